"""Figures behind the everyday-use features (docs/api.md, docs/fleet.md, --module's warning).

1. attach: what attaching one more process costs (BPF compile + uprobe attach + thread
   seeding), per process, for N processes traced by one loop (--match / several --pid).
2. per_span: what one call of a traced function costs the target, beyond the probes every
   Python call pays: the same loop of calls timed inside the target with no tracer, with
   the tracer attached but the function not a target, and with it a target; plus the
   tracer's own CPU per span (assembly, no export).
3. two_tracers: two tracers on one process (the API and the CLI at once, as
   tests/test_everyday.py runs them): how far apart their cycle durations are.

    scripts/bench everyday [--procs 4] [--calls 50000] [--spacing 100] [--repeats 3] [--cycles 20]

Prints a summary and writes results/everyday.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.capture.engine import prog_stats  # noqa: E402
from tracer.interpreters import find_interpreters, target_python  # noqa: E402
from tracer.loop import TraceLoop  # noqa: E402
from tracer.session import TraceOptions  # noqa: E402
from tracer.spec import load_spec, spec_from_functions  # noqa: E402

TARGETS = ROOT / ".cache" / "targets"
SYS_BPF, BPF_ENABLE_STATS = 321, 32  # x86-64

WORKLOAD = r"""
import sys, time
def f(i):
    return i + 1
def other():
    return 0
print("ready", flush=True)
sys.stdin.readline()
n, spacing = int(sys.argv[1]), int(sys.argv[2])
pad = range(spacing)
t = time.perf_counter()
for i in range(n):
    f(i)
    for _ in pad:  # no calls: keeps the span rate within what the tracer drains
        pass
print(time.perf_counter() - t, flush=True)
sys.stdin.readline()
"""


def _python() -> str:
    pyenv = [i for i in find_interpreters() if i.label.startswith("pyenv-3.12")]
    return target_python(pyenv[0], TARGETS) if pyenv else sys.executable


def _workload(python: str, calls: int, spacing: int = 0) -> subprocess.Popen:
    p = subprocess.Popen([python, "-c", WORKLOAD, str(calls), str(spacing)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _go(p: subprocess.Popen) -> None:
    p.stdin.write("\n")
    p.stdin.flush()


def _attach_series(pythons: list[str]) -> tuple[list[float], list[float]]:
    """Per process: the whole attach, and the BPF compile inside it."""
    procs = [_workload(py, 10) for py in pythons]
    loop = TraceLoop(spec_from_functions(["__main__:f"]), TraceOptions(status=False))
    per, compile_s = [], []
    try:
        for p in procs:
            t0 = time.monotonic()
            cap = loop.attach(p.pid)
            per.append(time.monotonic() - t0)
            compile_s.append(cap.engine.info.compile_s)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        loop.close()
    return per, compile_s


def bench_attach(n: int) -> dict:
    """N processes on N interpreter builds, then N on one build (ELF parsing and the probe
    plan are cached per build in the tracer; the BPF compile is per process)."""
    builds = [target_python(i, TARGETS) for i in find_interpreters()]
    mixed, mixed_cc = _attach_series([builds[i % len(builds)] for i in range(n)])
    same, same_cc = _attach_series([_python()] * n)
    return {"processes": n, "distinct_builds_s": mixed, "distinct_builds_compile_s": mixed_cc,
            "one_build_s": same, "one_build_compile_s": same_cc}


def _timed_run(python: str, calls: int, spacing: int, spec) -> tuple[float, dict]:
    """The workload's own timing of its loop, and (traced) spans, drops, tracer CPU, handler stats."""
    p = _workload(python, calls, spacing)
    loop = None
    info: dict = {}
    assembled = [0]
    try:
        if spec is not None:
            loop = TraceLoop(spec, TraceOptions(status=False, keep_spans=False),
                             on_spans=lambda done: assembled.__setitem__(0, assembled[0] + len(done)))
            loop.attach(p.pid)
        _go(p)
        cpu0 = time.process_time()
        wall = None
        while wall is None:
            if loop is not None:
                loop.step(50)
            line = p.stdout.readline() if loop is None else _ready_line(p)
            if line:
                wall = float(line)
        if loop is not None:
            loop.step(50)
            progs = prog_stats(next(iter(loop.live.values())).capture.engine.bpf)
            fleet = loop.close()
            res = fleet.targets[0]
            info = {"spans": assembled[0], "dropped": res.counters["dropped"], "handler": progs,
                    "tracer_cpu_s": time.process_time() - cpu0}
            loop = None
        _go(p)
        p.wait(timeout=60)
    finally:
        p.kill()
        if loop is not None:
            loop.close()
    return wall, info


def _ready_line(p: subprocess.Popen) -> str:
    import select  # noqa: PLC0415

    r, _, _ = select.select([p.stdout], [], [], 0)
    return p.stdout.readline() if r else ""


