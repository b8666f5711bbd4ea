"""Scheduler and memory accounting per thread (bpf/sched.c, tracer/correlate/sched.py).

The BPF tests run real target processes. Span-like windows come from tests/bpf/snapshot.c:
the target calls getppid() right before and after a phase, and a uprobe on its libc's
getppid snapshots the thread with sched_read()/sched_proc_read()/rss_read(), the same
helpers the capture program calls at a span's entry and exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from tracer.correlate.profile import build_profile
from tracer.correlate.sched import (
    A_BLOCKED,
    A_CPUS,
    A_INVOLUNTARY,
    A_ON_CPU,
    A_OTHER_ON_CPU,
    A_RSS_END,
    A_RSS_PEAK,
    A_RSS_START,
    A_RUN_QUEUE,
    A_VOLUNTARY,
    RssSample,
    RssState,
    SchedAcct,
    SchedMonitor,
    SpanSched,
    ThreadSnapshot,
    span_attributes,
    span_sched,
)
from tracer.otlpjson import Span

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_C = ROOT / "tests" / "bpf" / "snapshot.c"
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
print("ready", flush=True)
sys.stdin.readline()
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
print("done", flush=True)
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


def libc_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and ("/libc.so" in parts[5] or "/libc-" in parts[5]):
            return parts[5]
    raise AssertionError(f"no libc mapped in {pid}")


class Snapshotter:
    """SchedMonitor + the getppid uprobe, collecting snapshot events of one target."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.events: List[ThreadSnapshot] = []
        self.mon = SchedMonitor(pid, extra_source=SNAPSHOT_C.read_text())
        self.mon.bpf.attach_uprobe(name=libc_of(pid).encode(), sym=b"getppid", fn_name=b"snap_marker",
                                   pid=pid)
        self.mon.bpf[b"snap_events"].open_ring_buffer(self._on_snap)
        self.final_rss: RssState | None = None

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


def run_phases(phases: str, cpu: int | None = None) -> Tuple[List[SpanSched], Snapshotter]:
    """Run the target through `phases` with the snapshotter attached; one window per phase."""
    pre = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    p = subprocess.Popen([sys.executable, "-c", TARGET, phases], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, preexec_fn=pre)
    snap = None
    try:
        assert p.stdout.readline().strip() == "ready"
        snap = Snapshotter(p.pid)
        p.stdin.write("\n")
        p.stdin.flush()
        # Drain while the target runs: the RSS and snapshot rings are finite.
        line = ""
        while not line:
            snap.mon.poll(50)
            line = p.stdout.readline().strip() if _readable(p) else ""
        assert line == "done"
        wins = snap.windows()
        snap.final_rss = snap.mon.rss()
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
    (w,), _ = run_phases("spin")
    assert_buckets_cover_wall(w)
    # The target spins until its own thread CPU clock has moved 50 ms.
    assert abs(w.on_cpu_ns - 50 * MS) <= 2 * MS, w
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
            assert p.stdout.readline().strip() == "done"
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
        (w,), _ = run_phases("spinwall", cpu=0)
    finally:
        hog.kill()
        hog.wait()
    assert_buckets_cover_wall(w)
    # Two busy tasks on one CPU: roughly half the window waiting on the run queue.
    assert w.run_queue_ns >= 0.2 * w.wall_ns, w
    assert w.on_cpu_ns >= 0.2 * w.wall_ns, w
    assert w.involuntary_switches >= 1, w
    assert w.cpus == (0,)


@pytest.mark.xfail(strict=False, reason="known: in ~1 of 10 windows a thread created inside the window "
                   "loses part of its on-CPU time (see docs/correlation.md, Known issues)")
def test_other_threads_are_context_not_charged(ebpf):
    (w,), _ = run_phases("worker")
    assert_buckets_cover_wall(w)
    # The main thread waited in join(); the worker's 100 ms of CPU are process context.
    assert w.on_cpu_ns < 5 * MS, w
    assert abs(w.other_threads_on_cpu_ns - 100 * MS) <= 5 * MS, w


def _schedstat(pid: int) -> Dict[int, int]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[int(t.name)] = int((t / "schedstat").read_text().split()[0])
    return out


