"""The yardsticks of `scripts/bench peers` (bench/peers.py): the functions its large spec names
are the ones Python runs, and its ground truth counts calls exactly, on every interpreter.

The benchmark itself is never run here (it measures time); these check what its figures are
measured against.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from peers import figures, specs  # noqa: E402

from tracer.spec import parse_spec  # noqa: E402

REFERENCE = sorted(p for p in (ROOT / "tracer" / "reference").glob("*.py") if p.name not in ("__main__.py", "bare.py"))
STEPS = ("run", "_step1_screen", "_step2_encode", "_step3_step4_traverse", "_step5_consolidate", "_step6_vault",
         "_step7_render")


CO_OPTIMIZED = 0x1  # set on function code objects, not on module or class bodies


def _defined(code: types.CodeType) -> set[tuple[str, int]]:
    """(qualname, first line) of the functions a module defines at top level or in class bodies,
    from the compiler's code objects (lambdas and comprehensions aside)."""
    out = set()
    for c in code.co_consts:
        if not isinstance(c, types.CodeType) or c.co_name.startswith("<"):
            continue
        if c.co_flags & CO_OPTIMIZED:
            out.add((c.co_qualname, c.co_firstlineno))
        else:
            out |= _defined(c)  # a class body
    return out


@pytest.mark.parametrize("path", REFERENCE, ids=[p.name for p in REFERENCE])
def test_large_spec_names_the_code_objects_python_compiles(path: Path) -> None:
    code = compile(path.read_text(), str(path), "exec")
    want = _defined(code)
    got = {(f.qualname, f.line) for f in specs.functions_of(str(path))}
    assert got == want


def test_spec_text_parses_with_one_target_per_function_plus_the_beacon() -> None:
    fns = specs.large_spec([str(p) for p in REFERENCE])
    spec = parse_spec(specs.toml(fns, "peers-test"))
    assert len(spec.targets) == len(fns) + 1
    assert {t.function for t in spec.targets} == {f.ident for f in fns} | {"__main__:beacon"}
    small = specs.small_spec("reference", [str(p) for p in REFERENCE])
    assert [f.qualname for f in small] == [f"Takwin.{s}" for s in STEPS]


def test_module_names_give_the_path_suffix_the_tracer_matches() -> None:
    assert specs.module_name(str(ROOT / "tracer/reference/walker.py")) == "tracer.reference.walker"
    assert specs.module_name(str(ROOT / "tracer/reference/__init__.py")) == "tracer.reference"
    assert specs.module_name("/x/benchmarks/bm_richards/run_benchmark.py") == "bm_richards.run_benchmark"


def test_seen_fraction_credits_each_function_at_most_its_true_calls() -> None:
    truth = {"a": 10, "b": 5}
    s = figures.seen_fraction({"a": 10, "b": 5}, truth)
    assert s["fraction"] == 1.0 and s["exact"]
    s = figures.seen_fraction({"a": 20, "b": 0}, truth)
    assert s["fraction"] == pytest.approx(10 / 15) and not s["exact"]
    assert s["n_over"] == 1 and s["n_short"] == 1


def _harness(python: str, *cmds: dict) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    lines = "".join(json.dumps(c) + "\n" for c in cmds) + json.dumps({"op": "quit"}) + "\n"
    p = subprocess.run([python, str(ROOT / "bench/peers/harness.py"), "--workload", "reference", "--cycle-ms", "2",
                        "--cycles", "3"], input=lines, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return [json.loads(ln) for ln in p.stdout.splitlines()]


def test_harness_ground_truth_counts_every_step_once_per_cycle(interpreter) -> None:
    interp, python = interpreter
    modes = ["count", "setprofile"] + (["monitoring"] if interp.version >= (3, 12) else [])
    hello, *results = _harness(python, *({"op": "segment", "mode": m, "emitter": "noop"} for m in modes))
    takwin = str(ROOT / "tracer/reference/takwin.py")
    assert takwin in hello["files"]
    per_mode = {}
    for mode, res in zip(modes, results):
        rows = res["counts"] if mode == "count" else res["seen"]
        per_mode[mode] = {(r["file"], r["line"]): r["starts"] for r in rows}
        steps = {r["qualname"]: r["starts"] for r in rows if r["file"] == takwin}
        for step in STEPS:  # 3.9/3.10 code objects carry no qualname: the bare name there
            assert steps.get(f"Takwin.{step}" if hello["qualnames"] else step) == 3, (mode, step, steps)
    # the recorders and the ground truth agree function by function over the whole substrate
    assert per_mode["setprofile"] == per_mode["count"]
    assert results[0]["starts_all"] > 1000 and results[0]["resumes_all"] > 0
