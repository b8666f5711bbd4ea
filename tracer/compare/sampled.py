"""Parity for the sampled mode: stack-sampled spans against the in-process emitter's.

Sampled spans are estimates, so the questions differ from exact parity's: is every call
long enough to be sampled found (each emitter span of at least `min_ms` must overlap a
sampled span of its name on its thread); is the time per step right (the sum of a name's
durations, sampled over emitter, within `max_total_error`); how far off are the boundaries
(start and end differences of matched pairs, p50 and p99). Both sides stamp Unix time from
the same host clock, so no offset is fitted.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from ..otlpjson import Span
from ..report.stats import percentile

WINDOW_SLACK_NS = 50_000_000


@dataclass(frozen=True)
class StepParity:
    name: str
    emitter_spans: int  # of at least min_ms
    found: int  # of those, overlapped by a sampled span of the name on the same thread
    cycles_missing: int  # cycles (top-level emitter spans) in which one of them was not found
    emitter_total_ms: float
    sampled_total_ms: float  # over the matched sampled spans
    total_error: float  # sampled / emitter - 1
    start_error_ms: Tuple[float, float]  # |start difference|: p50, p99
    end_error_ms: Tuple[float, float]

    def to_dict(self) -> dict:
        return {"name": self.name, "emitter_spans": self.emitter_spans, "found": self.found,
                "cycles_missing": self.cycles_missing, "emitter_total_ms": self.emitter_total_ms,
                "sampled_total_ms": self.sampled_total_ms, "total_error": self.total_error,
                "start_error_ms": {"p50": self.start_error_ms[0], "p99": self.start_error_ms[1]},
                "end_error_ms": {"p50": self.end_error_ms[0], "p99": self.end_error_ms[1]}}


@dataclass(frozen=True)
class SampledParity:
    min_ms: float
    max_total_error: float
    cycles: int
    steps: Tuple[StepParity, ...]
    passed: bool

    def to_dict(self) -> dict:
        return {"min_ms": self.min_ms, "max_total_error": self.max_total_error, "cycles": self.cycles,
                "steps": [s.to_dict() for s in self.steps], "passed": self.passed}

    def format(self) -> str:
        lines = [f"sampled parity: {self.cycles} cycles; steps of >= {self.min_ms:g} ms; "
                 f"total time within {self.max_total_error:.0%}",
                 f"{'span':28s} {'found':>9s} {'emitter ms':>11s} {'sampled ms':>11s} {'error':>7s} "
                 f"{'start p50/p99 ms':>17s} {'end p50/p99 ms':>15s}"]
        for s in self.steps:
            lines.append(f"{s.name:28s} {s.found:>4d}/{s.emitter_spans:<4d} {s.emitter_total_ms:11.1f} "
                         f"{s.sampled_total_ms:11.1f} {s.total_error:+7.1%} "
                         f"{s.start_error_ms[0]:8.2f}/{s.start_error_ms[1]:<8.2f} "
                         f"{s.end_error_ms[0]:7.2f}/{s.end_error_ms[1]:<7.2f}")
        lines.append(f"verdict: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def _overlap(a: Span, b: Span) -> int:
    return min(a.end_ns, b.end_ns) - max(a.start_ns, b.start_ns)


def compare_sampled(hooks: Sequence[Span], sampled: Sequence[Span], min_ms: float = 20.0,
                    max_total_error: float = 0.05) -> SampledParity:
    by_key: Dict[Tuple[str, int], List[Span]] = defaultdict(list)
    for s in sampled:
        if s.attributes.get("ophamin.cut"):
            continue  # cut at attach or detach: its true boundary lies outside what was seen
        by_key[(s.name, s.thread_id or 0)].append(s)
    for v in by_key.values():
        v.sort(key=lambda s: s.start_ns)
    starts = {k: [s.start_ns for s in v] for k, v in by_key.items()}
    roots = sorted((h for h in hooks if not h.parent_span_id), key=lambda s: s.start_ns)
    root_of = {}
    for h in hooks:
        i = bisect.bisect_right([r.start_ns for r in roots], h.start_ns) - 1
        root_of[h.span_id] = i if i >= 0 and roots[i].end_ns >= h.end_ns else -1
    # The sampled window: emitter spans inside it are those sampling could see (a margin of
    # WINDOW_SLACK_NS: the outermost sampled boundaries are themselves estimates).
    lo = min((s.start_ns for s in sampled), default=0) - WINDOW_SLACK_NS
    hi = max((s.end_ns for s in sampled), default=0) + WINDOW_SLACK_NS
    per_name: Dict[str, List[Tuple[Span, Span | None]]] = defaultdict(list)
    for h in hooks:
        if h.duration_ns < min_ms * 1e6 or h.start_ns < lo or h.end_ns > hi:
            continue
        cands = by_key.get((h.name, h.thread_id or 0), [])
        i = bisect.bisect_left(starts.get((h.name, h.thread_id or 0), []), h.end_ns)
        best = max(cands[max(0, i - 3):i], key=lambda s: _overlap(h, s), default=None)
        per_name[h.name].append((h, best if best is not None and _overlap(h, best) > 0 else None))
    steps = []
    for name, pairs in sorted(per_name.items()):
        found = [(h, s) for h, s in pairs if s is not None]
        missing_cycles = {root_of.get(h.span_id, -1) for h, s in pairs if s is None}
        e_total = sum(h.duration_ns for h, _ in pairs) / 1e6
        s_total = sum(s.duration_ns for _, s in found) / 1e6
        d_start = sorted(abs(s.start_ns - h.start_ns) / 1e6 for h, s in found)
        d_end = sorted(abs(s.end_ns - h.end_ns) / 1e6 for h, s in found)
        steps.append(StepParity(
            name, len(pairs), len(found), len(missing_cycles), e_total, s_total,
            s_total / e_total - 1 if e_total else 0.0,
            (percentile(d_start, 50), percentile(d_start, 99)) if d_start else (0.0, 0.0),
            (percentile(d_end, 50), percentile(d_end, 99)) if d_end else (0.0, 0.0)))
    passed = bool(steps) and all(s.found == s.emitter_spans and abs(s.total_error) <= max_total_error
                                 for s in steps)
    cycles = sum(1 for r in roots if r.start_ns >= lo and r.end_ns <= hi)
    return SampledParity(min_ms, max_total_error, cycles, tuple(steps), passed)
