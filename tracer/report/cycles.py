"""Group spans into cycles: the unit a person reads in a waterfall.

A Takwin trace has one `takwin.cycle` span per cycle and every step below it. Any other
trace has no such name, so each root span (no parent, or a parent missing from the file)
stands for a cycle of its own.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..otlpjson import Span

CYCLE_SPAN = "takwin.cycle"

SpanKey = Tuple[str, str]  # (trace_id, span_id): span ids are only unique within a trace


@dataclass(frozen=True)
class Cycle:
    """One cycle: its root span and every descendant, depth-first, children by start time."""

    ordinal: int  # 0-based position in time order: what `--cycle N` selects
    root: Span
    spans: Tuple[Span, ...]
    depths: Tuple[int, ...]

    @property
    def label(self) -> str:
        idx = self.root.attributes.get("cycle.index")
        if self.root.name == CYCLE_SPAN and idx is not None:
            return f"cycle {idx}"
        return f"#{self.ordinal} {self.root.name}"

    def to_dict(self) -> dict:
        return {
            "ordinal": self.ordinal, "label": self.label, "root_span_id": self.root.span_id,
            "spans": [s.span_id for s in self.spans], "depths": list(self.depths),
        }


def _key(s: Span) -> SpanKey:
    return (s.trace_id, s.span_id)


def build_cycles(spans: Iterable[Span]) -> List[Cycle]:
    """Cycles in start-time order. Spans outside every cycle are left out (see `uncovered`)."""
    spans = list(spans)
    by_key: Dict[SpanKey, Span] = {_key(s): s for s in spans}
    children: Dict[SpanKey, List[Span]] = defaultdict(list)
    for s in spans:
        if s.parent_span_id:
            children[(s.trace_id, s.parent_span_id)].append(s)
    for kids in children.values():
        kids.sort(key=lambda s: (s.start_ns, -s.end_ns))

    roots = [s for s in spans if s.name == CYCLE_SPAN]
    if not roots:
        roots = [s for s in spans
                 if not s.parent_span_id or (s.trace_id, s.parent_span_id) not in by_key]
    roots.sort(key=lambda s: (s.start_ns, -s.end_ns))

    cycles = []
    for ordinal, root in enumerate(roots):
        order: List[Span] = []
        depths: List[int] = []
        seen = set()
        stack = [(root, 0)]
        while stack:
            s, d = stack.pop()
            # A malformed file can make a parent loop; a span is drawn once.
            if _key(s) in seen:
                continue
            seen.add(_key(s))
            order.append(s)
            depths.append(d)
            stack.extend((k, d + 1) for k in reversed(children.get(_key(s), [])))
        cycles.append(Cycle(ordinal, root, tuple(order), tuple(depths)))
    return cycles


def uncovered(spans: Sequence[Span], cycles: Sequence[Cycle]) -> int:
    """How many spans belong to no cycle (e.g. set-up work before the first Takwin cycle)."""
    covered = {_key(s) for c in cycles for s in c.spans}
    return sum(1 for s in spans if _key(s) not in covered)


def pick_cycle(cycles: Sequence[Cycle], ordinal: Optional[int]) -> int:
    """Validate a `--cycle` choice; returns the ordinal to show first."""
    from ..errors import TraceError

    if ordinal is None:
        return 0
    if not cycles:
        raise TraceError("--cycle given but the file holds no cycles")
    if not 0 <= ordinal < len(cycles):
        raise TraceError(f"--cycle {ordinal} is out of range: the file holds cycles 0..{len(cycles) - 1}")
    return ordinal
