"""Scheduler and memory accounting per thread (bpf/sched.c, tracer/correlate/sched.py).

The BPF tests run real target processes. Span-like windows come from tests/bpf/snapshot.c:
the target calls getppid() right before and after a phase, and a uprobe on its libc's
getppid snapshots the thread with sched_read(), the helper the capture program calls at a
span's entry and exit. tests/test_sched_capture.py covers the same through the capture.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tracer.correlate.btf import VMLINUX_BTF, Btf, BtfError, task_offsets, task_offsets_from
from tracer.correlate.profile import CpuSplit, build_profile, dist_stats
from tracer.correlate.sched import (
    A_BLOCKED,
    A_CPUS,
    A_INVOLUNTARY,
    A_ON_CPU,
    A_OTHER_ON_CPU,
    A_PAGE_FAULTS,
    A_PROC_PAGE_FAULTS,
    A_RSS_END,
    A_RSS_PEAK,
    A_RSS_START,
    A_RUN_QUEUE,
    A_VOLUNTARY,
    HEALTH_COUNTERS,
    ST_BLOCKED,
    RssSample,
    RssState,
    SchedAcct,
    SchedMonitor,
    SpanSched,
    ThreadSnapshot,
    page_faults_available,
    span_attributes,
    span_sched,
)
from tracer.errors import TraceError
from tracer.otlpjson import Span

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_C = ROOT / "tests" / "bpf" / "snapshot.c"
FAKE_MISS_C = ROOT / "tests" / "bpf" / "fake_miss.c"
MS = 1_000_000
MIB = 1 << 20

TARGET = r"""
import hashlib, os, sys, threading, time

def mark():
    os.getppid()

def spin_cpu(sec):
    t = time.thread_time()
    while time.thread_time() - t < sec:
        pass

def spin_wall(sec):
    t = time.monotonic()
    while time.monotonic() - t < sec:
        pass

def alloc(n):
    b = bytearray(n)
    for i in range(0, n, 4096):
        b[i] = 1
    return b

keep = []
cpu = []  # this thread's CPU time per phase, from mark to mark (CLOCK_THREAD_CPUTIME_ID)
print("ready", flush=True)
sys.stdin.readline()
_mark = mark
def mark():
    _mark()
    cpu.append(time.thread_time_ns())
for ph in sys.argv[1].split(","):
    if ph == "sleep":
        mark(); time.sleep(0.05); mark()
    elif ph == "spin":
        mark(); spin_cpu(0.05); mark()
    elif ph == "spinwall":
        mark(); spin_wall(0.3); mark()
    elif ph == "alloc":
        mark(); keep.append(alloc(100 << 20)); mark()
    elif ph == "allocfree":
        mark(); b = alloc(100 << 20); del b; mark()
    elif ph == "worker":
        mark()
        th = threading.Thread(target=spin_cpu, args=(0.1,))
        th.start(); th.join()
        mark()
    elif ph == "fakemiss":
        # getpgrp() is where tests/bpf/fake_miss.c hides the current switch-in.
        mark(); spin_cpu(0.03); os.getpgrp(); spin_cpu(0.03); mark()
print("done", ",".join(str(b - a) for a, b in zip(cpu[::2], cpu[1::2])), flush=True)
sys.stdin.readline()
"""

# Busy threads that release the GIL (hashlib on large buffers), for the schedstat check.
BUSY = r"""
import hashlib, sys, threading
buf = b"x" * (1 << 20)
def work():
    while True:
        hashlib.sha256(buf).digest()
for _ in range(3):
    threading.Thread(target=work, daemon=True).start()
print("ready", flush=True)
work()
"""

SPIN_FOREVER = "while True: pass"

# Two threads run, then block: their entries then hold the kernel's exact CPU time.
RUN_THEN_BLOCK = r"""
import sys, threading, time
def spin(sec):
    t = time.thread_time()
    while time.thread_time() - t < sec:
        pass
ev = threading.Event()
def work():
    spin(0.05)
    ev.wait()
