"""Deterministic building blocks shared by the reference substrate's modules.

Everything here gives the same answer on every CPython 3.9-3.13 and with or without numpy:
the random stream is our own splitmix64 (not `random`, whose derived methods changed across
versions), string hashing is crc32 (not `hash`, which is salted per process), and the
numpy path only does integer arithmetic that the pure-Python path reproduces exactly.
"""

from __future__ import annotations

import zlib
from operator import mul
from typing import List, Sequence, Tuple

try:
    import numpy as _np
except ImportError:  # some target venvs have no numpy wheel: pure-Python path, reported
    _np = None

HAVE_NUMPY = _np is not None
MASK64 = (1 << 64) - 1
MODULUS = 65521  # largest prime below 2**16: products of two residues summed 64 times fit int64


class SplitMix:
    """splitmix64: tiny, fast, and identical everywhere."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n

    def unit(self) -> float:
        return (self.next() >> 11) * (1.0 / 9007199254740992.0)


def stable_hash(text: str, salt: int = 0) -> int:
    return zlib.crc32(text.encode("utf-8"), salt & 0xFFFFFFFF)


def first_primes(count: int) -> Tuple[int, ...]:
    limit = 16
    while True:
        sieve = bytearray([1]) * (limit + 1)
        sieve[0:2] = b"\x00\x00"
        for i in range(2, int(limit ** 0.5) + 1):
            if sieve[i]:
                sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
        primes = [i for i in range(limit + 1) if sieve[i]]
        if len(primes) >= count:
            return tuple(primes[:count])
        limit *= 2


PRIMES = first_primes(509)


def make_matrix(seed: int, n: int) -> List[List[int]]:
    """An n x n matrix of residues mod MODULUS, from an inline LCG (no per-entry calls)."""
    state = seed & 0x7FFFFFFF
    rows = []
    for _ in range(n):
        row = []
        for _ in range(n):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
            row.append(state % MODULUS)
        rows.append(row)
    return rows


class Projector:
    """Repeated matrix-vector products mod MODULUS: numpy when importable, else pure Python.

    Integer-only, so both paths give bit-identical results and the digest does not depend on
    which one ran.
    """

    def __init__(self, matrix: List[List[int]]) -> None:
        self._rows = [tuple(r) for r in matrix]
        self._np_matrix = _np.array(matrix, dtype=_np.int64) if _np is not None else None

    def project(self, vector: Sequence[int], rounds: int) -> Tuple[int, ...]:
        if self._np_matrix is not None:
            v = _np.array([x % MODULUS for x in vector], dtype=_np.int64)
            for _ in range(rounds):
                v = (self._np_matrix @ v) % MODULUS
            return tuple(int(x) for x in v.tolist())
        w = [x % MODULUS for x in vector]
        rows = self._rows
        for _ in range(rounds):
            # map(mul, ...) keeps the inner product in C: no Python frame per element.
            w = [sum(map(mul, row, w)) % MODULUS for row in rows]
        return tuple(w)
