"""Benchmark: wall-time overhead of the default NoOpEmitter against the same substrate built
without any emitter calls (tracer.reference.bare), on a 30-cycle batch.

The two builds run side by side in one process, interleaved cycle by cycle (AB, BA, ... so
drift and load from other processes hit both alike), several repeats of a whole batch each.
Printed: per-build batch median and spread, the overhead per batch and per cycle (median and
quartiles), the same for CPU time, and an analytic figure (emitter calls per batch x measured
cost per no-op call / batch time) that stays meaningful when wall-time noise exceeds the
effect. Target: <= 1 %. Writes results/emitter.json.

    scripts/bench emitter [--repeats 15] [--cycles 30] [--cycle-ms 20] [--all-interpreters]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.emitter import NoOpEmitter  # noqa: E402
from tracer.reference import HAVE_NUMPY, Takwin, stimuli  # noqa: E402
from tracer.reference.bare import load_bare  # noqa: E402

SEED = 1


class CallCounter:
    """Counts the emitter calls a batch makes (to turn the per-call cost into an overhead)."""

    def __init__(self) -> None:
        self.spans = 0
        self.events = 0
        self._noop = NoOpEmitter()

    def span(self, name: str, attributes: Any = None) -> Any:
        self.spans += 1
        return self._noop.span(name, attributes)

    def event(self, name: str, attributes: Any = None) -> None:
        self.events += 1


def paired_batch(wired_cls: Any, bare_cls: Any, texts: List[str], cycle_ms: int,
                 flip: bool) -> Dict[str, Any]:
    """One 30-cycle batch of each build, interleaved cycle by cycle (alternating which goes
    first), so load from anything else on the machine lands on both builds alike."""
    wired = wired_cls(emitter=NoOpEmitter(), seed=SEED, cycle_ms=cycle_ms)
    bare = bare_cls(emitter=NoOpEmitter(), seed=SEED, cycle_ms=cycle_ms)
    acc = {"noop": [0.0, 0.0], "bare": [0.0, 0.0]}
    per_cycle = []
    digests = {"noop": "", "bare": ""}
    try:
        for i, t in enumerate(texts):
            order = [("noop", wired), ("bare", bare)]
            if (i % 2 == 1) != flip:
                order.reverse()
            took = {}
            for name, tk in order:
                w0, c0 = time.perf_counter(), time.process_time()
                digests[name] = tk.run(t).digest
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                acc[name][0] += dw
                acc[name][1] += dc
                took[name] = dw
            per_cycle.append(100.0 * (took["noop"] - took["bare"]) / took["bare"])
    finally:
        wired.close()
        bare.close()
    assert digests["noop"] == digests["bare"], "builds disagree: not the same substrate"
    return {"noop": {"wall": acc["noop"][0], "cpu": acc["noop"][1]},
            "bare": {"wall": acc["bare"][0], "cpu": acc["bare"][1]}, "per_cycle_pct": per_cycle}


def spread(xs: List[float]) -> Dict[str, float]:
    qs = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": qs[0], "p75": qs[2], "min": min(xs), "max": max(xs)}


def measure(repeats: int, cycles: int, cycle_ms: int) -> Dict[str, Any]:
    bare_cls = load_bare()["takwin"].Takwin
    texts = stimuli(SEED, cycles)
    paired_batch(Takwin, bare_cls, texts, cycle_ms, False)  # warm-up: imports, caches, first touch
    wired: List[Dict[str, float]] = []
    bare: List[Dict[str, float]] = []
    per_cycle: List[float] = []
    for r in range(repeats):
        res = paired_batch(Takwin, bare_cls, texts, cycle_ms, flip=bool(r % 2))
        wired.append(res["noop"])
        bare.append(res["bare"])
        per_cycle.extend(res["per_cycle_pct"])

    pair_wall = [100.0 * (w["wall"] - b["wall"]) / b["wall"] for w, b in zip(wired, bare)]
    pair_cpu = [100.0 * (w["cpu"] - b["cpu"]) / b["cpu"] for w, b in zip(wired, bare)]

    counter = CallCounter()
    t = Takwin(emitter=counter, seed=SEED, cycle_ms=cycle_ms)
    for s in texts:
        t.run(s)
    t.close()
    noop = NoOpEmitter()
    n = 200000
    attrs = {"a": 1, "b": "x", "c": 0.5}
    # Per-call cost as the substrate pays it: a `with` over span() and an event() with a dict.
    span_ns = min(timeit.repeat("with e.span('x'):\n    pass", globals={"e": noop},
                                number=n, repeat=5)) / n * 1e9
    event_ns = min(timeit.repeat("e.event('x', attributes={'a': a, 'b': b, 'c': c})",
                                 globals={"e": noop, **attrs}, number=n, repeat=5)) / n * 1e9
    batch_wall = statistics.median(b["wall"] for b in bare)
    analytic_pct = 100.0 * (counter.spans * span_ns + counter.events * event_ns) * 1e-9 / batch_wall

    return {
        "python": platform.python_version(), "executable": sys.executable, "numpy": HAVE_NUMPY,
        "cycles": cycles, "cycle_ms": cycle_ms, "repeats": repeats,
        "wall_s": {"noop": spread([w["wall"] for w in wired]), "bare": spread([b["wall"] for b in bare])},
        "overhead_wall_pct": spread(pair_wall),
        "overhead_wall_pct_per_cycle": spread(per_cycle),
        "overhead_cpu_pct": spread(pair_cpu),
        "overhead_wall_pct_of_medians": 100.0 * (statistics.median(w["wall"] for w in wired) - batch_wall)
        / batch_wall,
        "emitter_calls_per_batch": {"spans": counter.spans, "events": counter.events},
        "noop_cost_ns": {"span": span_ns, "event": event_ns},
        "overhead_analytic_pct": analytic_pct,
        "target_pct": 1.0,
    }


def _q(d: Dict[str, float], unit: str = " %") -> str:
    return f"median {d['median']:+.3f}{unit}  [p25 {d['p25']:+.3f}, p75 {d['p75']:+.3f}]"


def report(r: Dict[str, Any]) -> str:
    w = r["wall_s"]
    calls, cost = r["emitter_calls_per_batch"], r["noop_cost_ns"]
    wall_med = r["overhead_wall_pct"]["median"]
    return "\n".join([
        f"emitter overhead: python {r['python']} numpy={r['numpy']} "
        f"{r['cycles']} cycles x {r['cycle_ms']} ms, {r['repeats']} repeats, interleaved per cycle",
        f"  batch wall  noop  median {w['noop']['median']:.4f} s  "
        f"[p25 {w['noop']['p25']:.4f}, p75 {w['noop']['p75']:.4f}]",
        f"  batch wall  bare  median {w['bare']['median']:.4f} s  "
        f"[p25 {w['bare']['p25']:.4f}, p75 {w['bare']['p75']:.4f}]",
        f"  overhead wall per batch  {_q(r['overhead_wall_pct'])}",
        f"  overhead wall per cycle  {_q(r['overhead_wall_pct_per_cycle'])}",
        f"  overhead cpu  per batch  {_q(r['overhead_cpu_pct'])}",
        f"  analytic: {calls['spans']} spans x {cost['span']:.0f} ns + {calls['events']} events x "
        f"{cost['event']:.0f} ns = {r['overhead_analytic_pct']:.4f} % of the batch",
        f"  target <= {r['target_pct']:.0f} %: wall median {wall_med:+.3f} % -> "
        + ("met" if wall_med <= r["target_pct"] else "NOT met"),
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--cycle-ms", type=int, default=20)
    ap.add_argument("--all-interpreters", action="store_true",
                    help="also run under every target interpreter (tracer.interpreters)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    result = measure(args.repeats, args.cycles, args.cycle_ms)
    if args.json:
        print(json.dumps(result))
        return
    results = [result]
    print(report(result), flush=True)
    if args.all_interpreters:
        from tracer.interpreters import find_interpreters, target_python

        for interp in find_interpreters():
            py = target_python(interp, ROOT / ".cache" / "targets")
            out = subprocess.run([py, __file__, "--json", "--repeats", str(args.repeats), "--cycles",
                                  str(args.cycles), "--cycle-ms", str(args.cycle_ms)],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if out.returncode != 0:
                print(f"  {interp.label}: failed: {out.stderr.strip()[-300:]}")
                continue
            r = json.loads(out.stdout)
            r["label"] = interp.label
            results.append(r)
            print(report(r), flush=True)
    dest = ROOT / "results" / "emitter.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"benchmark": "emitter", "runs": results}, indent=2) + "\n")
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
