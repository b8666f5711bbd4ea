"""Per-span-name statistics in fixed memory, for traces that run for hours.

`span_stats` (stats.py) sorts every duration: exact, but its memory grows with the trace. A
long-running `trace` keeps instead, per name, an exact count, total and max and a
log-bucketed histogram whose buckets are RELATIVE_ERROR wide: a percentile is then within
RELATIVE_ERROR of a value that truly occurred near that rank, and the histogram never holds
more than a few thousand buckets per name whatever the number of spans.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from ..otlpjson import Span
from .stats import SpanStats

RELATIVE_ERROR = 0.005
_LOG_BASE = math.log1p(2 * RELATIVE_ERROR)


def _bucket(ns: int) -> int:
    return -1 if ns <= 0 else int(math.log(ns) / _LOG_BASE)


def _value(bucket: int) -> float:
    if bucket < 0:
        return 0.0
    # Geometric middle of the bucket: within RELATIVE_ERROR of both ends.
    return math.exp((bucket + 0.5) * _LOG_BASE)


@dataclass
class _Series:
    count: int = 0
    total: int = 0
    max: int = 0
    buckets: Counter = field(default_factory=Counter)

    def add(self, ns: int) -> None:
        self.count += 1
        self.total += ns
        self.max = max(self.max, ns)
        self.buckets[_bucket(ns)] += 1

    def percentile(self, q: float) -> float:
        rank = (self.count - 1) * q / 100.0
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen > rank:
                return min(_value(b), float(self.max))
        return float(self.max)


class RunningStats:
    """Feed finished spans with `add`; `stats()` gives SpanStats in first-seen order."""

    def __init__(self) -> None:
        self._series: dict[str, _Series] = {}

    def add(self, spans: Iterable[Span]) -> None:
        for s in spans:
            series = self._series.get(s.name)
            if series is None:
                series = self._series[s.name] = _Series()
            series.add(s.duration_ns)

    def buckets(self) -> int:
        return sum(len(s.buckets) for s in self._series.values())

    def stats(self) -> list[SpanStats]:
        return [SpanStats(name, s.count, s.percentile(50), s.percentile(10), s.percentile(90), s.max, s.total)
                for name, s in self._series.items()]
