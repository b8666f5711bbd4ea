"""Per-span-name duration statistics: the one table every command prints."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable, List, Sequence

from ..otlpjson import Span


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class SpanStats:
    name: str
    count: int
    median_ns: float
    p10_ns: float
    p90_ns: float
    max_ns: int
    total_ns: int

    def to_dict(self) -> dict:
        return asdict(self)


def span_stats(spans: Iterable[Span]) -> List[SpanStats]:
    """Count, median, p10, p90, max and total duration per span name, in first-seen order."""
    by_name: dict[str, list[int]] = defaultdict(list)
    for s in spans:
        by_name[s.name].append(s.duration_ns)
    out = []
    for name, durs in by_name.items():
        durs.sort()
        out.append(SpanStats(name, len(durs), percentile(durs, 50), percentile(durs, 10),
                             percentile(durs, 90), durs[-1], sum(durs)))
    return out


def step_timing_ms(stats: Iterable[SpanStats]) -> dict[str, dict[str, float]]:
    """Ophamin's per_step_timing shape: span name -> median_ms, p10_ms, p90_ms, count."""
    return {s.name: {"median_ms": s.median_ns / 1e6, "p10_ms": s.p10_ns / 1e6, "p90_ms": s.p90_ns / 1e6,
                     "count": s.count} for s in stats}


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def format_table(stats: Iterable[SpanStats]) -> str:
    """A fixed-width table (milliseconds) for terminals."""
    rows = [("span", "count", "median ms", "p10 ms", "p90 ms", "max ms")]
    rows += [(s.name, str(s.count), _ms(s.median_ns), _ms(s.p10_ns), _ms(s.p90_ns), _ms(s.max_ns))
             for s in stats]
    return _fixed_width(rows)


def format_calls_table(functions: Iterable[dict]) -> str:
    """The kernel's per-function call counts (CallStats.to_dict() rows), for terminals."""
    rows = [("function", "calls", "errors", "mean ms", "p50 ms", "p99 ms", "max ms")]
    rows += [(f["name"], f"{f['calls']:,}", f"{f['errors']:,}", *(_ms(f[k]) if f[k] is not None else "-" for k in
                                                                    ("mean_ns", "p50_ns", "p99_ns")),
              _ms(f["max_ns"])) for f in functions if f["calls"]]
    return _fixed_width(rows)


def _fixed_width(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
