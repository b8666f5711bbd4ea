"""`--sched` through the exact capture: real spans of the reference substrate on every interpreter.

The snapshots are taken by the capture program's own entry and exit handlers
(bpf/capture.c's new_event() calls sched_read()); the checks compare what they say about
each `takwin.cycle` with the process's own accounting of the same cycles.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tracer.commands import run_validate
from tracer.correlate.profile import build_profile
from tracer.correlate.sched import A_BLOCKED, A_CPUS, A_ON_CPU, A_OTHER_ON_CPU, A_RSS_START, A_RUN_QUEUE
from tracer.otlpjson import read_spans
from tracer.session import run_trace
from tracer.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ROOT / ".cache" / "targets"
CYCLES = 4

# The reference substrate's cycles, each bracketed by the process's own CPU accounting:
# the main thread's CLOCK_THREAD_CPUTIME_ID (schedstat's sum_exec_runtime plus the running
# slice it has not folded in yet) and the vault worker's /proc/self/task/TID/schedstat
# (it waits for its next job between cycles, so schedstat is current).
DRIVER = r"""
import json, sys, threading, time
from tracer.reference import Takwin, stimuli

def worker_cpu():
    for t in threading.enumerate():
        if t.name == "takwin-vault" and t.native_id:
            with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
                return int(f.read().split()[0])
    return 0

takwin = Takwin(seed=0, cycle_ms=int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()
rows = []
for i, text in enumerate(stimuli(0, int(sys.argv[1]))):
    m0, w0 = time.thread_time_ns(), worker_cpu()
    takwin.run(text)
    m1, w1 = time.thread_time_ns(), worker_cpu()
    rows.append({"main_ns": m1 - m0, "worker_ns": w1 - w0})
takwin.close()
print(json.dumps(rows), flush=True)
"""


def trace_driver(python: str, cycles: int, cycle_ms: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([python, "-c", DRIVER, str(cycles), str(cycle_ms)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "ready"

        def go(_capture) -> None:
            p.stdin.write("\n")
            p.stdin.flush()

        res = run_trace(p.pid, load_spec("reference"), status=False, with_sched=True, on_attached=go)
        rows = json.loads(p.stdout.readline())
        assert p.wait(timeout=30) == 0
        return res, rows
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def steal_ns() -> int:
    """Time the hypervisor took from this VM's CPUs so far (/proc/stat, all CPUs)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def test_cycle_cpu_agrees_with_the_process_accounting(ebpf, interpreter):
    _interp, python = interpreter
    st0 = steal_ns()
    res, rows = trace_driver(python, CYCLES, 50)
    # The slice open at a snapshot is timed on the monotonic clock, so steal inside it reads as
    # on-CPU, which the process's accounting (steal excluded) does not: allow what was stolen.
    slack = steal_ns() - st0
    cycles = sorted((s for s in res.spans if s.name == "takwin.cycle"), key=lambda s: s.start_ns)
    assert len(cycles) == len(rows) == CYCLES, res.losses
    for row, span in zip(rows, cycles):
        a = span.attributes
        own, other = a[A_ON_CPU], a[A_OTHER_ON_CPU]
        # The cycle thread's own time, and with the worker's the whole process's, per cycle.
        assert abs(own - row["main_ns"]) <= 0.02 * row["main_ns"] + slack, (row, a, slack, res.counters)
        ref = row["main_ns"] + row["worker_ns"]
        assert abs(own + other - ref) <= 0.02 * ref + slack, (row, a, slack, res.counters)
    for span in res.spans:
        a = span.attributes
        # Every span's thread time is partitioned: on a CPU, waiting for one, or asleep.
        assert abs(a[A_ON_CPU] + a[A_RUN_QUEUE] + a[A_BLOCKED] - span.duration_ns) <= 20_000, span
        assert a[A_RSS_START] > 0 and a[A_CPUS], span  # RSS seeded at attach
    c = res.counters
    assert c["sched_thread_map_full"] == 0 and c["sched_rss_samples_dropped"] == 0, c
    prof = build_profile(res.spans).to_dict()
    assert prof["n_cycles"] == prof["measured_cycles"] == CYCLES
    assert prof["attribution_kind"] == "per_cycle"
    assert all(c["cpu_time_attributed_s"] > 0 and c["rss_peak_bytes_attributed"] > 0 for c in prof["per_cycle"])


def test_validate_with_sched_writes_the_profile(ebpf, tmp_path):
    python = next((str(p / "bin" / "python") for p in sorted(TARGETS.glob("*")) if (p / "bin" / "python").exists()),
                  None)
    if python is None:
        pytest.fail("no target venv under .cache/targets (scripts/_setup.sh builds them)")
    res = run_validate(3, 20, python, tmp_path, 50.0, with_sched=True)
    prof = json.loads(Path(res["profile"]).read_text())
    assert prof["n_cycles"] == prof["measured_cycles"] == 3 and prof["attribution_kind"] == "per_cycle"
    spans = read_spans(res["ebpf"])
    assert spans and all(A_ON_CPU in s.attributes for s in spans)
    # Kernel attributes are eBPF-only: parity compares the emitter's attributes and finds
    # none of them disagreeing.
    assert "0 disagree" in res["parity_text"], res["parity_text"]


def test_profile_option_needs_sched(capsys):
    from tracer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--pid", "1", "--profile", "p.json"])
    assert e.value.code == 2
    assert "--profile needs --sched" in capsys.readouterr().err
