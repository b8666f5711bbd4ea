"""Overload: a target calling every one of its (traced) functions as fast as it can, for a
while; the kernel's ring buffer overflows all the time. Measured: the tracer's resident memory
over the run (it must stay flat: polls take at most MAX_EVENTS_PER_POLL events, the rest stays
in the fixed-size ring or is dropped and counted), the drop rate, and the accounting
invariant per kind (events read + events dropped = events made).

    scripts/bench overload [--python PATH] [--seconds 120] [--sample-s 2]

Writes results/overload.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.interpreters import default_target_python  # noqa: E402

FUNCTIONS = 10
TARGET = "import sys\n" + "".join(f"def f{k}(): return {k}\n" for k in range(FUNCTIONS)) + (
    "def burst():\n    for _ in range(1000):\n        " + "; ".join(f"f{k}()" for k in range(FUNCTIONS)) + "\n"
    "print('ready', flush=True)\nsys.stdin.readline()\nwhile True:\n    burst()\n")


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=None)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--sample-s", type=float, default=2)
    args = ap.parse_args()
    if args.python is None:
        args.python = default_target_python(ROOT / ".cache" / "targets")
    spec = ROOT / "results" / "overload.toml"
    spec.parent.mkdir(exist_ok=True)
    spec.write_text("".join(f'[[span]]\nfunction = "__main__:f{k}"\n' for k in range(FUNCTIONS))
                    + '[[span]]\nfunction = "__main__:burst"\n')
    t = subprocess.Popen([args.python, "-c", TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert t.stdout.readline().strip() == "ready"
    tracer = subprocess.Popen([sys.executable, "-m", "tracer.cli", "--pid", str(t.pid), "--spec", str(spec),
                               "--json", "--no-status", "--output", str(ROOT / "results" / "overload.jsonl")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    attached = threading.Event()

    def watch() -> None:
        for line in tracer.stderr:
            if "attached to PID" in line:
                attached.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not attached.wait(600):
            raise SystemExit("the tracer did not attach")
        t.stdin.write("go\n")
        t.stdin.flush()
        t0 = time.monotonic()
        samples = []
        while time.monotonic() - t0 < args.seconds:
            r = _rss_mib(tracer.pid)
            if r:
                samples.append((round(time.monotonic() - t0, 1), round(r, 2)))
            time.sleep(args.sample_s)
        t_stop = time.monotonic()
        tracer.send_signal(signal.SIGINT)
        out, _ = tracer.communicate(timeout=120)
        stop_s = time.monotonic() - t_stop
    finally:
        t.kill()
    res = json.loads(out)
    c = res["counters"]
    warm = [r for s, r in samples if s >= 10] or [r for _, r in samples]
    result = {
        "python": args.python, "seconds": args.seconds, "stop_after_sigint_s": round(stop_s, 2),
        "rss_mib": {"first": samples[0][1], "after_10s": warm[0], "peak": max(r for _, r in samples),
                    "growth_after_10s": round(max(warm) - warm[0], 2)},
        "events_made": c["target_entries"] + c["target_exits"],
        "events_read": c["received_entries"] + c["received_exits"], "dropped": c["dropped"],
        "drop_fraction": round(c["dropped"] / max(1, c["target_entries"] + c["target_exits"]), 4),
        "exact": c["received_entries"] + c["dropped_entries"] == c["target_entries"]
        and c["received_exits"] + c["dropped_exits"] == c["target_exits"],
        "spans": res["spans"], "samples": samples,
    }
    (ROOT / "results" / "overload.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.seconds:.0f} s of overload: {result['events_made']:,} events made, {result['events_read']:,} read, "
          f"{result['dropped']:,} dropped ({100 * result['drop_fraction']:.1f} %); accounting exact: {result['exact']}")
    r = result["rss_mib"]
    print(f"tracer RSS: {r['first']} MiB at start, {r['after_10s']} MiB after 10 s, peak {r['peak']} MiB, "
          f"growth after 10 s {r['growth_after_10s']} MiB; stopped {result['stop_after_sigint_s']} s after SIGINT")
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
