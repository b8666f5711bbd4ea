"""The in-substrate emitter: no-op cost model, env selection, and the OpenTelemetry emitter's
OTLP-JSON output, read back with the project's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import ROOT
from tracer import otlpjson
from tracer.emitter import (
    ENV_VAR,
    EmitterUnavailable,
    NoOpEmitter,
    OpenTelemetryEmitter,
    TelemetryEmitter,
    emitter_from_env,
)


def test_noop_emitter_shares_one_span_object_and_records_nothing():
    e = NoOpEmitter()
    assert isinstance(e, TelemetryEmitter)
    a, b = e.span("x"), e.span("y")
    assert a is b  # no allocation per span
    with a as s:
        s.set_attribute("k", 1)
        assert e.event("ev", attributes={"k": 1}) is None
    assert not hasattr(e, "__dict__")  # slots: nothing to accumulate into


def test_env_selects_emitter(tmp_path):
    assert isinstance(emitter_from_env({}), NoOpEmitter)
    assert isinstance(emitter_from_env({ENV_VAR: ""}), NoOpEmitter)
    path = tmp_path / "spans.jsonl"
    e = emitter_from_env({ENV_VAR: str(path)})
    assert isinstance(e, OpenTelemetryEmitter) and e.export_to == str(path)
    assert isinstance(e, TelemetryEmitter)
    e.shutdown()


def test_otel_emitter_writes_valid_otlp_json(tmp_path):
    path = tmp_path / "spans.jsonl"
    e = OpenTelemetryEmitter(export_to=str(path))
    with e.span("outer") as outer:
        outer.set_attribute("answer", 42)
        e.event("outer.event", attributes={"s": "x", "i": 3, "f": 0.5, "b": True})
        with e.span("inner"):
            e.event("inner.event")
        seen = {}

        def work():
            with e.span("on.thread"):
                seen["tid"] = threading.get_native_id()

        t = threading.Thread(target=work, name="emitter-test-worker")
        t.start()
        t.join()
    with pytest.raises(ValueError), e.span("failing"):
        raise ValueError("boom")
    e.shutdown()

    lines = path.read_text().splitlines()
    assert lines and all(json.loads(line)["resourceSpans"] for line in lines)
    spans = {s.name: s for s in otlpjson.read_spans(str(path))}
    assert set(spans) == {"outer", "inner", "on.thread", "failing"}
    outer, inner, thread_span = spans["outer"], spans["inner"], spans["on.thread"]
    for s in spans.values():
        assert s.resource["service.name"] == "takwin-reference"
        assert s.resource["process.pid"] == os.getpid()
        assert s.resource["telemetry.source"] == "hooks"
        assert int(s.span_id, 16) and int(s.trace_id, 16)
        assert s.start_ns <= s.end_ns
        assert isinstance(s.attributes["thread.name"], str)
    assert outer.parent_span_id == "" and inner.parent_span_id == outer.span_id
    assert inner.trace_id == outer.trace_id
    assert outer.attributes["answer"] == 42
    assert outer.thread_id == threading.get_native_id() == os.getpid()
    assert outer.attributes["thread.name"] == "MainThread"
    # A span opened on another thread carries that thread (its context does not cross threads).
    assert thread_span.thread_id == seen["tid"] != outer.thread_id
    assert thread_span.attributes["thread.name"] == "emitter-test-worker"
    assert [(ev.name, ev.attributes) for ev in outer.events] == [
        ("outer.event", {"s": "x", "i": 3, "f": 0.5, "b": True})]
    assert [ev.name for ev in inner.events] == ["inner.event"]
    assert outer.start_ns <= outer.events[0].time_ns <= outer.end_ns
    assert spans["failing"].status_code == otlpjson.STATUS_ERROR


def test_otel_emitter_shutdown_is_idempotent_and_flushes_at_exit(tmp_path):
    # A process that never calls shutdown still leaves complete lines (atexit flush).
    path = tmp_path / "spans.jsonl"
    code = ("from tracer.emitter import emitter_from_env\n"
            "e = emitter_from_env()\n"
            "with e.span('a'):\n    e.event('ev', attributes={'k': 'v'})\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{ENV_VAR: str(path)})
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=str(ROOT))
    (span,) = otlpjson.read_spans(str(path))
    assert span.name == "a" and span.events[0].attributes == {"k": "v"}
    e = OpenTelemetryEmitter(export_to=str(tmp_path / "b.jsonl"))
    e.shutdown()
    e.shutdown()


def test_emitter_imports_without_opentelemetry(interpreter, tmp_path):
    interp, _venv_python = interpreter
    # The bare interpreter (not its target venv) is the one without the SDK.
    code = (
        "import sys\n"
        "try:\n    import opentelemetry\n    print('HAS_OTEL'); sys.exit(0)\nexcept ImportError:\n    pass\n"
        "import tracer.emitter as m\n"
        "assert isinstance(m.emitter_from_env({}), m.NoOpEmitter)\n"
        "try:\n    m.OpenTelemetryEmitter(export_to=sys.argv[1])\n"
        "except m.EmitterUnavailable as e:\n    print('UNAVAILABLE', e)\n"
    )
    r = subprocess.run([interp.path, "-c", code, str(tmp_path / "x.jsonl")], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    if "HAS_OTEL" in r.stdout:
        pytest.skip(f"{interp.label} has the OpenTelemetry SDK installed globally")
    assert r.stdout.startswith("UNAVAILABLE OpenTelemetryEmitter needs the OpenTelemetry SDK")
    assert not (tmp_path / "x.jsonl").exists()
    # The runner selected onto a missing SDK says so in one line and exits 2.
    r = subprocess.run([interp.path, "-m", "tracer.reference", "--cycles", "1"], capture_output=True,
                       text=True, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=str(ROOT), **{ENV_VAR: str(tmp_path / "y.jsonl")}))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "opentelemetry-sdk" in r.stderr


def test_emitter_unavailable_is_a_runtime_error():
    assert issubclass(EmitterUnavailable, RuntimeError)
