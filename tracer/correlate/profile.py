"""Per-cycle resource profile, Ophamin-compatible, from spans carrying `ophamin.*` attributes.

Ophamin's batch profile apportions a batch's CPU time across cycles by wall time
(`attribution_kind="batch_averaged"`). Here every cycle's CPU and RSS peak are measured by
the kernel while that cycle's span ran (`attribution_kind="per_cycle"`): the cycle thread's
own on-CPU time from its entry/exit snapshots, plus what the process's other threads ran
in the same window, each also reported on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from ..errors import TraceError
from ..otlpjson import OtlpJsonError, Span, read_spans
from ..report.stats import span_stats
from .sched import (
    A_BLOCKED,
    A_CPUS,
    A_INVOLUNTARY,
    A_MIGRATIONS,
    A_ON_CPU,
    A_OTHER_ON_CPU,
    A_PAGE_FAULTS,
    A_RSS_END,
    A_RSS_PEAK,
    A_RSS_START,
    A_RUN_QUEUE,
    A_VOLUNTARY,
)

CYCLE_SPAN = "takwin.cycle"
NS = 1e9


@dataclass(frozen=True)
class CycleProfile:
    """One cycle, measured. CPU/RSS fields are None when the span carries no kernel data;
    `unavailable` then says why."""

    cycle_index: int
    span_name: str
    span_id: str
    thread_id: Optional[int]
    wall_seconds: float
    cpu_seconds: Optional[float]  # thread_cpu_seconds + other_threads_cpu_seconds
    thread_cpu_seconds: Optional[float]
    other_threads_cpu_seconds: Optional[float]
    run_queue_seconds: Optional[float]
    blocked_seconds: Optional[float]
    voluntary_switches: Optional[int]
    involuntary_switches: Optional[int]
    migrations: Optional[int]
    cpus: Tuple[int, ...]
    page_faults: Optional[int]
    rss_start_bytes: Optional[int]
    rss_end_bytes: Optional[int]
    rss_peak_bytes: Optional[int]
    unavailable: str = ""

    @property
    def rss_growth_bytes(self) -> Optional[int]:
        if self.rss_start_bytes is None or self.rss_end_bytes is None:
            return None
        return self.rss_end_bytes - self.rss_start_bytes

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["cpus"] = list(self.cpus)
        d["rss_growth_bytes"] = self.rss_growth_bytes
        return d


@dataclass(frozen=True)
class StepTiming:
    name: str
    count: int
    median_seconds: float
    p10_seconds: float
    p90_seconds: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ResourceProfile:
    """A batch of cycles: what Ophamin's resource profile reads."""

    cycles: Tuple[CycleProfile, ...]
    per_step_timing: Tuple[StepTiming, ...]
    attribution_kind: str = "per_cycle"

    def totals(self) -> Dict[str, Any]:
        measured = [c for c in self.cycles if c.cpu_seconds is not None]
        return {
            "cycles": len(self.cycles),
            "measured_cycles": len(measured),
            "wall_seconds": sum(c.wall_seconds for c in self.cycles),
            "cpu_seconds": sum(c.cpu_seconds or 0.0 for c in measured),
            "thread_cpu_seconds": sum(c.thread_cpu_seconds or 0.0 for c in measured),
            "other_threads_cpu_seconds": sum(c.other_threads_cpu_seconds or 0.0 for c in measured),
            "rss_peak_bytes": max((c.rss_peak_bytes or 0 for c in measured), default=None),
        }

    def to_dict(self) -> dict:
        return {
            "attribution_kind": self.attribution_kind,
            "cycles": [c.to_dict() for c in self.cycles],
            "per_step_timing": {s.name: s.to_dict() for s in self.per_step_timing},
            "totals": self.totals(),
        }


def _cycle_roots(spans: Sequence[Span]) -> List[Span]:
    named = [s for s in spans if s.name == CYCLE_SPAN]
    if named:
        return named
    # Not a Takwin trace: every root span (no parent, or parent not in the file) is a cycle.
    ids = {(s.trace_id, s.span_id) for s in spans}
    return [s for s in spans if not s.parent_span_id or (s.trace_id, s.parent_span_id) not in ids]


