"""Batch runner: `python -m tracer.reference --cycles N [--cycle-ms M] [--seed S]
[--wait-for-attach [--attach-timeout S]] [--out FILE] [--gpu [--gpu-ms MS]]`.

stdout line 1: {"pid", "python", "numpy", "emitter"} (flushed), so a tracer can attach to the
PID. With --wait-for-attach the runner then blocks until SIGUSR1 (the tracer sends it once its
probes are in). Then one JSON line per cycle {cycle_index, ok, cycle_seconds, digest}, and a
final {"done": true, "digest": ...} over the whole batch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import sys
import threading
import time
from typing import Any, Optional

from ..emitter import EmitterUnavailable, emitter_from_env
from . import HAVE_NUMPY, Takwin, stimuli


def _line(stream: Any, obj: dict) -> None:
    stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
    stream.flush()


# Set by the SIGUSR1 handler. Python runs signal handlers in the main thread whichever thread
# the kernel delivered the signal to (numpy's threads, started at import, can receive it), and
# the handler is installed before the PID line goes out: a signal sent the moment a tracer reads
# that line is never lost.
_attached = threading.Event()


def _on_sigusr1(signum: int, frame: Any) -> None:
    _attached.set()


def _wait_for_sigusr1(timeout: Optional[float]) -> bool:
    return _attached.wait(timeout)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tracer.reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, required=True)
    ap.add_argument("--cycle-ms", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-for-attach", action="store_true",
                    help="after printing the PID line, block until SIGUSR1 arrives")
    ap.add_argument("--attach-timeout", type=float, default=None,
                    help="with --wait-for-attach: give up (exit 3) after this many seconds")
    ap.add_argument("--out", help="write the per-cycle lines here instead of stdout")
    ap.add_argument("--gpu", action="store_true",
                    help="add the GPU step to each cycle where a CUDA device and CuPy or PyTorch exist "
                         "(else it is skipped, with the reason on stderr and in line 1)")
    ap.add_argument("--gpu-ms", type=float, default=400.0, help="with --gpu: GPU work per cycle (ms)")
    args = ap.parse_args(argv)
    if args.cycles < 0:
        ap.error("--cycles must be >= 0")

    try:
        emitter = emitter_from_env()
    except EmitterUnavailable as e:
        print(f"tracer.reference: error: {e}", file=sys.stderr)
        return 2

    # Also without --wait-for-attach, and for a tracer that signals more than once: a stray
    # SIGUSR1 must not kill the run (its default action).
    signal.signal(signal.SIGUSR1, _on_sigusr1)
    takwin = None
    head = {"pid": os.getpid(), "python": platform.python_version(),
            "numpy": HAVE_NUMPY, "emitter": getattr(emitter, "kind", "custom")}
    if args.gpu:
        # Before line 1: the CUDA context is created here, before any tracer attaches.
        takwin = Takwin(emitter=emitter, seed=args.seed, cycle_ms=args.cycle_ms)
        skipped = takwin.enable_gpu(args.gpu_ms)
        if skipped:
            print(f"tracer.reference: GPU step skipped: {skipped}", file=sys.stderr)
        head["gpu"] = {"enabled": not skipped, "reason": skipped,
                       "backend": takwin.gpu.backend if takwin.gpu else "",
                       "device": takwin.gpu.device if takwin.gpu else ""}
    _line(sys.stdout, head)
    if args.wait_for_attach and not _wait_for_sigusr1(args.attach_timeout):
        print(f"tracer.reference: error: no SIGUSR1 within {args.attach_timeout:g}s", file=sys.stderr)
        if takwin is not None:
            takwin.close()
        return 3

    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    if takwin is None:
        takwin = Takwin(emitter=emitter, seed=args.seed, cycle_ms=args.cycle_ms)
    batch = hashlib.sha256()
    ok_count = 0
    try:
        for i, text in enumerate(stimuli(args.seed, args.cycles)):
            t0 = time.perf_counter()
            try:
                digest = takwin.run(text).digest
                ok = True
            except Exception as e:  # noqa: BLE001 - a failed cycle is reported, the batch goes on
                digest, ok = None, False
                print(f"tracer.reference: cycle {i} failed: {e!r}", file=sys.stderr)
            dt = time.perf_counter() - t0
            ok_count += ok
            batch.update(f"{i}:{digest};".encode())
            _line(out, {"cycle_index": i, "ok": ok, "cycle_seconds": round(dt, 6), "digest": digest})
        _line(out, {"done": True, "cycles": args.cycles, "ok": ok_count, "digest": batch.hexdigest()})
    finally:
        takwin.close()
        shutdown = getattr(emitter, "shutdown", None)
        if shutdown is not None:
            shutdown()
        if out is not sys.stdout:
            out.close()
    return 0 if ok_count == args.cycles else 1


if __name__ == "__main__":
    sys.exit(main())
