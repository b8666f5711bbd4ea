"""The reference Takwin: seven steps per cycle, Screen -> Encode -> Traverse -> Consolidate ->
Vault -> Render, mirroring kimera_swm.domain.cognitive.takwin:Takwin.

Every step method is called exactly once per cycle, only from run(), and wrapped at the call
site by exactly one emitter span; a zero-touch tracer that probes the step methods therefore
sees the same spans the emitter writes (the parity contract, docs/reference.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, List, Tuple

from ..emitter import emitter_from_env
from ._common import HAVE_NUMPY, MODULUS, Projector, make_matrix
from .arachne import ArachneCollision, ArachneProtocol
from .dissonance import DissonanceMonitor
from .gwf import FEATURES, GWFProtocol, features_of
from .kccl import KCCL
from .scar import ScarStore
from .vault import Vault
from .walker import PrimeTopologyWalker, WalkResult

ENCODING_DIM = 64
MAX_REHASH = 64
RECENT = 10
# Work per 20 ms of cycle (calibrated on this project's machine, CPython 3.11): the walker's
# per-evaluation effort loop and the projection rounds. The rest of a cycle is the vault
# worker's latency (15% of cycle_ms, off-CPU) and fixed per-cycle work.
WALK_EFFORT = 400
PROJECT_ROUNDS = 16


@dataclass(frozen=True)
class Screen:
    verdict: str
    features: Tuple[int, ...]


@dataclass(frozen=True)
class Encoding:
    assignment: Tuple[Tuple[str, int], ...]
    vector: Tuple[int, ...]
    graph_seed: int
    collisions: int


@dataclass(frozen=True)
class Consolidation:
    pulsed: bool
    summary: int


@dataclass(frozen=True)
class VaultRecord:
    seal: str
    scars_written: int
    vault_bytes: int


@dataclass(frozen=True)
class OrchestratorResult:
    cycle_index: int
    verdict: str
    token_count: int
    collisions: int
    path_length: int
    mode_counts: Tuple[int, int, int, int]
    scars_written: int
    dissonances: int
    consolidated: bool
    consolidation_summary: int
    vault_seal: str
    vault_bytes: int
    rendered: str
    digest: str  # sha256 over every field above: equal digests mean equal results

    def to_dict(self) -> dict:
        return {
            "cycle_index": self.cycle_index, "verdict": self.verdict,
            "token_count": self.token_count, "collisions": self.collisions,
            "path_length": self.path_length, "mode_counts": list(self.mode_counts),
            "scars_written": self.scars_written, "dissonances": self.dissonances,
            "consolidated": self.consolidated, "consolidation_summary": self.consolidation_summary,
            "vault_seal": self.vault_seal, "vault_bytes": self.vault_bytes,
            "rendered": self.rendered, "digest": self.digest,
        }


class Takwin:
    """One substrate instance. `cycle_ms` scales the work (CPU, memory, waits) so that a cycle
    takes roughly that long: ~20 ms for tests, ~2500 ms like the real substrate."""

    def __init__(self, emitter: Any = None, seed: int = 0, cycle_ms: int = 20) -> None:
        self._emitter = emitter if emitter is not None else emitter_from_env()
        self.seed = int(seed)
        self.cycle_ms = max(1, int(cycle_ms))
        scale = self.cycle_ms / 20.0
        self._walk_effort = max(1, int(round(WALK_EFFORT * scale)))
        self._project_rounds = max(1, int(round(PROJECT_ROUNDS * scale)))
        self._block_bytes = min(4 << 20, max(4096, int(64 * 1024 * scale)))
        self._latency_s = 0.15 * self.cycle_ms / 1000.0
        self._cycle = 0
        self._baseline: List[int] = [0] * FEATURES
        self._projector = Projector(make_matrix(self.seed * 7919 + 17, ENCODING_DIM))
        self._gwf = GWFProtocol(self._emitter)
        self._arachne = ArachneProtocol()
        self._dissonance = DissonanceMonitor(self._emitter)
        self._kccl = KCCL(self._emitter)
        self._scars = ScarStore(self._emitter)
        self._vault = Vault()
        self._recent: List[Tuple[int, ...]] = []
        self.numpy = HAVE_NUMPY
        self.gpu: Any = None  # a warmed-up reference.gpu.GpuWork once enable_gpu() succeeded

    def enable_gpu(self, work_ms: float = 400.0) -> str:
        """Add the GPU step to every cycle from now on. Returns "" when it will run, else why it
        is skipped (no CUDA device, no CuPy or PyTorch). Results and digests do not change."""
        from .gpu import GpuWork

        work = GpuWork(work_ms)
        if work.reason:
            return work.reason
        work.warm_up()
        self.gpu = work
        return ""

    def close(self) -> None:
        self._vault.close()

    def run(self, stimulus: str) -> OrchestratorResult:
        index = self._cycle
        self._cycle += 1
        # The cycle span wraps the call site of the cycle's one method, like every step span:
        # the emitter's own work stays outside what both views measure (docs/reference.md).
        with self._emitter.span("takwin.cycle", {"cycle.index": index, "stimulus.length": len(stimulus)}):
            return self._run_cycle(index, stimulus)

    def _run_cycle(self, index: int, stimulus: str) -> OrchestratorResult:
        with self._emitter.span("takwin.step1_screen"):
            step1 = self._step1_screen(stimulus)
        with self._emitter.span("takwin.step2_encode"):
            step2 = self._step2_encode(stimulus)
        with self._emitter.span("takwin.step3_step4_traverse"):
            step3, dissonances = self._step3_step4_traverse(step2)
        with self._emitter.span("takwin.step5_consolidate"):
            step5 = self._step5_consolidate(index, step2)
        with self._emitter.span("takwin.step6_vault"):
            step6 = self._step6_vault(index, step3)
        with self._emitter.span("takwin.step7_render"):
            rendered = self._step7_render(index, step1, step2, step3, step5)
        if self.gpu is not None:
            with self._emitter.span("takwin.gpu_project"):
                self._gpu_project(step2)
        return self._result(index, step1, step2, step3, dissonances, step5, step6, rendered)

    # ---- the steps ----------------------------------------------------------------------

    def _step1_screen(self, stimulus: str) -> Screen:
        features = features_of(stimulus)
        verdict = self._gwf.screen_input(features, tuple(self._baseline))
        self._baseline = [(3 * b + f) // 4 for b, f in zip(self._baseline, features)]
        return Screen(verdict, features)

    def _step2_encode(self, stimulus: str) -> Encoding:
        collisions = 0
        while True:
            try:
                assignment = self._arachne.assign(stimulus)
                break
            except ArachneCollision:
                collisions += 1
                if collisions >= MAX_REHASH:
                    raise
                self._arachne.rehash()
        vector = [1] * ENCODING_DIM
        for i, (_token, prime) in enumerate(assignment):
            slot = (prime * 31 + i) % ENCODING_DIM
            vector[slot] = (vector[slot] * prime) % MODULUS
        projected = self._projector.project(vector, self._project_rounds)
        graph_seed = (self.seed * 1000003 + sum(p for _, p in assignment) * 2654435761
                      + projected[0]) & 0xFFFFFFFF
        return Encoding(assignment, projected, graph_seed, collisions)

    def _step3_step4_traverse(self, step2: Encoding) -> Tuple[WalkResult, int]:
        walker = PrimeTopologyWalker(step2.graph_seed, self._emitter, effort=self._walk_effort)
        walk = walker.traverse(max_steps=50)
        # Step 4: evaluate the walk for dissonance between neighbouring concepts.
        dissonances = self._dissonance.check(walk.concepts)
        return walk, dissonances

    def _step5_consolidate(self, index: int, step2: Encoding) -> Consolidation:
        self._recent.append(step2.vector)
        if len(self._recent) > RECENT:
            del self._recent[0]
        if self._kccl.due(index):
            return Consolidation(True, self._kccl.pulse(self._recent))
        digest = 0
        for v in step2.vector:
            digest = (digest * 257 + v) % (1 << 61)
        return Consolidation(False, digest)

    def _step6_vault(self, index: int, walk: WalkResult) -> VaultRecord:
        written = 0
        for i, (kind, chain_length) in enumerate(walk.scars[:3]):
            self._scars.write(f"scar-{index}-{i}", kind, chain_length)
            written += 1
        pattern = hashlib.sha256(f"{self.seed}:{index}:{walk.path!r}".encode()).digest()
        block = bytearray(pattern * (self._block_bytes // len(pattern)))
        seal, total = self._vault.store(block, self._latency_s)
        return VaultRecord(seal, written, total)

    def _step7_render(self, index: int, step1: Screen, step2: Encoding, walk: WalkResult,
                      step5: Consolidation) -> str:
        return " ".join(self._render_parts(index, step1, step2, walk, step5))

    def _gpu_project(self, step2: Encoding) -> float:
        # Optional GPU step (reference/gpu.py): its checksum stays out of the digest, which must
        # not depend on whether, or on which, GPU ran it.
        return self.gpu.run(step2.graph_seed)

    # ---- helpers (not steps) ------------------------------------------------------------

    @staticmethod
    def _render_parts(index: int, step1: Screen, step2: Encoding, walk: WalkResult,
                      step5: Consolidation) -> Any:
        yield f"cycle={index}"
        yield f"verdict={step1.verdict}"
        yield f"tokens={len(step2.assignment)}"
        yield "path=" + ">".join(str(p) for p in walk.path[:8])
        yield "modes=" + ",".join(str(c) for c in walk.mode_counts)
        if step5.pulsed:
            yield f"kccl={step5.summary:x}"

    def _result(self, index: int, step1: Screen, step2: Encoding, walk: WalkResult, dissonances: int,
                step5: Consolidation, step6: VaultRecord, rendered: str) -> OrchestratorResult:
        fields = {
            "cycle_index": index, "verdict": step1.verdict, "token_count": len(step2.assignment),
            "collisions": step2.collisions, "path_length": len(walk.path),
            "mode_counts": walk.mode_counts, "scars_written": step6.scars_written,
            "dissonances": dissonances, "consolidated": step5.pulsed,
            "consolidation_summary": step5.summary, "vault_seal": step6.seal,
            "vault_bytes": step6.vault_bytes, "rendered": rendered,
        }
        # The digest covers the full intermediate state too (encoding vector, walk), not only
        # the summary fields, so any divergence in any step changes it.
        canonical = json.dumps({"fields": fields, "vector": step2.vector, "walk": walk.to_dict(),
                                "features": step1.features}, sort_keys=True, separators=(",", ":"))
        return OrchestratorResult(digest=hashlib.sha256(canonical.encode()).hexdigest(), **fields)