def _descendants(spans: Sequence[Span], roots: Sequence[Span]) -> List[Span]:
    children: Dict[Tuple[str, str], List[Span]] = {}
    for s in spans:
        if s.parent_span_id:
            children.setdefault((s.trace_id, s.parent_span_id), []).append(s)
    out: List[Span] = []
    stack = list(roots)
    while stack:
        s = stack.pop()
        for c in children.get((s.trace_id, s.span_id), ()):
            out.append(c)
            stack.append(c)
    return out


def cycle_profile(span: Span, ordinal: int) -> CycleProfile:
    a = span.attributes
    idx = a.get("cycle.index")
    cycle_index = int(idx) if idx is not None else ordinal
    wall = span.duration_ns / NS
    if A_ON_CPU not in a:
        return CycleProfile(
            cycle_index=cycle_index, span_name=span.name, span_id=span.span_id,
            thread_id=span.thread_id, wall_seconds=wall, cpu_seconds=None, thread_cpu_seconds=None,
            other_threads_cpu_seconds=None, run_queue_seconds=None, blocked_seconds=None,
            voluntary_switches=None, involuntary_switches=None, migrations=None, cpus=(),
            page_faults=None, rss_start_bytes=None, rss_end_bytes=None, rss_peak_bytes=None,
            unavailable=f"span {span.name} carries no {A_ON_CPU} (traced without the scheduler programs)",
        )
    own = int(a[A_ON_CPU])
    other = int(a.get(A_OTHER_ON_CPU, 0))

    def opt(key: str) -> Optional[int]:
        return int(a[key]) if key in a else None

    return CycleProfile(
        cycle_index=cycle_index, span_name=span.name, span_id=span.span_id, thread_id=span.thread_id,
        wall_seconds=wall,
        cpu_seconds=(own + other) / NS,
        thread_cpu_seconds=own / NS,
        other_threads_cpu_seconds=other / NS,
        run_queue_seconds=int(a.get(A_RUN_QUEUE, 0)) / NS,
        blocked_seconds=int(a.get(A_BLOCKED, 0)) / NS,
        voluntary_switches=opt(A_VOLUNTARY), involuntary_switches=opt(A_INVOLUNTARY),
        migrations=opt(A_MIGRATIONS),
        cpus=tuple(int(c) for c in a.get(A_CPUS, ()) or ()),
        page_faults=opt(A_PAGE_FAULTS),
        rss_start_bytes=opt(A_RSS_START), rss_end_bytes=opt(A_RSS_END), rss_peak_bytes=opt(A_RSS_PEAK),
    )


def build_profile(spans: Sequence[Span]) -> ResourceProfile:
    """The per-cycle profile of a trace: one entry per cycle span, in start order."""
    roots = sorted(_cycle_roots(spans), key=lambda s: s.start_ns)
    cycles = tuple(cycle_profile(s, i) for i, s in enumerate(roots))
    steps = tuple(
        StepTiming(st.name, st.count, st.median_ns / NS, st.p10_ns / NS, st.p90_ns / NS)
        for st in span_stats(_descendants(spans, roots))
    )
    return ResourceProfile(cycles=cycles, per_step_timing=steps)


@click.command("profile")
@click.argument("spans_file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="write the JSON here (default: stdout)")
def profile_command(spans_file: str, output: Optional[str]) -> None:
    """Per-cycle resource profile (JSON) from a trace carrying kernel attributes.

    Cycles are `takwin.cycle` spans, or every root span in other traces. CPU and RSS peak
    are measured per cycle by the scheduler programs (attribution_kind "per_cycle").

    \b
    Examples:
      ophamin-trace profile spans.jsonl
      ophamin-trace profile spans.jsonl --output profile.json
    """
    try:
        spans = read_spans(spans_file)
    except OSError as e:
        raise TraceError(f"cannot read {spans_file}: {e.strerror}") from e
    except OtlpJsonError as e:
        raise TraceError(str(e)) from e
    if not spans:
        raise TraceError(f"{spans_file} holds no spans")
    text = json.dumps(build_profile(spans).to_dict(), indent=2)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    else:
        click.echo(text)
