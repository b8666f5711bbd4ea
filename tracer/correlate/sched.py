"""User-space side of bpf/sched.c: load it, read its maps, turn snapshots into span attributes.

The BPF side keeps per-thread counters closed in the kernel; a snapshot is one thread's
counters at one instant, taken by a probe running on that thread (`sched_read`), together
with the process-wide on-CPU total, page-fault count and resident set at the same instant.
Two snapshots of one thread (span entry and exit) plus the RSS samples emitted meanwhile
give every `ophamin.sched.*` / `ophamin.mem.*` attribute of the span (`span_attributes`).

The capture program concatenates `sched_source()` into its own text and compiles with
`sched_cflags(pid)`; `SchedMonitor` compiles it standalone (tests, processes traced
without capture) and can carry extra BPF text that calls the same helpers.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import PrivilegeError, TargetGone, TraceError
from .btf import task_offsets

SCHED_C = Path(__file__).resolve().parents[2] / "bpf" / "sched.c"
SCHED_MAX_CPUS = 64  # must equal the BPF side's SCHED_MAX_CPUS (its default)
DEFAULT_RSS_GRANULARITY = 1 << 20
PAGE_FAULT_TRACEPOINT = Path("/sys/kernel/tracing/events/exceptions/page_fault_user")

# Thread states of the BPF accounting (SCHED_ST_*).
ST_UNKNOWN, ST_ON_CPU, ST_RUNNABLE, ST_BLOCKED = 0, 1, 2, 3
STATE_NAMES = {ST_UNKNOWN: "unknown", ST_ON_CPU: "on_cpu", ST_RUNNABLE: "runnable", ST_BLOCKED: "blocked"}

# Span attribute names (documented in docs/correlation.md).
A_ON_CPU = "ophamin.sched.on_cpu_ns"
A_RUN_QUEUE = "ophamin.sched.run_queue_ns"
A_BLOCKED = "ophamin.sched.blocked_ns"
A_OFF_CPU = "ophamin.sched.off_cpu_ns"
A_VOLUNTARY = "ophamin.sched.voluntary_switches"
A_INVOLUNTARY = "ophamin.sched.involuntary_switches"
A_MIGRATIONS = "ophamin.sched.migrations"
A_CPUS = "ophamin.sched.cpus"
A_PAGE_FAULTS = "ophamin.mem.page_faults"
A_RSS_START = "ophamin.mem.rss_start_bytes"
A_RSS_END = "ophamin.mem.rss_end_bytes"
A_RSS_PEAK = "ophamin.mem.rss_peak_bytes"
A_OTHER_ON_CPU = "ophamin.process.other_threads_on_cpu_ns"
A_PROC_PAGE_FAULTS = "ophamin.process.page_faults"

# sched_health counters (SCHED_H_*): transitions the tracepoints did not report.
HEALTH_COUNTERS = ("missed_switch_out", "missed_switch_in", "missed_switch_in_at_snapshot", "missed_wakeup",
                   "thread_map_full")


class SchedAcct(ctypes.Structure):
    """Mirror of `struct sched_acct` (bpf/sched.c), for decoding raw ring-buffer bytes."""

    _fields_ = [
        ("on_cpu_ns", ctypes.c_uint64),
        ("run_queue_ns", ctypes.c_uint64),
        ("blocked_ns", ctypes.c_uint64),
        ("last_ts", ctypes.c_uint64),
        ("state", ctypes.c_uint32),
        ("voluntary", ctypes.c_uint32),
        ("involuntary", ctypes.c_uint32),
        ("migrations", ctypes.c_uint32),
        ("cpu_mask", ctypes.c_uint64),
        ("cpu", ctypes.c_uint32),
        ("switch_ins", ctypes.c_uint32),
        ("page_faults", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sum_exec_ns", ctypes.c_uint64),
        ("carry_ns", ctypes.c_uint64),
        ("proc_on_cpu_ns", ctypes.c_uint64),
        ("proc_page_faults", ctypes.c_uint64),
        ("rss_bytes", ctypes.c_uint64),
        ("cpu_runs", ctypes.c_uint16 * SCHED_MAX_CPUS),
    ]


class RssSampleC(ctypes.Structure):
    """Mirror of `struct rss_sample`."""

    _fields_ = [(n, ctypes.c_uint64) for n in ("ts", "total", "file", "anon", "shmem")]


assert ctypes.sizeof(SchedAcct) == 240, "keep SchedAcct in step with struct sched_acct"


@dataclass(frozen=True)
class ThreadSnapshot:
    """One thread's counters at `ts` (CLOCK_MONOTONIC ns), open interval included."""

    tid: int
    ts: int
    on_cpu_ns: int
    run_queue_ns: int
    blocked_ns: int
    state: int
    voluntary: int
    involuntary: int
    migrations: int
    cpu_mask: int
    cpu: int  # the CPU the snapshot was taken on (the thread's, when taken on the thread)
    switch_ins: int
    page_faults: int
    cpu_runs: Tuple[int, ...]
    proc_on_cpu_ns: int = 0  # all the process's threads, same instant (sched_read only)
    rss_bytes: int = 0  # the process's resident set, same instant (sched_read only)
    proc_page_faults: int = 0  # all the process's threads, same instant (sched_read only)
    sum_exec_ns: int = 0  # the kernel's se.sum_exec_runtime as of the thread's last switch

    @classmethod
    def from_acct(cls, tid: int, acct: Any, ts: Optional[int] = None) -> ThreadSnapshot:
        """From a `struct sched_acct` as bcc or ctypes decodes it (sched_read's output)."""
        return cls(
            tid=tid, ts=int(acct.last_ts if ts is None else ts),
            on_cpu_ns=int(acct.on_cpu_ns), run_queue_ns=int(acct.run_queue_ns),
            blocked_ns=int(acct.blocked_ns), state=int(acct.state),
            voluntary=int(acct.voluntary), involuntary=int(acct.involuntary),
            migrations=int(acct.migrations), cpu_mask=int(acct.cpu_mask), cpu=int(acct.cpu),
            switch_ins=int(acct.switch_ins), page_faults=int(acct.page_faults),
            cpu_runs=tuple(int(x) for x in acct.cpu_runs),
            proc_on_cpu_ns=int(acct.proc_on_cpu_ns), rss_bytes=int(acct.rss_bytes),
            proc_page_faults=int(acct.proc_page_faults), sum_exec_ns=int(acct.sum_exec_ns),
        )

    @classmethod
    def from_dict(cls, tid: int, d: Dict[str, Any]) -> ThreadSnapshot:
        """From the capture engine's decoded `RawEvent.sched` (field name -> value)."""
        return cls.from_acct(tid, _Fields(d))

    @property
    def cpus_ever(self) -> List[int]:
        return [c for c in range(64) if self.cpu_mask >> c & 1]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["cpu_runs"] = list(self.cpu_runs)
        d["state"] = STATE_NAMES.get(self.state, str(self.state))
        return d


