"""How far the emitter's span boundaries sit from the callee's own first and last statement.

The emitter's span wraps the call site in the caller; an eBPF probe sees the callee start
and its frame being released. This measures, in each target interpreter, the in-process part
of that difference: span start -> the callee's first statement, and the callee's last
statement -> span end, over many calls. It is the systematic Δ parity should expect (the
probe fires a little before the first statement and a little after the last one).

Usage: scripts/bench parity_gap [--calls N]   (writes results/parity_gap.json)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.interpreters import find_interpreters, target_python  # noqa: E402
from tracer.report.stats import percentile  # noqa: E402

# Runs inside the target interpreter (3.9+, no project dependencies beyond the emitter).
CHILD = r"""
import json, sys, time
from tracer.emitter import OpenTelemetryEmitter
em = OpenTelemetryEmitter(export_to=sys.argv[1])
marks = []
def callee(i):
    t_in = time.time_ns()
    x = 0
    for k in range(50):
        x += k * i
    marks.append((t_in, time.time_ns()))
    return x
for i in range(int(sys.argv[2])):
    with em.span("gap.call"):
        callee(i)
em.shutdown()
json.dump(marks, sys.stdout)
"""


def measure(python: str, calls: int) -> dict:
    from tracer.otlpjson import read_spans

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "spans.jsonl")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        out = subprocess.run([python, "-c", CHILD, path, str(calls)], env=env, capture_output=True,
                             text=True, check=True, timeout=300)
        marks = json.loads(out.stdout)
        spans = sorted((s for s in read_spans(path) if s.name == "gap.call"), key=lambda s: s.start_ns)
    if len(spans) != len(marks):
        raise SystemExit(f"{python}: {len(spans)} spans for {len(marks)} calls")
    # The first calls warm caches and specialise bytecode; the steady state is what parity sees.
    pairs = list(zip(spans, marks))[calls // 10:]
    start = sorted((t_in - s.start_ns) / 1000 for s, (t_in, _) in pairs)
    end = sorted((s.end_ns - t_out) / 1000 for s, (_, t_out) in pairs)

    def summary(v: list) -> dict:
        return {"median_us": round(percentile(v, 50), 2), "p99_us": round(percentile(v, 99), 2),
                "max_us": round(v[-1], 2)}

    return {"calls": len(pairs), "start_to_first_statement": summary(start),
            "last_statement_to_end": summary(end)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    results = {}
    for interp in find_interpreters():
        python = target_python(interp, ROOT / ".cache" / "targets")
        try:
            results[interp.label] = measure(python, args.calls)
        except (subprocess.CalledProcessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            results[interp.label] = {"unavailable": detail.strip().splitlines()[-1] if detail else str(e)}
        r = results[interp.label]
        if "unavailable" in r:
            print(f"{interp.label:<16} unavailable: {r['unavailable']}")
        else:
            s, e = r["start_to_first_statement"], r["last_statement_to_end"]
            print(f"{interp.label:<16} start->first stmt median {s['median_us']:6.2f} µs "
                  f"p99 {s['p99_us']:6.2f} | last stmt->end median {e['median_us']:6.2f} µs "
                  f"p99 {e['p99_us']:6.2f}")
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "parity_gap.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
