"""Step 1's primitive: the Gyroscopic Water Fortress screen (stand-in for
kimera_swm.domain.security.gyroscopic_water_fortress.gwf_protocol:GWFProtocol)."""

from __future__ import annotations

import math
from operator import mul, sub
from typing import Any, Sequence, Tuple

from ..emitter import NoOpEmitter

FEATURES = 16

# Intent anchors: fixed direction vectors in feature space; the screen reports the closest.
ANCHORS: Tuple[Tuple[str, Tuple[int, ...]], ...] = (
    ("inquiry", (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3)),
    ("instruction", (2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5)),
    ("narrative", (1, 4, 1, 4, 2, 1, 3, 5, 6, 2, 3, 7, 3, 0, 9, 5)),
    ("reflection", (1, 7, 3, 2, 0, 5, 0, 8, 0, 7, 5, 6, 8, 8, 7, 7)),
    ("intrusion", (9, 0, 0, 9, 0, 0, 9, 0, 0, 9, 0, 0, 9, 0, 0, 9)),
    ("noise", (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)),
)


def features_of(stimulus: str) -> Tuple[int, ...]:
    counts = [0] * FEATURES
    for ch in stimulus:
        counts[ord(ch) % FEATURES] += 1
    return tuple(counts)


class GWFProtocol:
    def __init__(self, emitter: Any = None) -> None:
        self._emitter = emitter if emitter is not None else NoOpEmitter()
        self.last_verdict = ""
        self.screens = 0

    def screen_input(self, features: Sequence[int], baseline: Sequence[int]) -> str:
        """Verdict "pass", "quarantine" or "block" for one input's features."""
        top_anchor, top_score = "", -1.0
        for name, direction in ANCHORS:
            score = self._cosine(features, direction)
            if score > top_score:
                top_anchor, top_score = name, score
        drift = self._drift(features, baseline)
        if top_anchor == "intrusion" and drift > 0.5:
            verdict = "block"
        elif drift > 0.8:
            verdict = "quarantine"
        else:
            verdict = "pass"
        self._record_screen(verdict, top_anchor, round(top_score, 6))
        return verdict

    def _record_screen(self, verdict: str, intent_top_anchor: str, intent_top_score: float) -> None:
        self.last_verdict = verdict
        self.screens += 1
        self._emitter.event("gwf.screen", attributes={
            "verdict": verdict, "intent_top_anchor": intent_top_anchor,
            "intent_top_score": intent_top_score,
        })

    @staticmethod
    def _cosine(a: Sequence[int], b: Sequence[int]) -> float:
        dot = sum(map(mul, a, b))
        na = math.sqrt(sum(map(mul, a, a)))
        nb = math.sqrt(sum(map(mul, b, b)))
        return dot / (na * nb) if na and nb else 0.0

    @staticmethod
    def _drift(features: Sequence[int], baseline: Sequence[int]) -> float:
        total = sum(features)
        if not total:
            return 0.0
        return sum(map(abs, map(sub, features, baseline))) / float(total)
