"""Target side of `scripts/bench peers`: one workload, run one measured segment at a time.

Runs inside the interpreter under test (CPython 3.9-3.13) with the standard library, the
workload's own code and, for the in-process peers, VizTracer. Every alternative measures the
same call, `workload.run()`, in this same process, so they differ only in what watches it.

    python harness.py --workload reference --cycle-ms 50 --cycles 20
    python harness.py --workload richards --size 3

Protocol, JSON lines. stdout line 1: {"pid", "python", "files"}. Then one reply per command
read from stdin:

    {"op": "segment", "mode": M, "emitter": E, "wait": W, "entries": N, "parse": P}

prepares a fresh workload object (untimed; E = "bare" | "noop" | "otel" on the reference
substrate), then, when W is true, prints {"ready": true} and calls `beacon()` every 5 ms (an
external tool proves it is attached by reporting a beacon span) until a line arrives on
stdin; then times `run()` under mode M (none, viztracer, setprofile, monitoring, count) and
prints {"wall_s", "cpu_s", "hwm_kb", "seen"?, "counts"?}. {"op": "quit"} ends.

`count` is the ground truth: every Python frame start and resumption, per code object, by
sys.monitoring where it exists (3.12+) and by a profile function on all threads before.
"""

from __future__ import annotations

import argparse
import dis
import importlib.util
import json
import os
import re
import select
import sys
import tempfile
import threading
import time

GEN_FLAGS = 0x20 | 0x80 | 0x100 | 0x200  # generator, coroutine, iterable coroutine, async generator
TOOL_ID = 4  # a sys.monitoring tool id no other peer here uses (VizTracer takes its own)


def beacon() -> None:
    """Called every 5 ms while an external tool attaches: its first span proves the attach."""


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _schedstat() -> tuple[int, int]:
    """This thread's time on a CPU and waiting on a run queue, ns (the kernel's schedstat).
    The rest of a segment's wall time the thread was off both: blocked, or stopped by a tool."""
    with open("/proc/thread-self/schedstat") as f:
        run, wait, _ = f.read().split()
    return int(run), int(wait)


def _reset_hwm() -> None:
    # "5" resets the peak RSS the kernel keeps for this process (Linux >= 4.0), so each
    # segment's peak is its own.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---- workloads ---------------------------------------------------------------------------

class Reference:
    """The project's Takwin substrate: `cycles` cycles of `cycle_ms` from a fresh Takwin."""

    SEED = 1

    def __init__(self, args: argparse.Namespace) -> None:
        from tracer.reference import stimuli  # noqa: PLC0415 - PYTHONPATH is the worktree

        self.cycle_ms = args.cycle_ms
        self.texts = list(stimuli(self.SEED, args.cycles))
        here = os.path.dirname(sys.modules["tracer.reference"].__file__)
        self.files = sorted(os.path.join(here, n) for n in os.listdir(here)
                            if n.endswith(".py") and n not in ("__main__.py", "bare.py"))
        self._tk = None
        self._emitter = None
        self._otel_path = None

    def prepare(self, emitter: str, cycle_ms: int | None = None) -> None:
        from tracer.emitter import NoOpEmitter, OpenTelemetryEmitter  # noqa: PLC0415

        if emitter == "bare":
            from tracer.reference.bare import load_bare  # noqa: PLC0415

            takwin_cls = load_bare()["takwin"].Takwin
            self._emitter = NoOpEmitter()
        else:
            from tracer.reference import Takwin as takwin_cls  # noqa: PLC0415, N813

            if emitter == "otel":
                fd, path = tempfile.mkstemp(prefix="peers-otel-", suffix=".jsonl")
                os.close(fd)
                self._emitter = OpenTelemetryEmitter(export_to=path)
                self._otel_path = path
            else:
                self._emitter = NoOpEmitter()
        self._tk = takwin_cls(emitter=self._emitter, seed=self.SEED, cycle_ms=cycle_ms or self.cycle_ms)

    def run(self) -> None:
        for t in self.texts:
            self._tk.run(t)

    def teardown(self) -> None:
        if self._tk is None:
            return
        self._tk.close()
        self._tk = None
        shutdown = getattr(self._emitter, "shutdown", None)
        if shutdown is not None:
            shutdown()
        if self._otel_path is not None:
            os.unlink(self._otel_path)
            self._otel_path = None


