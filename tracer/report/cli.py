"""`ophamin-trace report` and `ophamin-trace drift`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import click

from ..errors import TraceError
from ..otlpjson import OtlpJsonError, Span, read_spans
from .chrome import write_chrome_trace
from .cycles import build_cycles, pick_cycle
from .drift import drift, format_drift
from .html import render_html
from .verdict import parity_verdict


def load(path: str) -> List[Span]:
    """Spans of an OTLP-JSON lines file, with user-facing errors as TraceError."""
    try:
        return read_spans(path)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a span file") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file (OTLP-JSON lines expected)") from None
    except OtlpJsonError as e:
        raise TraceError(str(e)) from None


def write_report(spans_path: str, out_dir: Optional[str] = None, fmt: str = "html",
                 hooks_path: Optional[str] = None, cycle: Optional[int] = None) -> Path:
    """Write the HTML report (or Chrome trace) for a span file; returns the written path.

    The output lands in `out_dir` (default: beside the span file) as `<stem>.report.html`
    or `<stem>.trace.json`.
    """
    spans = load(spans_path)
    stem = Path(spans_path).name
    for suffix in (".jsonl", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    out = Path(out_dir) if out_dir else Path(spans_path).resolve().parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TraceError(f"cannot create output directory {out}: {e.strerror}") from None
    try:
        if fmt == "chrome":
            if hooks_path or cycle is not None:
                raise TraceError("--hooks and --cycle apply to the HTML report, not to --format chrome")
            path = out / f"{stem}.trace.json"
            write_chrome_trace(spans, str(path))
            return path
        initial = pick_cycle(build_cycles(spans), cycle)
        verdict = None
        if hooks_path:
            verdict = parity_verdict(load(hooks_path), spans, os.path.basename(hooks_path))
        path = out / f"{stem}.report.html"
        path.write_text(render_html(spans, spans_path, initial, verdict), encoding="utf-8")
        return path
    except OSError as e:
        raise TraceError(f"cannot write report in {out}: {e.strerror}") from None


@click.command("report")
@click.argument("spans_path", metavar="SPANS.jsonl", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", metavar="DIR", help="Output directory (default: beside SPANS.jsonl).")
@click.option("--format", "fmt", type=click.Choice(["html", "chrome"]), default="html", show_default=True,
              help="html: self-contained waterfall page; chrome: Chrome trace / Perfetto JSON.")
@click.option("--hooks", "hooks_path", metavar="HOOKS.jsonl",
              help="In-process emitter spans: adds the parity verdict to the HTML report.")
@click.option("--cycle", type=int, default=None, metavar="N",
              help="Cycle shown first (0-based, in time order); the page has a selector for the rest.")
def report(spans_path: str, out_dir: Optional[str], fmt: str, hooks_path: Optional[str],
           cycle: Optional[int]) -> None:
    """Write a report people can look at: an HTML waterfall or a Chrome trace.

    The HTML file is self-contained (no network): a waterfall per cycle (spans named
    takwin.cycle are cycle roots; otherwise each root span is one), span events as
    markers, on-CPU/run-queue/blocked bands when the spans carry scheduler data, a GPU
    track when they carry GPU samples, and a per-step table. The last line printed is
    the written path.

    \b
    Examples:
      ophamin-trace report spans.jsonl
      ophamin-trace report spans.jsonl --out reports/ --cycle 3
      ophamin-trace report ebpf.jsonl --hooks hooks.jsonl
      ophamin-trace report spans.jsonl --format chrome   # open in ui.perfetto.dev
    """
    path = write_report(spans_path, out_dir, fmt, hooks_path, cycle)
    click.echo(str(path))


@click.command("drift")
@click.argument("base_path", metavar="BASE.jsonl", type=click.Path(dir_okay=False))
@click.argument("new_path", metavar="NEW.jsonl", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--min-effect", type=float, default=0.10, show_default=True,
              help="Smallest relative growth of the median that counts as a regression.")
@click.option("--alpha", type=float, default=0.01, show_default=True,
              help="Significance level of the Mann-Whitney U test.")
def drift_cmd(base_path: str, new_path: str, as_json: bool, min_effect: float, alpha: float) -> None:
    """Compare per-step timings of two runs; exit 1 when a step regressed.

    Per span name: median and p90 of both runs, their relative change, and a two-sided
    Mann-Whitney U test (rank based, fit for skewed timings). A step is a regression when
    the test is significant (p < --alpha) AND its median grew by more than --min-effect.
    Exit status: 0 no regression, 1 regression flagged, 2 bad input.

    \b
    Examples:
      ophamin-trace drift base.jsonl new.jsonl
      ophamin-trace drift base.jsonl new.jsonl --json
      ophamin-trace drift base.jsonl new.jsonl --min-effect 0.25 --alpha 0.001
    """
    if not 0 < alpha < 1:
        raise TraceError(f"--alpha must be between 0 and 1, got {alpha}")
    if min_effect < 0:
        raise TraceError(f"--min-effect must be >= 0, got {min_effect}")
    base, new = load(base_path), load(new_path)
    if not base:
        raise TraceError(f"{base_path}: holds no spans")
    if not new:
        raise TraceError(f"{new_path}: holds no spans")
    result = drift(base, new, alpha=alpha, min_effect=min_effect)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(format_drift(result))
    if result.regressions:
        sys.exit(1)
