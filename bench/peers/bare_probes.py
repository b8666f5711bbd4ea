"""The bare kernel probes ophamin-trace's exact mode is built on, attached to a peers harness.

    python bench/peers/bare_probes.py PID

The plan's uprobe sites on PID's interpreter, each running an empty BPF program (bench/capture.py
`Bare`): what a traced call costs before any of ophamin-trace's own BPF code runs, measured on
the same workload as the tools. Prints "attached" once the probes are in, detaches on SIGINT.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from capture import Bare  # noqa: E402


def main() -> None:
    bare = Bare(int(sys.argv[1]))
    try:
        print("attached", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        bare.close()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # taken by sigwait only
    main()
