"""`ophamin-trace parity`: compare an eBPF span file with the emitter's span file."""

from __future__ import annotations

import json
from typing import List, Optional

import click

from ..errors import TraceError
from ..otlpjson import OtlpJsonError, Span, read_spans
from .parity import Thresholds, compare, format_report


def load(path: str, what: str) -> List[Span]:
    """read_spans, with every way a file can be unreadable turned into one line."""
    try:
        return read_spans(path)
    except OtlpJsonError as e:
        raise TraceError(f"{what} file: {e}") from None
    except UnicodeDecodeError as e:
        raise TraceError(f"{what} file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TraceError(f"{what} file {path}: {e.strerror or e}") from None


def parse_names(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise TraceError("--names: no span names given")
    return names


@click.command("parity")
@click.option("--hooks", "hooks_path", required=True, metavar="HOOKS.jsonl",
              help="OTLP-JSON spans written in-process by the emitter (the reference).")
@click.option("--ebpf", "ebpf_path", required=True, metavar="EBPF.jsonl",
              help="OTLP-JSON spans written by the eBPF tracer for the same run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--max-p99-us", type=float, default=50.0, show_default=True,
              help="Largest p99 |Δ| of span starts and of span ends after the clock-offset fit, "
                   "overall and per span name.")
@click.option("--max-abs-us", type=float, default=None,
              help="Also fail when any single start or end differs by more than this (off by default).")
@click.option("--min-recall", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Smallest share of hooks spans (per name) and events the eBPF file must match.")
@click.option("--min-precision", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="Smallest share of eBPF spans (per name) and events that must match a hooks one.")
@click.option("--names", default=None, metavar="NAME,NAME,...",
              help="Compare only these span names (default: every name in the hooks file).")
def parity(hooks_path: str, ebpf_path: str, as_json: bool, max_p99_us: float,
           max_abs_us: Optional[float], min_recall: float, min_precision: float,
           names: Optional[str]) -> None:
    """Check eBPF spans against the in-process emitter's spans of the same run.

    Spans are matched by name, thread and order (not by id) after fitting one clock
    offset; reported per span name: recall, precision, parent/child structure, start,
    end and duration differences (median, p99, max in µs) and event attribute agreement
    (see docs/parity.md). Exit status: 0 within thresholds, 1 outside them, 2 for unreadable input.

    \b
    Examples:
      ophamin-trace parity --hooks hooks.jsonl --ebpf ebpf.jsonl
      ophamin-trace parity --hooks hooks.jsonl --ebpf ebpf.jsonl --json > parity.json
      ophamin-trace parity --hooks h.jsonl --ebpf e.jsonl --max-p99-us 80 \\
          --names takwin.cycle,takwin.step2_encode,takwin.step3_step4_traverse
    """
    wanted = parse_names(names)
    hooks = load(hooks_path, "hooks")
    ebpf = load(ebpf_path, "ebpf")
    report = compare(hooks, ebpf, Thresholds(max_p99_us=max_p99_us, min_recall=min_recall,
                                             min_precision=min_precision, max_abs_us=max_abs_us),
                     names=wanted)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=repr))
    else:
        click.echo(format_report(report))
    click.get_current_context().exit(0 if report.passed else 1)