class _Fields:
    def __init__(self, d: Dict[str, Any]) -> None:
        self.__dict__.update(d)


@dataclass(frozen=True)
class RssSample:
    """The target's resident set when it had moved by >= the granularity since the last sample."""

    ts: int
    total: int
    file: int
    anon: int
    shmem: int

    def to_dict(self) -> dict:
        return {"ts": self.ts, "total": self.total, "file": self.file, "anon": self.anon,
                "shmem": self.shmem}


@dataclass(frozen=True)
class SpanSched:
    """What the kernel saw between two snapshots of the span's thread."""

    on_cpu_ns: int
    run_queue_ns: int
    blocked_ns: int
    voluntary_switches: int
    involuntary_switches: int
    migrations: int
    cpus: Tuple[int, ...]
    page_faults: int
    rss_start_bytes: int
    rss_end_bytes: int
    rss_peak_bytes: int
    other_threads_on_cpu_ns: int
    wall_ns: int
    process_page_faults: int = 0

    @property
    def off_cpu_ns(self) -> int:
        return self.run_queue_ns + self.blocked_ns

    def attributes(self) -> Dict[str, Any]:
        """The span attributes, under their documented names."""
        return {
            A_ON_CPU: self.on_cpu_ns,
            A_RUN_QUEUE: self.run_queue_ns,
            A_BLOCKED: self.blocked_ns,
            A_OFF_CPU: self.off_cpu_ns,
            A_VOLUNTARY: self.voluntary_switches,
            A_INVOLUNTARY: self.involuntary_switches,
            A_MIGRATIONS: self.migrations,
            A_CPUS: list(self.cpus),
            A_PAGE_FAULTS: self.page_faults,
            A_RSS_START: self.rss_start_bytes,
            A_RSS_END: self.rss_end_bytes,
            A_RSS_PEAK: self.rss_peak_bytes,
            A_OTHER_ON_CPU: self.other_threads_on_cpu_ns,
            A_PROC_PAGE_FAULTS: self.process_page_faults,
        }

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["cpus"] = list(self.cpus)
        d["off_cpu_ns"] = self.off_cpu_ns
        return d


