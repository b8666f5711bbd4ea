"""Raw entry/exit events -> spans and span events.

Pairing is by frame address, not by per-thread order: a frame is one activation, from its
first RESUME (or eval entry) to its release, so recursion, exceptions and threads pair
exactly. A generator or coroutine frame lives across suspensions: its span runs from its
first start to its frame's release, and `ophamin.resumes` counts re-entries (on 3.9/3.10
suspensions are seen too: `ophamin.suspensions`). On 3.11+ the RESUME oparg tells a call's
start from a resume, so a generator suspended before attach is reported cut at attach, never
given an invented start. The parent of a span is the
nearest caller frame that is an open span (the kernel names, at entry, the nearest two it has
open as span targets); events attach to that same nearest open span.

Loss is counted, never hidden: exits whose entry came before attach (cut at attach), spans
still open at detach (cut at detach), events with no open span to land on.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from ..capture.engine import EV_ENTRY, EV_EXIT, EV_EXIT_EXC, EV_RESUME, EV_SUSPEND, RawEvent
from ..discover.layout import Layout, _Mem, _read_str
from ..otlpjson import STATUS_ERROR, STATUS_UNSET, Span, SpanEvent
from ..spec import MAX_ARGS, Spec, Target
from .values import UNREADABLE, TypeAddrs, decode

# Span and trace ids must be unique, not secret (the OpenTelemetry SDK draws them the same way):
# a generator seeded from the OS costs a fraction of secrets.token_hex per span.
_ids = random.Random(int.from_bytes(os.urandom(16), "little"))


def _span_id() -> str:
    return f"{_ids.getrandbits(64) or 1:016x}"


def _trace_id() -> str:
    return f"{_ids.getrandbits(128) or 1:032x}"


class Clock:
    """CLOCK_MONOTONIC (BPF) -> Unix ns, with an offset re-measured every `every_s`."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._at = 0.0
        self.offset = 0
        self.measure()

    def measure(self) -> int:
        best = None
        for _ in range(5):  # the tightest bracket gives the least skewed pair
            m0 = time.monotonic_ns()
            r = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, r - (m0 + m1) // 2)
        self.offset = best[1]
        self._at = time.monotonic()
        return self.offset

    def unix(self, mono_ns: int) -> int:
        if time.monotonic() - self._at > self.every_s:
            self.measure()
        return mono_ns + self.offset


