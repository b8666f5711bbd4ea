"""Soak: the reference substrate traced at full speed for a long time (10 minutes by default).

    scripts/bench soak [--minutes 10] [--python PATH] [--seed 0] [--sample-s 5] [--rss-bound-mib 16]

Three runs of the same batch of cycles (same seed, --cycle-ms 1, the smallest work per cycle,
so the substrate calls its steps as fast as it can):

1. calibration: a short traced batch gives the traced cycles per second (timed by the
   substrate's own per-cycle clock); the soak batch is sized so that its traced run lasts
   about 1.25 x --minutes (at least --minutes unless the machine gets faster meanwhile);
2. traced: the substrate with its in-process emitter (the ground truth of every span and
   event), and `ophamin-trace` as a separate process, attached before the first cycle and
   tracing until the substrate exits; the tracer's resident memory is sampled every
   --sample-s seconds;
3. untraced: the same batch with the emitter, no tracer (so the CPU times compare the tracer
   alone: both are taken from wait4, immune to the load of other processes).

Checked and printed:
- memory: the tracer's RSS after the first minute, its peak, and its growth from the first
  minute to the end; the bound is --rss-bound-mib (default 16 MiB) of growth;
- spans: per span and event name, eBPF count vs the emitter's count; every difference must
  be a counted loss (ring-buffer drops, cut spans, orphan events);
- results: the substrate's batch digest (and every per-cycle digest) traced vs untraced.
Writes results/soak.json. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.interpreters import default_target_python  # noqa: E402
from tracer.otlpjson import decode_request  # noqa: E402

CYCLE_MS = 1


def _default_python() -> str:
    return default_target_python(ROOT / ".cache" / "targets")


def _substrate(python: str, cycles: int, seed: int, out: Path, hooks: Path | None, wait: bool) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KIMERA_TELEMETRY_EMITTER_PATH", None)
    if hooks is not None:
        env["KIMERA_TELEMETRY_EMITTER_PATH"] = str(hooks)
    cmd = [python, "-m", "tracer.reference", "--cycles", str(cycles), "--cycle-ms", str(CYCLE_MS),
           "--seed", str(seed), "--out", str(out)]
    if wait:
        cmd.append("--wait-for-attach")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    if not p.stdout.readline():
        raise SystemExit(f"the substrate did not start under {python}")
    return p


def _wait_cpu(p: subprocess.Popen) -> float:
    """Wait for a child; its CPU seconds (user + system), immune to what else loads the machine."""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cycles(path: Path) -> tuple[list[str], str]:
    digests, batch = [], ""
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d.get("done"):
            batch = d["digest"]
        else:
            digests.append(d["digest"])
    return digests, batch


def _count(path: Path) -> tuple[Counter, Counter, int]:
    """Spans and events per name in an OTLP-JSON lines file, and how many spans are cut."""
    spans, events, cut = Counter(), Counter(), 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            for s in decode_request(json.loads(line)):
                spans[s.name] += 1
                events.update(e.name for e in s.events)
                cut += "ophamin.cut" in s.attributes
    return spans, events, cut


def _traced_run(python: str, cycles: int, seed: int, work: Path, tag: str, sample_s: float) -> dict:
    """One batch traced from its first cycle to its exit by `ophamin-trace` (a separate process)."""
    hooks, spans_file = work / f"hooks_{tag}.jsonl", work / f"ebpf_{tag}.jsonl"
    for f in (hooks, spans_file):
        f.unlink(missing_ok=True)
    target = _substrate(python, cycles, seed, work / f"cycles_{tag}.jsonl", hooks, wait=True)
    tracer = subprocess.Popen([sys.executable, "-m", "tracer.cli", "--pid", str(target.pid), "--spec", "reference",
                               "--output", str(spans_file), "--json", "--no-status"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    attached = threading.Event()
    err_lines: list[str] = []

    def read_err() -> None:
        for line in tracer.stderr:
            err_lines.append(line.rstrip())
            if "attached to PID" in line:
                attached.set()

    threading.Thread(target=read_err, daemon=True).start()
    while not attached.wait(0.5):
        if tracer.poll() is not None:
            target.kill()
            raise SystemExit(f"tracer failed: {err_lines}")
    t_attach = time.monotonic()
    os.kill(target.pid, signal.SIGUSR1)
    samples: list[tuple[float, int, int]] = []  # (seconds since attach, tracer RSS KiB, target RSS KiB)
    cpu: dict[str, float] = {}
    waiter = threading.Thread(target=lambda: cpu.__setitem__("cpu", _wait_cpu(target)), daemon=True)
    waiter.start()
    while waiter.is_alive():
        t = _rss_kib(tracer.pid)
        g = _rss_kib(target.pid)
        if t and g:
            samples.append((round(time.monotonic() - t_attach, 1), t, g))
        waiter.join(sample_s)
    seconds = time.monotonic() - t_attach
    out, _ = tracer.communicate(timeout=300)
    return {"summary": json.loads(out), "samples": samples, "cpu": cpu["cpu"], "seconds": seconds,
            "target_exit": target.returncode, "tracer_exit": tracer.returncode, "hooks": hooks,
            "spans": spans_file, "cycles_file": work / f"cycles_{tag}.jsonl", "stderr": err_lines}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--python", default=None, help="interpreter of the substrate (default: pyenv 3.12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--rss-bound-mib", type=float, default=16.0)
    ap.add_argument("--work", default=str(ROOT / "results" / "soak"))
    args = ap.parse_args()
    python = args.python or _default_python()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    # Size the batch from the traced speed: a short traced batch, timed by the substrate itself.
    cal = _traced_run(python, 40, args.seed, work, "calibration", args.sample_s)
    busy = sum(json.loads(ln).get("cycle_seconds", 0) for ln in cal["cycles_file"].read_text().splitlines())
    rate = 40 / busy
    cycles = max(50, math.ceil(rate * args.minutes * 60 * 1.25))
    print(f"[soak] {python}: {rate:.1f} cycles/s traced; batch of {cycles} cycles", flush=True)

    run = _traced_run(python, cycles, args.seed, work, "traced", args.sample_s)
    summary, samples, traced_s = run["summary"], run["samples"], run["seconds"]
    cpu = {"traced": run["cpu"]}
    hooks, spans_file = run["hooks"], run["spans"]
    print(f"[soak] traced run: {traced_s:.0f} s, target exit {run['target_exit']}, tracer exit {run['tracer_exit']}",
          flush=True)

    # ---- untraced ---------------------------------------------------------------------
    t0 = time.monotonic()
    base_hooks = work / "hooks_untraced.jsonl"
    base_hooks.unlink(missing_ok=True)
    base = _substrate(python, cycles, args.seed, work / "untraced_cycles.jsonl", base_hooks, wait=False)
    cpu["untraced"] = _wait_cpu(base)
    untraced_s = time.monotonic() - t0

    # ---- checks -----------------------------------------------------------------------
    traced_digests, traced_batch = _cycles(run["cycles_file"])
    base_digests, base_batch = _cycles(work / "untraced_cycles.jsonl")
    digest_ok = traced_batch == base_batch and traced_digests == base_digests and len(base_digests) == cycles

    e_spans, e_events, cut = _count(spans_file)
    h_spans, h_events, _ = _count(hooks)
    losses, c = summary["losses"], summary["counters"]
    counted = Counter()
    for kind in ("cut_at_attach", "orphan_events"):
        counted.update(losses[kind])
    # Without ring-buffer drops every missing span or event must be a loss counted under its
    # own name; drops are counted per kind (entries, exits), not per name, so with drops the
    # missing total must stay within them.
    rows, exact = [], True
    for name in sorted(set(h_spans) | set(e_spans) | set(h_events) | set(e_events)):
        want = h_spans.get(name, 0) + h_events.get(name, 0)
        got = e_spans.get(name, 0) + e_events.get(name, 0)
        rows.append({"name": name, "emitter": want, "ebpf": got, "missing": want - got,
                     "counted_losses": counted.get(name, 0)})
        exact &= want - got == counted.get(name, 0)
    unexplained = sum(r["missing"] - r["counted_losses"] for r in rows)
    spans_ok = all(r["missing"] >= 0 for r in rows) and (exact if not c["dropped"] else unexplained <= c["dropped"])

    after_warmup = [s for s in samples if s[0] >= 60] or samples
    rss0 = after_warmup[0][1]
    rss_peak = max(s[1] for s in samples)
    growth_mib = (max(s[1] for s in after_warmup) - rss0) / 1024
    slope = 0.0
    if len(after_warmup) > 2:
        xs = [s[0] / 60 for s in after_warmup]
        ys = [s[1] / 1024 for s in after_warmup]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
    mem_ok = growth_mib <= args.rss_bound_mib

    result = {
        "python": python, "cycles": cycles, "cycle_ms": CYCLE_MS, "seed": args.seed,
        "traced_cycles_per_s_calibrated": round(rate, 2), "traced_s": round(traced_s, 1),
        "untraced_s": round(untraced_s, 1), "slowdown": round(traced_s / untraced_s, 3),
        "target_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_slowdown": round(cpu["traced"] / cpu["untraced"], 3),
        "tracer": {"exit": run["tracer_exit"], "stopped_by": summary["stopped_by"], "counters": c,
                   "losses": losses, "spans": summary["spans"], "cut_spans": cut, "warnings": summary["warnings"]},
        "memory": {"tracer_rss_mib_after_1min": round(rss0 / 1024, 1), "tracer_rss_mib_peak": round(rss_peak / 1024, 1),
                   "tracer_growth_mib_after_1min": round(growth_mib, 2), "tracer_slope_mib_per_min": round(slope, 3),
                   "bound_mib": args.rss_bound_mib, "samples": samples},
        "names": rows,
        "digest": {"traced": traced_batch, "untraced": base_batch, "equal": digest_ok},
        "passed": bool(digest_ok and spans_ok and mem_ok and run["tracer_exit"] == 0 and run["target_exit"] == 0),
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"[soak] target CPU traced {cpu['traced']:.0f} s vs untraced {cpu['untraced']:.0f} s "
          f"({result['cpu_slowdown']}x; both with the emitter)")
    print(f"[soak] traced {traced_s:.0f} s vs untraced {untraced_s:.0f} s ({result['slowdown']}x), "
          f"{summary['spans']:,} spans, stopped by {summary['stopped_by']}")
    print(f"[soak] probe hits {c['entry_hits']:,}/{c['exit_hits']:,}; ring-buffer drops {c['dropped']:,}; "
          f"cut spans {cut}; losses {losses}")
    for r in rows:
        print(f"  {r['name']:<28} emitter {r['emitter']:>9,}  ebpf {r['ebpf']:>9,}  missing {r['missing']:>6,}"
              f"  counted {r['counted_losses']:>6,}")
    print(f"[soak] tracer RSS {rss0 / 1024:.1f} MiB after 1 min, peak {rss_peak / 1024:.1f} MiB, growth "
          f"{growth_mib:.2f} MiB (bound {args.rss_bound_mib} MiB), slope {slope:.3f} MiB/min: "
          f"{'PASS' if mem_ok else 'FAIL'}")
    print(f"[soak] digest traced {traced_batch[:16]}… untraced {base_batch[:16]}…: {'PASS' if digest_ok else 'FAIL'}")
    print(f"[soak] spans: {'PASS' if spans_ok else 'FAIL'}; overall {'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