def _delta(a: int, b: int, bits: int) -> int:
    # Counters wrap in the kernel at their width; a span never spans a whole wrap.
    return (b - a) % (1 << bits)


def span_sched(entry: ThreadSnapshot, exit: ThreadSnapshot,
               rss_samples: Sequence[RssSample] = ()) -> SpanSched:
    """Combine the entry and exit snapshots of one thread (and the RSS samples) into a span.

    Both snapshots must come from the span's own thread, taken on it: then the buckets add
    up to the wall time between them. Other threads are never charged to the span; their
    on-CPU time in the window is reported separately as process context.
    """
    if entry.tid != exit.tid:
        raise ValueError(f"snapshots of different threads: {entry.tid} and {exit.tid}")
    if exit.ts < entry.ts:
        raise ValueError("exit snapshot taken before entry snapshot")
    on_cpu = exit.on_cpu_ns - entry.on_cpu_ns
    run_queue = max(0, exit.run_queue_ns - entry.run_queue_ns)
    blocked = max(0, exit.blocked_ns - entry.blocked_ns)
    if on_cpu < 0:
        # A snapshot counts the running slice it is taken in as on-CPU up to `now`; when the
        # slice closes, the kernel's own CPU time may be less (the hypervisor or interrupts
        # took some), and the difference is recharged as run-queue time. Seen from the
        # span, that recharge belongs before its entry: take it back out, so the buckets
        # still partition the span's wall time.
        deficit = -on_cpu
        on_cpu = 0
        take = min(deficit, run_queue)
        run_queue -= take
        blocked = max(0, blocked - (deficit - take))
    cpus = {entry.cpu, exit.cpu}
    for c, (a, b) in enumerate(zip(entry.cpu_runs, exit.cpu_runs)):
        if a != b:
            cpus.add(c)
    proc = max(0, exit.proc_on_cpu_ns - entry.proc_on_cpu_ns)
    peak = max([entry.rss_bytes, exit.rss_bytes]
               + [s.total for s in rss_samples if entry.ts <= s.ts <= exit.ts])
    return SpanSched(
        on_cpu_ns=on_cpu,
        run_queue_ns=run_queue,
        blocked_ns=blocked,
        voluntary_switches=_delta(entry.voluntary, exit.voluntary, 32),
        involuntary_switches=_delta(entry.involuntary, exit.involuntary, 32),
        migrations=_delta(entry.migrations, exit.migrations, 32),
        cpus=tuple(sorted(cpus)),
        page_faults=_delta(entry.page_faults, exit.page_faults, 32),
        rss_start_bytes=entry.rss_bytes,
        rss_end_bytes=exit.rss_bytes,
        rss_peak_bytes=peak,
        other_threads_on_cpu_ns=max(0, proc - on_cpu),
        wall_ns=exit.ts - entry.ts,
        process_page_faults=max(0, exit.proc_page_faults - entry.proc_page_faults),
    )


def span_attributes(entry: ThreadSnapshot, exit: ThreadSnapshot,
                    rss_samples: Sequence[RssSample] = ()) -> Dict[str, Any]:
    """`span_sched(...).attributes()`: the `ophamin.*` attributes of one span."""
    return span_sched(entry, exit, rss_samples).attributes()


