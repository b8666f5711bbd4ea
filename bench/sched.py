"""Extra cost of the scheduler/memory programs (bpf/sched.c) on the reference substrate.

The workload is `python -m tracer.reference` (main thread plus its `takwin-vault` worker
thread, which sleeps and hashes while the main thread waits on it: thousands of context
switches and wakeups a second). Each repeat runs the same batch of cycles in four modes,
in a rotating order, and the substrate times its own cycles (the sum of its
`cycle_seconds`, so start-up and attach are not counted):

  detached        no BPF at all
  sched           bpf/sched.c alone (SchedMonitor): the tracepoint programs' cost
  capture         the exact capture (spans, no --sched)
  capture+sched   the exact capture with --sched: tracepoint programs plus a snapshot in
                  every entry/exit handler of a traced function

The overheads are `sched` vs `detached` and `capture+sched` vs `capture`. Wall time on a
shared machine moves with other load, so it also reads the kernel's own per-program run
counts and run times (`kernel.bpf_stats_enabled`, restored afterwards): handler time
divided by wall time is what the programs took, whatever else ran. Prints medians and
spreads; writes results/sched.json.

    scripts/bench sched [--repeats 7] [--cycles 30] [--cycle-ms 50] [--python PATH] [--modes a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.capture.engine import prog_stats  # noqa: E402
from tracer.correlate.sched import SchedMonitor, program_misses, read_health  # noqa: E402
from tracer.discover.process import is_alive  # noqa: E402
from tracer.session import ExactCapture, TraceOptions  # noqa: E402
from tracer.spec import load_spec  # noqa: E402

MODES = ("detached", "sched", "capture", "capture+sched")
STATS_KNOB = Path("/proc/sys/kernel/bpf_stats_enabled")


def start_substrate(python: str, cycles: int, cycle_ms: int, out: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KIMERA_TELEMETRY_EMITTER_PATH", None)  # the no-op emitter: measure the tracer only
    p = subprocess.Popen([python, "-m", "tracer.reference", "--cycles", str(cycles), "--cycle-ms", str(cycle_ms),
                          "--wait-for-attach", "--out", out], env=env, stdout=subprocess.PIPE, text=True)
    first = json.loads(p.stdout.readline())
    assert first["pid"] == p.pid, first
    # The substrate's SIGUSR1 mask covers its main thread only: a signal sent before that
    # thread sits in sigwait can land on another thread (numpy's) and be lost.
    deadline = time.monotonic() + 10
    while "sigtimedwait" not in Path(f"/proc/{p.pid}/wchan").read_text() and time.monotonic() < deadline:
        time.sleep(0.005)
    return p


def wait_exit(p: subprocess.Popen, poll) -> float:
    """Wait for the substrate (calling `poll(timeout_ms)` meanwhile), reap it; its CPU seconds."""
    while is_alive(p.pid):  # not p.poll(): that would reap it before wait4 reads its rusage
        poll(100)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


def run_once(mode: str, python: str, cycles: int, cycle_ms: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as d:
        out = str(Path(d) / "cycles.jsonl")
        p = start_substrate(python, cycles, cycle_ms, out)
        progs, counters, cpu = {}, {}, float("nan")
        try:
            if mode == "detached":
                os.kill(p.pid, signal.SIGUSR1)
                cpu = wait_exit(p, lambda ms: time.sleep(ms / 1000))
            elif mode == "sched":
                with SchedMonitor(p.pid) as mon:
                    os.kill(p.pid, signal.SIGUSR1)
                    cpu = wait_exit(p, mon.poll)
                    progs = prog_stats(mon.bpf)
                    counters = {**read_health(mon.bpf), **program_misses(mon.bpf)}
            else:
                cap = ExactCapture(p.pid, load_spec("reference"), TraceOptions(with_sched=mode == "capture+sched"))
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                    cpu = wait_exit(p, cap.poll)
                    cap.drain()
                    progs = prog_stats(cap.engine.bpf)
                    counters = cap.counters()
                finally:
                    cap.close()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        lines = [json.loads(x) for x in Path(out).read_text().splitlines() if x.strip()]
    rows = [x for x in lines if "cycle_index" in x]
    if len(rows) != cycles or not all(r["ok"] for r in rows):
        raise SystemExit(f"bench sched: the substrate did not complete its {cycles} cycles in mode {mode}")
    return {"wall_s": sum(r["cycle_seconds"] for r in rows), "cpu_s": cpu, "progs": progs, "counters": counters}


def spread(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q[0], "q3": q[2]}


def default_python() -> str:
    for label in ("debian-3.11.2", "pyenv-3.12.1"):
        cand = ROOT / ".cache" / "targets" / label / "bin" / "python"
        if cand.exists():
            return str(cand)
    return sys.executable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--cycle-ms", type=int, default=50)
    ap.add_argument("--python", default=default_python(), help="interpreter that runs the substrate")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    args = ap.parse_args()
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    if len(modes) < 2:
        ap.error(f"--modes: give at least two of {', '.join(MODES)}")
    old_knob = STATS_KNOB.read_text().strip()
    STATS_KNOB.write_text("1")
    walls: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    runs: dict[str, dict[str, list[int]]] = {m: {} for m in modes}
    counters: dict[str, dict[str, int]] = {m: {} for m in modes}
    try:
        for i in range(args.repeats):
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for mode in order:
                r = run_once(mode, args.python, args.cycles, args.cycle_ms)
                walls[mode].append(r["wall_s"])
                cpus[mode].append(r["cpu_s"])
                for name, (n, ns) in r["progs"].items():
                    acc = runs[mode].setdefault(name, [0, 0])
                    acc[0] += n
                    acc[1] += ns
                for k, v in r["counters"].items():
                    counters[mode][k] = counters[mode].get(k, 0) + v
            print(f"  repeat {i + 1}/{args.repeats}: " + ", ".join(f"{m} {walls[m][-1]:.3f} s" for m in modes),
                  flush=True)
    finally:
        STATS_KNOB.write_text(old_knob)

    def overhead(base: str, with_: str, xs: dict[str, list[float]] = walls) -> dict | None:
        if base not in xs or with_ not in xs:
            return None
        pairs = [(a - b) / b * 100 for a, b in zip(xs[with_], xs[base])]
        mb, mw = statistics.median(xs[base]), statistics.median(xs[with_])
        return {"of_medians_pct": (mw - mb) / mb * 100, "pairs_pct": spread(pairs)}

    def handlers(mode: str, prefix: tuple[str, ...]) -> dict | None:
        if mode not in runs:
            return None
        sel = {k: v for k, v in runs[mode].items() if k.startswith(prefix)}
        total_ns = sum(ns for _, ns in sel.values())
        return {"ns_per_run": {k: (ns / n if n else 0.0) for k, (n, ns) in sel.items()},
                "runs": {k: n for k, (n, _) in sel.items()},
                "pct_of_wall": total_ns / 1e9 / sum(walls[mode]) * 100}

    sched_progs = ("raw_tracepoint__", "tracepoint__")
    result = {
        "benchmark": "sched",
        "workload": f"tracer.reference, {args.cycles} cycles x cycle_ms {args.cycle_ms} (main + takwin-vault worker), "
                    f"{Path(args.python).parent.parent.name}",
        "repeats": args.repeats,
        "modes": list(modes),
        "wall_s": {m: spread(walls[m]) for m in modes},
        "wall_s_all": walls,
        "cpu_s": {m: spread(cpus[m]) for m in modes},
        "sched_vs_detached": overhead("detached", "sched"),
        "capture_sched_vs_capture": overhead("capture", "capture+sched"),
        # The target's own CPU time: handlers running in its threads are charged to it, and
        # other load moves it less than wall time.
        "cpu_sched_vs_detached": overhead("detached", "sched", cpus),
        "cpu_capture_sched_vs_capture": overhead("capture", "capture+sched", cpus),
        "sched_handlers": handlers("sched", sched_progs),
        "sched_handlers_in_capture": handlers("capture+sched", sched_progs),
        "capture_handlers": handlers("capture", ("on_",)),
        "capture_handlers_with_sched": handlers("capture+sched", ("on_",)),
        "counters": counters,
        "target_pct": 1.0,
    }
    out = ROOT / "results" / "sched.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    def line(name: str, o: dict | None) -> str:
        if o is None:
            return f"  {name}: not run"
        p = o["pairs_pct"]
        return (f"  {name}: {o['of_medians_pct']:+.2f}% (medians); paired median {p['median']:+.2f}%, "
                f"IQR {p['q1']:+.2f}..{p['q3']:+.2f}%, range {p['min']:+.2f}..{p['max']:+.2f}%")

    print(f"sched: {result['workload']}, {args.repeats} repeats, modes rotated")
    for m in modes:
        w = result["wall_s"][m]
        print(f"  {m:14} wall median {w['median']:.3f} s (range {w['min']:.3f}..{w['max']:.3f})")
    print(line("wall, sched programs vs detached", result["sched_vs_detached"]))
    print(line("wall, capture+sched vs capture  ", result["capture_sched_vs_capture"]))
    print(line("target CPU, sched vs detached   ", result["cpu_sched_vs_detached"]))
    print(line("target CPU, capture+sched vs capture", result["cpu_capture_sched_vs_capture"]))
    for key in ("sched_handlers", "capture_handlers", "capture_handlers_with_sched"):
        h = result[key]
        if h is None:
            continue
        per = ", ".join(f"{k.split('__')[-1]} {v:.0f} ns" for k, v in h["ns_per_run"].items())
        print(f"  {key} (bpf_stats, its own clock reads included): {h['pct_of_wall']:.3f}% of wall; "
              f"per run: {per}")
    print(f"  target <= {result['target_pct']}% wall; written {out.relative_to(ROOT)} "
          f"({time.strftime('%Y-%m-%d %H:%M:%S')})")


if __name__ == "__main__":
    main()
