"""The parity verdict shown in the HTML report when a hooks file is given.

Parity itself lives in `tracer.compare.parity` (its own issue); this module is the one seam
the report uses to reach it, so a change of its API is fixed here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from ..otlpjson import Span


@dataclass(frozen=True)
class ParityVerdict:
    available: bool
    passed: Optional[bool]  # None when unavailable
    summary: str  # one line for the report
    detail: str  # the plain-text table `ophamin-trace parity` prints, shown folded

    def to_dict(self) -> dict:
        return asdict(self)


def _share(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def parity_verdict(hooks: Sequence[Span], ebpf: Sequence[Span], hooks_label: str) -> ParityVerdict:
    """Parity of the eBPF spans against the emitter's spans, with default thresholds."""
    try:
        from ..compare.parity import compare
    except ImportError as e:
        why = f"parity unavailable: tracer.compare.parity is not importable ({e})"
        return ParityVerdict(False, None, why, "")
    r = compare(hooks, ebpf)
    o = r.overall
    p99 = max((d.p99_abs_us for d in (o.timing.start, o.timing.end) if d.p99_abs_us is not None),
              default=None)
    timing = "n/a" if p99 is None else f"{p99:.1f} µs"
    summary = (f"parity {r.verdict} against {hooks_label}: recall {_share(o.recall)}, "
               f"precision {_share(o.precision)}, {o.matched} of {o.hooks} hooks spans matched, "
               f"p99 |Δ| start/end {timing}, {o.reparented} re-parented")
    return ParityVerdict(True, bool(r.passed), summary, r.format())
