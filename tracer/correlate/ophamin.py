"""The per-cycle resource profile in Ophamin's own shape (`BatchResourceProfile`,
`CycleResourceProfile`), filled from a trace instead of psutil bracket samples.

Field names and meanings follow Ophamin's `ophamin.instrumenting.resource_metrics` (public
source); `attribution_kind` is "per_cycle" because every cycle's figures are what the
kernel measured while that cycle's span ran (see profile.py), not a batch average shared
out by wall time. `per_step_timing` is the field Ophamin's Kimera telemetry proposal adds
to `BatchResourceProfile` (median / p10 / p90 per step).

What a trace cannot give is None, never a made-up number, and `unavailable` says why per
field: the scheduler tracepoints account on-CPU time without splitting user from system
time; the thread count is not sampled; without the scheduler programs (`--sched`) no CPU,
RSS or page-fault figure exists at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from ..otlpjson import Span
from .profile import ResourceProfile, build_profile

CPU_SOURCE = "ebpf_sched_per_cycle"  # Ophamin's cpu_source names where the CPU figures came from


@dataclass(frozen=True)
class CycleResourceProfile:
    cycle_index: int
    wall_time_s: float
    cpu_time_attributed_s: Optional[float]
    rss_peak_bytes_attributed: Optional[int]
    page_faults_attributed: Optional[int]
    attribution_kind: str = "per_cycle"

    def to_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class BatchResourceProfile:
    n_cycles: int
    batch_wall_time_s: float
    batch_cpu_time_user_s: Optional[float]
    batch_cpu_time_system_s: Optional[float]
    batch_page_faults: Optional[int]
    rss_bytes_before: Optional[int]
    rss_bytes_after: Optional[int]
    rss_bytes_peak: Optional[int]
    num_threads_max: Optional[int]
    process_count_max: int
    attribution_kind: str
    cpu_source: str
    sampler_polls: int = 0
    per_cycle: Tuple[CycleResourceProfile, ...] = ()
    per_step_timing: Dict[str, Dict[str, float]] = field(default_factory=dict)
    batch_cpu_time_total_s: Optional[float] = None  # measured whole (user+system are not split)
    unavailable: Dict[str, str] = field(default_factory=dict)  # field -> why it is None

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["per_cycle"] = [c.to_dict() for c in self.per_cycle]
        d["per_step_timing"] = {k: dict(v) for k, v in self.per_step_timing.items()}
        d["unavailable"] = dict(self.unavailable)
        return d


def _sum(values: Sequence[Optional[float]]) -> Optional[float]:
    return None if not values or any(v is None for v in values) else sum(v for v in values if v is not None)


def ophamin_profile(spans: Sequence[Span], *, sched_reason: str = "",
                    resource: Optional[ResourceProfile] = None) -> BatchResourceProfile:
    """Ophamin's batch profile of one process's trace. `sched_reason` says why the trace
    carries no scheduler attributes when it does not (it is reported, not guessed)."""
    prof = resource or build_profile(spans)
    cycles = prof.cycles
    roots = sorted((s for s in spans if s.span_id in {c.span_id for c in cycles}), key=lambda s: s.start_ns)
    per_cycle = tuple(CycleResourceProfile(c.cycle_index, c.wall_seconds, c.cpu_seconds, c.rss_peak_bytes,
                                           c.page_faults) for c in cycles)
    measured = bool(cycles) and all(c.cpu_seconds is not None for c in cycles)
    unavailable: Dict[str, str] = {}
    no_kernel = sched_reason or next((c.unavailable for c in cycles if c.unavailable), "")
    if not measured:
        why = no_kernel or "no cycles were traced"
        for k in ("batch_cpu_time_total_s", "batch_page_faults", "rss_bytes_before", "rss_bytes_after",
                  "rss_bytes_peak", "per_cycle.cpu_time_attributed_s", "per_cycle.rss_peak_bytes_attributed",
                  "per_cycle.page_faults_attributed"):
            unavailable[k] = why
    split = "the scheduler tracepoints account on-CPU time whole, not split into user and system time"
    unavailable["batch_cpu_time_user_s"] = split
    unavailable["batch_cpu_time_system_s"] = split
    unavailable["num_threads_max"] = "thread counts are not sampled by the tracer"
    rss_peaks = [c.rss_peak_bytes for c in cycles]
    return BatchResourceProfile(
        n_cycles=len(cycles),
        batch_wall_time_s=(max(s.end_ns for s in roots) - roots[0].start_ns) / 1e9 if roots else 0.0,
        batch_cpu_time_user_s=None,
        batch_cpu_time_system_s=None,
        batch_page_faults=_sum([c.page_faults for c in cycles]) if measured else None,  # type: ignore[arg-type]
        rss_bytes_before=cycles[0].rss_start_bytes if measured else None,
        rss_bytes_after=cycles[-1].rss_end_bytes if measured else None,
        rss_bytes_peak=max(rss_peaks) if measured and all(r is not None for r in rss_peaks) else None,  # type: ignore[type-var]
        num_threads_max=None,
        process_count_max=len({s.resource.get("process.pid") for s in roots}) if roots else 0,
        attribution_kind=prof.attribution_kind,
        cpu_source=CPU_SOURCE if measured else "unavailable",
        per_cycle=per_cycle,
        per_step_timing={s.name: {"median_ms": s.median_seconds * 1e3, "p10_ms": s.p10_seconds * 1e3,
                                  "p90_ms": s.p90_seconds * 1e3, "count": s.count} for s in prof.per_step_timing},
        batch_cpu_time_total_s=_sum([c.cpu_seconds for c in cycles]) if measured else None,
        unavailable=unavailable,
    )
