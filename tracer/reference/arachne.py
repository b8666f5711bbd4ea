"""Step 2's primitive: Arachne assigns each distinct token of a text a prime (stand-in for
kimera_swm.domain.prime.arachne_protocol:ArachneProtocol)."""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

from ._common import PRIMES, stable_hash

SLOTS = len(PRIMES)


class ArachneCollision(Exception):
    """Two distinct tokens of one text hashed to the same prime under the current salt.

    Raised on some cycles on purpose: step 2 handles it by rehashing and retrying, so traces
    show an exception raised and handled inside a step.
    """

    def __init__(self, token: str, other: str, slot: int) -> None:
        super().__init__(f"{token!r} and {other!r} both hash to slot {slot}")
        self.token, self.other, self.slot = token, other, slot


class ArachneProtocol:
    def __init__(self) -> None:
        self.salt = 0

    def assign(self, text: str) -> Tuple[Tuple[str, int], ...]:
        """(token, prime) for each distinct token, in first-seen order."""
        assigned: Dict[str, int] = {}
        owner: Dict[int, str] = {}
        for token in self._tokens(text):
            if token in assigned:
                continue
            slot = stable_hash(token, self.salt) % SLOTS
            other = owner.get(slot)
            if other is not None:
                raise ArachneCollision(token, other, slot)
            owner[slot] = token
            assigned[token] = PRIMES[slot]
        return tuple(assigned.items())

    def rehash(self) -> None:
        self.salt += 1

    @staticmethod
    def _tokens(text: str) -> Iterator[str]:
        word = []
        for ch in text:
            if ch.isalnum():
                word.append(ch.lower())
            elif word:
                yield "".join(word)
                word = []
        if word:
            yield "".join(word)