print("ready", flush=True)
sys.stdin.readline()
threading.Thread(target=work, daemon=True).start()
spin(0.05)
time.sleep(0.2)
print("idle", flush=True)
sys.stdin.readline()
"""


def libc_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and ("/libc.so" in parts[5] or "/libc-" in parts[5]):
            return parts[5]
    raise AssertionError(f"no libc mapped in {pid}")


class Snapshotter:
    """SchedMonitor + the getppid uprobe, collecting snapshot events of one target."""

    def __init__(self, pid: int, fake_miss: bool = False) -> None:
        self.pid = pid
        self.events: List[ThreadSnapshot] = []
        extra = SNAPSHOT_C.read_text() + ("\n" + FAKE_MISS_C.read_text() if fake_miss else "")
        self.mon = SchedMonitor(pid, extra_source=extra)
        libc = libc_of(pid).encode()
        self.mon.bpf.attach_uprobe(name=libc, sym=b"getppid", fn_name=b"snap_marker", pid=pid)
        if fake_miss:
            self.mon.bpf.attach_uprobe(name=libc, sym=b"getpgrp", fn_name=b"fake_missed_switch_in", pid=pid)
        self.mon.bpf[b"snap_events"].open_ring_buffer(self._on_snap)
        self.final_rss: RssState | None = None
        self.health: Dict[str, int] = {}
        self.misses: Dict[str, int] = {}
        self.threads_left: List[int] = []
        self.thread_cpu_ns: List[int] = []  # the target's own CPU clock per window

    def _on_snap(self, ctx, data, size) -> int:
        class Ev(ctypes.Structure):
            _fields_ = [("tid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("acct", SchedAcct)]

        e = ctypes.cast(data, ctypes.POINTER(Ev)).contents
        self.events.append(ThreadSnapshot.from_acct(e.tid, e.acct))
        return 0

    def windows(self) -> List[SpanSched]:
        self.mon.poll(100)
        assert len(self.events) % 2 == 0, f"odd number of marker snapshots: {len(self.events)}"
        return [span_sched(a, b, self.mon.rss_samples)
                for a, b in zip(self.events[::2], self.events[1::2])]

    def close(self) -> None:
        self.mon.close()


def run_phases(phases: str, cpu: int | None = None,
               fake_miss: bool = False) -> Tuple[List[SpanSched], Snapshotter]:
    """Run the target through `phases` with the snapshotter attached; one window per phase."""
    pre = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    p = subprocess.Popen([sys.executable, "-c", TARGET, phases], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, preexec_fn=pre)
    snap = None
    try:
        assert p.stdout.readline().strip() == "ready"
        snap = Snapshotter(p.pid, fake_miss)
        p.stdin.write("\n")
        p.stdin.flush()
        # Drain while the target runs: the RSS and snapshot rings are finite.
        line = ""
        while not line:
            snap.mon.poll(50)
            line = p.stdout.readline().strip() if _readable(p) else ""
        assert line.split()[0] == "done"
        snap.thread_cpu_ns = [int(x) for x in line.split()[1].split(",")]
        # A joined thread may still be on its way out of the kernel.
        deadline = time.monotonic() + 5
        while len(list(Path(f"/proc/{p.pid}/task").iterdir())) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        wins = snap.windows()
        snap.final_rss = snap.mon.rss()
        snap.health, snap.misses = snap.mon.health(), snap.mon.misses()
        snap.threads_left = sorted(snap.mon.threads())
        assert len(wins) == len(phases.split(","))
        return wins, snap
    finally:
        if snap is not None:
            snap.close()
        p.kill()
        p.wait()


def _readable(p: subprocess.Popen) -> bool:
    import select

    return bool(select.select([p.stdout], [], [], 0.05)[0])


def assert_buckets_cover_wall(w: SpanSched) -> None:
    # Exactness of sched_read from the thread itself: the three buckets are the wall time.
    assert abs(w.on_cpu_ns + w.run_queue_ns + w.blocked_ns - w.wall_ns) <= 1000, w


# ---- real processes -------------------------------------------------------------------

def test_sleep_window_is_blocked(ebpf):
    (w,), _ = run_phases("sleep")
    assert_buckets_cover_wall(w)
    assert abs(w.blocked_ns - 50 * MS) <= 2 * MS, w
    assert w.on_cpu_ns < 2 * MS, w
    assert w.voluntary_switches >= 1


def test_spin_window_is_on_cpu(ebpf):
    (w,), snap = run_phases("spin")
    assert_buckets_cover_wall(w)
    # The target spins until its own thread CPU clock has moved 50 ms.
    assert abs(w.on_cpu_ns - 50 * MS) <= 2 * MS, w
    assert abs(w.on_cpu_ns - snap.thread_cpu_ns[0]) <= 2 * MS, (w, snap.thread_cpu_ns)
    assert w.blocked_ns < 2 * MS, w
    assert w.cpus and all(0 <= c < (os.cpu_count() or 1) for c in w.cpus)


def test_alloc_window_shows_rss_rise_and_peak(ebpf):
    (grow, transient), snap = run_phases("alloc,allocfree")
    rise = grow.rss_end_bytes - grow.rss_start_bytes
    assert abs(rise - 100 * MIB) <= 5 * MIB, grow
    assert grow.rss_peak_bytes >= grow.rss_end_bytes
    # Allocated, touched and freed inside the window: only the samples show it.
    assert abs(transient.rss_end_bytes - transient.rss_start_bytes) <= 5 * MIB, transient
    assert transient.rss_peak_bytes - transient.rss_start_bytes >= 95 * MIB, transient
    st = snap.final_rss
    assert st is not None and st.mm_known and st.events > 0 and st.dropped == 0


def test_rss_matches_proc_status(ebpf):
    p = subprocess.Popen([sys.executable, "-c", TARGET, "alloc"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with SchedMonitor(p.pid) as mon:
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline().split()[0] == "done"
            status = Path(f"/proc/{p.pid}/status").read_text()
            vmrss = int(status.split("VmRSS:")[1].split()[0]) * 1024
            mon.poll(0)
            assert abs(mon.rss().total - vmrss) <= 2 * MIB, (mon.rss(), vmrss)
            assert mon.rss_samples and mon.rss_samples[-1].total >= 100 * MIB
    finally:
        p.kill()
        p.wait()


def test_shared_core_shows_run_queue_latency(ebpf):
    hog = subprocess.Popen([sys.executable, "-c", SPIN_FOREVER],
                           preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        (w,), snap = run_phases("spinwall", cpu=0)
    finally:
        hog.kill()
        hog.wait()
    assert_buckets_cover_wall(w)
    # Two busy tasks on one CPU: about half the window waiting on the run queue (more when
    # other load shares the CPU too); the rest on it, as much as the thread's own clock says.
    assert w.run_queue_ns >= 0.2 * w.wall_ns, w
    assert abs(w.on_cpu_ns - snap.thread_cpu_ns[0]) <= 2 * MS, (w, snap.thread_cpu_ns)
    assert w.blocked_ns < 2 * MS, w
    assert w.involuntary_switches >= 1, w
    assert w.cpus == (0,)


def test_other_threads_are_context_not_charged(ebpf):
    (w,), snap = run_phases("worker")
    assert_buckets_cover_wall(w)
    # The main thread waited in join(); the worker's 100 ms of CPU are process context. The
    # worker is created inside the window: its first switch-in gives it an entry, and the
    # kernel's CPU time closes each of its slices (an unreported switch-in costs nothing).
    assert w.on_cpu_ns < 5 * MS, w
    assert abs(w.other_threads_on_cpu_ns - 100 * MS) <= 5 * MS, (w, snap.health)


@pytest.mark.parametrize("shared_core", [False, True], ids=["alone", "shared-core"])
def test_unreported_switch_in_costs_no_cpu_time(ebpf, shared_core):
    # Halfway through 60 ms of spinning, the accounting is made to believe the thread's
    # switch-in was never reported. Alone on its CPU the thread runs on and the exit
    # snapshot finds it (missed_switch_in_at_snapshot); sharing a core with a spinner it
    # is switched out first (missed_switch_in). Either way on-CPU time is its CPU time.
    hog = None
    if shared_core:
        hog = subprocess.Popen([sys.executable, "-c", SPIN_FOREVER],
                               preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        (w,), snap = run_phases("fakemiss", cpu=0 if shared_core else None, fake_miss=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    assert_buckets_cover_wall(w)
    assert abs(w.on_cpu_ns - 60 * MS) <= 2 * MS, (w, snap.health)
    assert abs(w.on_cpu_ns - snap.thread_cpu_ns[0]) <= 2 * MS, (w, snap.thread_cpu_ns)
    assert snap.health["missed_switch_in"] + snap.health["missed_switch_in_at_snapshot"] >= 1, snap.health
    if shared_core:
        assert w.run_queue_ns >= 0.2 * w.wall_ns, w


def test_exited_threads_leave_the_map(ebpf):
    # TASK_DEAD in the raw prev_state frees the entry: a TID reused later starts clean.
    _, snap = run_phases("worker")
    assert set(snap.threads_left) == {snap.pid}, snap.threads_left


def _schedstat(pid: int) -> Dict[int, int]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[int(t.name)] = int((t / "schedstat").read_text().split()[0])
    return out


def _read_both(pid: int, mon: SchedMonitor):
    # Read with the target stopped: every thread's last switch-out has closed its interval
    # with the kernel's own CPU time, and schedstat (which lags a running thread by up to a
    # tick) is current. Between the reads the threads run freely for seconds.
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        while any(_task_state(pid, t) != "T" for t in tids) and time.monotonic() < deadline:
            time.sleep(0.005)
        return _schedstat(pid), mon.threads()
    finally:
        os.kill(pid, signal.SIGCONT)


def test_on_cpu_agrees_with_schedstat(ebpf):
    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with SchedMonitor(p.pid) as mon:
            # Let every thread switch at least once, so each has an entry in the map.
            deadline = time.monotonic() + 5
            while len(mon.threads()) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(mon.threads()) == 4
            s0, m0 = _read_both(p.pid, mon)
            time.sleep(3.0)
            s1, m1 = _read_both(p.pid, mon)
        total_k = total_b = 0
        for tid in s0:
            k = s1[tid] - s0[tid]
            b = m1[tid].on_cpu_ns - m0[tid].on_cpu_ns
            total_k += k
            total_b += b
            assert k > 100 * MS
            assert abs(b - k) <= 0.02 * k, (tid, b, k)
        assert abs(total_b - total_k) <= 0.02 * total_k, (total_b, total_k)
    finally:
        p.kill()
        p.wait()


def _task_state(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_task_struct_offsets_match_what_the_kernel_reports(ebpf):
    # pid/tgid (TASK_PID_OFF, TASK_TGID_OFF): a thread is switched in only through them, so
    # every thread has switch-ins; se.sum_exec_runtime (TASK_SUM_EXEC_OFF): read at the
    # thread's last switch-out it equals schedstat's first field while the thread sleeps.
    p = subprocess.Popen([sys.executable, "-c", RUN_THEN_BLOCK], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with SchedMonitor(p.pid) as mon:
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "idle"
            tids = sorted(int(t.name) for t in Path(f"/proc/{p.pid}/task").iterdir())
            deadline = time.monotonic() + 5
            while any(_task_state(p.pid, t) != "S" for t in tids) and time.monotonic() < deadline:
                time.sleep(0.01)
            stats = {t: [int(x) for x in Path(f"/proc/{p.pid}/task/{t}/schedstat").read_text().split()]
                     for t in tids}
            snaps = mon.threads()
        assert len(tids) == 2 and sorted(snaps) == tids
        for t in tids:
            sum_exec, _run_delay, pcount = stats[t]
            assert snaps[t].sum_exec_ns == sum_exec, (t, snaps[t].sum_exec_ns, sum_exec)
            assert 1 <= snaps[t].switch_ins <= pcount, (t, snaps[t].switch_ins, pcount)
            assert snaps[t].state == ST_BLOCKED
    finally:
        p.kill()
        p.wait()


def test_health_and_skip_counters_are_reported(ebpf):
    _, snap = run_phases("sleep")
    assert set(snap.health) == set(HEALTH_COUNTERS)
    want = {"sched_switch", "sched_wakeup", "sched_migrate_task", "rss_stat"}
    if page_faults_available():
        want.add("page_fault_user")
    assert set(snap.misses) == want, snap.misses
    assert all(isinstance(v, int) and v >= 0 for v in [*snap.health.values(), *snap.misses.values()])


# ---- pure functions -------------------------------------------------------------------

def _btf_blob() -> bytes:
    """A minimal BTF: task_struct {int pid; union { int tgid; }; struct sched_entity se;},
    sched_entity {u64 pad; u64 sum_exec_runtime;}, and a bitfield member."""
    names = ["", "int", "long", "u64", "sched_entity", "sum_exec_runtime", "task_struct", "pid", "tgid",
             "se", "flagbit", "pad"]
    strs = b"".join(n.encode() + b"\0" for n in names)
    off = {n: strs.index(n.encode() + b"\0") if n else 0 for n in names}
    off["pid"] = strs.index(b"\0pid\0") + 1

    def t(name, kind, vlen, size_or_type, kflag=0):
        return struct.pack("<III", off[name], (kflag << 31) | (kind << 24) | vlen, size_or_type)

    types = b"".join([
        t("int", 1, 0, 4) + struct.pack("<I", (1 << 24) | 32),          # 1 int
        t("long", 1, 0, 8) + struct.pack("<I", 64),                     # 2 long
        t("u64", 8, 0, 2),                                              # 3 typedef u64
        t("sched_entity", 4, 2, 16)                                     # 4 struct sched_entity
        + struct.pack("<III", off["pad"], 3, 0) + struct.pack("<III", off["sum_exec_runtime"], 3, 64),
        t("", 5, 1, 4) + struct.pack("<III", off["tgid"], 1, 0),        # 5 anonymous union
        t("task_struct", 4, 4, 28, kflag=1)                             # 6 struct task_struct
        + struct.pack("<III", off["pid"], 1, 0) + struct.pack("<III", 0, 5, 32)
        + struct.pack("<III", off["se"], 4, 64) + struct.pack("<III", off["flagbit"], 1, (1 << 24) | 192),
    ])
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strs))
    return hdr + types + strs


def test_btf_reader_finds_members_through_anonymous_unions():
    btf = Btf(_btf_blob())
    assert btf.offset("task_struct", "pid") == (0, 4)
    assert btf.offset("task_struct", "tgid") == (4, 4)
    assert btf.offset("task_struct", "se.sum_exec_runtime") == (16, 8)
    offs = task_offsets_from(btf)
    assert (offs.pid, offs.tgid, offs.sum_exec_runtime, offs.last_arrival) == (0, 4, 16, None)
    assert "-DTASK_SUM_EXEC_OFF=16" in offs.cflags() and not any("ARRIVAL" in f for f in offs.cflags())
    with pytest.raises(BtfError, match="bitfield"):
        btf.offset("task_struct", "flagbit")
    with pytest.raises(BtfError, match="no member"):
        btf.offset("task_struct", "se.nope")
    with pytest.raises(BtfError, match="no struct"):
        btf.struct("mm_struct")
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\0" * 32)


def test_missing_kernel_btf_is_one_clear_error(tmp_path):
    with pytest.raises(TraceError, match="CONFIG_DEBUG_INFO_BTF"):
        task_offsets(tmp_path / "vmlinux")


def test_running_kernel_btf_gives_task_offsets():
    if not VMLINUX_BTF.exists():
        pytest.skip("this kernel publishes no BTF")
    offs = task_offsets()
    assert offs.tgid == offs.pid + 4 and offs.sum_exec_runtime > 0

def _snap(tid=7, ts=0, on=0, rq=0, blk=0, vol=0, invol=0, mig=0, cpu=0, runs=None, proc=0, rss=0,
          pf=0, proc_pf=0) -> ThreadSnapshot:
    r = [0] * 64
    for c, n in (runs or {}).items():
        r[c] = n
    return ThreadSnapshot(tid=tid, ts=ts, on_cpu_ns=on, run_queue_ns=rq, blocked_ns=blk, state=1,
                          voluntary=vol, involuntary=invol, migrations=mig, cpu_mask=0, cpu=cpu,
                          switch_ins=0, page_faults=pf, cpu_runs=tuple(r), proc_on_cpu_ns=proc,
                          rss_bytes=rss, proc_page_faults=proc_pf)


def test_span_sched_deltas_cpus_and_peak():
    a = _snap(ts=100, on=10, rq=5, blk=1, vol=2**32 - 1, invol=3, cpu=1, runs={1: 65535, 3: 9},
              proc=1000, rss=50, pf=4, proc_pf=10)
    b = _snap(ts=900, on=310, rq=105, blk=301, vol=1, invol=4, mig=2, cpu=3, runs={1: 0, 3: 9},
              proc=2000, rss=60, pf=6, proc_pf=17)
    samples = [RssSample(ts=50, total=999, file=0, anon=0, shmem=0),
               RssSample(ts=500, total=80, file=0, anon=0, shmem=0),
               RssSample(ts=901, total=999, file=0, anon=0, shmem=0)]
    attrs = span_attributes(a, b, samples)
    assert attrs[A_ON_CPU] == 300 and attrs[A_RUN_QUEUE] == 100 and attrs[A_BLOCKED] == 300
    assert attrs[A_VOLUNTARY] == 2  # wrapped u32
    assert attrs[A_INVOLUNTARY] == 1
    assert attrs[A_CPUS] == [1, 3]  # 1: wrapped u16 count moved; 3: exit CPU
    assert attrs[A_RSS_START] == 50 and attrs[A_RSS_END] == 60
    assert attrs[A_RSS_PEAK] == 80  # samples outside the window are ignored
    assert attrs[A_OTHER_ON_CPU] == 700
    assert attrs[A_PAGE_FAULTS] == 2 and attrs[A_PROC_PAGE_FAULTS] == 7


def test_span_sched_takes_back_a_slice_recharged_as_run_queue():
    # Entry inside a running slice counted 50 ns of it as on-CPU; the kernel's CPU time for
    # the slice was 30 ns less, recharged to the run queue when it closed (within the span).
    a = _snap(ts=100, on=1000, rq=10, blk=0)
    b = _snap(ts=200, on=970, rq=50, blk=90)
    s = span_sched(a, b)
    assert (s.on_cpu_ns, s.run_queue_ns, s.blocked_ns) == (0, 10, 90)
    assert s.on_cpu_ns + s.run_queue_ns + s.blocked_ns == s.wall_ns


def test_span_sched_rejects_mismatched_snapshots():
    with pytest.raises(ValueError):
        span_sched(_snap(tid=1), _snap(tid=2))
    with pytest.raises(ValueError):
        span_sched(_snap(ts=10), _snap(ts=5))


def test_snapshot_from_engine_dict_matches_from_struct():
    acct = SchedAcct(on_cpu_ns=5, run_queue_ns=6, blocked_ns=7, last_ts=99, state=1, voluntary=2,
                     proc_on_cpu_ns=11, proc_page_faults=12, rss_bytes=13, sum_exec_ns=14)
    acct.cpu_runs[3] = 4
    d = {f: getattr(acct, f) for f, _ in SchedAcct._fields_ if f != "cpu_runs"}
    d["cpu_runs"] = list(acct.cpu_runs)
    assert ThreadSnapshot.from_dict(8, d) == ThreadSnapshot.from_acct(8, acct)
    assert ThreadSnapshot.from_dict(8, d).rss_bytes == 13


OPHAMIN_CYCLE_FIELDS = ["cycle_index", "wall_time_s", "cpu_time_attributed_s", "rss_peak_bytes_attributed",
                        "page_faults_attributed", "attribution_kind"]
OPHAMIN_BATCH_FIELDS = ["n_cycles", "batch_wall_time_s", "batch_cpu_time_user_s", "batch_cpu_time_system_s",
                        "batch_cpu_time_total_s", "batch_page_faults", "rss_bytes_before", "rss_bytes_after",
                        "rss_bytes_peak", "num_threads_max", "process_count_max", "attribution_kind",
                        "cpu_source", "sampler_polls", "cycle_wall_distribution", "cycle_cpu_distribution",
                        "cycle_rss_distribution", "per_cycle"]


def _cycle_spans():
    def span(sid, parent, start, end, attrs):
        return Span(trace_id="a" * 32, span_id=sid, parent_span_id=parent, name="takwin.cycle"
                    if not parent else "takwin.step2_encode", start_ns=start, end_ns=end,
                    attributes=attrs)

    s1 = span_sched(_snap(ts=0, rss=100, proc_pf=5),
                    _snap(ts=2 * 10**9, on=5 * 10**8, blk=15 * 10**8, proc=7 * 10**8, rss=300, proc_pf=9),
                    [RssSample(10**9, 400, 0, 0, 0)])
    s2 = span_sched(_snap(ts=0, rss=300), _snap(ts=10**9, on=10**9, proc=10**9, rss=310, proc_pf=1))
    return [span("1" * 16, "", 0, 2 * 10**9, {**s1.attributes(), "cycle.index": 0}),
            span("2" * 16, "1" * 16, 0, 10**9, {**s1.attributes()}),
            span("3" * 16, "", 3 * 10**9, 4 * 10**9, {**s2.attributes(), "cycle.index": 1})]


def test_profile_per_cycle_has_ophamin_field_names_and_measures():
    prof = build_profile(_cycle_spans())
    d = prof.to_dict()
    assert list(d)[:len(OPHAMIN_BATCH_FIELDS)] == OPHAMIN_BATCH_FIELDS
    assert all(list(c)[:len(OPHAMIN_CYCLE_FIELDS)] == OPHAMIN_CYCLE_FIELDS for c in d["per_cycle"])
    assert d["attribution_kind"] == "per_cycle" and {c["attribution_kind"] for c in d["per_cycle"]} == {"per_cycle"}
    assert [c["cycle_index"] for c in d["per_cycle"]] == [0, 1]
    c0, c1 = prof.per_cycle
    assert c0.wall_time_s == 2.0
    assert c0.thread_cpu_time_s == 0.5 and c0.other_threads_cpu_time_s == 0.2
    assert c0.cpu_time_attributed_s == pytest.approx(0.7)
    assert c0.rss_peak_bytes_attributed == 400 and c0.page_faults_attributed == 4
    assert c1.cpu_time_attributed_s == 1.0
    assert d["n_cycles"] == 2 and d["batch_wall_time_s"] == 4.0
    assert d["batch_cpu_time_total_s"] == pytest.approx(1.7)
    # The user/system split is not measured from spans: None, never a made-up zero.
    assert d["batch_cpu_time_user_s"] is None and d["batch_cpu_time_system_s"] is None
    assert "not measured" in d["cpu_source"]
    assert (d["rss_bytes_before"], d["rss_bytes_after"], d["rss_bytes_peak"]) == (100, 310, 400)
    assert d["batch_page_faults"] == 5
    assert d["cycle_cpu_distribution"]["n"] == 2 and d["cycle_cpu_distribution"]["max"] == 1.0
    assert d["per_step_timing"]["takwin.step2_encode"]["count"] == 1
    split = build_profile(_cycle_spans(), CpuSplit(user_s=1.5, system_s=0.25)).to_dict()
    assert split["batch_cpu_time_total_s"] == 1.75 and split["batch_cpu_time_user_s"] == 1.5


def test_dist_stats_nearest_rank():
    d = dist_stats([float(x) for x in range(1, 11)])
    assert (d["n"], d["min"], d["max"], d["median"], d["mean"]) == (10, 1.0, 10.0, 5.5, 5.5)
    assert (d["p10"], d["p90"]) == (1.0, 10.0)
    assert dist_stats([])["n"] == 0


def test_profile_command_writes_json(tmp_path):
    from tracer.cli import main
    from tracer.otlpjson import dumps_line

    s = span_sched(_snap(ts=0, rss=10), _snap(ts=10**9, on=4 * 10**8, blk=6 * 10**8, proc=5 * 10**8, rss=20))
    spans_file = tmp_path / "spans.jsonl"
    spans_file.write_text(dumps_line(
        [Span(trace_id="b" * 32, span_id="4" * 16, parent_span_id="", name="work", start_ns=0,
              end_ns=10**9, attributes=s.attributes()),
         Span(trace_id="b" * 32, span_id="5" * 16, parent_span_id="", name="bare", start_ns=2 * 10**9,
              end_ns=3 * 10**9)], {"service.name": "t"}, "test"))
    out = tmp_path / "profile.json"
    main(["profile", str(spans_file), "--output", str(out)])
    d = json.loads(out.read_text())
    assert d["attribution_kind"] == "per_cycle" and d["measured_cycles"] == 1
    c0, c1 = d["per_cycle"]
    assert c0["thread_cpu_time_s"] == 0.4 and c0["other_threads_cpu_time_s"] == 0.1
    assert c0["rss_peak_bytes_attributed"] == 20 and c0["unavailable"] == ""
    assert c1["cpu_time_attributed_s"] is None and "carries no" in c1["unavailable"]


def test_profile_command_reports_bad_file(tmp_path, capsys):
    from tracer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["profile", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2
    assert "cannot read" in capsys.readouterr().err
