"""Parity: a real emitter recording of the reference substrate against an "eBPF" view of it.

The hooks file comes from running the reference Takwin substrate with the OpenTelemetry
emitter. The eBPF file is derived from it the way the tracer's output differs from the
emitter's: fresh ids, another clock (+37 ms), the probe entering a few µs after the call site
and leaving a few µs before it, tracer metadata under `ophamin.`, and one attribute the
tracer does not capture. Each test then breaks one thing and checks it is named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.compare.align import align, guess_offset
from tracer.compare.parity import Thresholds, compare, format_report, values_agree
from tracer.otlpjson import OtlpJsonError, Span, SpanEvent, dumps_line, read_spans

ROOT = Path(__file__).resolve().parent.parent
OFFSET_NS = 37_000_000
CYCLES = 6
STEP = "takwin.step2_encode"


@pytest.fixture(scope="module")
def hooks_file(tmp_path_factory) -> Path:
    """A real emitter recording: the reference substrate run with the OpenTelemetry emitter."""
    path = tmp_path_factory.mktemp("parity") / "hooks.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), KIMERA_TELEMETRY_EMITTER_PATH=str(path))
    proc = subprocess.run([sys.executable, "-m", "tracer.reference", "--cycles", str(CYCLES),
                           "--cycle-ms", "20", "--seed", "7"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return path


@pytest.fixture(scope="module")
def hooks(hooks_file) -> List[Span]:
    spans = read_spans(str(hooks_file))
    names = Counter(s.name for s in spans)
    # The recording must be the realistic one the comparison is about.
    assert names["takwin.cycle"] == CYCLES and names[STEP] == CYCLES, names
    assert all(s.thread_id is not None for s in spans)
    assert sum(len(s.events) for s in spans) > CYCLES
    return spans


def _hex(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(digits))


def as_ebpf(hooks: List[Span], seed: int = 1) -> List[Span]:
    """The same run as the eBPF tracer would write it."""
    rng = random.Random(seed)
    new_ids = {s.span_id: _hex(rng, 16) for s in hooks}
    new_traces = {s.trace_id: _hex(rng, 32) for s in hooks}
    out = []
    for s in hooks:
        attrs = {k: v for k, v in s.attributes.items() if k != "thread.name"}
        attrs.update({"thread.name": "python3", "ophamin.probe": "resume", "ophamin.site": 0x4f21a0})
        events = tuple(dataclasses.replace(
            e, time_ns=e.time_ns + OFFSET_NS + rng.randint(200, 2_000),
            # The tracer reads no `kind` off a SCAR write: "not captured", never a failure.
            attributes={k: v for k, v in e.attributes.items()
                        if not (e.name == "scar.write" and k == "kind")})
            for e in s.events)
        out.append(dataclasses.replace(
            s, trace_id=new_traces[s.trace_id], span_id=new_ids[s.span_id],
            parent_span_id=new_ids.get(s.parent_span_id, "") if s.parent_span_id else "",
            start_ns=s.start_ns + OFFSET_NS + rng.randint(500, 4_000),
            end_ns=s.end_ns + OFFSET_NS - rng.randint(500, 4_000),
            attributes=attrs, events=events, resource={"service.name": "ophamin-trace"},
            scope="ophamin.trace"))
    out.sort(key=lambda s: s.end_ns)
    return out


def nth(spans: List[Span], name: str, k: int) -> Span:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_ns)[k]


def replace_span(spans: List[Span], old: Span, new: Span) -> List[Span]:
    return [new if s is old else s for s in spans]


def failure(report, kind: str):
    found = [f for f in report.failures if f.kind == kind]
    assert found, f"no {kind!r} failure in:\n{format_report(report)}"
    return found[0]


# ---- the comparison -------------------------------------------------------------------

def test_identical_but_shifted_passes(hooks):
    report = compare(hooks, as_ebpf(hooks), Thresholds())
    assert report.passed, format_report(report)
    o = report.overall
    assert o.hooks == o.ebpf == o.matched == len(hooks)
    assert o.recall == o.precision == 1.0
    assert not report.reparented and not report.mismatches
    # Jitter is 0.5-4 µs at each boundary, opposite signs: the midpoint fit lands within it.
    assert abs(report.offset_ns - OFFSET_NS) < 4_000
    assert o.timing.start.max_abs_us < 8 and o.timing.end.max_abs_us < 8
    # The probe's span is shorter than the call site's.
    assert -8 < o.timing.duration.median_us < -1
    assert o.events_matched == o.events_hooks == o.events_ebpf > 0
    assert o.values_compared > 0 and o.values_disagreeing == 0
    assert any(k.startswith("event scar.write: kind") for k in report.not_captured)
    assert not any(k.startswith(("span", "event")) and ".ophamin" in k for k in report.not_captured)
    assert {r.name for r in report.per_name} == {s.name for s in hooks}
    json.loads(json.dumps(report.to_dict()))


def test_dropped_span_is_named_and_does_not_shift_later_matches(hooks):
    ebpf = as_ebpf(hooks)
    victim = nth(ebpf, STEP, 2)
    report = compare(hooks, [s for s in ebpf if s is not victim], Thresholds())
    assert not report.passed
    f = failure(report, "recall")
    assert [(m.name, m.index) for m in report.missed] == [(STEP, 2)]
    h = nth(hooks, STEP, 2)
    assert f.examples and STEP in f.examples[0] and "#2" in f.examples[0]
    assert f"thread {h.thread_id}" in f.examples[0] and str(h.start_ns) in f.examples[0]
    # Aligned on time: spans after the drop still meet their own counterparts.
    step = next(r for r in report.per_name if r.name == STEP)
    assert step.matched == CYCLES - 1 and step.timing.start.max_abs_us < 8
    assert not report.extra and not any(f.kind.startswith("timing") for f in report.failures)


def test_two_drops_and_an_extra_keep_alignment():
    # Ten calls 1 ms apart; the eBPF side lost #1 and #6 and has one between #3 and #4.
    hooks = [(k * 1_000_000, k * 1_000_000 + 300_000) for k in range(10)]
    ebpf = [(s + 5_000_000 + 2_000, e + 5_000_000 - 2_000)
            for k, (s, e) in enumerate(hooks) if k not in (1, 6)]
    ebpf.append((3_500_000 + 5_000_000, 3_700_000 + 5_000_000))
    ebpf.sort()
    offset = guess_offset([([s for s, _ in hooks], [s for s, _ in ebpf])])
    assert abs(offset - 5_000_000) <= 2_000
    pairs = align(hooks, ebpf, offset, 500_000)
    assert [i for i, _ in pairs] == [0, 2, 3, 4, 5, 7, 8, 9]
    assert all(abs(ebpf[j][0] - offset - hooks[i][0]) < 5_000 for i, j in pairs)


def test_extra_span_is_named(hooks):
    ebpf = as_ebpf(hooks)
    after = nth(ebpf, STEP, 3)
    # A second call of the step right after the real one, on the same thread and parent.
    ghost = dataclasses.replace(after, span_id="00000000000000ee", start_ns=after.end_ns + 20_000,
                                end_ns=after.end_ns + 60_000, events=())
    report = compare(hooks, ebpf + [ghost], Thresholds())
    assert not report.passed
    f = failure(report, "precision")
    assert len(report.extra) == 1 and report.extra[0].name == STEP and report.extra[0].index == 4
    assert "ebpf thread" in f.examples[0] and str(ghost.start_ns) in f.examples[0]
    assert not report.missed and not report.reparented


def test_reparented_span_is_named(hooks):
    ebpf = as_ebpf(hooks)
    child = nth(ebpf, STEP, 4)
    wrong_parent = nth(ebpf, "takwin.cycle", 3)
    report = compare(hooks, replace_span(ebpf, child, dataclasses.replace(
        child, trace_id=wrong_parent.trace_id, parent_span_id=wrong_parent.span_id)), Thresholds())
    assert not report.passed
    f = failure(report, "structure")
    assert f.count == 1
    r = report.reparented[0]
    assert (r.span.name, r.span.index) == (STEP, 4)
    assert (r.hooks_parent.name, r.hooks_parent.index) == ("takwin.cycle", 4)
    assert (r.ebpf_parent.name, r.ebpf_parent.index) == ("takwin.cycle", 3)
    assert STEP in f.examples[0] and "#4" in f.examples[0]


def test_shifted_timestamp_is_named(hooks):
    ebpf = as_ebpf(hooks)
    moved = nth(ebpf, STEP, 1)
    report = compare(hooks, replace_span(ebpf, moved, dataclasses.replace(
        moved, start_ns=moved.start_ns + 500_000, end_ns=moved.end_ns + 500_000)), Thresholds())
    assert not report.passed
    # Still matched (recall intact): it is a timing failure, not a drop plus an extra.
    assert report.overall.recall == 1.0 and report.overall.precision == 1.0
    f = failure(report, "timing start")
    assert STEP in f.message
    assert f.examples and STEP in f.examples[0] and "#1" in f.examples[0]
    assert "+49" in f.examples[0] or "+50" in f.examples[0]  # ~ +500 µs
    failure(report, "timing end")
    # The offset fit is a median: one moved span does not move it.
    assert abs(report.offset_ns - OFFSET_NS) < 4_000


def test_max_abs_threshold_catches_a_single_outlier(hooks):
    ebpf = as_ebpf(hooks)
    moved = nth(ebpf, "takwin.cycle", 0)
    shifted = replace_span(ebpf, moved, dataclasses.replace(moved, start_ns=moved.start_ns - 30_000))
    assert compare(hooks, shifted, Thresholds(max_p99_us=50)).passed
    report = compare(hooks, shifted, Thresholds(max_p99_us=50, max_abs_us=20))
    f = failure(report, "timing max")
    assert f.count == 1 and "takwin.cycle" in f.examples[0] and "#0" in f.examples[0]


def test_changed_event_attribute_is_named(hooks):
    ebpf = as_ebpf(hooks)
    span = next(s for s in sorted(ebpf, key=lambda s: s.start_ns)
                if any(e.name == "gwf.screen" for e in s.events))
    def nudged(e):
        score = e.attributes["intent_top_score"]
        return dataclasses.replace(e, attributes={**e.attributes, "intent_top_score": score + 1e-6})
    events = tuple(nudged(e) if e.name == "gwf.screen" else e for e in span.events)
    report = compare(hooks, replace_span(ebpf, span, dataclasses.replace(span, events=events)), Thresholds())
    assert not report.passed
    f = failure(report, "attributes")
    assert f.count == 1
    m = report.mismatches[0]
    assert (m.event, m.key, m.span.name) == ("gwf.screen", "intent_top_score", span.name)
    assert all(word in f.examples[0] for word in ("gwf.screen", "intent_top_score", span.name))


def test_float_tolerance_is_representation_noise_only():
    assert values_agree(0.716828, 0.716828 * (1 + 1e-12))
    assert not values_agree(0.716828, 0.716828 * (1 + 1e-8))
    assert values_agree(3, 3.0) and not values_agree(True, 1)
    assert values_agree(float("nan"), float("nan"))
    assert not values_agree("3", 3)


def test_dropped_event_is_counted_and_named(hooks):
    ebpf = as_ebpf(hooks)
    span = max(ebpf, key=lambda s: sum(e.name == "walker.mode_transition" for e in s.events))
    walker = [e for e in span.events if e.name == "walker.mode_transition"]
    assert len(walker) >= 3
    lost = walker[1]
    report = compare(hooks, replace_span(ebpf, span, dataclasses.replace(
        span, events=tuple(e for e in span.events if e is not lost))), Thresholds())
    f = failure(report, "event recall")
    assert f.count == 1 and "walker.mode_transition #1" in f.examples[0]
    # Aligned on time: the events after the lost one still agree attribute for attribute.
    assert not report.mismatches


def test_names_restricts_and_unknown_names_fail(hooks):
    ebpf = as_ebpf(hooks)
    report = compare(hooks, ebpf, Thresholds(), names=["takwin.cycle", STEP])
    assert report.passed and [r.name for r in report.per_name] == ["takwin.cycle", STEP]
    # With the cycle and one step only, the step's parent is still its cycle.
    assert report.overall.matched == 2 * CYCLES
    bad = compare(hooks, ebpf, Thresholds(), names=["takwin.cycle", "takwin.no_such_step"])
    assert not bad.passed and "takwin.no_such_step" in failure(bad, "absent").message
    assert not compare([], [], Thresholds()).passed


def test_missing_thread_spans_fail_recall(hooks):
    ebpf = [s for s in as_ebpf(hooks) if s.name != STEP]
    report = compare(hooks, ebpf, Thresholds())
    f = failure(report, "recall")
    assert f.count == CYCLES and f"{STEP} 0.0% (0/{CYCLES})" in f.message


# ---- the command ----------------------------------------------------------------------

def write(path: Path, spans: List[Span]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for s in spans:
            f.write(dumps_line([s], s.resource, s.scope))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tracer.cli import main; main()", "parity", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_and_json(hooks_file, hooks, tmp_path):
    ebpf = as_ebpf(hooks)
    good = write(tmp_path / "ebpf.jsonl", ebpf)
    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(good))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verdict: PASS" in p.stdout and STEP in p.stdout and "start p99 µs" in p.stdout

    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(good), "--json")
    assert p.returncode == 0
    doc = json.loads(p.stdout)
    assert doc["verdict"] == "PASS" and doc["overall"]["recall"] == 1.0
    assert {r["name"] for r in doc["per_name"]} == {s.name for s in hooks}

    victim = nth(ebpf, STEP, 2)
    bad = write(tmp_path / "dropped.jsonl", [s for s in ebpf if s is not victim])
    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(bad))
    assert p.returncode == 1 and "verdict: FAIL" in p.stdout and f"{STEP} [hooks thread" in p.stdout
    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(bad), "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["missed"][0]["name"] == STEP
    # Lowering the bar is the user's call, and is honoured.
    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(bad), "--min-recall", "0.8")
    assert p.returncode == 0, p.stdout

    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(good),
                "--names", "takwin.cycle,takwin.step2_encode")
    assert p.returncode == 0 and "takwin.step7_render" not in p.stdout


def test_cli_malformed_input_is_one_line_exit_2(hooks_file, tmp_path):
    broken = tmp_path / "broken.jsonl"
    lines = hooks_file.read_text().splitlines()
    broken.write_text("\n".join([lines[0], lines[1][: len(lines[1]) // 2], *lines[2:]]) + "\n")
    for args in (["--hooks", str(hooks_file), "--ebpf", str(broken)],
                 ["--hooks", str(tmp_path / "absent.jsonl"), "--ebpf", str(hooks_file)]):
        p = run_cli(*args)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = run_cli("--hooks", str(hooks_file), "--ebpf", str(broken))
    assert f"{broken}:2:" in p.stderr
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    p = run_cli("--hooks", str(binary), "--ebpf", str(hooks_file))
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_cli_help_has_examples():
    p = run_cli("--help")
    assert p.returncode == 0 and "Examples:" in p.stdout and "--max-p99-us" in p.stdout


# ---- the reader under fuzzed input ----------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
# Keys the reader looks at, so fuzzing reaches past the first check.
KEYS = st.sampled_from(["resourceSpans", "resource", "attributes", "scopeSpans", "scope", "spans", "name",
                        "startTimeUnixNano", "endTimeUnixNano", "traceId", "spanId", "parentSpanId",
                        "events", "timeUnixNano", "status", "code", "key", "value", "intValue",
                        "doubleValue", "arrayValue", "values", "kvlistValue", "stringValue"])


_SPAN = Span("ab" * 16, "cd" * 8, "ef" * 8, "n", 1, 2, {"a": [1, 2.5, "x"], "b": True},
             (SpanEvent("e", 1, {"k": 0.5}),), resource={"r": 1}, scope="s")
VALID_LINE = dumps_line([_SPAN], _SPAN.resource, _SPAN.scope)


def _mutate(obj, data):
    """Replace one node of a valid request with fuzz, at a random depth."""
    if isinstance(obj, dict) and obj and data.draw(st.booleans()):
        k = data.draw(st.sampled_from(sorted(obj)))
        return {**obj, k: _mutate(obj[k], data)}
    if isinstance(obj, list) and obj and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(obj) - 1))
        return [*obj[:i], _mutate(obj[i], data), *obj[i + 1:]]
    return data.draw(JSON | st.dictionaries(KEYS, JSON, max_size=3))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_read_spans_parses_or_raises_otlpjsonerror(data):
    valid = json.loads(VALID_LINE)
    kind = data.draw(st.sampled_from(["mutate", "json", "text"]))
    if kind == "mutate":
        line = json.dumps(_mutate(valid, data))
    elif kind == "json":
        line = json.dumps(data.draw(JSON))
    else:
        line = data.draw(st.text(max_size=40)).replace("\n", " ")
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        f.write(line + "\n")
    try:
        read_spans(f.name)
    except OtlpJsonError as e:
        assert f"{f.name}:1:" in str(e)
    finally:
        os.unlink(f.name)
