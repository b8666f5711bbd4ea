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
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..access import require_tracing_access, tracefs_probes_of
from ..discover.elf import open_image
from ..discover.layout import Layout, _Mem, _read_str, layout_for, walk_threads_live
from ..discover.process import Interpreter, find_interpreter, is_alive
from ..errors import PrivilegeError, TargetGone, TraceError
from ..plan.probes import ProbePlan, ProbeSite, plan_for
from ..plan.verify import verify_plan
from ..spec import MAX_ARGS, Spec
from .calls import CallStats, read_call_stats
from .names import NameRule, fnv, rules_for
from .output import CapturedOutput

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
RINGBUF_PAGES = 1024  # 4 MiB: ~4,500 entry events in flight before a drop is counted
# Events taken per poll: libbpf's poll consumes until the ring is empty, which under a target
# producing faster than we read is never, so the loop would neither stop on a signal nor bound
# its memory. At this many, the callback ends the poll (the rest stays in the ring).
MAX_EVENTS_PER_POLL = 4096
COUNTERS = ("entry_hits", "exit_hits", "target_entries", "target_exits", "dropped", "no_tstate",
            "read_faults", "stack_overflow", "classified", "eval_returns_lost", "open_full", "frame_reg_mismatch",
            "submitted", "dropped_entries", "dropped_exits", "execs")
