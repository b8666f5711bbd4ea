"""Per-cycle resource profile, Ophamin-compatible, from spans carrying `ophamin.*` attributes.

Ophamin's `BatchResourceProfile` apportions a batch's CPU time across cycles by wall time
(`attribution_kind="batch_averaged"`). Here every cycle's CPU and RSS peak are measured by
the kernel while that cycle's span ran (`attribution_kind="per_cycle"`): the cycle
thread's own on-CPU time from its entry/exit snapshots, plus what the process's other
threads ran in the same window, each also reported on its own.

This module is the one place that builds that profile. Field names follow Ophamin's
`CycleResourceProfile` / `BatchResourceProfile` (`to_dict()` output included); fields
Ophamin does not have are additions, listed in docs/correlation.md. A value that was not
measured is None, with the reason in `unavailable` / `cpu_source`, never a zero.
"""

from __future__ import annotations

import json
import statistics
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
    A_PROC_PAGE_FAULTS,
    A_RSS_END,
    A_RSS_PEAK,
    A_RSS_START,
    A_RUN_QUEUE,
    A_VOLUNTARY,
)

CYCLE_SPAN = "takwin.cycle"
ATTRIBUTION = "per_cycle"
CPU_SOURCE = "ebpf_sched"
NS = 1e9


@dataclass(frozen=True)
class CycleResourceProfile:
    """One cycle, measured. Ophamin's fields first; the rest are additions."""

    cycle_index: int
    wall_time_s: float
    cpu_time_attributed_s: Optional[float]  # the cycle thread + the process's other threads
    rss_peak_bytes_attributed: Optional[int]  # highest resident set while the cycle ran
    page_faults_attributed: Optional[int]  # user page faults of the process in the window
    attribution_kind: str
    # Additions: the parts and the context of the measurement.
    span_name: str = ""
    span_id: str = ""
    thread_id: Optional[int] = None
    thread_cpu_time_s: Optional[float] = None
    other_threads_cpu_time_s: Optional[float] = None
    run_queue_time_s: Optional[float] = None
    blocked_time_s: Optional[float] = None
    voluntary_switches: Optional[int] = None
    involuntary_switches: Optional[int] = None
    migrations: Optional[int] = None
    cpus: Tuple[int, ...] = ()
    thread_page_faults: Optional[int] = None
    rss_start_bytes: Optional[int] = None
    rss_end_bytes: Optional[int] = None
    unavailable: str = ""  # why the measured fields are None

    @property
    def rss_growth_bytes(self) -> Optional[int]:
        if self.rss_start_bytes is None or self.rss_end_bytes is None:
            return None
        return self.rss_end_bytes - self.rss_start_bytes

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["cpus"] = list(self.cpus)
        d["rss_growth_bytes"] = self.rss_growth_bytes
        return d


@dataclass(frozen=True)
class StepTiming:
    name: str
    count: int
    median_s: float
    p10_s: float
    p90_s: float

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CpuSplit:
    """User/system CPU of the process over the batch, when the caller measured it (the
    kernel's tick-sampled utime/stime, e.g. /proc/PID/stat before and after)."""

    user_s: float
    system_s: float


