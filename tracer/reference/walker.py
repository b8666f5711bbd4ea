"""Steps 3-4's primitive: a walk over a prime-labelled topology (stand-in for
kimera_swm.domain.cognitive.prime_topology_walker:PrimeTopologyWalker).

Deliberately pure Python with many small calls (a neighbour generator, a value function, a
recursive lookahead) so that a call tracer has real work to see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

from ..emitter import NoOpEmitter
from ._common import PRIMES, SplitMix

M1, M2, M3, M4 = "M1_commit", "M2_amplitude_death", "M3_rollback", "M4_lateral_leap"
MODES = (M1, M2, M3, M4)
DEGREE = 4
BEAM = 2
DEATH = 0.45  # below this best-continuation score the walk's amplitude dies


@dataclass(frozen=True)
class WalkResult:
    path: Tuple[int, ...]  # prime labels visited, in order
    transitions: Tuple[Tuple[str, str], ...]
    mode_counts: Tuple[int, int, int, int]  # steps spent in M1..M4
    scars: Tuple[Tuple[str, int], ...]  # (kind, prime chain length) where a chain broke
    concepts: Tuple[Tuple[str, float], ...]  # (concept, value) along the path
    final_phi: float

    def to_dict(self) -> dict:
        return {
            "path": list(self.path), "transitions": [list(t) for t in self.transitions],
            "mode_counts": list(self.mode_counts), "scars": [list(s) for s in self.scars],
            "concepts": [list(c) for c in self.concepts], "final_phi": self.final_phi,
        }


class PrimeTopologyWalker:
    def __init__(self, graph_seed: int, emitter: Any = None, effort: int = 1, nodes: int = 97) -> None:
        self._emitter = emitter if emitter is not None else NoOpEmitter()
        self.graph_seed = graph_seed
        self._effort = max(1, int(effort))
        self._rng = SplitMix(graph_seed)
        self._labels = PRIMES[:nodes]
        self._salt = [self._rng.next() & 0x7FFFFFFF for _ in range(nodes)]
        # Edges from an inline LCG seeded per node: building the graph costs few calls, so
        # the calls a tracer sees are the walk's, not the setup's.
        edges = []
        for salt in self._salt:
            state, out = salt, []
            for _ in range(DEGREE):
                state = (state * 1103515245 + 12345) & 0x7FFFFFFF
                out.append((state >> 8) % nodes)
            edges.append(tuple(out))
        self._edges = edges
        self._visits = [0] * nodes
        self.mode = M1
        self.transitions: List[Tuple[str, str]] = []

    def traverse(self, max_steps: int = 50) -> WalkResult:
        n = len(self._labels)
        node = self._rng.below(n)
        start = node
        chain = [node]
        phi = 1.0
        counts = [0, 0, 0, 0]
        scars: List[Tuple[str, int]] = []
        path = [self._labels[node]]
        concepts = []
        for _ in range(max_steps):
            self._visits[node] += 1
            best, score = self._best_candidate(node)
            if score >= phi * 0.85:
                mode = M1
                node = best
                chain.append(node)
            elif score < DEATH:
                # No continuation carries amplitude: restart from the origin at full amplitude.
                mode = M2
                scars.append(("amplitude_death", len(chain)))
                node = start
                chain = [node]
                score = 1.0
            elif len(chain) > 1:
                mode = M3
                chain.pop()
                scars.append(("rollback", len(chain)))
                node = chain[-1]
            else:
                mode = M4
                node = self._rng.below(n)
                chain = [node]
            if mode != self.mode:
                self._transition(self.mode, mode, round(phi, 6))
            counts[MODES.index(mode)] += 1
            phi = 0.6 * phi + 0.4 * score
            path.append(self._labels[node])
            concepts.append((f"c{self._labels[node]}", round(score, 6)))
        return WalkResult(tuple(path), tuple(self.transitions), (counts[0], counts[1], counts[2], counts[3]),
                          tuple(scars), tuple(concepts), round(phi, 9))

    def _transition(self, from_mode: str, to_mode: str, phi_at_transition: float) -> None:
        self.mode = to_mode
        self.transitions.append((from_mode, to_mode))
        self._emitter.event("walker.mode_transition", attributes={
            "from_mode": from_mode, "to_mode": to_mode, "phi_at_transition": phi_at_transition,
        })

    def _best_candidate(self, node: int) -> Tuple[int, float]:
        best, best_score = node, -1.0
        for cand in self._neighbours(node):
            s = self._lookahead(cand, 1)
            if s > best_score:
                best, best_score = cand, s
        return best, best_score

    def _neighbours(self, node: int) -> Iterator[int]:
        for nxt in self._edges[node]:
            if nxt != node:
                yield nxt

    def _lookahead(self, node: int, depth: int) -> float:
        # Recursive, with a beam of BEAM successors: a node is worth its own value plus half
        # of its best continuation.
        v = self._value(node)
        if depth <= 0:
            return v
        best = 0.0
        for nxt in self._edges[node][:BEAM]:
            s = self._lookahead(nxt, depth - 1)
            if s > best:
                best = s
        return 0.5 * v + 0.5 * best

    def _value(self, node: int) -> float:
        # The effort loop is the tunable CPU work per evaluation (inline: no extra calls).
        acc = self._salt[node]
        for _ in range(self._effort):
            acc = (acc * 1103515245 + 12345) & 0x7FFFFFFF
        return (acc % 10007) / 10007.0 / (1 + self._visits[node])