class Pyperformance:
    """A benchmark shipped in pyperformance, its bench function called directly."""

    # name -> how one run calls the module, with `size` the loop count
    CALLS = {
        "richards": lambda m, n: m.Richards().run(n),
        "deltablue": lambda m, n: m.delta_blue(n),
        "nbody": lambda m, n: m.bench_nbody(1, "sun", n),
        "go": lambda m, n: [m.versus_cpu() for _ in range(n)],
        "float": lambda m, n: m.benchmark(n),
        "nqueens": lambda m, n: [m.test_n_queens(8) for _ in range(n)],
    }

    def __init__(self, args: argparse.Namespace) -> None:
        import pyperformance  # noqa: PLC0415

        path = os.path.join(os.path.dirname(pyperformance.__file__), "data-files", "benchmarks",
                            f"bm_{args.workload}", "run_benchmark.py")
        self.path = path
        self.files = [path]
        self.size = args.size
        self.call = self.CALLS[args.workload]
        self.module = None

    def prepare(self, emitter: str, cycle_ms: int | None = None) -> None:
        # A fresh module per segment: some benchmarks keep state in globals (richards' work
        # area, nbody's bodies), and the call counts must be the same in every segment.
        spec = importlib.util.spec_from_file_location(f"bm_run_benchmark_{id(self)}", self.path)
        self.module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = self.module
        spec.loader.exec_module(self.module)

    def run(self) -> None:
        self.call(self.module, self.size)

    def teardown(self) -> None:
        pass


def ladder_call() -> None:
    """The rate ladder's traced function: it does nothing, so the call rate is the tracer's."""