@dataclass(frozen=True)
class BatchResourceProfile:
    """A batch of cycles, with Ophamin's batch fields. Batch totals are sums over the
    cycles' windows (time between cycles is not in any cycle)."""

    n_cycles: int
    batch_wall_time_s: float  # first cycle start to last cycle end
    batch_cpu_time_user_s: Optional[float]
    batch_cpu_time_system_s: Optional[float]
    batch_page_faults: Optional[int]
    rss_bytes_before: Optional[int]
    rss_bytes_after: Optional[int]
    rss_bytes_peak: Optional[int]
    num_threads_max: Optional[int]  # not measured from spans
    process_count_max: int  # one traced process
    attribution_kind: str
    cpu_source: str
    sampler_polls: int = 0  # Ophamin's periodic sampler; none here
    per_cycle: Tuple[CycleResourceProfile, ...] = ()
    # Additions.
    batch_cpu_time_total_measured_s: Optional[float] = None
    measured_cycles: int = 0
    per_step_timing: Tuple[StepTiming, ...] = ()

    def _measured(self) -> List[CycleResourceProfile]:
        return [c for c in self.per_cycle if c.cpu_time_attributed_s is not None]

    def cycle_wall_distribution(self) -> Dict[str, float]:
        return dist_stats([c.wall_time_s for c in self.per_cycle])

    def cycle_cpu_distribution(self) -> Dict[str, float]:
        return dist_stats([c.cpu_time_attributed_s for c in self._measured()])

    def cycle_rss_distribution(self) -> Dict[str, float]:
        return dist_stats([float(c.rss_peak_bytes_attributed) for c in self._measured()
                           if c.rss_peak_bytes_attributed is not None])

    def to_dict(self) -> Dict[str, Any]:
        split = self.batch_cpu_time_user_s is not None and self.batch_cpu_time_system_s is not None
        return {
            "n_cycles": self.n_cycles,
            "batch_wall_time_s": self.batch_wall_time_s,
            "batch_cpu_time_user_s": self.batch_cpu_time_user_s,
            "batch_cpu_time_system_s": self.batch_cpu_time_system_s,
            "batch_cpu_time_total_s": (self.batch_cpu_time_user_s + self.batch_cpu_time_system_s) if split
            else self.batch_cpu_time_total_measured_s,
            "batch_page_faults": self.batch_page_faults,
            "rss_bytes_before": self.rss_bytes_before,
            "rss_bytes_after": self.rss_bytes_after,
            "rss_bytes_peak": self.rss_bytes_peak,
            "num_threads_max": self.num_threads_max,
            "process_count_max": self.process_count_max,
            "attribution_kind": self.attribution_kind,
            "cpu_source": self.cpu_source,
            "sampler_polls": self.sampler_polls,
            "cycle_wall_distribution": self.cycle_wall_distribution(),
            "cycle_cpu_distribution": self.cycle_cpu_distribution(),
            "cycle_rss_distribution": self.cycle_rss_distribution(),
            "per_cycle": [c.to_dict() for c in self.per_cycle],
            "batch_cpu_time_total_measured_s": self.batch_cpu_time_total_measured_s,
            "measured_cycles": self.measured_cycles,
            "per_step_timing": {s.name: s.to_dict() for s in self.per_step_timing},
        }


def dist_stats(values: Sequence[float]) -> Dict[str, float]:
    """n / min / max / median / mean / p10 / p90, with Ophamin's nearest-rank p10 and p90."""
    if not values:
        return {"n": 0, "min": 0.0, "max": 0.0, "median": 0.0, "mean": 0.0, "p10": 0.0, "p90": 0.0}
    v = sorted(float(x) for x in values)
    n = len(v)
    return {"n": n, "min": v[0], "max": v[-1], "median": float(statistics.median(v)),
            "mean": float(statistics.fmean(v)), "p10": v[max(0, int(n * 0.10) - 1)],
            "p90": v[min(n - 1, int(n * 0.90))]}


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


def cycle_profile(span: Span, ordinal: int) -> CycleResourceProfile:
    a = span.attributes
    idx = a.get("cycle.index")
    cycle_index = int(idx) if idx is not None else ordinal
    base = dict(cycle_index=cycle_index, wall_time_s=span.duration_ns / NS, attribution_kind=ATTRIBUTION,
                span_name=span.name, span_id=span.span_id, thread_id=span.thread_id)
    if A_ON_CPU not in a:
        return CycleResourceProfile(
            cpu_time_attributed_s=None, rss_peak_bytes_attributed=None, page_faults_attributed=None,
            unavailable=f"span {span.name} carries no {A_ON_CPU} (traced without the scheduler programs)",
            **base)

    def opt(key: str) -> Optional[int]:
        return int(a[key]) if key in a else None

    own, other = int(a[A_ON_CPU]), int(a.get(A_OTHER_ON_CPU, 0))
    return CycleResourceProfile(
        cpu_time_attributed_s=(own + other) / NS,
        rss_peak_bytes_attributed=opt(A_RSS_PEAK),
        page_faults_attributed=opt(A_PROC_PAGE_FAULTS),
        thread_cpu_time_s=own / NS,
        other_threads_cpu_time_s=other / NS,
        run_queue_time_s=int(a.get(A_RUN_QUEUE, 0)) / NS,
        blocked_time_s=int(a.get(A_BLOCKED, 0)) / NS,
        voluntary_switches=opt(A_VOLUNTARY), involuntary_switches=opt(A_INVOLUNTARY),
        migrations=opt(A_MIGRATIONS),
        cpus=tuple(int(c) for c in a.get(A_CPUS, ()) or ()),
        thread_page_faults=opt(A_PAGE_FAULTS),
        rss_start_bytes=opt(A_RSS_START), rss_end_bytes=opt(A_RSS_END),
        **base)


