"""Every call of each spec function, counted and timed in the kernel (bpf/capture.c `call_stats`).

The ring buffer carries two events per call to user space, and a reader in Python cannot keep
up with a target making hundreds of thousands of target calls a second: then spans are dropped
(counted). These figures do not travel through the ring. The exit probe adds each ended call to
its function's per-CPU record, so the count, error count, total and maximum duration are exact
whatever the ring lost, and quantiles come from a log-linear histogram (4 buckets per power of
two: a reported quantile is its bucket's midpoint, within 12.5 % of the true value).

`started` counts calls as they begin (a resume after yield/await is not one), `calls` those that
ended. A call that began before attach is in neither (its start is unknown); one still running at
detach is started, not ended: both are in the span losses (cut at attach / at detach) too.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from ..spec import Spec

SUB = 4  # histogram buckets per power of two (bpf/capture.c bucket())


def bucket_bounds(b: int) -> tuple[int, int]:
    """[low, high) in ns of histogram bucket `b`."""
    if b < SUB:
        return b, b + 1
    shift = b // SUB - 1
    sub = b % SUB
    return (SUB + sub) << shift, (SUB + sub + 1) << shift


def _quantile(hist: tuple[int, ...], q: float) -> float:
    n = sum(hist)
    want = q * n
    seen = 0
    for b, c in enumerate(hist):
        seen += c
        if c and seen >= want:
            lo, hi = bucket_bounds(b)
            return (lo + hi) / 2
    return 0.0


@dataclass(frozen=True)
class CallStats:
    name: str
    started: int  # calls that began since attach (a resume after yield/await is not one)
    calls: int  # calls begun since attach that ended, each timed
    errors: int  # ended by an exception
    total_ns: int
    max_ns: int
    hist: tuple[int, ...]  # calls per bucket_bounds(b)

    def quantile_ns(self, q: float) -> float:
        return _quantile(self.hist, q)

    def to_dict(self) -> dict:
        return {"name": self.name, "started": self.started, "calls": self.calls, "errors": self.errors,
                "total_ns": self.total_ns, "mean_ns": self.total_ns / self.calls if self.calls else None,
                "max_ns": self.max_ns,
                **{f"p{int(q * 100)}_ns": self.quantile_ns(q) if self.calls else None for q in (0.5, 0.9, 0.99)}}


def read_call_stats(bpf, spec: Spec) -> list[CallStats]:
    """The kernel's `call_stats`, summed over CPUs, per span and event target of `spec` (by name:
    targets sharing a name are one row), in spec order, functions never called included."""
    table = bpf[b"call_stats"]
    by_name: dict[str, list] = {}  # name -> the per-CPU records of its targets
    for t in spec.targets:
        by_name.setdefault(t.name, []).extend(table[ctypes.c_int(t.target_id)])
    return [CallStats(name, sum(r.started for r in rs), sum(r.calls for r in rs), sum(r.errors for r in rs),
                      sum(r.total_ns for r in rs), max(r.max_ns for r in rs),
                      tuple(map(sum, zip(*(r.hist for r in rs))))) for name, rs in by_name.items()]


def calls_summary(stats: list[CallStats]) -> dict:
    return {"status": "ok", "source": "kernel (every call, independent of ring-buffer loss)",
            "functions": [s.to_dict() for s in stats]}


def calls_unavailable(reason: str) -> dict:
    return {"status": "unavailable", "reason": reason}
