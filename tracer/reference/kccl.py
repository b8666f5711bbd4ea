"""KCCL: the consolidation cycle. Every `period` cycles it pulses through its phases."""

from __future__ import annotations

from typing import Any, Sequence

from ..emitter import NoOpEmitter
from ._common import MODULUS

PHASES = ("K0_accumulate", "K1_consolidate", "K2_crystallize")


class KCCL:
    def __init__(self, emitter: Any = None, period: int = 5) -> None:
        self._emitter = emitter if emitter is not None else NoOpEmitter()
        self.period = period
        self.phase = PHASES[0]
        self.pulses = 0

    def due(self, cycle_index: int) -> bool:
        return (cycle_index + 1) % self.period == 0

    def pulse(self, encodings: Sequence[Sequence[int]]) -> int:
        """Consolidate the recent encodings into one crystal (an int); three phase transitions."""
        self.transition(PHASES[0], PHASES[1])
        merged = [0] * (len(encodings[0]) if encodings else 0)
        for enc in encodings:
            merged = [(m * 31 + e) % MODULUS for m, e in zip(merged, enc)]
        self.transition(PHASES[1], PHASES[2])
        crystal = 0
        for m in merged:
            crystal = (crystal * 131 + m) % (1 << 61)
        self.transition(PHASES[2], PHASES[0])
        self.pulses += 1
        return crystal

    def transition(self, from_phase: str, to_phase: str) -> None:
        self.phase = to_phase
        self._emitter.event("kccl.phase_transition", attributes={
            "from_phase": from_phase, "to_phase": to_phase,
        })
