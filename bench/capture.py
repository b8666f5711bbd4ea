"""Per-call cost of exact capture, next to the bare kernel probes it is built on, per interpreter.

One target process per interpreter runs a loop of Python-to-Python calls (`f(i)`, N per
round) and times each round itself in thread CPU time (ns per call): a uprobe trap is charged
to the trapping thread, while time it spends preempted by other load is not. Between rounds the driver changes what is
attached to that same process, so every configuration sees the same interpreter, the same
warm caches and the same machine load, interleaved round by round (rotating the order):

  none       nothing attached
  bare       the plan's uprobes, each running an empty BPF program (`return 0`): the trap
             cost of the sites alone, what the kernel charges before any of our code runs
  site:R     the empty program on the sites of one role R only (entry, exit, ...): the cost
             of each kind of site, and so whether the emulated sites are the cheap ones
  capture    ophamin-trace's capture engine with a spec naming a function the loop never
             calls: every call is classified in the kernel and filtered out (the common case)
  emitting   the engine with `f` itself as the target: every call becomes two ring-buffer
             events and a span in user space

Figures per interpreter: median ns/call of each configuration over the rounds, the cost of
each (minus `none`), and `capture_over_bare` = (capture - none) / (bare - none), the target
being <= 1.25 (the BPF side adds at most 25% to the trap). Writes results/capture.json.

    scripts/bench capture [--rounds 7] [--calls 200000] [--only pyenv-3.12.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.capture.engine import CaptureEngine  # noqa: E402
from tracer.capture.output import CapturedOutput  # noqa: E402
from tracer.discover.elf import open_image  # noqa: E402
from tracer.discover.process import find_interpreter  # noqa: E402
from tracer.interpreters import find_interpreters, target_python  # noqa: E402
from tracer.plan.probes import plan_for  # noqa: E402
from tracer.spec import parse_spec  # noqa: E402

TARGET = r"""
import sys, time
def f(x):
    return x
def never():
    return 0
n = int(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.thread_time_ns()
    for i in range(n):
        f(i)
    dt = time.thread_time_ns() - t0
    print(dt / n, flush=True)
"""

NOOP = b"int noop(struct pt_regs *ctx) { return 0; }"
NOT_CALLED = parse_spec('[[span]]\nfunction = "__main__:never"\n')
CALLED = parse_spec('[[span]]\nfunction = "__main__:f"\n')


class Bare:
    """An empty BPF program on some of the plan's sites (uretprobe where the plan says so)."""

    def __init__(self, pid: int, roles: set[str] | None = None) -> None:
        from bcc import BPF

        interp = find_interpreter(pid)
        plan = plan_for(open_image(interp.host_path), interp.version)
        with CapturedOutput():
            self.bpf = BPF(text=NOOP)
        for s in plan.sites:
            if roles is not None and s.role not in roles:
                continue
            attach = self.bpf.attach_uretprobe if s.role == "eval-return" else self.bpf.attach_uprobe
            attach(name=interp.host_path.encode(), addr=s.vaddr, fn_name=b"noop", pid=pid)

    def close(self) -> None:
        self.bpf.cleanup()


class Engine:
    def __init__(self, pid: int, spec) -> None:
        self.engine = CaptureEngine(pid, spec)

    def close(self) -> None:
        self.engine.drain()
        self.engine.close()


def measure(python: str, calls: int, rounds: int) -> dict:
    p = subprocess.Popen([python, "-c", TARGET, str(calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        interp = find_interpreter(p.pid)
        plan = plan_for(open_image(interp.host_path), interp.version)
        roles = sorted({s.role for s in plan.sites})
        configs: dict[str, object] = {"none": lambda: None, "bare": lambda: Bare(p.pid)}
        for r in roles:
            configs[f"site:{r}"] = lambda r=r: Bare(p.pid, {r})
        configs["capture"] = lambda: Engine(p.pid, NOT_CALLED)
        configs["emitting"] = lambda: Engine(p.pid, CALLED)

        def one_round() -> float:
            p.stdin.write("go\n")
            p.stdin.flush()
            return float(p.stdout.readline())

        one_round()  # warm-up: specialisation, caches
        samples: dict[str, list[float]] = {k: [] for k in configs}
        names = list(configs)
        for k in range(rounds):
            for name in names[k % len(names):] + names[:k % len(names)]:
                attached = configs[name]()
                try:
                    samples[name].append(one_round())
                finally:
                    if attached is not None:
                        attached.close()
        med = {k: statistics.median(v) for k, v in samples.items()}
        base = med["none"]
        cost = {k: v - base for k, v in med.items() if k != "none"}
        return {
            "version": ".".join(map(str, interp.version)),
            "sites": [{"role": s.role, "label": s.label, "instruction": s.instruction, "emulated": s.emulated}
                      for s in plan.sites],
            "ns_per_call_median": med,
            "ns_per_call_spread": {k: [min(v), max(v)] for k, v in samples.items()},
            "cost_ns": cost,
            "capture_over_bare": cost["capture"] / cost["bare"] if cost["bare"] > 0 else None,
            "emitting_over_bare": cost["emitting"] / cost["bare"] if cost["bare"] > 0 else None,
        }
    finally:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--only", action="append", help="interpreter label(s) to measure")
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                           "loadavg_before": os.getloadavg()}, "interpreters": {}}
    t0 = time.monotonic()
    for interp in find_interpreters():
        if args.only and interp.label not in args.only:
            continue
        python = target_python(interp, ROOT / ".cache" / "targets")
        r = measure(python, args.calls, args.rounds)
        results["interpreters"][interp.label] = r
        c = r["cost_ns"]
        sites = ", ".join(f"{k[5:]} {v:.0f}" for k, v in c.items() if k.startswith("site:"))
        print(f"{interp.label:15} none {r['ns_per_call_median']['none']:6.0f} ns/call | cost: bare {c['bare']:6.0f}"
              f" ({sites}) capture {c['capture']:6.0f} emitting {c['emitting']:6.0f} ns | "
              f"capture/bare {r['capture_over_bare']:.2f}", flush=True)
    results["machine"]["loadavg_after"] = os.getloadavg()
    results["wall_s"] = time.monotonic() - t0
    out = ROOT / "results" / "capture.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
