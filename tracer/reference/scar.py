"""SCARs: the durable marks a traversal leaves where a prime chain broke."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Tuple

from ..emitter import NoOpEmitter


class ScarStore:
    def __init__(self, emitter: Any = None, capacity: int = 512) -> None:
        self._emitter = emitter if emitter is not None else NoOpEmitter()
        self._capacity = capacity
        self._scars: OrderedDict = OrderedDict()
        self.writes = 0

    def write(self, scar_id: str, kind: str, prime_chain_length: int) -> None:
        self._scars[scar_id] = (kind, prime_chain_length)
        while len(self._scars) > self._capacity:
            self._scars.popitem(last=False)
        self.writes += 1
        self._emitter.event("scar.write", attributes={
            "scar_id": scar_id, "kind": kind, "prime_chain_length": prime_chain_length,
        })

    def recent(self, n: int) -> Tuple[Tuple[str, str, int], ...]:
        items = list(self._scars.items())[-n:]
        return tuple((k, v[0], v[1]) for k, v in items)