def _read_both(pid: int, mon: SchedMonitor):
    # Four busy threads on this machine's cores would preempt the reader between the two
    # readings and skew them by tens of ms; as a real-time task it is not preempted.
    old = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    try:
        return _schedstat(pid), mon.threads()
    finally:
        os.sched_setscheduler(0, old[0], old[1])


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
            # schedstat of a running thread lags by up to a tick: a long window keeps that <1%.
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


# ---- pure functions -------------------------------------------------------------------

def _snap(tid=7, ts=0, on=0, rq=0, blk=0, vol=0, invol=0, mig=0, cpu=0, runs=None, proc=0, rss=0,
          pf=0) -> ThreadSnapshot:
    r = [0] * 64
    for c, n in (runs or {}).items():
        r[c] = n
    return ThreadSnapshot(tid=tid, ts=ts, on_cpu_ns=on, run_queue_ns=rq, blocked_ns=blk, state=1,
                          voluntary=vol, involuntary=invol, migrations=mig, cpu_mask=0, cpu=cpu,
                          switch_ins=0, page_faults=pf, cpu_runs=tuple(r), proc_on_cpu_ns=proc,
                          rss_bytes=rss)


def test_span_sched_deltas_cpus_and_peak():
    a = _snap(ts=100, on=10, rq=5, blk=1, vol=2**32 - 1, invol=3, cpu=1, runs={1: 65535, 3: 9},
              proc=1000, rss=50)
    b = _snap(ts=900, on=310, rq=105, blk=301, vol=1, invol=4, mig=2, cpu=3, runs={1: 0, 3: 9},
              proc=2000, rss=60)
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


def test_span_sched_rejects_mismatched_snapshots():
    with pytest.raises(ValueError):
        span_sched(_snap(tid=1), _snap(tid=2))
    with pytest.raises(ValueError):
        span_sched(_snap(ts=10), _snap(ts=5))


def test_profile_per_cycle_from_span_attributes():
    def span(sid, parent, start, end, attrs):
        return Span(trace_id="a" * 32, span_id=sid, parent_span_id=parent, name="takwin.cycle"
                    if not parent else "takwin.step2_encode", start_ns=start, end_ns=end,
                    attributes=attrs)

    s1 = span_sched(_snap(ts=0, rss=100), _snap(ts=2 * 10**9, on=5 * 10**8, blk=15 * 10**8, proc=7 * 10**8,
                                                 rss=300), [RssSample(10**9, 400, 0, 0, 0)])
    s2 = span_sched(_snap(ts=0, rss=300), _snap(ts=10**9, on=10**9, proc=10**9, rss=300))
    spans = [span("1" * 16, "", 0, 2 * 10**9, {**s1.attributes(), "cycle.index": 0}),
             span("2" * 16, "1" * 16, 0, 10**9, {**s1.attributes()}),
             span("3" * 16, "", 3 * 10**9, 4 * 10**9, {**s2.attributes(), "cycle.index": 1})]
    prof = build_profile(spans)
    d = prof.to_dict()
    assert d["attribution_kind"] == "per_cycle"
    assert [c["cycle_index"] for c in d["cycles"]] == [0, 1]
    c0 = prof.cycles[0]
    assert c0.wall_seconds == 2.0
    assert c0.thread_cpu_seconds == 0.5 and c0.other_threads_cpu_seconds == 0.2
    assert c0.cpu_seconds == pytest.approx(0.7)
    assert c0.rss_peak_bytes == 400
    assert prof.cycles[1].cpu_seconds == 1.0
    assert d["totals"]["cpu_seconds"] == pytest.approx(1.7)


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
    assert d["attribution_kind"] == "per_cycle"
    c0, c1 = d["cycles"]
    assert c0["thread_cpu_seconds"] == 0.4 and c0["other_threads_cpu_seconds"] == 0.1
    assert c0["rss_peak_bytes"] == 20 and c0["unavailable"] == ""
    assert c1["cpu_seconds"] is None and "carries no" in c1["unavailable"]


def test_profile_command_reports_bad_file(tmp_path, capsys):
    from tracer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["profile", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2
    assert "cannot read" in capsys.readouterr().err
