"""Sampled mode on the reference substrate: wall overhead, kernel cost, parity with the emitter.

Runs `python -m tracer.reference` alternately untraced and traced in sampled mode (A/B/A/B,
so drift on a shared machine falls on both sides) and reports:

* wall overhead: median cycle time traced over untraced, minus 1 (the issue's target: <= 1%);
* kernel cost: the sampling programs' own run time (BPF_ENABLE_STATS) per second of trace
  and per target sample: the part of the overhead the tracer adds on the target's CPUs;
* parity (tracer/compare/sampled.py): every step of >= 20 ms found in every cycle, per-step
  total time against the emitter's, boundary error p50/p99.

    scripts/bench sampled [--cycles 8] [--cycle-ms 2500] [--hz 999] [--repeats 2] [--python PATH]
Writes results/sampled.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from everyday import _enable_bpf_stats  # noqa: E402

from tracer.commands import run_validate  # noqa: E402
from tracer.interpreters import default_target_python  # noqa: E402


def cycle_seconds(path: Path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["cycle_seconds"] for r in rows if "cycle_seconds" in r]


def untraced(python: str, cycles: int, cycle_ms: int, out: Path) -> list[float]:
    # The emitter on, as in the traced run (run_validate turns it on for parity): the two
    # sides then differ by the tracer alone.
    env = dict(os.environ, PYTHONPATH=str(ROOT), KIMERA_TELEMETRY_EMITTER_PATH=str(out.with_suffix(".hooks.jsonl")))
    subprocess.run([python, "-m", "tracer.reference", "--cycles", str(cycles), "--cycle-ms", str(cycle_ms),
                    "--out", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    return cycle_seconds(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--cycle-ms", type=int, default=2500)
    ap.add_argument("--hz", type=int, default=999)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--python", default=default_target_python(ROOT / ".cache" / "targets"))
    args = ap.parse_args()
    base, traced, runs, tracer_cpu, pairs = [], [], [], [], []
    fd = _enable_bpf_stats()
    try:
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                b = untraced(args.python, args.cycles, args.cycle_ms, Path(tmp) / "cycles.jsonl")
                base += b
                cpu0 = time.process_time()
                res = run_validate(args.cycles, args.cycle_ms, args.python, Path(tmp) / "v", 50.0,
                                   mode="sampled", hz=args.hz)
                tracer_cpu.append((time.process_time() - cpu0) / res["trace"]["duration_s"])
                t = cycle_seconds(Path(tmp) / "v" / "cycles.jsonl")
                traced += t
                pairs.append(statistics.median(t) / statistics.median(b) - 1)
                c = res["trace"]["counters"]
                runs.append({"parity": res["parity"], "counters": c, "duration_s": res["trace"]["duration_s"]})
                print(f"run {r + 1}: {res['parity_text']}\n")
    finally:
        os.close(fd)
    mb, mt = statistics.median(base), statistics.median(traced)
    prog_ns = sum(x["counters"]["prog_run_ns"] for x in runs)
    dur = sum(x["duration_s"] for x in runs)
    samples = sum(x["counters"]["samples"] + x["counters"]["switch_outs"] for x in runs)
    out = {
        "python": args.python, "hz": args.hz, "cycles": args.cycles, "cycle_ms": args.cycle_ms,
        "repeats": args.repeats,
        "untraced_cycle_s": {"median": mb, "n": len(base)}, "traced_cycle_s": {"median": mt, "n": len(traced)},
        "wall_overhead": mt / mb - 1,
        "wall_overhead_per_repeat": pairs,  # each traced run against the untraced run just before it
        "kernel_ns_per_s": prog_ns / dur if dur else None,
        "tracer_cpu_share": statistics.median(tracer_cpu),  # of one CPU, user + system, this process
        "kernel_ns_per_target_sample": prog_ns / samples if samples else None,
        "runs": runs,
        "passed": all(x["parity"]["passed"] for x in runs),
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "sampled.json").write_text(json.dumps(out, indent=2))
    print(f"median cycle: untraced {mb:.4f} s, traced {mt:.4f} s -> wall overhead {out['wall_overhead']:+.2%} "
          f"(per repeat: {', '.join(f'{p:+.2%}' for p in pairs)})")
    print(f"kernel: {out['kernel_ns_per_s'] / 1e6:.3f} ms of program time per s of trace "
          f"({out['kernel_ns_per_s'] / 1e9:.3%} of one CPU), "
          f"{out['kernel_ns_per_target_sample'] / 1e3:.2f} µs per target sample or switch")
    print(f"tracer process: {out['tracer_cpu_share']:.1%} of one CPU (attach and compile included)")
    print(f"parity: {'PASS' if out['passed'] else 'FAIL'} in every run; results/sampled.json")


if __name__ == "__main__":
    main()
