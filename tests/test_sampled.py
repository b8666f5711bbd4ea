"""Sampled mode: the in-kernel stack walk (bpf/sample.c) on every interpreter, and the
assembly of samples into spans (tracer/assemble/samples.py)."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from tracer.assemble.samples import A_END_UNC, A_OFF_CPU, A_START_UNC, SampleAssembler
from tracer.capture.sampler import F_NO_STACK, K_BACK, K_OFF_CPU, K_ON_CPU, RawSample, SampleEngine
from tracer.commands import run_validate
from tracer.spec import parse_spec

KNOWN = r'''
import sys, time
def spin(t):
    e = time.perf_counter() + t
    while time.perf_counter() < e: pass
def inner(): spin(0.4)
def deep(n): return inner() if n == 0 else deep(n - 1)
def outer(): return deep(100)
print("ready", flush=True); sys.stdin.readline()
outer()
print("done", flush=True); sys.stdin.readline()
'''
SPEC = parse_spec("\n".join(f'[[span]]\nfunction = "__main__:{f}"' for f in ("outer", "deep", "inner", "spin")))


def _sample(python: str, program: str, spec, seconds: float) -> tuple[list[RawSample], dict]:
    p = subprocess.Popen([python, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        eng = SampleEngine(p.pid, spec, 999)
        try:
            p.stdin.write("\n")
            p.stdin.flush()
            out: list[RawSample] = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                out += eng.poll(50)
            out += eng.finish()
            return out, eng.counters()
        finally:
            eng.close()
    finally:
        p.kill()
        p.wait()


def test_walk_names_the_functions_on_a_deep_stack(ebpf, interpreter):
    """104 spec frames (spin, inner, 101 x deep, outer), innermost first, in every sample."""
    _interp, python = interpreter
    samples, c = _sample(python, KNOWN, SPEC, 1.0)
    ids = {t.name: t.target_id for t in SPEC.targets}
    want = [ids["spin"], ids["inner"], *[ids["deep"]] * 101, ids["outer"]]
    spinning = [s for s in samples if s.kind == K_ON_CPU and s.hits and s.hits[0][0] == ids["spin"]]
    assert len(spinning) > 100, (len(samples), c)  # 0.4 s at 999 Hz
    for s in spinning:
        assert [t for t, _f, _k in s.hits] == want, s
        assert len({f for _t, f, _k in s.hits}) == 104  # 104 distinct frames
    assert c["truncated"] == 0 and c["dropped"] == 0 and c["no_tstate"] == 0, c
    # Classified once each (in user space, then cached in the kernel): not once per sample.
    assert c["classified_here"] < 50, c


IDLE_C = r'''
import sys
print("ready", flush=True); sys.stdin.buffer.readline()  # bytes: no Python decoder frame
x = sum(range(60_000_000))  # C code under a frame that is not a spec function
print("done", flush=True); sys.stdin.buffer.readline()
'''


def test_a_process_without_spec_frames_costs_only_the_samples(ebpf, interpreter):
    _interp, python = interpreter
    samples, c = _sample(python, IDLE_C, SPEC, 1.0)
    assert c["walks"] > 50, c  # it ran, and was sampled
    # Nothing travels but the first report of each thread: no event per sample.
    assert c["submitted"] <= 2 and all(not s.hits for s in samples), (c, samples)
    assert c["frames_read"] <= 2 * c["walks"], c  # a one-frame stack is one frame read


def test_reference_steps_are_found_in_every_cycle(ebpf, interpreter, tmp_path: Path):
    _interp, python = interpreter
    res = run_validate(3, 300, python, tmp_path, 50.0, mode="sampled")
    parity = res["parity"]
    assert parity["steps"], res["parity_text"]
    for step in parity["steps"]:
        assert step["found"] == step["emitter_spans"] and step["cycles_missing"] == 0, res["parity_text"]
    assert res["trace"]["counters"]["dropped"] == 0


# ---- assembly (no kernel) -----------------------------------------------------------------

ASM_SPEC = parse_spec('[[span]]\nfunction = "m:cycle"\n[[span]]\nfunction = "m:step"\n')
CYCLE, STEP = 1, 2


def _s(ts, kind=K_ON_CPU, hits=(), tid=7, flags=0, ptr=0x70) -> RawSample:
    return RawSample(ts, tid, kind, 0, flags, ptr, tuple(hits))


def test_assembly_midpoints_parents_and_uncertainty():
    a = SampleAssembler(ASM_SPEC, 1)
    a.seed({0x70: ()}, 0)  # seen at attach with nothing running
    spans = a.feed([
        _s(1000),  # empty: the thread runs nothing of the spec
        _s(2000, hits=[(CYCLE, 0xA, 11)]),
        _s(3000, hits=[(STEP, 0xB, 21), (CYCLE, 0xA, 11)]),
        _s(4000, hits=[(STEP, 0xB, 21), (CYCLE, 0xA, 11)]),
        _s(5000, hits=[(CYCLE, 0xA, 11)]),
        _s(6000),
    ])
    by = {s.name: s for s in spans}
    off = a.clock.offset
    cycle, step = (by[t.name] for t in ASM_SPEC.targets)
    assert (step.start_ns - off, step.end_ns - off) == (2500, 4500)
    assert step.attributes[A_START_UNC] == 500 and step.attributes[A_END_UNC] == 500
    assert (cycle.start_ns - off, cycle.end_ns - off) == (1500, 5500)
    assert step.parent_span_id == cycle.span_id and step.trace_id == cycle.trace_id
    assert not a.losses().cut_at_attach


def test_assembly_starts_from_the_last_walk_the_kernel_did_not_report():
    a = SampleAssembler(ASM_SPEC, 1)
    a.seed({0x70: ()}, 0)
    spans = a.feed([_s(1000), RawSample(5000, 7, K_ON_CPU, 0, 0, 0x70, ((STEP, 0xB, 1),), prev_seen=4000),
                    _s(6000)])
    assert [(s.start_ns - a.clock.offset, s.end_ns - a.clock.offset) for s in spans] == [(4500, 5500)]


def test_assembly_splits_calls_at_one_frame_by_their_arguments():
    a = SampleAssembler(ASM_SPEC, 1)
    a.seed({0x70: ()}, 0)
    spans = a.feed([_s(1000), _s(2000, hits=[(STEP, 0xB, 1)]), _s(3000, hits=[(STEP, 0xB, 0)]),
                    _s(4000, hits=[(STEP, 0xB, 2)]), _s(5000)])
    assert [(s.start_ns - a.clock.offset, s.end_ns - a.clock.offset) for s in spans] == [(1500, 3500), (3500, 4500)]


def test_assembly_puts_time_off_cpu_inside_the_span_and_marks_attach_cuts():
    a = SampleAssembler(ASM_SPEC, 1)
    a.seed({0x70: ((CYCLE, 0xA, 0),)}, 100)  # already inside a cycle at attach, then blocked
    spans = a.feed([
        _s(5000, kind=K_BACK),  # back on a CPU: the attach-time stack held all along
        _s(6000, hits=[(CYCLE, 0xA, 9)]),
        _s(7000, kind=K_OFF_CPU, hits=[(CYCLE, 0xA, 9)]),
        _s(9000, kind=K_BACK),
        _s(9500, kind=K_OFF_CPU, flags=F_NO_STACK),  # over the walk budget: last stack assumed
        _s(9600, kind=K_BACK),
        _s(10000),
    ])
    (cycle,) = spans
    assert cycle.attributes["ophamin.cut"] == "attach" and a.losses().cut_at_attach == {cycle.name: 1}
    assert cycle.start_ns - a.clock.offset == 100
    assert cycle.attributes[A_OFF_CPU] == (5000 - 100) + (9000 - 7000)
    assert cycle.end_ns - a.clock.offset == (9500 + 10000) // 2


def test_assembly_cuts_what_is_open_at_detach():
    a = SampleAssembler(ASM_SPEC, 1)
    a.seed({0x70: ()}, 0)
    a.feed([_s(1000), _s(2000, hits=[(CYCLE, 0xA, 1)])])
    (cut,) = a.cut_spans(9000, "target still running")
    assert cut.attributes["ophamin.cut"] == "detach" and cut.end_ns - a.clock.offset == 9000
    assert a.losses().cut_at_detach == {cut.name: 1}
    assert Counter(a.hits) == Counter({cut.name: 1})


@pytest.mark.parametrize("args, message", [
    (["--pid", "1", "--hz", "100"], "--hz needs --mode sampled"),
    (["--pid", "1", "--mode", "sampled", "--sched"], "--sched needs --mode exact"),
    (["--pid", "1", "--mode", "sampled", "--hz", "0"], "0 is not in the range"),
])
def test_sampled_options_are_checked(args, message):
    from tracer.cli import cli

    r = CliRunner().invoke(cli, ["trace", *args])
    assert r.exit_code != 0 and message in r.output, r.output
