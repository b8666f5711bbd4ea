"""The reference Takwin substrate: the no-op emitter is bit-identical to no wiring, the span and
event contract a zero-touch tracer relies on, the OTel emitter's output, and the runner on every
interpreter."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections import Counter
from typing import Any, Dict, List, Optional

from tests.conftest import ROOT
from tracer import otlpjson
from tracer.emitter import ENV_VAR, NoOpEmitter, OpenTelemetryEmitter
from tracer.reference import Takwin, stimuli
from tracer.reference.bare import load_bare, stripped_source_tree
from tracer.reference.vault import MAX_BLOCKS

STEPS = {
    "_step1_screen": "takwin.step1_screen",
    "_step2_encode": "takwin.step2_encode",
    "_step3_step4_traverse": "takwin.step3_step4_traverse",
    "_step5_consolidate": "takwin.step5_consolidate",
    "_step6_vault": "takwin.step6_vault",
    "_step7_render": "takwin.step7_render",
}
SPAN_NAMES = {"takwin.cycle", *STEPS.values()}
# event -> (module, class, emitting method, attribute names in order, step span it occurs in)
EVENTS = {
    "gwf.screen": ("gwf", "GWFProtocol", "_record_screen",
                   ("verdict", "intent_top_anchor", "intent_top_score"), "takwin.step1_screen"),
    "walker.mode_transition": ("walker", "PrimeTopologyWalker", "_transition",
                               ("from_mode", "to_mode", "phi_at_transition"), "takwin.step3_step4_traverse"),
    "dissonance.event": ("dissonance", "DissonanceMonitor", "record",
                         ("concept_a", "concept_b", "dissonance_type", "score"),
                         "takwin.step3_step4_traverse"),
    "kccl.phase_transition": ("kccl", "KCCL", "transition", ("from_phase", "to_phase"),
                              "takwin.step5_consolidate"),
    "scar.write": ("scar", "ScarStore", "write", ("scar_id", "kind", "prime_chain_length"),
                   "takwin.step6_vault"),
}
MODES = {"M1_commit", "M2_amplitude_death", "M3_rollback", "M4_lateral_leap"}


def batch_digest(digests: List[Optional[str]]) -> str:
    h = hashlib.sha256()
    for i, d in enumerate(digests):
        h.update(f"{i}:{d};".encode())
    return h.hexdigest()


def run_batch(takwin: Any, seed: int, cycles: int) -> List[str]:
    try:
        return [takwin.run(s).digest for s in stimuli(seed, cycles)]
    finally:
        takwin.close()


class Recorder:
    """A real TelemetryEmitter that keeps everything in memory, including who called event()."""

    def __init__(self) -> None:
        self.stack: List[Dict[str, Any]] = []
        self.spans: List[Dict[str, Any]] = []

    def span(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> Any:
        rec = self

        class _Span:
            def __enter__(self) -> Any:
                self.rec = {"name": name, "attributes": dict(attributes or {}), "events": [],
                            "parent": rec.stack[-1]["name"] if rec.stack else None}
                rec.stack.append(self.rec)
                return self

            def set_attribute(self, key: str, value: Any) -> None:
                self.rec["attributes"][key] = value

            def __exit__(self, *exc: Any) -> None:
                assert rec.stack.pop() is self.rec
                rec.spans.append(self.rec)

        return _Span()

    def event(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> None:
        caller = sys._getframe(1)
        assert self.stack, f"event {name} outside any span"
        self.stack[-1]["events"].append({
            "name": name, "attributes": dict(attributes or {}),
            "caller": caller.f_code.co_name, "caller_self": type(caller.f_locals.get("self")).__name__,
            "caller_args": {k: caller.f_locals[k] for k in caller.f_code.co_varnames[
                1:caller.f_code.co_argcount]},
        })


class Forbidden:
    """An emitter no code may touch: the bare build must never call it."""

    def span(self, name: str, attributes: Any = None) -> Any:
        raise AssertionError(f"bare build opened span {name}")

    def event(self, name: str, attributes: Any = None) -> None:
        raise AssertionError(f"bare build emitted {name}")


# ---- bit-identical no-op --------------------------------------------------------------

def test_noop_emitter_is_bit_identical_to_no_wiring(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    wired = Takwin(seed=11)
    assert isinstance(wired._emitter, NoOpEmitter)  # the default
    bare_takwin = load_bare()["takwin"].Takwin
    wired_digests = run_batch(wired, 11, 30)
    bare_digests = run_batch(bare_takwin(emitter=Forbidden(), seed=11), 11, 30)
    assert len(set(wired_digests)) == 30
    assert batch_digest(wired_digests) == batch_digest(bare_digests)
    # And the batch does depend on the seed, so equality above is not vacuous.
    assert batch_digest(run_batch(Takwin(seed=12), 12, 30)) != batch_digest(wired_digests)


def test_bare_build_strips_every_emitter_call_and_nothing_else():
    import ast

    for module in ("takwin", "gwf", "walker", "scar", "dissonance", "kccl"):
        tree = stripped_source_tree(module)
        src = ast.dump(tree)
        assert "'span'" not in src and "'event'" not in src and "set_attribute" not in src
    bare = load_bare()
    # Same step methods, same event methods, same signatures: only the emitter calls differ.
    for name in STEPS:
        assert (inspect.signature(getattr(bare["takwin"].Takwin, name))
                == inspect.signature(getattr(Takwin, name)))


# ---- the span/event contract a zero-touch tracer relies on ----------------------------

def test_step_methods_run_once_per_cycle_inside_their_span():
    rec = Recorder()
    takwin = Takwin(emitter=rec, seed=3)
    step_codes = {getattr(Takwin, n).__code__: n for n in STEPS}
    run_code = Takwin._run_cycle.__code__
    calls: List[tuple] = []

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in step_codes:
            calls.append((step_codes[frame.f_code], frame.f_back.f_code is run_code,
                          rec.stack[-1]["name"] if rec.stack else None, len(rec.stack)))

    cycles = 6
    sys.setprofile(prof)
    try:
        for s in stimuli(3, cycles):
            takwin.run(s)
    finally:
        sys.setprofile(None)
        takwin.close()
    assert Counter(c[0] for c in calls) == {n: cycles for n in STEPS}
    for name, from_run, innermost, depth in calls:
        assert from_run and innermost == STEPS[name] and depth == 2
    # No other method anywhere in the package is named like a step.
    import tracer.reference as pkg
    for mod_name in ("takwin", "gwf", "walker", "scar", "dissonance", "kccl", "arachne", "vault", "_common"):
        mod = __import__("tracer.reference." + mod_name, fromlist=["x"])
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            names = {n for n in vars(cls) if n.startswith("_step")}
            assert names <= set(STEPS) and (not names or cls is Takwin), (cls, names)
    assert pkg.Takwin is Takwin


def test_spans_and_events_follow_the_contract():
    rec = Recorder()
    takwin = Takwin(emitter=rec, seed=7)
    texts = stimuli(7, 15)
    for s in texts:
        takwin.run(s)
    takwin.close()
    cycles = [s for s in rec.spans if s["name"] == "takwin.cycle"]
    assert [c["attributes"] for c in cycles] == [
        {"cycle.index": i, "stimulus.length": len(t)} for i, t in enumerate(texts)]
    assert Counter(s["name"] for s in rec.spans) == {n: 15 for n in SPAN_NAMES}
    assert all(s["parent"] == "takwin.cycle" for s in rec.spans if s["name"] != "takwin.cycle")
    seen = Counter()
    kccl_cycles = set()
    for i, step in enumerate(s for s in rec.spans if s["name"] != "takwin.cycle"):
        for ev in step["events"]:
            module, cls, method, attrs, span_name = EVENTS[ev["name"]]
            seen[ev["name"]] += 1
            assert step["name"] == span_name
            assert tuple(ev["attributes"]) == attrs
            # Emitted by the one named method, whose arguments are exactly the attributes.
            assert (ev["caller_self"], ev["caller"]) == (cls, method)
            assert ev["caller_args"] == ev["attributes"]
            for v in ev["attributes"].values():
                assert isinstance(v, (str, int, float, bool))
                if isinstance(v, str):
                    assert len(v) <= 48 and v.isascii()
            if ev["name"] == "kccl.phase_transition":
                kccl_cycles.add(i // 6)
            if ev["name"] == "walker.mode_transition":
                assert {ev["attributes"]["from_mode"], ev["attributes"]["to_mode"]} <= MODES
    assert seen["gwf.screen"] == 15
    assert seen["kccl.phase_transition"] == 3 * 3 and kccl_cycles == {4, 9, 14}
    assert seen["walker.mode_transition"] > 15 and seen["scar.write"] > 0 and seen["dissonance.event"] > 0


def test_event_methods_have_the_attribute_signatures():
    import importlib

    for _event, (module, cls, method, attrs, _span) in EVENTS.items():
        fn = getattr(getattr(importlib.import_module("tracer.reference." + module), cls), method)
        assert tuple(inspect.signature(fn).parameters) == ("self", *attrs)
    from tracer.reference.arachne import ArachneProtocol
    from tracer.reference.gwf import GWFProtocol
    from tracer.reference.walker import PrimeTopologyWalker
    assert tuple(inspect.signature(GWFProtocol.screen_input).parameters) == ("self", "features", "baseline")
    assert tuple(inspect.signature(ArachneProtocol.assign).parameters) == ("self", "text")
    assert inspect.signature(PrimeTopologyWalker.traverse).parameters["max_steps"].default == 50
    assert tuple(inspect.signature(Takwin.__init__).parameters) == ("self", "emitter", "seed", "cycle_ms")


def test_realistic_work_is_there():
    takwin = Takwin(seed=0)
    results = [takwin.run(s) for s in stimuli(0, 60)]
    threads = {t.name for t in threading.enumerate()}
    takwin.close()
    assert "takwin-vault" in threads  # the worker thread the vault step waits on
    assert any(r.collisions for r in results)  # exception raised and handled inside step 2
    assert not all(r.collisions for r in results)
    # Memory grows across cycles, then plateaus at the vault's bound.
    sizes = [r.vault_bytes for r in results]
    assert sizes[0] < sizes[10] < sizes[MAX_BLOCKS - 1] == sizes[-1]
    assert [r.consolidated for r in results[:10]] == [False] * 4 + [True] + [False] * 4 + [True]
    mode_steps = [sum(r.mode_counts[k] for r in results) for k in range(4)]
    assert all(mode_steps) and all(r.path_length == 51 for r in results)


def test_deterministic_per_seed_and_cycle_ms():
    a = run_batch(Takwin(seed=5), 5, 8)
    b = run_batch(Takwin(seed=5), 5, 8)
    assert a == b
    assert run_batch(Takwin(seed=5, cycle_ms=40), 5, 8) != a  # more work, different effort results


# ---- the OpenTelemetry emitter inside the substrate -----------------------------------

def test_otel_spans_from_the_substrate(tmp_path):
    path = tmp_path / "spans.jsonl"
    emitter = OpenTelemetryEmitter(export_to=str(path))
    takwin = Takwin(emitter=emitter, seed=2)
    texts = stimuli(2, 10)
    digests = [takwin.run(s).digest for s in texts]
    takwin.close()
    emitter.shutdown()
    assert digests == run_batch(Takwin(emitter=NoOpEmitter(), seed=2), 2, 10)  # telemetry changes nothing

    spans = otlpjson.read_spans(str(path))
    assert len(spans) == 7 * 10
    by_trace: Dict[str, List[otlpjson.Span]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
        assert s.attributes["thread.id"] == os.getpid() and s.attributes["thread.name"] == "MainThread"
        assert s.resource["service.name"] == "takwin-reference"
        assert s.resource["telemetry.source"] == "hooks" and s.resource["process.pid"] == os.getpid()
        assert s.start_ns < s.end_ns
    assert len(by_trace) == 10
    events_per_cycle = []
    for trace in by_trace.values():
        (root,) = [s for s in trace if s.name == "takwin.cycle"]
        assert root.parent_span_id == ""
        assert {s.name for s in trace} == SPAN_NAMES
        idx = root.attributes["cycle.index"]
        assert root.attributes["stimulus.length"] == len(texts[idx])
        names = Counter()
        for s in trace:
            if s is not root:
                assert s.parent_span_id == root.span_id
                assert root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns
            for ev in s.events:
                module, cls, method, attrs, span_name = EVENTS[ev.name]
                assert s.name == span_name and tuple(ev.attributes) == attrs
                assert s.start_ns <= ev.time_ns <= s.end_ns
                names[ev.name] += 1
        events_per_cycle.append((idx, names))
    for idx, names in events_per_cycle:
        assert names["gwf.screen"] == 1 and names["walker.mode_transition"] > 0
        assert names["kccl.phase_transition"] == (3 if idx in (4, 9) else 0)
    assert sum(n["scar.write"] for _, n in events_per_cycle) > 0


# ---- the runner, on every interpreter -------------------------------------------------

def runner_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def has_numpy(python: str) -> bool:
    return subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0


def test_runner_on_every_interpreter(interpreter, tmp_path):
    interp, python = interpreter
    expected = batch_digest(run_batch(Takwin(seed=9), 9, 6))
    r = subprocess.run([python, "-m", "tracer.reference", "--cycles", "6", "--seed", "9"],
                       capture_output=True, text=True, env=runner_env(), cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    head, cycles, done = lines[0], lines[1:-1], lines[-1]
    assert head["python"] == ".".join(map(str, interp.version))
    assert head["numpy"] is has_numpy(python) and head["emitter"] == "noop"
    assert isinstance(head["pid"], int)
    assert [c["cycle_index"] for c in cycles] == list(range(6))
    assert all(c["ok"] and c["cycle_seconds"] > 0 and len(c["digest"]) == 64 for c in cycles)
    # Same results on every interpreter, with numpy or the pure-Python path.
    assert done == {"done": True, "cycles": 6, "ok": 6, "digest": expected}

    # With the OpenTelemetry emitter selected by the environment, into --out.
    spans, out = tmp_path / "spans.jsonl", tmp_path / "cycles.jsonl"
    r = subprocess.run([python, "-m", "tracer.reference", "--cycles", "5", "--seed", "9", "--out", str(out)],
                       capture_output=True, text=True, env=runner_env(**{ENV_VAR: str(spans)}),
                       cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout.splitlines()[0])
    assert head["emitter"] == "otel" and len(r.stdout.splitlines()) == 1
    assert json.loads(out.read_text().splitlines()[-1])["done"] is True
    got = otlpjson.read_spans(str(spans))
    assert Counter(s.name for s in got) == {n: 5 for n in SPAN_NAMES}
    assert {s.resource["process.pid"] for s in got} == {head["pid"]}
    assert sum(1 for s in got for e in s.events if e.name == "kccl.phase_transition") == 3


def test_runner_waits_for_sigusr1(interpreter, tmp_path):
    _interp, python = interpreter
    p = subprocess.Popen([python, "-m", "tracer.reference", "--cycles", "2", "--wait-for-attach"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=runner_env(),
                         cwd=str(tmp_path))
    try:
        head = json.loads(p.stdout.readline())
        assert head["pid"] == p.pid
        ready, _, _ = select.select([p.stdout], [], [], 0.5)
        assert not ready and p.poll() is None  # blocked: no cycle ran before the signal
        os.kill(p.pid, signal.SIGUSR1)
        os.kill(p.pid, signal.SIGUSR1)  # a second "attached" signal must not kill the run
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    lines = [json.loads(x) for x in rest.splitlines()]
    assert len(lines) == 3 and lines[-1]["done"] is True


def test_runner_attach_timeout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tracer.reference", "--cycles", "1", "--wait-for-attach",
                        "--attach-timeout", "0.2"], capture_output=True, text=True, env=runner_env(),
                       cwd=str(tmp_path), timeout=60)
    assert r.returncode == 3 and "no SIGUSR1" in r.stderr
    assert len(r.stdout.splitlines()) == 1


def test_stray_sigusr1_does_not_kill_the_runner(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "tracer.reference", "--cycles", "10"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=runner_env(), cwd=str(tmp_path))
    try:
        json.loads(p.stdout.readline())
        p.stdout.readline()  # a cycle has run: the handler is in place
        os.kill(p.pid, signal.SIGUSR1)
        rest, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert json.loads(rest.splitlines()[-1])["done"] is True