class Ladder:
    """Calls `ladder_call()` at a paced rate, step by step (one rate per step), so the rate a
    tracer keeps up with without loss can be read from what it reports per step."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rates = [int(r) for r in args.rates.split(",")]
        self.step_s = args.step_s
        self.files = [os.path.abspath(__file__)]
        self.steps: list = []

    def prepare(self, emitter: str, cycle_ms: int | None = None) -> None:
        self.steps = []

    def run(self) -> None:
        for rate in self.rates:
            per_ms = max(1, rate // 1000)
            n_slots = int(self.step_s * 1000)
            t0_ns = time.time_ns()
            start = time.perf_counter()
            for slot in range(n_slots):
                for _ in range(per_ms):
                    ladder_call()
                due = start + (slot + 1) / 1000
                while time.perf_counter() < due:
                    pass
            self.steps.append({"rate": rate, "calls": per_ms * n_slots, "start_ns": t0_ns, "end_ns": time.time_ns(),
                               "achieved_per_s": per_ms * n_slots / (time.perf_counter() - start)})

    def teardown(self) -> None:
        pass


# ---- in-process peers and the ground truth -------------------------------------------------

class Resumes:
    """Tells a generator's resumption from a start at a profile 'call' event: past the code's
    first RESUME (3.11+), or past instruction -1 (3.9/3.10), the frame has run before."""

    def __init__(self) -> None:
        self._at: dict = {}

    def __call__(self, frame) -> bool:
        code = frame.f_code
        if not code.co_flags & GEN_FLAGS:
            return False
        at = self._at.get(code)
        if at is None:
            at = self._at[code] = next((i.offset for i in dis.get_instructions(code)
                                        if i.opname.startswith("RESUME")), -1)
        return frame.f_lasti > at


class Counter:
    """Counts Python frame starts and resumptions per code object, on every thread."""

    def __init__(self) -> None:
        self.starts: dict = {}
        self.resumes: dict = {}
        self.on = False
        self._is_resume = Resumes()

    # 3.9-3.11: a profile function; a 'call' event is a start unless a generator resumes
    def _profile(self, frame, event, arg) -> None:
        if event != "call" or not self.on:
            return
        code = frame.f_code
        if self._is_resume(frame):
            self.resumes[code] = self.resumes.get(code, 0) + 1
        else:
            self.starts[code] = self.starts.get(code, 0) + 1

    def _start(self, code, offset) -> None:
        self.starts[code] = self.starts.get(code, 0) + 1

    def _resume(self, code, offset) -> None:
        self.resumes[code] = self.resumes.get(code, 0) + 1

    def install(self) -> None:
        mon = getattr(sys, "monitoring", None)
        if mon is not None:
            mon.use_tool_id(TOOL_ID, "peers-count")
            mon.register_callback(TOOL_ID, mon.events.PY_START, self._start)
            mon.register_callback(TOOL_ID, mon.events.PY_RESUME, self._resume)
            mon.set_events(TOOL_ID, mon.events.PY_START | mon.events.PY_RESUME)
        else:
            # threading.setprofile first: the substrate starts its worker thread inside run()
            threading.setprofile(self._profile)
            sys.setprofile(self._profile)
        self.on = True

    def remove(self) -> None:
        self.on = False
        mon = getattr(sys, "monitoring", None)
        if mon is not None:
            mon.set_events(TOOL_ID, 0)
            mon.free_tool_id(TOOL_ID)
        else:
            sys.setprofile(None)
            threading.setprofile(None)


def _code_key(code) -> dict:
    return {"file": code.co_filename, "qualname": getattr(code, "co_qualname", code.co_name),
            "name": code.co_name, "line": code.co_firstlineno}


def _per_code(starts: dict, resumes: dict, files: set) -> list:
    out = []
    for code in set(starts) | set(resumes):
        if code.co_filename in files:
            out.append(dict(_code_key(code), starts=starts.get(code, 0), resumes=resumes.get(code, 0)))
    return out


class SetprofileRecorder:
    """sys.setprofile (and threading.setprofile) with a Python callback that records calls:
    starts per code object, a generator's resumptions apart (as a real recorder must)."""

    def __init__(self) -> None:
        self.calls: dict = {}
        self.resumes: dict = {}
        self._is_resume = Resumes()

    def _profile(self, frame, event, arg) -> None:
        if event == "call":
            code = frame.f_code
            if self._is_resume(frame):
                self.resumes[code] = self.resumes.get(code, 0) + 1
            else:
                self.calls[code] = self.calls.get(code, 0) + 1

    def start(self) -> None:
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)

    def stop(self) -> None:
        sys.setprofile(None)
        threading.setprofile(None)


class MonitoringRecorder:
    """sys.monitoring (3.12+) PY_START and PY_RETURN callbacks that record calls and returns."""

    def __init__(self) -> None:
        self.calls: dict = {}
        self.returns = 0

    def _start(self, code, offset) -> None:
        self.calls[code] = self.calls.get(code, 0) + 1

    def _return(self, code, offset, retval) -> None:
        self.returns += 1

    def start(self) -> None:
        mon = sys.monitoring
        mon.use_tool_id(TOOL_ID, "peers-monitoring")
        mon.register_callback(TOOL_ID, mon.events.PY_START, self._start)
        mon.register_callback(TOOL_ID, mon.events.PY_RETURN, self._return)
        mon.set_events(TOOL_ID, mon.events.PY_START | mon.events.PY_RETURN)

    def stop(self) -> None:
        sys.monitoring.set_events(TOOL_ID, 0)
        sys.monitoring.free_tool_id(TOOL_ID)


_VIZ_NAME = re.compile(r"^(?P<qual>.+) \((?P<file>.+):(?P<line>\d+)\)$")


