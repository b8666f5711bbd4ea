"""How exact the scheduler accounting is against the kernel's own per-thread counters.

Four busy threads (hashing, GIL released) run for `--seconds`; at both ends the target is
stopped (SIGSTOP) so every thread's last switch-out has closed its interval and
/proc/PID/task/TID/schedstat is current, and the two are read. Per repeat it reports each
thread's on-CPU error against schedstat's sum_exec_runtime, and how many switch-ins the
kernel counted (schedstat's pcount) that the sched_switch tracepoint never reported,
next to the programs' own counters of unreported transitions and skipped events.

    scripts/bench sched_accuracy [--repeats 20] [--seconds 3]
"""

from __future__ import annotations

import argparse
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

from tracer.correlate.sched import SchedMonitor  # noqa: E402

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


def _state(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def read_stopped(pid: int, mon: SchedMonitor) -> tuple[dict, dict]:
    os.kill(pid, signal.SIGSTOP)
    try:
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        deadline = time.monotonic() + 5
        while any(_state(pid, t) != "T" for t in tids) and time.monotonic() < deadline:
            time.sleep(0.005)
        kern = {t: [int(x) for x in Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()] for t in tids}
        return kern, mon.threads()
    finally:
        os.kill(pid, signal.SIGCONT)


def once(seconds: float) -> dict:
    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with SchedMonitor(p.pid) as mon:
            deadline = time.monotonic() + 5
            while len(mon.threads()) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            h0 = mon.health()
            k0, b0 = read_stopped(p.pid, mon)
            time.sleep(seconds)
            k1, b1 = read_stopped(p.pid, mon)
            h1, misses = mon.health(), mon.misses()
    finally:
        p.kill()
        p.wait()
    errs, unreported = [], 0
    for t in k0:
        kcpu = k1[t][0] - k0[t][0]
        errs.append(((b1[t].on_cpu_ns - b0[t].on_cpu_ns) - kcpu) / kcpu * 100)
        unreported += (k1[t][2] - k0[t][2]) - (b1[t].switch_ins - b0[t].switch_ins)
    return {"thread_err_pct": errs, "unreported_switch_ins": unreported,
            "health": {k: h1[k] - h0[k] for k in h1}, "skipped": misses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        r = once(args.seconds)
        runs.append(r)
        worst = max(r["thread_err_pct"], key=abs)
        print(f"  repeat {i + 1}/{args.repeats}: worst thread {worst:+.4f}%, switch-ins not reported "
              f"{r['unreported_switch_ins']}, noticed {r['health']['missed_switch_in']}", flush=True)
    worst = [max(r["thread_err_pct"], key=abs) for r in runs]
    result = {
        "benchmark": "sched_accuracy", "repeats": args.repeats, "seconds": args.seconds,
        "worst_thread_err_pct": {"median": statistics.median(worst), "max_abs": max(worst, key=abs),
                                 "over_2pct": sum(abs(w) > 2 for w in worst)},
        "unreported_switch_ins": [r["unreported_switch_ins"] for r in runs],
        "runs": runs,
    }
    out = ROOT / "results" / "sched_accuracy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    w = result["worst_thread_err_pct"]
    print(f"sched_accuracy: 4 busy threads, {args.seconds:g} s windows, {args.repeats} repeats")
    print(f"  per-thread on-CPU vs schedstat: median of worst {w['median']:+.4f}%, largest {w['max_abs']:+.4f}%, "
          f"{w['over_2pct']} repeats over 2%")
    print(f"  switch-ins the tracepoint did not report, per repeat: {result['unreported_switch_ins']}")
    print(f"  written {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
