"""What Ophamin runs instead of psutil sampling: trace one batch of the reference substrate
through the Python API and print its per-step timing and per-cycle resource profile.

    sudo .venv/bin/python examples/ophamin_api.py --cycles 10 [--cycle-ms 20] [--output spans.jsonl]
    sudo .venv/bin/python examples/ophamin_api.py --pid PID   # a substrate started with --wait-for-attach

Prints one JSON object: the number of spans streamed while the batch ran, per_step_timing
(median / p10 / p90 ms per step) and Ophamin's BatchResourceProfile with
attribution_kind="per_cycle". The test suite runs it (tests/test_everyday.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tracer  # noqa: E402


def start_substrate(cycles: int, cycle_ms: int, python: str = sys.executable) -> subprocess.Popen:
    """The reference substrate, blocked until SIGUSR1 (sent once the probes are in)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([python, "-m", "tracer.reference", "--cycles", str(cycles), "--cycle-ms", str(cycle_ms),
                             "--wait-for-attach", "--attach-timeout", "120", "--out", os.devnull],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())  # {"pid": ...}: the runner is up and waiting
    return proc


def trace_batch(pid: int, output: Optional[str] = None) -> Dict[str, Any]:
    """Attach, start the batch, stream its spans while it runs, and profile it."""
    streamed: Counter[str] = Counter()
    with tracer.attach(pid, spec="reference", output=output) as session:
        os.kill(pid, signal.SIGUSR1)  # probes are in: start the batch
        for span in session.spans():  # ends when the substrate exits
            streamed[span.name] += 1
    profile = session.profile
    return {
        "pid": pid,
        "streamed": dict(streamed),
        "per_step_timing": session.per_step_timing,
        "profile": profile.to_dict(),
        "sched_unavailable": session.sched_unavailable,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--cycle-ms", type=int, default=20)
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the substrate")
    ap.add_argument("--output", help="also write the spans as OTLP-JSON lines")
    ap.add_argument("--pid", type=int, help="trace this substrate (already waiting for SIGUSR1) instead")
    args = ap.parse_args()
    if args.pid:
        try:
            out = trace_batch(args.pid, args.output)
        except tracer.TraceError as e:
            print(f"ophamin_api: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(out, indent=2))
        return 0
    proc = start_substrate(args.cycles, args.cycle_ms, args.python)
    try:
        out = trace_batch(proc.pid, args.output)
    except tracer.TraceError as e:
        proc.kill()
        print(f"ophamin_api: error: {e}", file=sys.stderr)
        return 2
    out["substrate_exit"] = proc.wait()
    print(json.dumps(out, indent=2))
    return 0 if out["substrate_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