def build_profile(spans: Sequence[Span], cpu_split: Optional[CpuSplit] = None) -> BatchResourceProfile:
    """The per-cycle profile of a trace: one entry per cycle span, in start order."""
    roots = sorted(_cycle_roots(spans), key=lambda s: s.start_ns)
    cycles = tuple(cycle_profile(s, i) for i, s in enumerate(roots))
    steps = tuple(
        StepTiming(st.name, st.count, st.median_ns / NS, st.p10_ns / NS, st.p90_ns / NS)
        for st in span_stats(_descendants(spans, roots))
    )
    measured = [c for c in cycles if c.cpu_time_attributed_s is not None]
    faults = [c.page_faults_attributed for c in measured]
    peaks = [c.rss_peak_bytes_attributed for c in measured if c.rss_peak_bytes_attributed is not None]
    if cpu_split is not None:
        source = f"{CPU_SOURCE}; user/system split from the caller's process CPU times"
    else:
        source = f"{CPU_SOURCE}; user/system split not measured (batch_cpu_time_total_s is the measured sum)"
    return BatchResourceProfile(
        n_cycles=len(cycles),
        batch_wall_time_s=(max(s.end_ns for s in roots) - min(s.start_ns for s in roots)) / NS if roots else 0.0,
        batch_cpu_time_user_s=cpu_split.user_s if cpu_split else None,
        batch_cpu_time_system_s=cpu_split.system_s if cpu_split else None,
        batch_page_faults=sum(faults) if measured and None not in faults else None,
        rss_bytes_before=measured[0].rss_start_bytes if measured else None,
        rss_bytes_after=measured[-1].rss_end_bytes if measured else None,
        rss_bytes_peak=max(peaks) if peaks else None,
        num_threads_max=None,
        process_count_max=1,
        attribution_kind=ATTRIBUTION,
        cpu_source=source,
        per_cycle=cycles,
        batch_cpu_time_total_measured_s=sum(c.cpu_time_attributed_s for c in measured) if measured else None,
        measured_cycles=len(measured),
        per_step_timing=steps,
    )


def write_profile(spans: Sequence[Span], path: str, cpu_split: Optional[CpuSplit] = None) -> BatchResourceProfile:
    prof = build_profile(spans, cpu_split)
    try:
        with open(path, "w") as f:
            f.write(json.dumps(prof.to_dict(), indent=2) + "\n")
    except OSError as e:
        raise TraceError(f"cannot write {path}: {e.strerror}") from None
    return prof


@click.command("profile")
@click.argument("spans_file", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="write the JSON here (default: stdout)")
def profile_command(spans_file: str, output: Optional[str]) -> None:
    """Per-cycle resource profile (JSON) from a trace carrying kernel attributes.

    Cycles are `takwin.cycle` spans, or every root span in other traces. CPU and RSS peak
    are measured per cycle by the scheduler programs (attribution_kind "per_cycle").
    Field names follow Ophamin's BatchResourceProfile / CycleResourceProfile.

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
    if output:
        write_profile(spans, output)
    else:
        click.echo(json.dumps(build_profile(spans).to_dict(), indent=2))