# ---- loading --------------------------------------------------------------------------

def sched_source() -> str:
    """The text of bpf/sched.c, to compile alone or concatenate into another program."""
    try:
        return SCHED_C.read_text()
    except OSError as e:
        raise TraceError(f"cannot read the scheduler BPF program {SCHED_C}: {e}") from e


def page_faults_available() -> bool:
    return PAGE_FAULT_TRACEPOINT.is_dir()


def possible_cpus() -> int:
    """CPUs the kernel may ever use (ids 0..n-1), from /sys; the BPF loop covers them."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
        return int(text.split(",")[-1].split("-")[-1]) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def sched_cflags(pid: int, rss_granularity: int = DEFAULT_RSS_GRANULARITY,
                 page_faults: Optional[bool] = None, with_target: bool = True) -> List[str]:
    """The -D flags bpf/sched.c needs, for the capture program's compile too (which passes
    its own -DTARGET_TGID: `with_target=False`). Raises TraceError without kernel BTF."""
    if rss_granularity < 1:
        raise TraceError(f"RSS granularity must be at least 1 byte, not {rss_granularity}")
    ncpu = possible_cpus()
    if ncpu > SCHED_MAX_CPUS:
        raise TraceError(f"this machine has {ncpu} possible CPUs; the scheduler accounting "
                         f"covers at most {SCHED_MAX_CPUS}")
    flags = [f"-DRSS_GRANULARITY={int(rss_granularity)}ULL", f"-DSCHED_NR_CPUS={ncpu}",
             *task_offsets().cflags()]
    if with_target:
        flags.insert(0, f"-DTARGET_TGID={int(pid)}")
    if page_faults_available() if page_faults is None else page_faults:
        flags.append("-DSCHED_PAGE_FAULTS")
    return flags


def proc_rss(pid: int) -> Dict[str, int]:
    """RssFile / RssAnon / RssShmem of a process in bytes, from /proc/PID/status."""
    want = {"RssFile:": "file", "RssAnon:": "anon", "RssShmem:": "shmem"}
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in want:
                    out[want[parts[0]]] = int(parts[1]) * 1024
    except FileNotFoundError as e:
        raise TargetGone(f"process {pid} is gone") from e
    return out


def seed_rss(bpf: Any, pid: int) -> None:
    """Start the kernel's RSS state from /proc, for members that have had no event yet.

    rss_stat fires only when a counter changes; without a seed, rss_read() would say 0
    until the target next faults. Each event then overwrites its member with the kernel's
    own absolute value.
    """
    table = bpf[b"rss_state"]
    st = table[ctypes.c_int(0)]
    if st.events:
        return
    r = proc_rss(pid)
    st.member[0] = r.get("file", 0)
    st.member[1] = r.get("anon", 0)
    st.member[3] = r.get("shmem", 0)
    st.total = st.member[0] + st.member[1] + st.member[3]
    st.last_emitted = st.total
    table[ctypes.c_int(0)] = st


@dataclass(frozen=True)
class RssState:
    """The kernel's view of the target's memory, read from the `rss_state` map."""

    total: int
    file: int
    anon: int
    swap: int
    shmem: int
    events: int
    emitted: int
    dropped: int
    mm_known: bool

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def read_rss_state(bpf: Any) -> RssState:
    """The `rss_state` map of a program that includes sched.c."""
    st = bpf[b"rss_state"][ctypes.c_int(0)]
    return RssState(total=st.total, file=st.member[0], anon=st.member[1], swap=st.member[2],
                    shmem=st.member[3], events=st.events, emitted=st.emitted,
                    dropped=st.dropped, mm_known=bool(st.mm_known))


def read_health(bpf: Any) -> Dict[str, int]:
    """Transitions the tracepoints did not report (SCHED_H_*), summed over CPUs."""
    table = bpf[b"sched_health"]
    return {name: int(sum(table[ctypes.c_int(i)])) for i, name in enumerate(HEALTH_COUNTERS)}


def program_misses(bpf: Any) -> Dict[str, int]:
    """Events each scheduler/memory program was skipped for, as the kernel counts them
    (`recursion_misses` in the program's fdinfo), by tracepoint name."""
    out: Dict[str, int] = {}
    for name, fn in bpf.funcs.items():
        n = name.decode() if isinstance(name, bytes) else name
        if not n.startswith(("raw_tracepoint__", "tracepoint__")):
            continue
        try:
            info = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("recursion_misses:"):
                out[n.split("__")[-1]] = int(line.split()[1])
    return out


class SchedMonitor:
    """bpf/sched.c compiled standalone for one process, plus optional BPF text of the caller.

    `extra_source` is appended to sched.c, so it may call sched_read() and declare its own
    maps (tests attach a uprobe this way).
    """

    def __init__(self, pid: int, *, rss_granularity: int = DEFAULT_RSS_GRANULARITY,
                 extra_source: str = "", extra_cflags: Sequence[str] = (),
                 page_faults: Optional[bool] = None) -> None:
        if not Path(f"/proc/{pid}").exists():
            raise TargetGone(f"process {pid} is gone")
        if os.geteuid() != 0:
            raise PrivilegeError("loading the scheduler BPF programs needs root")
        try:
            from bcc import BPF
        except ImportError as e:
            raise TraceError(f"bcc is not importable ({e}); install Debian's python3-bpfcc") from e
        self.pid = pid
        self.rss_samples: List[RssSample] = []
        self._rss_callbacks: List[Callable[[RssSample], None]] = []
        text = sched_source() + "\n" + extra_source
        try:
            self.bpf = BPF(text=text.encode(), cflags=[*sched_cflags(pid, rss_granularity, page_faults),
                                              *extra_cflags])
        except Exception as e:  # bcc raises bare Exception on compile/load failure
            raise TraceError(f"cannot load the scheduler BPF programs: {e}") from e
        seed_rss(self.bpf, pid)
        self.bpf[b"rss_samples"].open_ring_buffer(self._on_rss)

    def _on_rss(self, ctx: Any, data: Any, size: int) -> int:
        c = ctypes.cast(data, ctypes.POINTER(RssSampleC)).contents
        s = RssSample(ts=c.ts, total=c.total, file=c.file, anon=c.anon, shmem=c.shmem)
        self.rss_samples.append(s)
        for cb in self._rss_callbacks:
            cb(s)
        return 0

    def on_rss(self, cb: Callable[[RssSample], None]) -> None:
        self._rss_callbacks.append(cb)

    def poll(self, timeout_ms: int = 0) -> None:
        """Drain every ring buffer of the program (RSS samples and the caller's)."""
        self.bpf.ring_buffer_poll(timeout_ms)

    def threads(self, now: Optional[int] = None) -> Dict[int, ThreadSnapshot]:
        """Every known thread of the target, open intervals closed at `now` (default: now).

        Read from user space, so a thread's state may be a few µs stale; exact snapshots
        come from sched_read() on the thread itself.
        """
        now = time.monotonic_ns() if now is None else now
        out: Dict[int, ThreadSnapshot] = {}
        for k, v in self.bpf[b"sched_threads"].items():
            snap = ThreadSnapshot.from_acct(k.value, v, ts=now)
            d = max(0, now - int(v.last_ts))
            if v.state == ST_ON_CPU:
                snap = replace(snap, on_cpu_ns=snap.on_cpu_ns + d)
            elif v.state == ST_RUNNABLE:
                snap = replace(snap, run_queue_ns=snap.run_queue_ns + d)
            elif v.state == ST_BLOCKED:
                snap = replace(snap, blocked_ns=snap.blocked_ns + d)
            out[k.value] = snap
        return out

    def rss(self) -> RssState:
        return read_rss_state(self.bpf)

    def health(self) -> Dict[str, int]:
        return read_health(self.bpf)

    def misses(self) -> Dict[str, int]:
        return program_misses(self.bpf)

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            bpf.cleanup()
            self.bpf = None

    def __enter__(self) -> SchedMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
