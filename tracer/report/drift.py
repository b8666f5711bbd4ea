"""Drift: did a step get slower between two runs?

Span durations are skewed (a long right tail from preemption, GC, page faults), so a t-test
on means would chase outliers. The Mann-Whitney U test compares the whole distributions by
rank and needs no shape assumption; it is computed here by hand (normal approximation with
tie and continuity corrections) so the tool carries no scipy dependency. Significance
alone is not enough to flag: with thousands of spans a 1% shift is "significant", so a
regression also needs the median to grow by more than `min_effect`. The p-values are
Holm-adjusted across span names, so `alpha` bounds the chance of any false flag in a run
however many span names it compares.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..otlpjson import Span
from .stats import SpanStats, span_stats


@dataclass(frozen=True)
class MannWhitney:
    u: float  # U of the first sample: how often a value of `a` beats one of `b` (ties count 1/2)
    z: float
    p_value: float  # two-sided

    def to_dict(self) -> dict:
        return asdict(self)


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> MannWhitney:
    """Two-sided Mann-Whitney U test, normal approximation with tie and continuity correction."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney U needs at least one value on each side")
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    n = n1 + n2
    rank_sum_a = 0.0
    tie_term = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        avg_rank = (i + j) / 2.0 + 1.0  # ranks are 1-based; tied values share the mean rank
        t = j - i + 1
        tie_term += t ** 3 - t
        rank_sum_a += avg_rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        i = j + 1
    u = rank_sum_a - n1 * (n1 + 1) / 2.0
    mean = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        # Every value is identical: nothing distinguishes the samples.
        return MannWhitney(u, 0.0, 1.0)
    diff = abs(u - mean)
    z = max(0.0, diff - 0.5) / math.sqrt(var)
    return MannWhitney(u, math.copysign(z, u - mean), math.erfc(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class DriftRow:
    name: str
    base: SpanStats
    new: SpanStats
    median_change: Optional[float]  # (new - base) / base; None when the base median is 0
    p90_change: Optional[float]
    test: MannWhitney
    p_adjusted: float  # Holm-adjusted across the span names compared
    significant: bool
    verdict: str  # "regression", "faster", "slower (below min-effect)", "no change"

    @property
    def regression(self) -> bool:
        return self.verdict == "regression"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "base": self.base.to_dict(), "new": self.new.to_dict(),
            "median_change": self.median_change, "p90_change": self.p90_change,
            "mann_whitney": self.test.to_dict(),
            "p_adjusted": self.p_adjusted, "significant": self.significant,
            "regression": self.regression, "verdict": self.verdict,
        }


@dataclass(frozen=True)
class DriftResult:
    rows: Tuple[DriftRow, ...]
    only_in_base: Tuple[str, ...]
    only_in_new: Tuple[str, ...]
    alpha: float
    min_effect: float

    @property
    def regressions(self) -> Tuple[DriftRow, ...]:
        return tuple(r for r in self.rows if r.regression)

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha, "min_effect": self.min_effect,
            "test": "Mann-Whitney U, two-sided, normal approximation with tie and continuity correction; "
                    "p-values Holm-adjusted across span names",
            "regressions": [r.name for r in self.regressions],
            "rows": [r.to_dict() for r in self.rows],
            "only_in_base": list(self.only_in_base), "only_in_new": list(self.only_in_new),
        }


def holm_adjust(p_values: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values: comparing them with alpha bounds the chance of ANY
    false flag across all span names by alpha (one test per name would inflate it with
    the number of names)."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def _rel(new: float, base: float) -> Optional[float]:
    return None if base == 0 else (new - base) / base


def drift(base: Iterable[Span], new: Iterable[Span], alpha: float = 0.01,
          min_effect: float = 0.10) -> DriftResult:
    """Compare per-name durations of two runs; names present in one run only are listed apart."""
    base_durs: Dict[str, List[int]] = defaultdict(list)
    new_durs: Dict[str, List[int]] = defaultdict(list)
    base_list, new_list = list(base), list(new)
    for s in base_list:
        base_durs[s.name].append(s.duration_ns)
    for s in new_list:
        new_durs[s.name].append(s.duration_ns)
    base_stats = {st.name: st for st in span_stats(base_list)}
    new_stats = {st.name: st for st in span_stats(new_list)}
    pairs = [(name, bst, new_stats[name]) for name, bst in base_stats.items() if name in new_stats]
    tests = [mann_whitney_u(base_durs[name], new_durs[name]) for name, _, _ in pairs]
    adjusted = holm_adjust([t.p_value for t in tests])
    rows = []
    for (name, bst, nst), test, p_adj in zip(pairs, tests, adjusted):
        med = _rel(nst.median_ns, bst.median_ns)
        significant = p_adj < alpha
        if significant and nst.median_ns > bst.median_ns:
            verdict = "regression" if med is None or med > min_effect else "slower (below min-effect)"
        elif significant and nst.median_ns < bst.median_ns:
            verdict = "faster"
        else:
            verdict = "no change"
        rows.append(DriftRow(name, bst, nst, med, _rel(nst.p90_ns, bst.p90_ns), test, p_adj,
                             significant, verdict))
    return DriftResult(
        rows=tuple(rows),
        only_in_base=tuple(n for n in base_stats if n not in new_stats),
        only_in_new=tuple(n for n in new_stats if n not in base_stats),
        alpha=alpha, min_effect=min_effect,
    )


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def format_drift(result: DriftResult) -> str:
    """A fixed-width table (milliseconds) for terminals, regressions marked with `!!`."""
    rows = [("span", "n base/new", "median ms base→new", "Δmedian", "p90 ms base→new", "Δp90", "p (Holm)",
             "verdict")]
    for r in result.rows:
        rows.append((
            r.name, f"{r.base.count}/{r.new.count}",
            f"{_ms(r.base.median_ns)} → {_ms(r.new.median_ns)}", _pct(r.median_change),
            f"{_ms(r.base.p90_ns)} → {_ms(r.new.p90_ns)}", _pct(r.p90_change),
            f"{r.p_adjusted:.2g}", ("!! " if r.regression else "") + r.verdict,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1])]
        cells.append(row[-1])
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for n in result.only_in_base:
        lines.append(f"only in base run: {n}")
    for n in result.only_in_new:
        lines.append(f"only in new run: {n}")
    regs = result.regressions
    rule = f"Mann-Whitney U, Holm-adjusted p < {result.alpha:g} and median +>{result.min_effect:.0%}"
    names = ": " + ", ".join(r.name for r in regs) if regs else ""
    lines.append(f"{len(regs)} regression(s) ({rule}){names}")
    return "\n".join(lines)