def bench_per_span(calls: int, spacing: int, repeats: int) -> dict:
    python = _python()
    runs: dict[str, list[float]] = {"none": [], "probes": [], "target": []}
    tracer_cpu, spans, dropped = [], [], []
    handler_ns: dict[str, list[float]] = {"probes": [], "target": []}
    specs = {"none": None, "probes": spec_from_functions(["__main__:other"]),
             "target": spec_from_functions(["__main__:f"])}
    for _ in range(repeats):
        for kind, spec in specs.items():
            wall, info = _timed_run(python, calls, spacing, spec)
            runs[kind].append(wall)
            if kind != "none":
                handler_ns[kind].append(sum(ns for _, ns in info["handler"].values()) / calls)
            if kind == "target":
                tracer_cpu.append(info["tracer_cpu_s"])
                spans.append(info["spans"])
                dropped.append(info["dropped"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "python": python, "calls": calls, "spacing": spacing, "repeats": repeats, "wall_s": runs, "median_wall_s": med,
        "per_call_us": {k: v / calls * 1e6 for k, v in med.items()},
        "per_span_target_us": (med["target"] - med["probes"]) / calls * 1e6,
        "probe_per_call_us": (med["probes"] - med["none"]) / calls * 1e6,
        "spans": spans, "dropped": dropped,
        "handler_ns_per_call": {k: statistics.median(v) for k, v in handler_ns.items()},
        "per_span_handler_us": (statistics.median(handler_ns["target"]) - statistics.median(handler_ns["probes"])) / 1e3,
        "tracer_cpu_per_span_us": statistics.median(c / max(1, s) * 1e6 for c, s in zip(tracer_cpu, spans)),
    }


def bench_two_tracers(cycles: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([_python(), "-m", "tracer.reference", "--cycles", str(cycles), "--cycle-ms", "20",
                             "--wait-for-attach", "--out", os.devnull], env=env, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    spec = load_spec("reference")
    loops = [TraceLoop(spec, TraceOptions(status=False)) for _ in range(2)]
    try:
        for loop in loops:
            loop.attach(proc.pid)
        os.kill(proc.pid, signal.SIGUSR1)
        while any(loop.live for loop in loops):
            for loop in loops:
                loop.step(50)
    finally:
        results = [loop.close() for loop in loops]
        proc.kill()
        proc.wait()
    by_name = [{}, {}]
    for i, fleet in enumerate(results):
        for s in sorted(fleet.spans, key=lambda s: s.start_ns):
            by_name[i].setdefault(s.name, []).append(s.duration_ns)
    gaps = [abs(a - b) for name in by_name[0] for a, b in zip(by_name[0][name], by_name[1].get(name, []))]
    cyc = [abs(a - b) for a, b in zip(by_name[0].get("takwin.cycle", []), by_name[1].get("takwin.cycle", []))]
    return {"cycles": cycles, "spans": [len(f.spans) for f in results],
            "duration_gap_us": {"median": statistics.median(gaps) / 1e3, "max": max(gaps) / 1e3},
            "cycle_gap_us": {"median": statistics.median(cyc) / 1e3, "max": max(cyc) / 1e3}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--calls", type=int, default=50_000)
    ap.add_argument("--spacing", type=int, default=100, help="empty loop turns between two calls")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--only", default="attach,per_span,two_tracers", help="comma-separated parts to run")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    out = {"load_before": os.getloadavg()}
    if "attach" in parts:
        out["attach"] = bench_attach(args.procs)
        a = out["attach"]
        fmt = ", ".join
        print(f"attach, {args.procs} processes: on distinct builds {fmt(f'{x:.2f}' for x in a['distinct_builds_s'])} s;"
              f" on one build {fmt(f'{x:.2f}' for x in a['one_build_s'])} s; of which BPF compile "
              f"{fmt(f'{x:.2f}' for x in a['distinct_builds_compile_s'])} / "
              f"{fmt(f'{x:.2f}' for x in a['one_build_compile_s'])} s")
    if "per_span" in parts:
        run_per_span(args, out)
    if "two_tracers" in parts:
        out["two_tracers"] = tt = bench_two_tracers(args.cycles)
        print(f"two tracers on one process: span duration gap median {tt['duration_gap_us']['median']:.1f} µs, "
              f"max {tt['duration_gap_us']['max']:.1f} µs; cycle gap max {tt['cycle_gap_us']['max']:.1f} µs")
    out["load_after"] = os.getloadavg()
    # Parts run separately (--only) update their own entries; each keeps the load it ran under.
    path = ROOT / "results" / "everyday.json"
    path.parent.mkdir(exist_ok=True)
    merged = json.loads(path.read_text()) if path.exists() else {}
    for part in parts & set(out):
        merged[part] = {**out[part], "load": [out["load_before"], out["load_after"]]}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


def _enable_bpf_stats() -> int:
    """BPF_ENABLE_STATS: run_time_ns accounting while the returned fd is open. Unlike the
    kernel.bpf_stats_enabled sysctl, another process toggling the sysctl cannot turn it off."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 8)()  # union bpf_attr { struct { __u32 type; } enable_stats; }, type 0: run time
    fd = libc.syscall(SYS_BPF, BPF_ENABLE_STATS, ctypes.byref(attr), 4)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_ENABLE_STATS failed")
    return fd


def run_per_span(args, out: dict) -> None:
    fd = _enable_bpf_stats()
    try:
        out["per_span"] = ps = bench_per_span(args.calls, args.spacing, args.repeats)
    finally:
        os.close(fd)
    print(f"per call ({args.calls:,} calls, median of {args.repeats}): no tracer "
          f"{ps['per_call_us']['none']:.3f} µs, probes only {ps['per_call_us']['probes']:.3f} µs, "
          f"traced {ps['per_call_us']['target']:.3f} µs -> a span costs the target "
          f"{ps['per_span_target_us']:.2f} µs (BPF handlers alone: {ps['per_span_handler_us']:.2f} µs), "
          f"the tracer {ps['tracer_cpu_per_span_us']:.2f} µs CPU; "
          f"drops {ps['dropped']}")


if __name__ == "__main__":
    sys.exit(main())
