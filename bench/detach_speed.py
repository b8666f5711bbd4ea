"""Does the target get its speed back when the tracer is SIGKILLed?

    scripts/bench detach_speed [--python PATH] [--window-s 1] [--windows 8]

A target calls a traced function in a loop and reports, per window, how many calls it made
per CPU second (time.process_time: other load on the machine does not move it). Three phases
of --windows windows each: untraced, traced by `ophamin-trace` (a separate process), and
after that tracer was SIGKILLed. Printed: the median rate of each phase and after/untraced.
The kernel removes the probes when the dead tracer's file descriptors close, so the last
ratio should be 1 within noise (tests/test_hardening.py checks the breakpoint bytes
themselves; this is the timing side). Writes results/detach_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.interpreters import default_target_python  # noqa: E402

TARGET = r'''
import sys, time
def work(i):
    return i + 1
def run(window):
    n = 0
    start = time.monotonic()  # CLOCK_MONOTONIC, shared with the bench: tells which phase a window is in
    t0 = time.process_time()
    while time.process_time() - t0 < window:
        for i in range(1000):
            work(i)
        n += 1000
    return start, n / (time.process_time() - t0)
window = float(sys.argv[1])
print("ready", flush=True)
while True:
    start, rate = run(window)
    print("rate", start, round(rate), flush=True)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=None)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args()
    if args.python is None:
        args.python = default_target_python(ROOT / ".cache" / "targets")
    spec = ROOT / "results" / "detach_speed.toml"
    spec.parent.mkdir(exist_ok=True)
    spec.write_text('[[span]]\nfunction = "__main__:work"\n')
    t = subprocess.Popen([args.python, "-c", TARGET, str(args.window_s)], stdout=subprocess.PIPE, text=True)
    assert t.stdout.readline().strip() == "ready"

    def rates(n: int) -> list[int]:
        """The next n windows that start from now on (lines already in the pipe are older)."""
        since = time.monotonic()
        out = []
        while len(out) < n:
            line = t.stdout.readline().split()
            if line and line[0] == "rate" and float(line[1]) >= since:
                out.append(int(line[2]))
        return out

    phases = {}
    try:
        phases["untraced"] = rates(args.windows)
        tracer = subprocess.Popen([sys.executable, "-m", "tracer.cli", "--pid", str(t.pid), "--spec", str(spec),
                                   "--no-status"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  cwd=str(ROOT))
        attached = threading.Event()

        def watch() -> None:
            for line in tracer.stderr:
                if "attached to PID" in line:
                    attached.set()

        threading.Thread(target=watch, daemon=True).start()
        if not attached.wait(600):
            raise SystemExit("the tracer did not attach")
        phases["traced"] = rates(args.windows)
        os.kill(tracer.pid, signal.SIGKILL)
        tracer.wait()
        phases["after SIGKILL"] = rates(args.windows)
    finally:
        t.kill()
    med = {k: statistics.median(v) for k, v in phases.items()}
    for k, v in phases.items():
        print(f"{k:<14} median {med[k]:>12,.0f} calls per CPU second  (windows: {', '.join(f'{x:,}' for x in v)})")
    ratio = med["after SIGKILL"] / med["untraced"]
    print(f"after SIGKILL / untraced = {ratio:.3f}; traced / untraced = {med['traced'] / med['untraced']:.3f}")
    (ROOT / "results" / "detach_speed.json").write_text(json.dumps(
        {"python": args.python, "phases": phases, "medians": med, "after_over_untraced": round(ratio, 4),
         "traced_over_untraced": round(med["traced"] / med["untraced"], 4)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
