"""Pairing two recordings of the same calls: one clock offset, then an order-keeping alignment.

Both views record the same calls in the same order per (name, thread), so "the k-th matches
the k-th" is right until one side drops or invents a call; from then on every later pair would
be off by one. Aligning on time (after the offset) instead keeps one drop a single miss.
"""

from __future__ import annotations

import bisect
from typing import List, Sequence, Tuple

Interval = Tuple[int, int]  # (start_ns, end_ns)

# Width of the window in which the most start differences must fall for the offset guess.
# The two views of one call differ by µs (probe vs call site); neighbouring calls of the same
# name are normally ms apart, so a 200 µs window holds the true offset's cluster and not the
# "off by one call" clusters.
OFFSET_WINDOW_NS = 200_000
# How far (in positions) the k-th span of one side is looked for on the other side when the
# offset is guessed: enough for a few drops/extras without becoming quadratic.
OFFSET_SEARCH_SPREAD = 50
# Smallest gap penalty: below this, jitter between the two views could split a true pair.
MIN_GAP_NS = 100_000
# A (name, thread) group with a single span on a side has no spacing to scale by: any pair
# of the two is the same call, however far apart (a bad clock is reported as timing).
UNBOUNDED_NS = 1 << 62


def _median(values: Sequence[int]) -> float:
    s = sorted(values)
    n = len(s)
    return float(s[n // 2]) if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def guess_offset(groups: Sequence[Tuple[Sequence[int], Sequence[int]]]) -> int:
    """A first clock offset (ebpf - hooks, ns) before anything is matched.

    groups: per (name, thread), the sorted start times on each side. Takes the densest
    cluster of start differences between near-same-position spans; 0 when nothing pairs.
    """
    diffs: List[int] = []
    for hs, es in groups:
        spread = min(OFFSET_SEARCH_SPREAD, abs(len(hs) - len(es)) + 3)
        for i, h in enumerate(hs):
            for j in range(max(0, i - spread), min(len(es), i + spread + 1)):
                diffs.append(es[j] - h)
    if not diffs:
        return 0
    diffs.sort()
    best_lo, best_hi, r = 0, 0, 0
    for lo in range(len(diffs)):
        r = max(r, lo)
        while r + 1 < len(diffs) and diffs[r + 1] - diffs[lo] <= OFFSET_WINDOW_NS:
            r += 1
        # Ties go to the tighter cluster: the true offset's differences are µs apart.
        if (r - lo, diffs[best_hi] - diffs[best_lo]) > (best_hi - best_lo, diffs[r] - diffs[lo]):
            best_lo, best_hi = lo, r
    return int(round(_median(diffs[best_lo:best_hi + 1])))


def gap_penalty(starts: Sequence[int]) -> int:
    """Half the median spacing of consecutive calls (at least MIN_GAP_NS).

    A pair whose start and end differences add up to more than twice this is cheaper left
    as one miss and one extra: it is closer to a neighbouring call than to its own slot.
    """
    if len(starts) < 2:
        return UNBOUNDED_NS
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return max(MIN_GAP_NS, int(_median(gaps) // 2))


class _PrefixMax:
    """Fenwick tree of (value, payload) maxima over prefixes of 0..n-1."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tree: List[Tuple[int, int]] = [(0, -1)] * (n + 1)

    def update(self, i: int, item: Tuple[int, int]) -> None:
        i += 1
        while i <= self.n:
            if item[0] > self.tree[i][0]:
                self.tree[i] = item
            i += i & -i

    def query(self, i: int) -> Tuple[int, int]:
        """Best over indices 0..i-1."""
        best = (0, -1)
        while i > 0:
            if self.tree[i][0] > best[0]:
                best = self.tree[i]
            i -= i & -i
        return best


def align(hooks: Sequence[Interval], ebpf: Sequence[Interval], offset_ns: int,
          gap_ns: int) -> List[Tuple[int, int]]:
    """Order-keeping pairs (i, j) of hooks[i] with ebpf[j], both sorted by start.

    Minimises the sum of |Δstart| + |Δend| (after the offset) over pairs plus gap_ns per
    unpaired span on either side; equivalently, maximises the sum over pairs of
    2*gap_ns - cost. Only pairs cheaper than two gaps are candidates, so the work is a sparse
    longest-chain search (O(C log m) for C candidates), not an n*m table.
    """
    if not hooks or not ebpf:
        return []
    limit = 2 * gap_ns
    e_starts = [s - offset_ns for s, _ in ebpf]
    cand_i: List[int] = []
    cand_j: List[int] = []
    cand_val: List[int] = []
    cand_prev: List[int] = []
    tree = _PrefixMax(len(ebpf))
    for i, (hs, he) in enumerate(hooks):
        lo = bisect.bisect_left(e_starts, hs - limit)
        hi = bisect.bisect_right(e_starts, hs + limit)
        row: List[Tuple[int, int]] = []
        for j in range(lo, hi):
            es, ee = ebpf[j]
            cost = abs(es - offset_ns - hs) + abs(ee - offset_ns - he)
            if cost >= limit:
                continue
            prev_val, prev_id = tree.query(j)
            cand_i.append(i)
            cand_j.append(j)
            cand_val.append(prev_val + (limit - cost))
            cand_prev.append(prev_id)
            row.append((j, len(cand_i) - 1))
        # Updates after the whole row: a hooks span pairs with at most one ebpf span.
        for j, cid in row:
            tree.update(j, (cand_val[cid], cid))
    if not cand_val:
        return []
    best = max(range(len(cand_val)), key=lambda c: cand_val[c])
    pairs = []
    while best != -1:
        pairs.append((cand_i[best], cand_j[best]))
        best = cand_prev[best]
    pairs.reverse()
    return pairs