class ThreadNames:
    """A target's thread names by TID, read once from /proc ("" once the thread is gone)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._names: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        name = self._names.get(tid)
        if name is None:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = ""
            self._names[tid] = name
        return name


@dataclass
class _Open:
    target: Target
    span_id: str
    trace_id: str
    parent_span_id: str
    start: int
    tid: int
    attrs: dict
    events: list = field(default_factory=list)
    resumes: int = 0
    suspensions: int = 0
    sched0: dict | None = None
    rss0: int | None = None
    ts: int = 0  # the entry's kernel timestamp: the start its exit event names


@dataclass(frozen=True)
class Losses:
    cut_at_attach: dict[str, int]
    cut_at_detach: dict[str, int]
    orphan_events: dict[str, int]
    unreadable_attributes: int
    # Calls whose entry or exit was lost (ring-buffer drops): counted, never paired with another.
    unpaired: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"cut_at_attach": dict(self.cut_at_attach), "cut_at_detach": dict(self.cut_at_detach),
                "orphan_events": dict(self.orphan_events),
                "unreadable_attributes": self.unreadable_attributes, "unpaired": dict(self.unpaired)}


class Assembler:
    def __init__(self, spec: Spec, pid: int, layout: Layout, types: TypeAddrs,
                 clock: Clock | None = None, sched_attrs=None, resource: dict | None = None) -> None:
        self.targets = {t.target_id: t for t in spec.targets}
        self.pid = pid
        self.layout = layout
        self.types = types
        self.clock = clock or Clock()
        self.sched_attrs = sched_attrs  # (open span, exit event) -> attrs, from their snapshots
        self.resource = resource if resource is not None else {}  # shared by every span, not copied
        self.open: dict[int, _Open] = {}  # frame address -> open span
        self.cut_at_attach: Counter[str] = Counter()
        self.unpaired: Counter[str] = Counter()
        self.orphan_events: Counter[str] = Counter()
        self.unreadable = 0
        self.hits: Counter[str] = Counter()
        self._argnames: dict[int, tuple[str, ...]] = {}
        self._thread_name = ThreadNames(pid)

    # ---- helpers ------------------------------------------------------------------------

    def _arg_names(self, code: int) -> tuple[str, ...]:
        """Parameter names of a code object, read once from the target (read-only)."""
        names = self._argnames.get(code)
        if names is not None:
            return names
        lay = self.layout
        names = ()
        try:
            mem = _Mem(self.pid)
            try:
                off = lay.code_localsplusnames if lay.code_localsplusnames >= 0 else lay.code_varnames
                tup = mem.u64(code + off)
                n = min(mem.i64(tup + lay.var_size), MAX_ARGS)
                names = tuple(_read_str(mem, lay, mem.u64(tup + lay.tuple_items + 8 * i)) for i in range(n))
            finally:
                mem.close()
        except (OSError, ValueError):
            names = ()
        self._argnames[code] = names
        return names

    def _attributes(self, t: Target, ev: RawEvent) -> dict:
        if not t.attributes:
            return {}
        names = self._arg_names(ev.code)
        out = {}
        for a in t.attributes:
            if a.param not in names or names.index(a.param) >= len(ev.args):
                self.unreadable += 1
                continue
            obj, typ, head, data = ev.args[names.index(a.param)]
            v = decode(obj, typ, head, data, self.types, self.layout, a.length)
            if v is UNREADABLE:
                self.unreadable += 1
                continue
            out[a.key] = v
        return out

    def _nearest_open(self, ev: RawEvent) -> _Open | None:
        for f in ev.parents:
            if f == 0:
                break
            o = self.open.get(f)
            if o is not None and o.target.kind == "span":
                return o
        return None

    # ---- the event stream -------------------------------------------------------------
    def feed(self, events: list[RawEvent]) -> list[Span]:
        done: list[Span] = []
        for ev in events:
            t = self.targets.get(ev.target_id)
            if t is None:
                continue
            self.hits[t.name] += 1
            if ev.kind == EV_ENTRY:
                self._entry(t, ev)
            elif ev.kind == EV_RESUME:
                # A resume after yield/await: of an open span it is one more resumption; of a
                # frame not open, a generator started before attach: its start is unknown, so it
                # opens nothing and its exit counts as cut at attach.
                o = self.open.get(ev.frame)
                if o is not None:
                    o.resumes += 1
            elif ev.kind == EV_SUSPEND:
                o = self.open.get(ev.frame)
                if o is not None:
                    o.suspensions += 1
            elif ev.kind in (EV_EXIT, EV_EXIT_EXC) and t.kind == "span":
                s = self._exit(t, ev)
                if s is not None:
                    done.append(s)
        return done

    def _entry(self, t: Target, ev: RawEvent) -> None:
        if t.kind == "event":
            parent = self._nearest_open(ev)
            if parent is None:
                self.orphan_events[t.name] += 1
                return
            parent.events.append(SpanEvent(t.name, self.clock.unix(ev.ts), self._attributes(t, ev)))
            return
        o = self.open.get(ev.frame)
        if o is not None:
            if o.target.target_id == t.target_id:
                o.resumes += 1  # a RESUME re-run after instrumenting (3.12+ sys.monitoring)
                return
            # Another function's call at this frame address: the open span's exit was lost (a
            # ring-buffer drop, counted there). Never let it absorb this call: count it, go on.
            del self.open[ev.frame]
            self.unpaired[o.target.name] += 1
        parent = self._nearest_open(ev)
        attrs = {"thread.id": ev.tid, "thread.name": self._thread_name(ev.tid),
                 "code.function": t.qualname.rsplit(".", 1)[-1], "code.namespace": t.module}
        attrs.update(self._attributes(t, ev))
        self.open[ev.frame] = _Open(
            t, _span_id(), parent.trace_id if parent else _trace_id(),
            parent.span_id if parent else "", self.clock.unix(ev.ts), ev.tid, attrs,
            sched0=ev.sched, rss0=ev.rss, ts=ev.ts)

    def _exit(self, t: Target, ev: RawEvent) -> Span | None:
        o = self.open.pop(ev.frame, None)
        if o is None:
            # The kernel knows when the call began: never (0) means before attach; a start means
            # its entry event was dropped (ring buffer full), a loss of another kind.
            (self.unpaired if ev.start else self.cut_at_attach)[t.name] += 1
            return None
        if o.target.target_id != t.target_id or (ev.start and ev.start != o.ts):
            # Two calls at one frame address: o's exit and this exit's entry were both dropped
            # (the same function called again reuses the address; the kernel's start tells them apart).
            self.unpaired[o.target.name] += 1
            self.unpaired[t.name] += 1
            return None
        attrs = dict(o.attrs)
        if o.resumes:
            attrs["ophamin.resumes"] = o.resumes
        if o.suspensions:
            attrs["ophamin.suspensions"] = o.suspensions
        if self.sched_attrs is not None and o.sched0 is not None and ev.sched is not None:
            attrs.update(self.sched_attrs(o, ev))
        status, message = STATUS_UNSET, ""
        if ev.kind == EV_EXIT_EXC:
            status, message = STATUS_ERROR, ev.exc_name or "exception"
            attrs["exception.type"] = ev.exc_name
        return Span(o.trace_id, o.span_id, o.parent_span_id, t.name, o.start, self.clock.unix(ev.ts),
                    attrs, tuple(o.events), status, message, self.resource)

    def cut_spans(self, alive_mono_ns: int, reason: str) -> list[Span]:
        """The spans still open when the trace ends, closed at the last moment the tracer knew
        the target alive (CLOCK_MONOTONIC ns) and marked cut: `ophamin.cut = "detach"`, status
        ERROR with `reason`. Pure: they stay open here, so losses() still counts them."""
        end = self.clock.unix(alive_mono_ns)
        out = []
        for o in self.open.values():
            if o.target.kind != "span":
                continue
            attrs = dict(o.attrs)
            if o.resumes:
                attrs["ophamin.resumes"] = o.resumes
            if o.suspensions:
                attrs["ophamin.suspensions"] = o.suspensions
            attrs["ophamin.cut"] = "detach"
            last = max([o.start, *(e.time_ns for e in o.events)])
            out.append(Span(o.trace_id, o.span_id, o.parent_span_id, o.target.name, o.start, max(end, last),
                            attrs, tuple(o.events), STATUS_ERROR, f"cut at detach: {reason}", self.resource))
        return out

    def losses(self) -> Losses:
        detach = Counter(o.target.name for o in self.open.values() if o.target.kind == "span")
        return Losses(dict(self.cut_at_attach), dict(detach), dict(self.orphan_events), self.unreadable,
                      dict(self.unpaired))


def resource_for(spec: Spec, interp, pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return {
        "service.name": spec.service,
        "process.pid": pid,
        "process.command_line": cmd,
        "process.runtime.name": "CPython",
        "process.runtime.version": ".".join(map(str, interp.version)),
        "host.name": os.uname().nodename,
        "telemetry.source": "ebpf",
        "telemetry.sdk.name": "ophamin-trace",
    }
