"""Dissonance between concepts met along one traversal."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from ..emitter import NoOpEmitter


class DissonanceMonitor:
    def __init__(self, emitter: Any = None, threshold: float = 0.3, per_check: int = 3) -> None:
        self._emitter = emitter if emitter is not None else NoOpEmitter()
        self._threshold = threshold
        self._per_check = per_check
        self.history: List[Tuple[str, str, str, float]] = []

    def check(self, concepts: Sequence[Tuple[str, float]]) -> int:
        """Record up to `per_check` dissonances between consecutive (concept, value) pairs."""
        found = 0
        for (a, va), (b, vb) in zip(concepts, concepts[1:]):
            if found >= self._per_check:
                break
            gap = abs(va - vb)
            if a == b or gap <= self._threshold:
                continue
            kind = "contradiction" if gap > 0.6 else "tension"
            self.record(a, b, kind, round(gap, 6))
            found += 1
        return found

    def record(self, concept_a: str, concept_b: str, dissonance_type: str, score: float) -> None:
        self.history.append((concept_a, concept_b, dissonance_type, score))
        if len(self.history) > 256:
            del self.history[:128]
        self._emitter.event("dissonance.event", attributes={
            "concept_a": concept_a, "concept_b": concept_b,
            "dissonance_type": dissonance_type, "score": score,
        })