EV_ENTRY, EV_EXIT, EV_EXIT_EXC, EV_SUSPEND, EV_RESUME = 1, 2, 3, 4, 5
_HEAD = struct.Struct("<QIHHIIQQQ")  # struct event up to `start`
# The BPF function behind each probe-site role (bpf/capture.c).
HANDLERS = {"entry": "on_entry", "exit": "on_exit", "eval-entry": "on_eval_entry", "eval-return": "on_eval_return"}
# Attach order (detach is the reverse): every exit probe, then every entry probe, then the
# frames already running are seeded (bpf/capture.c: until then an exit of an unknown target
# frame is still reported, counted as cut at attach). So no call can show an entry without its
# exit, and none that ends while the tracer attaches goes uncounted.
ATTACH_ORDER = {"exit": 0, "eval-return": 0, "eval-entry": 1, "entry": 1}
_LOCAL_INCLUDE = re.compile(r'#include "([a-z_]+\.h)"')
_PT_REGS = {"rax": "ax", "rbx": "bx", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di", "rbp": "bp", "rsp": "sp"}


def handler_for(site: ProbeSite) -> tuple[str, str]:
    """The BPF function a site runs, and the macro line that defines it ("" if capture.c has it).

    Entry sites whose frame register the plan proved get a handler reading that register
    (bpf/capture.c ENTRY_AT_REG / ENTRY_AT_REGS); the rest read the frame from the thread state."""
    if site.role != "entry" or not site.frame_register:
        return HANDLERS[site.role], ""
    f = _PT_REGS.get(site.frame_register, site.frame_register)
    if site.instr_register:
        i = _PT_REGS.get(site.instr_register, site.instr_register)
        return f"on_entry_{f}_{i}", f"ENTRY_AT_REGS({f}, {i})"
    return f"on_entry_{f}", f"ENTRY_AT_REG({f})"


class RawEvent(NamedTuple):
    """One kernel event, decoded. A NamedTuple, not a dataclass: one is built per event, and
    a frozen dataclass's __init__ costs four times as much (the reader's hot path)."""

    ts: int  # CLOCK_MONOTONIC ns
    tid: int
    kind: int
    target_id: int
    frame: int
    code: int
    exc_name: str
    parents: tuple[int, ...]  # entries: the nearest caller frames the kernel had open as span targets
    args: tuple[tuple[int, int, bytes, bytes], ...]  # (obj, type, head, data)
    sched: dict | None = None
    rss: int | None = None
    start: int = 0  # exits: the call's start in the kernel; 0 if it began before attach


@dataclass
class Attached:
    interp: Interpreter
    layout: Layout
    plan: ProbePlan
    rules: list[NameRule]
    warnings: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    attach_s: float = 0.0


def layout_cflags(pid: int, layout: Layout, version: tuple[int, int, int]) -> list[str]:
    """What bpf/pyframe.h needs: the target and its layout as OFF_* macros."""
    flags = [f"-DTARGET_TGID={pid}", f"-DPY_MINOR={version[1]}"]
    for name, value in layout.to_dict().items():
        if isinstance(value, int):
            flags.append(f"-DOFF_{name.upper()}={value}")
    match = layout.code_qualname if version[:2] >= (3, 11) else layout.code_name
    flags.append(f"-DOFF_CODE_MATCH_NAME={match}")
    return flags


def bpf_source(name: str) -> str:
    """A program of bpf/ with its local headers spliced in: bcc rewrites map calls
    (`map.lookup(...)`) only in the text it is given, never in an #included file."""
    out = []
    for line in (BPF_DIR / name).read_text().splitlines(keepends=True):
        m = _LOCAL_INCLUDE.match(line)
        out.append(bpf_source(m.group(1)) if m else line)
    return "".join(out)


def resolve_target(pid: int, spec: Spec) -> tuple[Interpreter, Layout, list[NameRule], list[str]]:
    """The target's interpreter, its layout, and the name rules of the spec's functions there."""
    interp = find_interpreter(pid)
    layout = layout_for(interp.host_path, interp.version, interp.build_id)
    rules: list[NameRule] = []
    warnings: list[str] = []
    for t in spec.targets:
        r, w = rules_for(t, pid, interp.version)
        rules += r
        warnings += w
    return interp, layout, rules, warnings


def classify_live(pid: int, info: Attached, code: int) -> tuple[int, int, int]:
    """bpf/pyframe.h's classify(), done here on the target's memory (read-only): the target
    id of a code object (0: none), its (qual)name object and its co_flags (0, 0, 0 if the
    object cannot be read)."""
    lay = info.layout
    try:
        mem = _Mem(pid)
    except OSError:  # the target is gone
        return 0, 0, 0
    try:
        name_obj = mem.u64(code + (lay.code_qualname if info.interp.version >= (3, 11) else lay.code_name))
        name = _read_str(mem, lay, name_obj)
        filename = _read_str(mem, lay, mem.u64(code + lay.code_filename))
        line = mem.u32(code + lay.code_firstlineno)
        co_flags = mem.u32(code + lay.code_flags)
    except (OSError, ValueError, UnicodeDecodeError):
        return 0, 0, 0
    finally:
        mem.close()
    return next((r.target_id for r in info.rules if r.matches(name, filename, line)), 0), name_obj, co_flags


def prog_stats(bpf) -> dict[str, tuple[int, int]]:
    """{program: (run_cnt, run_time_ns)}, the kernel's own accounting of each loaded program
    (run time only while BPF stats are enabled: kernel.bpf_stats_enabled or BPF_ENABLE_STATS)."""
    out = {}
    for name, fn in bpf.funcs.items():
        try:
            with open(f"/proc/self/fdinfo/{fn.fd}") as f:
                info = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        out[name.decode() if isinstance(name, bytes) else name] = (int(info.get("run_cnt", 0)),
                                                                   int(info.get("run_time_ns", 0)))
    return out


def read_counters(bpf, names: tuple[str, ...]) -> dict[str, int]:
    """A program's per-CPU `counters` array, summed over CPUs, by name."""
    table = bpf[b"counters"]
    return {name: int(sum(table[ctypes.c_int(i)])) for i, name in enumerate(names)}


def fill_names(bpf, rules: list[NameRule]) -> None:
    """The spec's functions, as bpf/pyframe.h's classify() looks them up."""
    names = bpf[b"names"]
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


def _cflags(pid: int, layout: Layout, version: tuple[int, int, int], with_sched: bool,
            verify_frame_register: bool = False, str_type: int = 0, n_targets: int = 1) -> list[str]:
    """`str_type`: PyUnicode_Type's address in the target (0: unknown, no string is read)."""
    flags = layout_cflags(pid, layout, version) + [f"-DRINGBUF_PAGES={RINGBUF_PAGES}", f"-DSTR_TYPE={str_type}ULL",
                                                   f"-DNTARGETS={n_targets + 1}"]
    if version[:2] in ((3, 9), (3, 10)):
        flags.append("-DPY_EVAL_FRAME")
    if version[:2] == (3, 11):
        flags.append("-DENTRY_FRAMES_END_AT_RETURN")
    if with_sched:
        from ..correlate.sched import sched_cflags  # noqa: PLC0415

        flags += ["-DWITH_SCHED", *sched_cflags(pid, with_target=False)]
    if verify_frame_register:
        flags.append("-DVERIFY_FRAME_REG")
    return flags


class CaptureEngine:
    """One target process: compile, fill the maps, attach, then `poll()` until `close()`."""

    def __init__(self, pid: int, spec: Spec, *, with_sched: bool = False, verify_frame_register: bool = False) -> None:
        """`verify_frame_register` (tests): count entries where the register the plan proved
        does not hold the thread state's current frame (counter `frame_reg_mismatch`)."""
        require_tracing_access(pid)  # before anything is loaded (tracer/access.py)
        from bcc import BPF  # Debian's python3-bpfcc; imported late so --help works without it

        self.pid = pid
        self.spec = spec
        self.with_sched = with_sched
        interp, layout, rules, warnings = resolve_target(pid, spec)
        image = open_image(interp.host_path)
        plan = plan_for(image, interp.version, layout)
        unicode_type = image.symbol("PyUnicode_Type")
        str_type = unicode_type.value + interp.bias if unicode_type is not None else 0
        self.info = Attached(interp, layout, plan, rules, warnings)
        self._span_ids = {t.target_id for t in spec.targets if t.kind == "span"}  # event targets are never parents
        self._events: list[RawEvent] = []
        self._received = {True: 0, False: 0}  # events read from the ring: entries (True), exits
        self._more = False  # the last poll stopped at MAX_EVENTS_PER_POLL: the ring holds more
        self._closed = False
        text = bpf_source("capture.c")
        lines = sorted({handler_for(s)[1] for s in plan.sites} - {""})
        text += "\n" + "\n".join(lines) + "\n"
        if with_sched:
            text = (BPF_DIR / "sched.c").read_text() + "\n" + text
        t0 = time.monotonic()
        # libbcc prints compiler chatter to stdout; keep the user's terminal clean.
        out = CapturedOutput()
        try:
            with out:
                self.bpf = BPF(text=text.encode(),
                               cflags=_cflags(pid, layout, interp.version, with_sched, verify_frame_register,
                                              str_type, len(spec.targets)))
                # Load (verify) every handler now, so a verifier log lands here, not on the terminal.
                for fn in {handler_for(s)[0] for s in plan.sites}:
                    self.bpf.load_func(fn.encode(), BPF.KPROBE)
        except (Exception, SystemExit) as e:  # bcc raises bare Exception, or exits
            raise TraceError(f"BPF compile failed: {e}; {out.tail()}") from None
        self.info.compile_s = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            self._fill_maps(rules)
            if with_sched:
                from ..correlate.sched import seed_rss  # noqa: PLC0415

                seed_rss(self.bpf, pid)  # before the probes: the first snapshots read it
            self._attach(plan, interp)
            self.seed_threads()
            self.bpf[b"attaching"][ctypes.c_int(0)] = ctypes.c_uint(0)  # from now on exits need a known frame
        except BaseException as e:
            self.close()  # probes attached before a failure go now, not at garbage collection
            if isinstance(e, OSError) and not is_alive(pid):  # it exited while BPF compiled
                raise TargetGone(f"process {pid} exited while the tracer attached") from None
            raise
        self.info.attach_s = time.monotonic() - t0
        # bcc cannot infer the event type from a struct with nested arrays: use the
        # scratch map's value type, which is the same `struct event`.
        self._event_type = self.bpf[b"scratch"].sLeaf
        self._decode = self._decoder()
        self.bpf[b"events"].open_ring_buffer(self._on_event)

    # ---- setup ------------------------------------------------------------------------
    def _fill_maps(self, rules: list[NameRule]) -> None:
        self.bpf[b"attaching"][ctypes.c_int(0)] = ctypes.c_uint(1)
        fill_names(self.bpf, rules)
        targets = self.bpf[b"targets"]
        for t in self.spec.targets:
            cfg = targets.Leaf()
            cfg.nargs = MAX_ARGS if t.attributes else 0
            cfg.span = int(t.target_id in self._span_ids)
            for i in range(MAX_ARGS):
                cfg.arg_index[i] = i
            targets[ctypes.c_int(t.target_id)] = cfg

    def seed_threads(self) -> int:
        """Right after attach: teach the kernel side the target frames already running, so that
        their exits are seen (and reported as cut at attach), and on 3.11+ every existing
        thread's state (new threads are learnt in the kernel when they first enter the eval
        loop). Returns the number of thread states walked."""
        image = open_image(self.info.interp.host_path)
        runtime = self.info.interp.runtime(image.symbol("_PyRuntime").value)
        threads = walk_threads_live(self.pid, self.info.layout, runtime)
        if self.info.plan.strategy != "resume-handlers":
            stacks = self.bpf[b"stacks"]
            for th in threads:
                # outermost first; starts stay 0: these calls began before attach, not timed
                running = [(f, target_id) for f, code in reversed(th.chain)
                           if (target_id := classify_live(self.pid, self.info, code)[0])]
                if running:
                    st = stacks.Leaf()
                    st.depth = len(running)
                    nearest = 0
                    for i, (f, target_id) in enumerate(running[: len(st.frames)]):
                        st.frames[i] = f
                        nearest = i + 1 if target_id in self._span_ids else nearest
                        st.nearest[i] = nearest
                    stacks[ctypes.c_ulonglong(th.tstate)] = st
            return len(threads)
        tstates = self.bpf[b"tstates"]
        open_frames = self.bpf[b"open_frames"]
        for th in threads:
            if th.native_thread_id > 0:
                tstates[ctypes.c_uint(th.native_thread_id)] = ctypes.c_ulonglong(th.tstate)
            for frame, code in th.chain:
                target_id = classify_live(self.pid, self.info, code)[0]
                if target_id:  # start 0: began before attach, not timed
                    open_frames[ctypes.c_ulonglong(frame)] = open_frames.Leaf(code, 0, target_id,
                                                                               int(target_id in self._span_ids))
        return len(threads)

    def _attach(self, plan: ProbePlan, interp: Interpreter) -> None:
        verify_plan(open_image(interp.host_path), plan, self.pid, interp.bias)  # boundaries, re-proven
        for site in sorted(plan.sites, key=lambda s: ATTACH_ORDER[s.role]):
            attach = self.bpf.attach_uretprobe if site.role == "eval-return" else self.bpf.attach_uprobe
            try:
                attach(name=interp.host_path.encode(), addr=site.vaddr, fn_name=handler_for(site)[0].encode(),
                       pid=self.pid)
            except (Exception, SystemExit) as e:  # bcc raises bare Exception, or exits
                if not os.path.exists(f"/proc/{self.pid}"):
                    raise TargetGone(f"process {self.pid} exited while attaching") from None
                raise TraceError(f"cannot attach uprobe at {site.label} ({site.vaddr:#x}): {e}") from None
        if tracefs_probes_of(os.getpid()):  # bcc fell back to tracefs: such probes outlive a killed tracer
            raise PrivilegeError("uprobes were created through tracefs, not as perf events: refusing to trace")

    # ---- streaming --------------------------------------------------------------------
    def _decoder(self):
        """Offsets of `struct event` (from the layout bcc gave the scratch map's value type),
        so each event is decoded with a few struct.unpack_from calls: this runs per event."""
        t = self._event_type
        exc, par, args = t.exc_name.offset, t.parents.offset, t.args.offset
        arg = struct.Struct("<QQ32s48s")
        parents = struct.Struct(f"<{len(t().parents)}Q")
        sched_t = type(t().sched) if self.with_sched else None
        sched_off, rss_off = (t.sched.offset, t.rss.offset) if self.with_sched else (0, 0)

        def decode(raw: bytes) -> RawEvent:
            ts, tid, kind, nargs, target_id, _, frame, code, start = _HEAD.unpack_from(raw, 0)
            exc_name = raw[exc:exc + 48].split(b"\0", 1)[0].decode(errors="replace") if kind == EV_EXIT_EXC else ""
            par_t = parents.unpack_from(raw, par) if len(raw) > par else ()
            args_t = tuple(arg.unpack_from(raw, args + arg.size * i) for i in range(nargs)) if nargs else ()
            sched = rss = None
            if sched_t is not None:
                s = sched_t.from_buffer_copy(raw, sched_off)
                sched = {f: getattr(s, f) for f, _ in s._fields_ if f != "cpu_runs"}
                sched["cpu_runs"] = list(s.cpu_runs)
                rss = struct.unpack_from("<Q", raw, rss_off)[0]
            return RawEvent(ts, tid, kind, target_id, frame, code, exc_name, par_t, args_t, sched, rss, start)

        return decode

    def _on_event(self, _ctx, data, size) -> int:
        ev = self._decode(ctypes.string_at(data, size))
        self._events.append(ev)
        self._received[ev.kind in (EV_ENTRY, EV_RESUME)] += 1
        return -1 if len(self._events) >= MAX_EVENTS_PER_POLL else 0  # < 0 ends this poll; this event is kept

    def poll(self, timeout_ms: int = 100) -> list[RawEvent]:
        """Events since the last call. Waits up to `timeout_ms` for a wakeup (the kernel side
        wakes the reader only every WAKE_EVERY events), then drains whatever is there; when the
        last call stopped at its bound, the ring still holds more and it does not wait: under
        overload most submits fail, and a wakeup due on a failed submit never comes."""
        if not self._more:
            self.bpf.ring_buffer_poll(timeout_ms)
        if len(self._events) < MAX_EVENTS_PER_POLL:  # the unwoken rest, up to the same bound
            self.bpf.ring_buffer_consume()
        out, self._events = self._events, []
        self._more = len(out) >= MAX_EVENTS_PER_POLL
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

    def call_stats(self) -> list[CallStats]:
        """Every ended call of each spec function, counted and timed in the kernel."""
        return read_call_stats(self.bpf, self.spec)

    def counters(self) -> dict[str, int]:
        out = read_counters(self.bpf, COUNTERS)
        out["received_entries"], out["received_exits"] = self._received[True], self._received[False]
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.detach_probes()
        self.bpf.cleanup()
