"""Load bpf/capture.c for one target process, attach the planned probes, stream events.

The BPF side is compiled per target: the interpreter's struct offsets become -D macros,
so the kernel code reads exactly the layout discovery chose. Probes are perf-event
uprobes owned by this process's file descriptors, so they disappear with it however it
ends (SIGKILL included); `close()` detaches them eagerly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..access import require_tracing_access, tracefs_probes_of
from ..discover.elf import open_image
from ..discover.layout import Layout, layout_for, walk_threads_live
from ..discover.process import Interpreter, find_interpreter, is_alive
from ..errors import PrivilegeError, TargetGone, TraceError
from ..plan.probes import ProbePlan, plan_for
from ..plan.verify import verify_plan
from ..spec import MAX_ARGS, Spec
from .names import NameRule, fnv, rules_for
from .output import CapturedOutput

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
RINGBUF_PAGES = 1024  # 4 MiB: ~4,500 entry events in flight before a drop is counted
# Events taken per poll: libbpf's poll consumes until the ring is empty, which under a target
# producing faster than we read is never, so the loop would neither stop on a signal nor bound
# its memory. At this many, the callback ends the poll (the rest stays in the ring).
MAX_EVENTS_PER_POLL = 4096
COUNTERS = ("entry_hits", "exit_hits", "target_entries", "target_exits", "dropped", "no_tstate",
            "read_faults", "stack_overflow", "classified", "dropped_entries", "dropped_exits", "execs")
# Frame fields the 3.9/3.10 exit needs to tell a generator's yield from its return
# (verified against DWARF by tests/test_capture.py).
FRAME_SUSPEND_FIELD = {(3, 9): ("OFF_FRAME_STACKTOP", 72), (3, 10): ("OFF_FRAME_STATE", 108)}
EV_ENTRY, EV_EXIT, EV_EXIT_EXC, EV_SUSPEND = 1, 2, 3, 4


@dataclass(frozen=True)
class RawEvent:
    ts: int  # CLOCK_MONOTONIC ns
    tid: int
    kind: int
    target_id: int
    frame: int
    code: int
    exc_name: str
    ancestors: tuple[int, ...]
    args: tuple[tuple[int, int, bytes, bytes], ...]  # (obj, type, head, data)
    sched: dict | None = None
    rss: int | None = None


@dataclass
class Attached:
    interp: Interpreter
    layout: Layout
    plan: ProbePlan
    rules: list[NameRule]
    warnings: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    attach_s: float = 0.0


def _cflags(pid: int, layout: Layout, version: tuple[int, int, int], with_sched: bool) -> list[str]:
    flags = [f"-DTARGET_TGID={pid}", f"-DRINGBUF_PAGES={RINGBUF_PAGES}", f"-DPY_MINOR={version[1]}"]
    for name, value in layout.to_dict().items():
        if isinstance(value, int):
            flags.append(f"-DOFF_{name.upper()}={value}")
    match = layout.code_qualname if version[:2] >= (3, 11) else layout.code_name
    flags.append(f"-DOFF_CODE_MATCH_NAME={match}")
    if version[:2] in FRAME_SUSPEND_FIELD:
        flags.append("-DPY_EVAL_FRAME")
        macro, off = FRAME_SUSPEND_FIELD[version[:2]]
        flags.append(f"-D{macro}={off}")
    if with_sched:
        flags += ["-DWITH_SCHED", f"-DSCHED_NR_CPUS={os.cpu_count() or 1}"]
    return flags


class CaptureEngine:
    """One target process: compile, fill the maps, attach, then `poll()` until `close()`."""

    def __init__(self, pid: int, spec: Spec, *, with_sched: bool = False) -> None:
        require_tracing_access(pid)  # before anything is loaded (tracer/access.py)
        from bcc import BPF  # Debian's python3-bpfcc; imported late so --help works without it

        self.pid = pid
        self.spec = spec
        self.with_sched = with_sched
        interp = find_interpreter(pid)
        image = open_image(interp.host_path)
        layout = layout_for(interp.host_path, interp.version, interp.build_id)
        plan = plan_for(image, interp.version)
        rules: list[NameRule] = []
        warnings: list[str] = []
        for t in spec.targets:
            r, w = rules_for(t, pid, interp.version)
            rules += r
            warnings += w
        self.info = Attached(interp, layout, plan, rules, warnings)
        self._events: list[RawEvent] = []
        self._received = {True: 0, False: 0}  # events read from the ring: entries (True), exits
        self._closed = False
        text = (BPF_DIR / "capture.c").read_text()
        if with_sched:
            text = (BPF_DIR / "sched.c").read_text() + "\n" + text
        t0 = time.monotonic()
        # libbcc prints compiler chatter to stdout; keep the user's terminal clean.
        out = CapturedOutput()
        try:
            with out:
                self.bpf = BPF(text=text.encode(), cflags=_cflags(pid, layout, interp.version, with_sched))
        except (Exception, SystemExit) as e:  # bcc raises bare Exception, or exits
            raise TraceError(f"BPF compile failed: {e}; {out.tail()}") from None
        self.info.compile_s = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            self._fill_maps(rules)
            self._attach(plan, interp)
        except BaseException as e:
            self.close()  # probes attached before a failure go now, not at garbage collection
            if isinstance(e, OSError) and not is_alive(pid):  # it exited while BPF compiled
                raise TargetGone(f"process {pid} exited while the tracer attached") from None
            raise
        self.info.attach_s = time.monotonic() - t0
        # bcc cannot infer the event type from a struct with nested arrays: use the
        # scratch map's value type, which is the same `struct event`.
        self._event_type = self.bpf["scratch"].sLeaf
        self.bpf["events"].open_ring_buffer(self._on_event)

    # ---- setup ------------------------------------------------------------------------
    def _fill_maps(self, rules: list[NameRule]) -> None:
        names = self.bpf["names"]
        slots: dict[int, int] = {}
        for r in rules:
            h = r.key_hash()
            slot = slots.get(h, 0)
            if slot >= 4:
                raise TraceError(f"more than 4 spec functions share the name {r.match_name!r}")
            slots[h] = slot + 1
            k = names.Key(h, slot, 0)
            suffix = r.suffix.encode()
            names[k] = names.Leaf(r.target_id, len(suffix), fnv(suffix), r.firstlineno, int(r.exact))
        targets = self.bpf["targets"]
        for t in self.spec.targets:
            cfg = targets.Leaf()
            cfg.nargs = MAX_ARGS if t.attributes else 0
            for i in range(MAX_ARGS):
                cfg.arg_index[i] = i
            targets[ctypes.c_int(t.target_id)] = cfg

    def seed_threads(self) -> int:
        """3.11+: teach the kernel side every existing thread's state (new threads are
        learnt in the kernel when they first enter the eval loop)."""
        if self.info.plan.strategy != "resume-handlers":
            return 0
        image = open_image(self.info.interp.host_path)
        runtime = self.info.interp.runtime(image.symbol("_PyRuntime").value)
        tstates = self.bpf["tstates"]
        n = 0
        for th in walk_threads_live(self.pid, self.info.layout, runtime):
            if th.native_thread_id > 0:
                tstates[ctypes.c_uint(th.native_thread_id)] = ctypes.c_ulonglong(th.tstate)
                n += 1
        return n

    def _attach(self, plan: ProbePlan, interp: Interpreter) -> None:
        fn = {"entry": "on_entry", "exit": "on_exit", "tstate": "on_tstate"}
        verify_plan(open_image(interp.host_path), plan, self.pid, interp.bias)  # boundaries, re-proven
        # Exits first, entries last, threads seeded in between: a call in flight while probes
        # go in then shows as an exit without entry (counted: cut at attach), never as an
        # entry without exit (an open span whose frame, reused, would swallow the next call),
        # and no entry is missed for want of a thread state.
        order = {"exit": 0, "tstate": 1, "entry": 2}
        seeded = False
        for site in sorted(plan.sites, key=lambda s: order[s.role]):
            if site.role == "entry" and not seeded:
                self.seed_threads()
                seeded = True
            try:
                self.bpf.attach_uprobe(name=interp.host_path.encode(), addr=site.vaddr,
                                       fn_name=fn[site.role].encode(), pid=self.pid)
            except (Exception, SystemExit) as e:  # bcc raises bare Exception, or exits
                if not os.path.exists(f"/proc/{self.pid}"):
                    raise TargetGone(f"process {self.pid} exited while attaching") from None
                raise TraceError(f"cannot attach uprobe at {site.label} ({site.vaddr:#x}): {e}") from None
        if tracefs_probes_of(os.getpid()):  # bcc fell back to tracefs: such probes outlive a killed tracer
            raise PrivilegeError("uprobes were created through tracefs, not as perf events: refusing to trace")

    # ---- streaming --------------------------------------------------------------------
    def _on_event(self, _ctx, data, _size) -> None:
        e = ctypes.cast(data, ctypes.POINTER(self._event_type)).contents
        args = tuple((a.obj, a.type, bytes(a.head), bytes(a.data)) for a in e.args[: e.nargs])
        sched = None
        rss = None
        if self.with_sched:
            s = e.sched
            sched = {f: getattr(s, f) for f, _ in s._fields_ if f != "cpu_runs"}
            sched["cpu_runs"] = list(s.cpu_runs)
            rss = e.rss
        self._events.append(RawEvent(
            e.ts, e.tid, e.kind, e.target_id, e.frame, e.code,
            bytes(e.exc_name).split(b"\0", 1)[0].decode(errors="replace"),
            tuple(e.ancestors), args, sched, rss))
        self._received[e.kind == EV_ENTRY] += 1
        return -1 if len(self._events) >= MAX_EVENTS_PER_POLL else 0  # < 0 ends this poll; this event is kept

    def poll(self, timeout_ms: int = 100) -> list[RawEvent]:
        self.bpf.ring_buffer_poll(timeout_ms)
        out, self._events = self._events, []
        return out

    def drain(self, max_events: int = 4 * MAX_EVENTS_PER_POLL) -> list[RawEvent]:
        """What the ring holds now, in bounded batches (a target still running keeps adding)."""
        out: list[RawEvent] = []
        while len(out) < max_events:
            self.bpf.ring_buffer_consume()
            batch, self._events = self._events, []
            out += batch
            if len(batch) < MAX_EVENTS_PER_POLL:
                break
        return out

    def finish(self) -> list[RawEvent]:
        """Detach every probe, then read the ring to its end. Afterwards the counters are final:
        per kind, events received + dropped = events the kernel made."""
        self.detach_probes()
        out: list[RawEvent] = []
        while True:
            batch = self.drain()
            out += batch
            if not batch:
                return out

    def detach_probes(self) -> None:
        # The reverse of the attach order: entries go first, exits last, so a call in flight
        # ends as a span or stays open (cut), and no entry goes without its exit.
        for name, fd in reversed(list(self.bpf.uprobe_fds.items())):
            try:
                self.bpf.detach_uprobe_event(name)
            except Exception:  # noqa: BLE001 - without root bcc cannot read tracefs; the fd is what matters
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.bpf.uprobe_fds.pop(name, None)

    def counters(self) -> dict[str, int]:
        table = self.bpf["counters"]
        out = {}
        for i, name in enumerate(COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        out["received_entries"], out["received_exits"] = self._received[True], self._received[False]
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.detach_probes()
        self.bpf.cleanup()
