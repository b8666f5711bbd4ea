"""Step 6's storage: a bounded vault of byte blocks and the worker thread that seals them."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from typing import Any, List, Tuple

MAX_BLOCKS = 48


class VaultWorker:
    """One persistent thread: seals a block (hash) after a simulated storage latency.

    The caller blocks on the reply queue, so a cycle spends that latency off-CPU on the main
    thread while the worker thread sleeps and then runs: real scheduler activity for a tracer.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="takwin-vault", daemon=True)
        self._thread.start()

    def seal(self, block: bytes, latency_s: float) -> str:
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((block, latency_s, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            block, latency_s, reply = job
            try:
                if latency_s > 0:
                    time.sleep(latency_s)
                reply.put((True, hashlib.blake2b(block, digest_size=8).hexdigest()))
            except Exception as e:  # noqa: BLE001 - handed back to the waiting caller
                reply.put((False, e))


class Vault:
    """Blocks kept across cycles (bounded ring): the substrate's memory grows, then plateaus."""

    def __init__(self) -> None:
        self.blocks: List[bytearray] = []
        self._worker: Any = None

    def store(self, block: bytearray, latency_s: float) -> Tuple[str, int]:
        if self._worker is None:
            self._worker = VaultWorker()
        self.blocks.append(block)
        if len(self.blocks) > MAX_BLOCKS:
            del self.blocks[0]
        return self._worker.seal(bytes(block), latency_s), sum(len(b) for b in self.blocks)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
