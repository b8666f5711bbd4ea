"""Load bpf/sample.c for one target process: periodic stack samples instead of call probes.

Nothing is placed in the interpreter's code: a CPU-clock perf event per CPU (N Hz) and the
scheduler's switch tracepoint, both owned by this process's file descriptors (they go when
it exits, however it exits). The kernel walks the sampled thread's Python frames with the
layout discovery chose and reports the spec functions on them (`RawSample`).

The thread states are found by thread pointer, from a map this side keeps current by
walking the interpreter's thread list whenever /proc/PID/task changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import time
from dataclasses import dataclass

from ..access import require_tracing_access
from ..correlate.btf import task_offsets
from ..discover.elf import open_image
from ..discover.layout import walk_threads_live
from ..discover.process import is_alive
from ..errors import TargetGone, TraceError
from ..spec import Spec
from .engine import (
    MAX_EVENTS_PER_POLL,
    Attached,
    bpf_source,
    classify_live,
    fill_names,
    layout_cflags,
    prog_stats,
    read_counters,
    resolve_target,
)
from .output import CapturedOutput

RINGBUF_PAGES = 1024  # 4 MiB: ~1,200 samples of a 100-frame stack in flight, ~9,000 of a 13-frame one
DEFAULT_HZ = 999  # off the round 1 kHz of timer ticks, so samples do not beat with them
MAX_HZ = 20_000
COUNTERS = ("samples", "walks", "frames_read", "no_tstate", "read_faults", "classified", "submitted",
            "dropped", "truncated", "switch_outs", "walks_skipped")
K_ON_CPU, K_OFF_CPU, K_BACK = 1, 2, 3
F_TRUNCATED, F_NO_STACK = 1, 2
NOT_CACHED = 0xFFFFFFFF  # bpf/pyframe.h: the kernel's cache does not know this code object yet
_HEAD = struct.Struct("<QIHHIHHQQ")
_ENT = struct.Struct("<QQQII")
THREADS_EVERY_S = 0.2  # how often /proc/PID/task is compared with the thread states known
THREADS_FULL_S = 1.0  # how often the thread list is walked even when /proc/PID/task looks the same


@dataclass(frozen=True)
class RawSample:
    ts: int  # CLOCK_MONOTONIC ns
    tid: int
    kind: int  # K_*
    cpu: int
    flags: int  # F_*
    ptr: int  # the thread pointer (pthread_self(), a thread state's thread_id)
    # (target_id, frame address, call key) of the spec functions on the stack, innermost first
    hits: tuple[tuple[int, int, int], ...]
    prev_seen: int = 0  # the thread's stack was last known before this at this time (0: never)


class SampleEngine:
    """One target process sampled: compile, fill the maps, attach, `poll()` until `close()`."""

    def __init__(self, pid: int, spec: Spec, hz: int = DEFAULT_HZ) -> None:
        require_tracing_access(pid)
        from bcc import BPF, PerfSWConfig, PerfType  # noqa: PLC0415 - imported late so --help works without bcc

        if not 1 <= hz <= MAX_HZ:
            raise TraceError(f"--hz must be between 1 and {MAX_HZ}, not {hz}")
        self.pid = pid
        self.hz = hz
        interp, layout, rules, warnings = resolve_target(pid, spec)
        # Span events are calls too short to sample reliably: sampled mode reports spans only.
        events = [t.name for t in spec.targets if t.kind == "event"]
        if events:
            warnings.append(f"sampled mode reports spans only: span events ({', '.join(sorted(set(events)))}) "
                            f"need exact mode")
        span_ids = {t.target_id for t in spec.targets if t.kind == "span"}
        rules = [r for r in rules if r.target_id in span_ids]
        self.info = Attached(interp, layout, None, rules, warnings)  # type: ignore[arg-type] - no probe plan
        offs = task_offsets()
        if offs.fsbase is None:
            raise TraceError("sampled mode needs task_struct.thread.fsbase in the kernel's BTF (x86-64)")
        self._events: list[RawSample] = []
        self._classified: dict[int, tuple[int, int, int]] = {}  # code -> (target, name object, co_flags)
        self.counters_user = {"classified_here": 0}
        self.prog_stats: dict[str, int] = {}  # filled when sampling stops
        self._closed = False
        self._perf = (PerfType.SOFTWARE, PerfSWConfig.CPU_CLOCK)
        cflags = layout_cflags(pid, layout, interp.version) + [
            f"-DRINGBUF_PAGES={RINGBUF_PAGES}", *offs.cflags(),
            # A thread switching out faster than the sampling rate is walked at most that often.
            f"-DMIN_WALK_GAP_NS={max(1, 10**9 // hz)}ULL"]
        out = CapturedOutput()
        t0 = time.monotonic()
        try:
            with out:  # the switch tracepoint attaches here (bcc loads RAW_TRACEPOINT_PROBEs itself)
                self.bpf = BPF(text=bpf_source("sample.c").encode(), cflags=cflags)
                self.bpf.load_func(b"on_sample", BPF.PERF_EVENT)
        except (Exception, SystemExit) as e:  # bcc raises bare Exception, or exits
            raise TraceError(f"BPF compile failed: {e}; {out.tail()}") from None
        self.info.compile_s = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            fill_names(self.bpf, rules)
            image = open_image(interp.host_path)
            self._runtime = interp.runtime(image.symbol("_PyRuntime").value)
            self._tasks: frozenset[str] = frozenset()
            self._known: dict[int, int] = {}
            self._checked = self._walked = 0.0
            self.bpf.attach_perf_event(ev_type=self._perf[0], ev_config=self._perf[1], fn_name=b"on_sample",
                                       sample_freq=hz)
            self.seed_ns = 0
            self.seed_stacks: dict[int, tuple[tuple[int, int, int], ...]] = {}
            self.refresh_threads(force=True)
        except BaseException as e:
            self.close()
            if isinstance(e, OSError) and not is_alive(pid):
                raise TargetGone(f"process {pid} exited while the tracer attached") from None
            raise
        self.info.attach_s = time.monotonic() - t0
        self.bpf[b"samples"].open_ring_buffer(self._on_event)

    # ---- thread states ----------------------------------------------------------------
    def refresh_threads(self, force: bool = False) -> None:
        """Map thread pointer -> thread state for every thread, when the set of threads changed."""
        now = time.monotonic()
        if not force and now - self._checked < THREADS_EVERY_S:
            return
        self._checked = now
        try:
            tasks = frozenset(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return  # gone: the loop notices
        # A thread exists in /proc before its thread state does (and a launched command has
        # none at attach): the list is walked again when the threads change, and every second.
        if tasks == self._tasks and not force and now - self._walked < THREADS_FULL_S:
            return
        self._tasks = tasks
        self._walked = now
        try:
            threads = walk_threads_live(self.pid, self.info.layout, self._runtime)
        except OSError:
            return  # gone: the loop notices
        table = self.bpf[b"tstates"]
        if force:  # at attach: what each thread runs now, for threads not on a CPU until later
            self.seed_ns = time.monotonic_ns()
            self.seed_stacks = {t.thread_id: tuple((target, frame, 0) for frame, code in t.chain
                                                   if (target := self._classify(code)))
                                for t in threads if t.thread_id}
        now_known = {t.thread_id: t.tstate for t in threads if t.thread_id}
        for ptr in set(self._known) - set(now_known):
            table.pop(ctypes.c_ulonglong(ptr), None)
        for ptr, tstate in now_known.items():
            if self._known.get(ptr) != tstate:
                table[ctypes.c_ulonglong(ptr)] = ctypes.c_ulonglong(tstate)
        self._known = now_known

    def live_tids(self) -> frozenset[int]:
        """The target's threads now (read after the samples: a thread missing here has exited)."""
        try:
            return frozenset(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return frozenset()  # the process is gone: the loop ends it

    # ---- streaming --------------------------------------------------------------------
    def _decode(self, raw: bytes) -> RawSample:
        ts, tid, kind, n, cpu, flags, _targets, ptr, prev_seen = _HEAD.unpack_from(raw, 0)
        hits = []
        for frame, code, call, target, _ in _ENT.iter_unpack(raw[_HEAD.size:_HEAD.size + n * _ENT.size]):
            if target == NOT_CACHED:
                target = self._classify(code)
                call = 0  # not keyed in the kernel: this sample does not split or join its calls
            if target:
                hits.append((target, frame, call))
        return RawSample(ts, tid, kind, cpu, flags, ptr, tuple(hits), prev_seen)

    def _classify(self, code: int) -> int:
        """A code object the kernel's cache did not know: classified here from the target's
        memory, by the same rules, and put in the kernel's cache for the next samples."""
        found = self._classified.get(code)
        if found is None:
            found = self._classified[code] = classify_live(self.pid, self.info, code)
            target, name_obj, co_flags = found
            if name_obj:
                cache = self.bpf[b"code_cache"]
                cache[ctypes.c_ulonglong(code)] = cache.Leaf(name_obj, target, co_flags)
            self.counters_user["classified_here"] += 1
        return found[0]

    def _on_event(self, _ctx, data, size) -> int:
        self._events.append(self._decode(ctypes.string_at(data, size)))
        return -1 if len(self._events) >= MAX_EVENTS_PER_POLL else 0

    def poll(self, timeout_ms: int = 100) -> list[RawSample]:
        self.refresh_threads()
        self.bpf.ring_buffer_poll(timeout_ms)
        if len(self._events) < MAX_EVENTS_PER_POLL:
            self.bpf.ring_buffer_consume()
        out, self._events = self._events, []
        return out

    def finish(self) -> list[RawSample]:
        """Stop sampling, then read the ring to its end (the counters are final after it)."""
        stats = prog_stats(self.bpf).values()  # both programs, before they are detached
        self.prog_stats = {"prog_runs": sum(r for r, _ in stats), "prog_run_ns": sum(ns for _, ns in stats)}
        self.detach()
        out: list[RawSample] = []
        while True:
            self.bpf.ring_buffer_consume()
            batch, self._events = self._events, []
            out += batch
            if not batch:
                return out

    def detach(self) -> None:
        if not hasattr(self, "bpf"):
            return
        with contextlib.suppress(Exception):  # not attached (a failed attach): nothing to undo
            self.bpf.detach_perf_event(ev_type=self._perf[0], ev_config=self._perf[1])
        with contextlib.suppress(Exception):  # already detached
            self.bpf.detach_raw_tracepoint(b"sched_switch")

    def counters(self) -> dict[str, int]:
        out = read_counters(self.bpf, COUNTERS)
        out.update(self.counters_user)
        out.update(self.prog_stats)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.detach()
        if hasattr(self, "bpf"):
            self.bpf.cleanup()
