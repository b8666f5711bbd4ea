"""Stack samples -> spans, for the sampled mode.

A sample names the spec functions on one thread's stack at one instant, each by its frame
address and a key of the objects its first parameters hold. An activation is a (function,
frame) pair seen in consecutive observations of its thread with the same key; it ends at
the first observation that no longer shows it, or shows another key there (the next call
of a function called in a loop reuses the frame address, with other arguments). Its start and end are
known only to lie between two observations: each is put at the midpoint, and the half-gap
is reported (`ophamin.start_uncertainty_ns`, `ophamin.end_uncertainty_ns`), so durations
are unbiased and their error is stated.

Observations are the periodic on-CPU samples and the thread's switches: the stack walked
when it leaves a CPU holds, unchanged, until it is put back, so the time a function spends
blocked is inside its span (`ophamin.off_cpu_ns`), not a gap. A switch-out the kernel did
not walk (a thread over its walk budget: one walk per sampling period on average, bursts
of 64) counts as showing the thread's last stack, and its time away is no observation:
span boundaries there carry the wider uncertainty of the surrounding observations.

What sampling cannot tell is said, never guessed: two calls of one function at one frame
address, with the same arguments and no observation between them, are one span; a call
that rebinds one of its first four parameters is two; a call shorter than the sampling
period may be missed; a function seen in a thread's first observation may have started
before attach (marked `ophamin.cut = "attach"`, counted in `cut_at_attach`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..capture.sampler import F_NO_STACK, K_BACK, K_OFF_CPU, K_ON_CPU, RawSample
from ..otlpjson import STATUS_ERROR, STATUS_UNSET, Span
from ..spec import Spec, Target
from .spans import Clock, Losses, ThreadNames, _span_id, _trace_id

A_MODE = "ophamin.mode"
A_SAMPLES = "ophamin.samples"
A_OFF_CPU = "ophamin.off_cpu_ns"
A_START_UNC = "ophamin.start_uncertainty_ns"
A_END_UNC = "ophamin.end_uncertainty_ns"


@dataclass
class _Act:
    target: Target
    span_id: str
    trace_id: str
    parent_span_id: str
    before: int | None  # the thread's last observation before the first that showed it
    first: int
    last: int
    call: int  # the kernel's key of its parameters' objects (0: not keyed yet)
    samples: int = 0
    off_ns: int = 0


@dataclass
class _Thread:
    open: dict[tuple[int, int], _Act] = field(default_factory=dict)  # (target id, frame) -> activation
    last_ts: int | None = None  # its last observation
    stack: tuple[tuple[int, int, int], ...] = ()  # what that observation showed, innermost first
    off_since: int | None = None  # left a CPU then (walked or not), not back yet
    seeded: bool = False  # observed only by the attach-time read: off CPU since attach


class SampleAssembler:
    def __init__(self, spec: Spec, pid: int, clock: Clock | None = None, resource: dict | None = None) -> None:
        self.targets = {t.target_id: t for t in spec.targets if t.kind == "span"}
        self.pid = pid
        self.thread_name = ThreadNames(pid)
        self.clock = clock or Clock()
        self.resource = resource if resource is not None else {}
        self.threads: dict[int, _Thread] = {}
        self.seed_ns = 0
        self.seeds: dict[int, tuple] = {}
        self.cut_at_attach: Counter[str] = Counter()
        self.cut_at_detach: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()

    def seed(self, stacks: dict[int, tuple], ts: int) -> None:
        """The stacks read from the target at attach (thread pointer -> stack), at `ts`: a
        thread's first observation when the kernel did not see it earlier."""
        self.seeds, self.seed_ns = dict(stacks), ts

    def feed(self, samples: list[RawSample]) -> list[Span]:
        out: list[Span] = []
        for s in sorted(samples, key=lambda s: s.ts):
            th = self.threads.get(s.tid)
            if th is None:
                th = self.threads[s.tid] = _Thread()
                stack = self.seeds.pop(s.ptr, None)
                if stack is not None and s.ts >= self.seed_ns:
                    self._observe(th, s.tid, self.seed_ns, tuple(h for h in stack if h[0] in self.targets), out)
                    th.off_since, th.seeded = self.seed_ns, s.kind == K_BACK
                elif s.kind == K_BACK:
                    # Its first time on a CPU since attach, with no stack read then: a thread
                    # started after attach, which has run no Python yet.
                    self._observe(th, s.tid, s.ts, (), out)
                    continue
            if s.kind == K_BACK:
                if th.seeded or (th.off_since is not None and th.last_ts is not None
                                 and th.last_ts >= th.off_since):
                    # Walked at switch-out: that stack held all along; the thread is seen again.
                    gap = s.ts - th.off_since
                    for a in th.open.values():
                        a.off_ns += gap
                    self._observe(th, s.tid, s.ts, th.stack, out)
                th.off_since, th.seeded = None, False
                continue
            if s.kind == K_OFF_CPU:
                th.off_since = s.ts
                if s.flags & F_NO_STACK:
                    # Not walked (the thread's walk budget was spent, bpf/sample.c): its last
                    # stack is taken for the moment it left, and nothing for the time away.
                    self._observe(th, s.tid, s.ts, th.stack, out)
                    th.off_since = None
                    continue
            self._observe(th, s.tid, s.ts, tuple(h for h in s.hits if h[0] in self.targets), out,
                          on_cpu=s.kind == K_ON_CPU, seen=s.prev_seen)
        return out

    def _observe(self, th: _Thread, tid: int, ts: int, stack, out: list[Span], on_cpu: bool = False,
                 seen: int = 0) -> None:
        """`seen`: the kernel last knew this thread's stack then (walks it did not report,
        having nothing new to say, included): a tighter lower bound for what starts here."""
        present = {}
        for target, frame, call in stack:
            present[(target, frame)] = call
        for key in list(th.open):
            a = th.open[key]
            call = present.get(key)
            # Gone, or another call at the same frame address (its parameters hold other objects).
            if call is None or (call and a.call and call != a.call):
                out.append(self._close(th.open.pop(key), tid, ts))
        before = th.last_ts if th.last_ts is None or seen <= th.last_ts or seen >= ts else seen
        parent: _Act | None = None
        for target, frame, call in reversed(stack):  # outermost first: a parent opens before its children
            key = (target, frame)
            a = th.open.get(key)
            if a is None:
                t = self.targets[target]
                self.hits[t.name] += 1
                a = _Act(t, _span_id(), parent.trace_id if parent else _trace_id(),
                         parent.span_id if parent else "", before, ts, ts, call)
                if th.last_ts is None:
                    self.cut_at_attach[t.name] += 1
                th.open[key] = a
            a.last = ts
            a.call = a.call or call
            a.samples += on_cpu
            parent = a
        th.last_ts = ts
        th.stack = stack

    def _span(self, a: _Act, tid: int, end: int, end_unc: int, cut: str = "") -> Span:
        if a.before is None:
            start, start_unc = a.first, 0
        else:
            start = (a.before + a.first) // 2
            start_unc = a.first - start
        attrs = {"thread.id": tid, "thread.name": self.thread_name(tid), A_MODE: "sampled",
                 A_SAMPLES: a.samples, A_OFF_CPU: a.off_ns, A_START_UNC: start_unc, A_END_UNC: end_unc}
        if a.before is None:
            attrs["ophamin.cut"] = "attach"  # seen in the thread's first observation
        status, message = STATUS_UNSET, ""
        if cut:
            attrs["ophamin.cut"] = "detach"
            status, message = STATUS_ERROR, f"cut at detach: {cut}"
        return Span(a.trace_id, a.span_id, a.parent_span_id, a.target.name, self.clock.unix(start),
                    self.clock.unix(max(end, start)), attrs, (), status, message, self.resource)

    def _close(self, a: _Act, tid: int, next_ts: int) -> Span:
        end = (a.last + next_ts) // 2
        return self._span(a, tid, end, next_ts - end)

    def end_threads(self, live_tids: frozenset[int]) -> list[Span]:
        """Threads that have exited: their open activations ended after their last observation."""
        out: list[Span] = []
        for tid in [t for t in self.threads if t not in live_tids]:
            th = self.threads.pop(tid)
            for a in th.open.values():
                out.append(self._span(a, tid, a.last, 0))
        return out

    def cut_spans(self, alive_mono_ns: int, reason: str) -> list[Span]:
        """Activations still open at the end: they run on past the last moment seen alive."""
        out = [self._span(a, tid, max(alive_mono_ns, a.last), 0, cut=reason)
               for tid, th in self.threads.items() for a in th.open.values()]
        for th in self.threads.values():
            th.open.clear()
        self.cut_at_detach.update(s.name for s in out)
        return out

    def losses(self) -> Losses:
        return Losses(dict(self.cut_at_attach), dict(self.cut_at_detach), {}, 0)
