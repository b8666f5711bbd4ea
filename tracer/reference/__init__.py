"""The reference Takwin substrate: a faithful, deterministic stand-in for the private Kimera
substrate, to trace, demo, benchmark, and serve as the parity baseline (docs/reference.md).

Runs inside targets on CPython 3.9-3.13; imports nothing from `tracer` but the emitter and the
OTLP-JSON codec.
"""

from __future__ import annotations

from ._common import HAVE_NUMPY
from .takwin import OrchestratorResult, Takwin

__all__ = ["HAVE_NUMPY", "OrchestratorResult", "Takwin", "stimuli"]


def stimuli(seed: int, count: int) -> list:
    """The runner's stimuli: `count` ASCII sentences derived only from `seed`."""
    from ._common import SplitMix

    words = ("prime", "lattice", "water", "fortress", "walk", "scar", "vault", "render", "echo",
             "signal", "drift", "anchor", "thread", "weave", "resonance", "quiet", "storm", "map",
             "origin", "bridge", "mirror", "seed", "field", "pulse", "crystal", "river", "stone",
             "question", "answer", "why", "how", "when", "intrusion", "override", "ignore", "system")
    rng = SplitMix(seed ^ 0x5DEECE66D)
    out = []
    for _ in range(count):
        n = 4 + rng.below(24)
        text = " ".join(words[rng.below(len(words))] for _ in range(n))
        out.append(text[:1].upper() + text[1:] + ("?" if rng.below(3) == 0 else "."))
    return out