def _viztracer_seen(tracer, files: set) -> tuple[int, list]:
    """Entries VizTracer recorded, and per function of `files` how many complete calls."""
    total = tracer.parse()
    seen: dict = {}
    keys: dict = {}  # event name -> (file, qualname, line) or None: names repeat, parse each once
    for ev in tracer.data["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        name = ev.get("name", "")
        key = keys.get(name, 0)
        if key == 0:
            m = _VIZ_NAME.match(name)
            key = keys[name] = (m.group("file"), m.group("qual"), int(m.group("line"))) \
                if m and m.group("file") in files else None
        if key is not None:
            seen[key] = seen.get(key, 0) + 1
    return total, [{"file": f, "viz_name": q, "line": ln, "calls": n} for (f, q, ln), n in seen.items()]


# ---- one segment -----------------------------------------------------------------------------

def _wait_with_beacon() -> bool:
    """Call beacon() every 5 ms until the driver writes "go" (the tool is attached: run) or
    "skip" (it could not attach: don't)."""
    while True:
        beacon()
        ready, _, _ = select.select([sys.stdin], [], [], 0.005)
        if ready:
            return sys.stdin.readline().strip() == "go"


def segment(work, cmd: dict) -> dict:
    """Prepare, (wait for the tool,) time one run. The workload object is torn down at the
    start of the next segment, not here: an attached tool must not see the teardown, which the
    ground truth does not count either."""
    work.teardown()
    mode = cmd.get("mode", "none")
    work.prepare(cmd.get("emitter", "noop"), cmd.get("cycle_ms"))
    files = set(work.files)
    out: dict = {"mode": mode}
    if cmd.get("wait"):
        _reply({"ready": True})
        if not _wait_with_beacon():
            out["skipped"] = True
            return out
    _reset_hwm()
    hwm0 = _hwm_kb()
    peer = None
    if mode == "viztracer":
        from viztracer import VizTracer  # noqa: PLC0415

        peer = VizTracer(tracer_entries=int(cmd.get("entries", 1_000_000)), verbose=0)
    elif mode == "setprofile":
        peer = SetprofileRecorder()
    elif mode == "monitoring":
        peer = MonitoringRecorder()
    elif mode == "count":
        peer = Counter()
        peer.start, peer.stop = peer.install, peer.remove
    elif mode != "none":
        raise SystemExit(f"harness: unknown mode {mode!r}")
    if peer is not None:
        peer.start()
    t0_ns = time.time_ns()
    s0 = _schedstat()
    c0, w0 = time.process_time(), time.perf_counter()
    work.run()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    s1 = _schedstat()
    t1_ns = time.time_ns()
    if peer is not None:
        peer.stop()
    # start_ns/end_ns: the run's window on the wall clock, so a tool attached across several
    # segments can have its spans counted per segment.
    out.update(wall_s=wall, cpu_s=cpu, hwm_kb=_hwm_kb(), hwm0_kb=hwm0, start_ns=t0_ns, end_ns=t1_ns,
               on_cpu_ns=s1[0] - s0[0], run_queue_ns=s1[1] - s0[1])
    if mode == "count":
        out["counts"] = _per_code(peer.starts, peer.resumes, files)
        out["starts_all"] = sum(peer.starts.values())
        out["resumes_all"] = sum(peer.resumes.values())
    elif mode in ("setprofile", "monitoring"):
        out["seen"] = _per_code(peer.calls, {}, files)
        out["events"] = sum(peer.calls.values())
    elif mode == "viztracer":
        out["entries_cap"] = peer.tracer_entries
        if cmd.get("parse"):
            out["events"], out["seen"] = _viztracer_seen(peer, files)
        peer.clear()
    if isinstance(work, Ladder):
        out["steps"] = work.steps
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--cycle-ms", type=int, default=50)
    ap.add_argument("--cycles", type=int, default=1)
    ap.add_argument("--size", type=int, default=1)
    ap.add_argument("--rates", default="2000,5000,10000,20000,40000,80000,160000", help="ladder: calls/s per step")
    ap.add_argument("--step-s", type=float, default=1.0, help="ladder: seconds per step")
    args = ap.parse_args()
    if args.workload == "reference":
        work = Reference(args)
    elif args.workload == "ladder":
        work = Ladder(args)
    else:
        work = Pyperformance(args)
    import platform  # noqa: PLC0415

    _reply({"pid": os.getpid(), "python": platform.python_version(), "files": work.files,
            "qualnames": hasattr(sys._getframe().f_code, "co_qualname")})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        _reply(segment(work, cmd))
    work.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
