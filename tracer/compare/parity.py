"""Parity: do the eBPF spans say what the in-process emitter's spans say?

Matching is by name, thread and order (never by id: the two views mint their own ids), with
one clock offset fitted for the run. See docs/parity.md for what is compared and why the
expected differences are what they are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..otlpjson import Span, SpanEvent
from ..report.stats import percentile
from .align import align, gap_penalty, guess_offset

# Keys that are tracer or thread metadata, not the program's data: never compared.
IGNORED_PREFIXES = ("ophamin.", "thread.", "code.")
# The tracer reads the exact double out of the target, so only representation noise is allowed.
FLOAT_REL_TOL = 1e-9
# How many spans each failure message names; counts are always complete.
EXAMPLES = 3
# How many items each list in the report keeps (the JSON must stay readable on a bad run).
LISTED = 50

SpanKey = Tuple[str, str]  # (trace_id, span_id)
Group = Tuple[str, Optional[int]]  # (name, thread id)


# ---- report types ---------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    max_p99_us: float = 50.0
    min_recall: float = 1.0
    min_precision: float = 1.0
    # Off unless set: a single preempted call can be ms off, and the target is stated as p99.
    max_abs_us: Optional[float] = None

    def to_dict(self) -> dict:
        return {"max_p99_us": self.max_p99_us, "min_recall": self.min_recall,
                "min_precision": self.min_precision, "max_abs_us": self.max_abs_us}


@dataclass(frozen=True)
class SpanRef:
    """One span, as a person finds it: name, thread, position on its thread, start time."""

    side: str  # "hooks" or "ebpf"
    name: str
    thread_id: Optional[int]
    index: int  # k-th span of this name on this thread (0-based), on its own side
    start_ns: int  # as written in its own file
    rel_ms: float  # start on the hooks clock, ms after the first compared hooks span

    def describe(self) -> str:
        return (f"{self.name} [{self.side} thread {self.thread_id} #{self.index}, "
                f"start +{self.rel_ms:.3f} ms = {self.start_ns} ns]")

    def to_dict(self) -> dict:
        return {"side": self.side, "name": self.name, "thread_id": self.thread_id,
                "index": self.index, "start_ns": self.start_ns, "rel_ms": round(self.rel_ms, 6)}


@dataclass(frozen=True)
class Distribution:
    """Signed differences ebpf - hooks, in µs; None when there is nothing to measure."""

    count: int
    median_us: Optional[float]
    p99_abs_us: Optional[float]
    max_abs_us: Optional[float]

    @staticmethod
    def of(diffs_ns: Sequence[int]) -> Distribution:
        if not diffs_ns:
            return Distribution(0, None, None, None)
        signed = sorted(d / 1000.0 for d in diffs_ns)
        absolute = sorted(abs(d) for d in signed)
        return Distribution(len(signed), percentile(signed, 50), percentile(absolute, 99), absolute[-1])

    def to_dict(self) -> dict:
        return {"count": self.count, "median_us": self.median_us,
                "p99_abs_us": self.p99_abs_us, "max_abs_us": self.max_abs_us}


@dataclass(frozen=True)
class Timing:
    start: Distribution  # after the offset
    end: Distribution  # after the offset
    duration: Distribution  # offset-free
    event: Distribution  # event times after the offset; reported, not judged

    def to_dict(self) -> dict:
        return {"start": self.start.to_dict(), "end": self.end.to_dict(),
                "duration": self.duration.to_dict(), "event": self.event.to_dict()}


@dataclass(frozen=True)
class NameReport:
    name: str  # "*" for the whole run
    hooks: int
    ebpf: int
    matched: int
    recall: Optional[float]  # None when the hooks file has no such span
    precision: Optional[float]  # None when the ebpf file has no such span
    timing: Timing
    reparented: int
    events_hooks: int
    events_ebpf: int
    events_matched: int
    values_compared: int
    values_disagreeing: int

    def to_dict(self) -> dict:
        return {"name": self.name, "hooks": self.hooks, "ebpf": self.ebpf, "matched": self.matched,
                "recall": self.recall, "precision": self.precision, "timing": self.timing.to_dict(),
                "reparented": self.reparented, "events_hooks": self.events_hooks,
                "events_ebpf": self.events_ebpf, "events_matched": self.events_matched,
                "values_compared": self.values_compared,
                "values_disagreeing": self.values_disagreeing}


@dataclass(frozen=True)
class Reparented:
    span: SpanRef  # the hooks span of the pair
    hooks_parent: Optional[SpanRef]  # None: a root
    ebpf_parent: Optional[SpanRef]

    def describe(self) -> str:
        hp = self.hooks_parent.describe() if self.hooks_parent else "root"
        ep = self.ebpf_parent.describe() if self.ebpf_parent else "root"
        return f"{self.span.describe()}: hooks parent {hp}, ebpf parent {ep}"

    def to_dict(self) -> dict:
        return {"span": self.span.to_dict(),
                "hooks_parent": self.hooks_parent.to_dict() if self.hooks_parent else None,
                "ebpf_parent": self.ebpf_parent.to_dict() if self.ebpf_parent else None}


@dataclass(frozen=True)
class EventRef:
    span: SpanRef
    event: str
    index: int  # k-th event of this name in its span
    time_ns: int

    def describe(self) -> str:
        return f"event {self.event} #{self.index} of {self.span.describe()}"

    def to_dict(self) -> dict:
        return {"span": self.span.to_dict(), "event": self.event, "index": self.index,
                "time_ns": self.time_ns}


@dataclass(frozen=True)
class AttributeMismatch:
    span: SpanRef  # hooks side
    event: Optional[str]  # None: a span attribute
    event_index: Optional[int]
    key: str
    hooks_value: Any
    ebpf_value: Any

    def describe(self) -> str:
        where = self.span.describe()
        if self.event is not None:
            where = f"event {self.event} #{self.event_index} of {where}"
        return f"{where}: {self.key} = {self.hooks_value!r} in hooks, {self.ebpf_value!r} in ebpf"

    def to_dict(self) -> dict:
        return {"span": self.span.to_dict(), "event": self.event, "event_index": self.event_index,
                "key": self.key, "hooks_value": self.hooks_value, "ebpf_value": self.ebpf_value}


@dataclass(frozen=True)
class TimingOutlier:
    span: SpanRef  # hooks side
    boundary: str  # "start" or "end"
    delta_us: float  # after the offset

    def describe(self) -> str:
        return f"{self.span.describe()}: {self.boundary} Δ {self.delta_us:+.1f} µs"

    def to_dict(self) -> dict:
        return {"span": self.span.to_dict(), "boundary": self.boundary,
                "delta_us": round(self.delta_us, 3)}


@dataclass(frozen=True)
class Failure:
    kind: str
    count: int
    message: str
    examples: Tuple[str, ...] = ()

    def describe(self) -> str:
        lines = [f"{self.kind}: {self.message}"]
        lines += [f"    {e}" for e in self.examples]
        if self.count > len(self.examples):
            lines.append(f"    ... and {self.count - len(self.examples)} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "count": self.count, "message": self.message,
                "examples": list(self.examples)}


@dataclass(frozen=True)
class ParityReport:
    passed: bool
    thresholds: Thresholds
    names: Tuple[str, ...]
    offset_ns: int  # ebpf clock - hooks clock, fitted over matched pairs
    offset_pairs: int
    overall: NameReport
    per_name: Tuple[NameReport, ...]
    missed: Tuple[SpanRef, ...]
    extra: Tuple[SpanRef, ...]
    reparented: Tuple[Reparented, ...]
    events_missed: Tuple[EventRef, ...]
    events_extra: Tuple[EventRef, ...]
    mismatches: Tuple[AttributeMismatch, ...]
    outliers: Tuple[TimingOutlier, ...]
    # "span <name>: <key>" / "event <name>: <key>" -> how many times hooks had it and ebpf not
    not_captured: Dict[str, int] = field(default_factory=dict)
    failures: Tuple[Failure, ...] = ()

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def format(self) -> str:
        """The table and verdict for people (as `ophamin-trace parity` prints them)."""
        return format_report(self)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict, "passed": self.passed,
            "thresholds": self.thresholds.to_dict(), "names": list(self.names),
            "offset_ns": self.offset_ns, "offset_pairs": self.offset_pairs,
            "overall": self.overall.to_dict(), "per_name": [r.to_dict() for r in self.per_name],
            "missed": [s.to_dict() for s in self.missed[:LISTED]],
            "extra": [s.to_dict() for s in self.extra[:LISTED]],
            "reparented": [r.to_dict() for r in self.reparented[:LISTED]],
            "events_missed": [e.to_dict() for e in self.events_missed[:LISTED]],
            "events_extra": [e.to_dict() for e in self.events_extra[:LISTED]],
            "attribute_mismatches": [m.to_dict() for m in self.mismatches[:LISTED]],
            "timing_outliers": [o.to_dict() for o in self.outliers[:LISTED]],
            "not_captured": dict(self.not_captured),
            "failures": [f.to_dict() for f in self.failures],
        }


# ---- helpers ----------------------------------------------------------------------------

def compared_key(key: str) -> bool:
    return not key.startswith(IGNORED_PREFIXES)


def values_agree(a: Any, b: Any) -> bool:
    """Equal, with floats equal up to FLOAT_REL_TOL; bool never equals a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        fa, fb = float(a), float(b)
        if math.isnan(fa) or math.isnan(fb):
            return math.isnan(fa) and math.isnan(fb)
        return math.isclose(fa, fb, rel_tol=FLOAT_REL_TOL, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(values_agree(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_agree(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def attr_diffs(hooks: Dict[str, Any], ebpf: Dict[str, Any]
               ) -> Tuple[int, List[Tuple[str, Any, Any]], List[str]]:
    """Compare every compared key the emitter wrote against what the eBPF side captured:
    (values compared, [(key, hooks value, ebpf value)] that disagree, keys not captured)."""
    compared, bad, missing = 0, [], []
    for k, hv in hooks.items():
        if not compared_key(k):
            continue
        if k not in ebpf:
            missing.append(k)
            continue
        compared += 1
        if not values_agree(hv, ebpf[k]):
            bad.append((k, hv, ebpf[k]))
    return compared, bad, missing


def _key(s: Span) -> SpanKey:
    return (s.trace_id, s.span_id)


class _Side:
    """One file's spans, indexed for the comparison."""

    def __init__(self, label: str, spans: Sequence[Span], names: frozenset) -> None:
        self.label = label
        self.by_key: Dict[SpanKey, Span] = {}
        for s in spans:
            self.by_key.setdefault(_key(s), s)
        self.names = names
        self.groups: Dict[Group, List[Span]] = defaultdict(list)
        for s in spans:
            if s.name in names:
                self.groups[(s.name, s.thread_id)].append(s)
        self.position: Dict[SpanKey, int] = {}
        for members in self.groups.values():
            members.sort(key=lambda s: (s.start_ns, s.end_ns))
            for k, s in enumerate(members):
                self.position[_key(s)] = k

    def compared(self) -> Iterable[Span]:
        for members in self.groups.values():
            yield from members

    def parent(self, s: Span) -> Optional[Span]:
        """Nearest ancestor among the compared names; None for a root.

        Ancestors outside the compared set are skipped so that `--names` compares the
        projection of both trees onto those names (an eBPF spec may trace more functions).
        A parent id absent from the file counts as a root: it is outside the recording.
        """
        seen = set()
        cur = s
        while cur.parent_span_id:
            key = (cur.trace_id, cur.parent_span_id)
            if key in seen:
                return None
            seen.add(key)
            nxt = self.by_key.get(key)
            if nxt is None:
                return None
            if nxt.name in self.names:
                return nxt
            cur = nxt
        return None


def _events_by_name(events: Sequence[SpanEvent]) -> Dict[str, List[SpanEvent]]:
    out: Dict[str, List[SpanEvent]] = defaultdict(list)
    for e in sorted(events, key=lambda e: e.time_ns):
        out[e.name].append(e)
    return out


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


# ---- the comparison -------------------------------------------------------------------

def compare(hooks: Sequence[Span], ebpf: Sequence[Span], thresholds: Thresholds = Thresholds(),
            names: Optional[Iterable[str]] = None) -> ParityReport:
    """Compare the eBPF view of a run with the emitter's view of the same run.

    names: the span names to compare; default, every name in the hooks spans.
    """
    if names is None:
        # In order of first appearance in time (files are written in end order: children first).
        first: Dict[str, int] = {}
        for s in hooks:
            first[s.name] = min(first.get(s.name, s.start_ns), s.start_ns)
        name_list = sorted(first, key=lambda n: first[n])
    else:
        name_list = list(dict.fromkeys(names))
    name_set = frozenset(name_list)
    H = _Side("hooks", hooks, name_set)
    E = _Side("ebpf", ebpf, name_set)
    group_keys = list(dict.fromkeys([*H.groups, *E.groups]))

    # The clock: guess from start times alone, pair, fit on the pairs, pair again, fit again.
    offset = guess_offset([([s.start_ns for s in H.groups.get(g, [])],
                            [s.start_ns for s in E.groups.get(g, [])]) for g in group_keys])
    pairs: Dict[Group, List[Tuple[int, int]]] = {}
    for _ in range(2):
        for g in group_keys:
            hs, es = H.groups.get(g, []), E.groups.get(g, [])
            gap = gap_penalty([s.start_ns for s in hs] if len(hs) >= 2 else [s.start_ns for s in es])
            pairs[g] = align([(s.start_ns, s.end_ns) for s in hs],
                             [(s.start_ns, s.end_ns) for s in es], offset, gap)
        all_pairs = [(H.groups[g][i], E.groups[g][j]) for g in group_keys for i, j in pairs[g]]
        if not all_pairs:
            break
        # Midpoint of the start and end fits: the probe enters a little after the call site
        # and leaves a little before it, so the two medians sit either side of the true offset.
        ds = sorted(e.start_ns - h.start_ns for h, e in all_pairs)
        de = sorted(e.end_ns - h.end_ns for h, e in all_pairs)
        offset = int(round((percentile(ds, 50) + percentile(de, 50)) / 2))

    t0 = min((s.start_ns for s in H.compared()), default=0)

    def ref(side: _Side, s: Span) -> SpanRef:
        shift = offset if side is E else 0
        return SpanRef(side.label, s.name, s.thread_id, side.position[_key(s)], s.start_ns,
                       (s.start_ns - shift - t0) / 1e6)

    h2e: Dict[SpanKey, Span] = {}
    e2h: Dict[SpanKey, Span] = {}
    missed: List[SpanRef] = []
    extra: List[SpanRef] = []
    for g in group_keys:
        hs, es = H.groups.get(g, []), E.groups.get(g, [])
        used_h = {i for i, _ in pairs[g]}
        used_e = {j for _, j in pairs[g]}
        for i, j in pairs[g]:
            h2e[_key(hs[i])] = es[j]
            e2h[_key(es[j])] = hs[i]
        missed += [ref(H, s) for i, s in enumerate(hs) if i not in used_h]
        extra += [ref(E, s) for j, s in enumerate(es) if j not in used_e]
    missed.sort(key=lambda r: r.rel_ms)
    extra.sort(key=lambda r: r.rel_ms)
    matched = sorted(((h, h2e[_key(h)]) for h in H.compared() if _key(h) in h2e),
                     key=lambda p: p[0].start_ns)

    # Per-name accumulators.
    d_start: Dict[str, List[int]] = defaultdict(list)
    d_end: Dict[str, List[int]] = defaultdict(list)
    d_dur: Dict[str, List[int]] = defaultdict(list)
    d_event: Dict[str, List[int]] = defaultdict(list)
    n_reparented: Dict[str, int] = defaultdict(int)
    ev_h: Dict[str, int] = defaultdict(int)
    ev_e: Dict[str, int] = defaultdict(int)
    ev_m: Dict[str, int] = defaultdict(int)
    v_cmp: Dict[str, int] = defaultdict(int)
    v_bad: Dict[str, int] = defaultdict(int)
    reparented: List[Reparented] = []
    events_missed: List[EventRef] = []
    events_extra: List[EventRef] = []
    mismatches: List[AttributeMismatch] = []
    outliers: List[TimingOutlier] = []
    not_captured: Dict[str, int] = defaultdict(int)
    events_on_missed = 0

    for s in H.compared():
        ev_h[s.name] += len(s.events)
        if _key(s) not in h2e:
            events_on_missed += len(s.events)
    for s in E.compared():
        ev_e[s.name] += len(s.events)

    outlier_limit_us = thresholds.max_p99_us
    if thresholds.max_abs_us is not None:
        outlier_limit_us = min(outlier_limit_us, thresholds.max_abs_us)

    for h, e in matched:
        name = h.name
        hr = ref(H, h)
        rs, re_ = e.start_ns - offset - h.start_ns, e.end_ns - offset - h.end_ns
        d_start[name].append(rs)
        d_end[name].append(re_)
        d_dur[name].append(e.duration_ns - h.duration_ns)
        for boundary, d in (("start", rs), ("end", re_)):
            if abs(d) / 1000.0 > outlier_limit_us:
                outliers.append(TimingOutlier(hr, boundary, d / 1000.0))

        # Structure: the ebpf parent must be the match of the hooks parent.
        hp, ep = H.parent(h), E.parent(e)
        expected = h2e.get(_key(hp)) if hp is not None else None
        if hp is not None and expected is None:
            # The hooks parent was missed (already a recall failure); only a parent that is
            # the match of some other hooks span is then a structural difference.
            bad = ep is not None and _key(ep) in e2h
        else:
            bad = (ep is None) != (expected is None) or (
                ep is not None and expected is not None and _key(ep) != _key(expected))
        if bad:
            n_reparented[name] += 1
            reparented.append(Reparented(hr, ref(H, hp) if hp else None, ref(E, ep) if ep else None))

        n, bad, missing = attr_diffs(h.attributes, e.attributes)
        v_cmp[name] += n
        v_bad[name] += len(bad)
        mismatches += [AttributeMismatch(hr, None, None, k, hv, ev) for k, hv, ev in bad]
        for k in missing:
            not_captured[f"span {name}: {k}"] += 1

        # Events: per name, matched by order when both sides hold as many, else aligned on
        # time, so one lost event stays one.
        he_by, ee_by = _events_by_name(h.events), _events_by_name(e.events)
        er = ref(E, e)
        for ev_name in dict.fromkeys([*he_by, *ee_by]):
            hl, el = he_by.get(ev_name, []), ee_by.get(ev_name, [])
            if len(hl) == len(el):
                # Same count inside a matched span: order is the match. Aligning on time
                # instead can pair neighbours when events are closer together than the
                # drift the probes add inside one span.
                ev_pairs = [(i, i) for i in range(len(hl))]
            else:
                # Times relative to each side's own span start, so the drift accumulated
                # before this span does not shift the alignment.
                rel_h = [x.time_ns - h.start_ns for x in hl]
                rel_e = [x.time_ns - e.start_ns for x in el]
                gap = gap_penalty(rel_h if len(rel_h) >= 2 else rel_e)
                ev_pairs = align([(t, t) for t in rel_h], [(t, t) for t in rel_e], 0, gap)
            used_h = {i for i, _ in ev_pairs}
            used_e = {j for _, j in ev_pairs}
            events_missed += [EventRef(hr, ev_name, i, x.time_ns) for i, x in enumerate(hl)
                              if i not in used_h]
            events_extra += [EventRef(er, ev_name, j, x.time_ns) for j, x in enumerate(el)
                             if j not in used_e]
            for i, j in ev_pairs:
                hx, ex = hl[i], el[j]
                ev_m[name] += 1
                d_event[name].append(ex.time_ns - offset - hx.time_ns)
                n, bad, missing = attr_diffs(hx.attributes, ex.attributes)
                v_cmp[name] += n
                v_bad[name] += len(bad)
                mismatches += [AttributeMismatch(hr, ev_name, i, k, hv, ev) for k, hv, ev in bad]
                for k in missing:
                    not_captured[f"event {ev_name}: {k}"] += 1

    outliers.sort(key=lambda o: -abs(o.delta_us))

    def row(name: str, nh: int, ne: int, nm: int, starts: List[int], ends: List[int],
            durs: List[int], evs: List[int], rep: int, eh: int, ee: int, em: int,
            vc: int, vb: int) -> NameReport:
        return NameReport(name, nh, ne, nm, nm / nh if nh else None, nm / ne if ne else None,
                          Timing(Distribution.of(starts), Distribution.of(ends),
                                 Distribution.of(durs), Distribution.of(evs)),
                          rep, eh, ee, em, vc, vb)

    per_name = []
    count_h = {n: sum(len(v) for g, v in H.groups.items() if g[0] == n) for n in name_list}
    count_e = {n: sum(len(v) for g, v in E.groups.items() if g[0] == n) for n in name_list}
    count_m = defaultdict(int)
    for h, _ in matched:
        count_m[h.name] += 1
    for n in name_list:
        per_name.append(row(n, count_h[n], count_e[n], count_m[n], d_start[n], d_end[n], d_dur[n],
                            d_event[n], n_reparented[n], ev_h[n], ev_e[n], ev_m[n], v_cmp[n], v_bad[n]))

    def cat(d: Dict[str, List[int]]) -> List[int]:
        return [x for n in name_list for x in d[n]]

    overall = row("*", sum(count_h.values()), sum(count_e.values()), len(matched),
                  cat(d_start), cat(d_end), cat(d_dur), cat(d_event), len(reparented),
                  sum(ev_h.values()), sum(ev_e.values()), sum(ev_m.values()),
                  sum(v_cmp.values()), sum(v_bad.values()))

    failures = _judge(thresholds, per_name, overall, missed, extra, reparented, events_missed,
                      events_extra, events_on_missed, mismatches, outliers)

    return ParityReport(
        passed=not failures, thresholds=thresholds, names=tuple(name_list), offset_ns=offset,
        offset_pairs=len(matched), overall=overall, per_name=tuple(per_name),
        missed=tuple(missed), extra=tuple(extra), reparented=tuple(reparented),
        events_missed=tuple(events_missed), events_extra=tuple(events_extra),
        mismatches=tuple(mismatches), outliers=tuple(outliers),
        not_captured=dict(sorted(not_captured.items())), failures=tuple(failures))


def _judge(t: Thresholds, per_name: Sequence[NameReport], overall: NameReport,
           missed: Sequence[SpanRef], extra: Sequence[SpanRef], reparented: Sequence[Reparented],
           events_missed: Sequence[EventRef], events_extra: Sequence[EventRef], events_on_missed: int,
           mismatches: Sequence[AttributeMismatch], outliers: Sequence[TimingOutlier]) -> List[Failure]:
    out: List[Failure] = []

    def examples(items: Sequence[Any]) -> Tuple[str, ...]:
        return tuple(i.describe() for i in items[:EXAMPLES])

    if overall.hooks == 0 and overall.ebpf == 0:
        out.append(Failure("nothing compared", 0, "neither file holds a span with the compared names "
                           f"({', '.join(r.name for r in per_name) or 'none given'})"))
        return out
    absent = [r.name for r in per_name if r.hooks == 0 and r.ebpf == 0]
    if absent:
        out.append(Failure("absent", len(absent), "names in neither file: " + ", ".join(absent)))

    low_recall = [r for r in per_name if r.recall is not None and r.recall < t.min_recall]
    if low_recall:
        detail = "; ".join(f"{r.name} {_pct(r.recall)} ({r.matched}/{r.hooks})" for r in low_recall)
        out.append(Failure("recall", len(missed),
                           f"{len(missed)} hooks span(s) have no eBPF match; recall below "
                           f"{_pct(t.min_recall)}: {detail}", examples(missed)))
    low_precision = [r for r in per_name if r.precision is not None and r.precision < t.min_precision]
    if low_precision:
        detail = "; ".join(f"{r.name} {_pct(r.precision)} ({r.matched}/{r.ebpf})" for r in low_precision)
        out.append(Failure("precision", len(extra),
                           f"{len(extra)} eBPF span(s) match no hooks span; precision below "
                           f"{_pct(t.min_precision)}: {detail}", examples(extra)))
    if reparented:
        out.append(Failure("structure", len(reparented),
                           f"{len(reparented)} matched span(s) have a different parent in eBPF",
                           examples(reparented)))
    if mismatches:
        out.append(Failure("attributes", len(mismatches),
                           f"{len(mismatches)} of {overall.values_compared} captured attribute values "
                           "disagree", examples(mismatches)))
    ev_recall = overall.events_matched / overall.events_hooks if overall.events_hooks else None
    ev_precision = overall.events_matched / overall.events_ebpf if overall.events_ebpf else None
    n_ev_missed = len(events_missed) + events_on_missed
    if ev_recall is not None and ev_recall < t.min_recall:
        out.append(Failure("event recall", n_ev_missed,
                           f"event recall {_pct(ev_recall)} < {_pct(t.min_recall)}: {n_ev_missed} hooks "
                           f"event(s) unmatched ({events_on_missed} of them on missed spans)",
                           examples(events_missed)))
    n_ev_extra = overall.events_ebpf - overall.events_matched
    if ev_precision is not None and ev_precision < t.min_precision:
        out.append(Failure("event precision", n_ev_extra,
                           f"event precision {_pct(ev_precision)} < {_pct(t.min_precision)}: "
                           f"{n_ev_extra} eBPF event(s) unmatched", examples(events_extra)))

    for boundary in ("start", "end"):
        rows = [r for r in [overall, *per_name]
                if getattr(r.timing, boundary).p99_abs_us is not None
                and getattr(r.timing, boundary).p99_abs_us > t.max_p99_us]
        if rows:
            worst = [o for o in outliers if o.boundary == boundary]
            detail = "; ".join(f"{'all spans' if r.name == '*' else r.name} "
                               f"{getattr(r.timing, boundary).p99_abs_us:.1f} µs" for r in rows)
            out.append(Failure(f"timing {boundary}", len(worst),
                               f"p99 |Δ{boundary}| after the offset exceeds {t.max_p99_us:g} µs: {detail}",
                               examples(worst)))
    if t.max_abs_us is not None:
        over = [o for o in outliers if abs(o.delta_us) > t.max_abs_us]
        if over:
            out.append(Failure("timing max", len(over),
                               f"{len(over)} boundary difference(s) exceed {t.max_abs_us:g} µs",
                               examples(over)))
    return out


# ---- text -------------------------------------------------------------------------------

def _us(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def format_report(r: ParityReport) -> str:
    """The table and the verdict, for people."""
    header = ("span", "hooks", "ebpf", "matched", "recall", "precision",
              "start p99 µs", "end p99 µs", "dur Δ med µs")
    rows = [header]
    for n in [*r.per_name, r.overall]:
        rows.append(("(all)" if n.name == "*" else n.name, str(n.hooks), str(n.ebpf), str(n.matched),
                     _pct(n.recall), _pct(n.precision), _us(n.timing.start.p99_abs_us),
                     _us(n.timing.end.p99_abs_us), _us(n.timing.duration.median_us, signed=True)))
    widths = [max(len(x[i]) for x in rows) for i in range(len(header))]
    lines = []
    for k, x in enumerate(rows):
        if k == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join([x[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(x[1:], widths[1:])]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    o = r.overall
    lines.append("")
    lines.append(f"clock offset (ebpf - hooks): {r.offset_ns / 1e6:+.6f} ms, fitted on {r.offset_pairs} "
                 "matched spans (midpoint of the start and end medians)")
    for label, d in (("start", o.timing.start), ("end", o.timing.end),
                     ("duration", o.timing.duration), ("event time", o.timing.event)):
        lines.append(f"  {label:<10} Δ: median {_us(d.median_us, True)} µs, p99 |Δ| {_us(d.p99_abs_us)} µs, "
                     f"max |Δ| {_us(d.max_abs_us)} µs  (n={d.count})")
    lines.append(f"structure: {'identical' if not r.reparented else f'{len(r.reparented)} re-parented'}"
                 f" ({o.matched} parent links checked)")
    ev_recall = o.events_matched / o.events_hooks if o.events_hooks else None
    ev_precision = o.events_matched / o.events_ebpf if o.events_ebpf else None
    lines.append(f"events: hooks {o.events_hooks}, ebpf {o.events_ebpf}, matched {o.events_matched} "
                 f"(recall {_pct(ev_recall)}, precision {_pct(ev_precision)})")
    lines.append(f"attributes: {o.values_compared} captured values compared, {o.values_disagreeing} disagree")
    if r.not_captured:
        lines.append("not captured by eBPF (not a failure): "
                     + ", ".join(f"{k} ×{v}" for k, v in r.not_captured.items()))
    lines.append("")
    lines.append(f"verdict: {r.verdict}")
    lines += [f.describe() for f in r.failures]
    return "\n".join(lines)
