"""GPU correlation: NVML record layouts, interval-overlap attribution on sample streams, the
no-GPU path for real (this machine has no NVIDIA driver), and the reference GPU step's skip.

The attribution tests replay the streams in tests/data/gpu/: synthetic ones (made by
make_synthetic.py, labelled as such) and any `recorded-*.json` that bench/gpu.py wrote on a
machine with a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pynvml
import pytest

from tests.conftest import ROOT
from tracer.correlate import gpu as G
from tracer.correlate.gpu import GpuEnricher, GpuStream, detect_clock, span_gpu
from tracer.correlate.nvml import (
    VALUE_MEMBERS,
    nvml_availability,
    process_info_record,
    process_utilization_record,
    sample_record,
)
from tracer.otlpjson import Span

DATA = ROOT / "tests" / "data" / "gpu"
SYNTHETIC = sorted(DATA.glob("synthetic-*.json"))
RECORDED = sorted(DATA.glob("recorded-*.json"))
MIB = 1 << 20
AVAIL = nvml_availability()


def fields(struct) -> set:
    return {name for name, _ in struct._fields_}


def load(path: Path) -> tuple:
    data = json.loads(path.read_text())
    return GpuStream.from_dict(data), {s["name"]: s for s in data["spans"]}, data


def attrs(stream: GpuStream, span: dict) -> dict:
    return span_gpu(stream, span["start_ns"], span["end_ns"])


# ---- the file format is NVML's ---------------------------------------------------------

@pytest.mark.parametrize("path", SYNTHETIC + RECORDED, ids=lambda p: p.name)
def test_stream_files_use_nvml_field_layouts(path):
    data = json.loads(path.read_text())
    assert data["format"] == G.FORMAT
    kind = data["provenance"]["kind"]
    assert kind == ("synthetic" if path.name.startswith("synthetic-") else "recorded")
    assert data["clock"]["nvml_timestamp_unit"] == "us"
    n = 0
    for dev in data["devices"]:
        assert set(dev) == {"index", "uuid", "name", "samples", "process_utilization", "compute_running_processes",
                            "errors", "pids_seen"}
        assert set(dev["samples"]) <= {G.GPU_UTIL, G.MEM_UTIL}
        for block in dev["samples"].values():
            for s in block["samples"]:
                assert set(s) == fields(pynvml.c_nvmlSample_t)
                assert list(s["sampleValue"]) == [VALUE_MEMBERS[block["sampleValType"]]]
                assert VALUE_MEMBERS[block["sampleValType"]] in fields(pynvml.c_nvmlValue_t)
                n += 1
        for r in dev["process_utilization"]:
            assert set(r) == fields(pynvml.c_nvmlProcessUtilizationSample_t)
            n += 1
        for poll in dev["compute_running_processes"]:
            assert set(poll) == {"poll", "t_ns", "processes"}
            for p in poll["processes"]:
                assert set(p) == fields(pynvml.c_nvmlProcessInfo_t)
    assert n > 0 and data["spans"]


def test_synthetic_files_are_what_the_generator_makes():
    sys.path.insert(0, str(DATA))
    try:
        import make_synthetic
    finally:
        sys.path.remove(str(DATA))
    assert json.loads((DATA / "synthetic-one-gpu.json").read_text()) == make_synthetic.one_gpu()
    assert json.loads((DATA / "synthetic-two-gpus.json").read_text()) == make_synthetic.two_gpus()


def test_records_from_real_pynvml_structures():
    # The exact conversion the sampler applies to what pynvml returns, on pynvml's own types.
    s = pynvml.c_nvmlSample_t()
    s.timeStamp = 1_700_000_000_123_456
    s.sampleValue.uiVal = 87
    assert sample_record(s, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT) == {
        "timeStamp": 1_700_000_000_123_456, "sampleValue": {"uiVal": 87}}
    s.sampleValue.dVal = 12.5
    assert sample_record(s, pynvml.NVML_VALUE_TYPE_DOUBLE)["sampleValue"] == {"dVal": 12.5}

    p = pynvml.c_nvmlProcessUtilizationSample_t(pid=4242, timeStamp=1_700_000_000_200_000, smUtil=93,
                                                memUtil=31, encUtil=0, decUtil=2)
    assert process_utilization_record(p) == {"pid": 4242, "timeStamp": 1_700_000_000_200_000, "smUtil": 93,
                                             "memUtil": 31, "encUtil": 0, "decUtil": 2}

    info = pynvml.nvmlStructToFriendlyObject(pynvml.c_nvmlProcessInfo_t(
        pid=4242, usedGpuMemory=812 * MIB, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF))
    rec = process_info_record(info)
    assert rec == {"pid": 4242, "usedGpuMemory": 812 * MIB, "gpuInstanceId": 0xFFFFFFFF,
                   "computeInstanceId": 0xFFFFFFFF}
    # pynvml turns NVML_VALUE_NOT_AVAILABLE into None; it is carried as such, never as a number.
    info.usedGpuMemory = None
    st = GpuStream(4242)
    st.add_processes(0, 1, 10, [process_info_record(info)])
    assert st.devices[0].memory == {1: None}


# ---- attribution by interval overlap ---------------------------------------------------

def test_one_gpu_attribution():
    stream, spans, _ = load(DATA / "synthetic-one-gpu.json")
    # The GPU step covers sample periods 6..10 exactly: the target at 95 % SM / 38 % memory,
    # the device at 97 % / 40 %; memory 300 MiB at both ends, 812 MiB peak inside.
    a = attrs(stream, spans["takwin.gpu_project"])
    assert a[G.A_DEVICES] == [0] and a[G.A_UUIDS] == ["GPU-00000000-0000-4000-8000-000000000000"]
    assert (a[G.A_SM], a[G.A_MEM_UTIL], a[G.A_PROC_SAMPLES]) == (95.0, 38.0, 5)
    assert (a[G.A_DEV_SM], a[G.A_DEV_MEM_UTIL], a[G.A_DEV_SAMPLES]) == (97.0, 40.0, 5)
    assert a[G.A_PERIOD] == 200.0
    assert (a[G.A_MEM_START], a[G.A_MEM_END], a[G.A_MEM_MAX], a[G.A_MEM_SAMPLES]) == (
        300 * MIB, 300 * MIB, 812 * MIB, 11)  # readings at 0.95 s, then 1.05 ... 1.95 s

    # CPU steps: no process sample in their periods -> 0 %; the device's background 3 % is
    # another process's and stays out of the target's figure.
    for name, n in (("cpu_before", 4), ("cpu_after", 8)):
        a = attrs(stream, spans[name])
        assert (a[G.A_SM], a[G.A_PROC_SAMPLES], a[G.A_DEV_SM], a[G.A_DEV_SAMPLES]) == (0.0, 0, 3.0, n)
        assert a[G.A_MEM_MAX] == 300 * MIB

    # 0.9-1.3 s overlaps period 5 (3 %) by 100 ms, 6 and 7 (97 %) by 200 and 100 ms.
    a = attrs(stream, spans["straddle"])
    assert a[G.A_DEV_SM] == pytest.approx((100 * 3 + 300 * 97) / 400)
    assert a[G.A_SM] == pytest.approx(300 * 95 / 400)
    assert (a[G.A_DEV_SAMPLES], a[G.A_PROC_SAMPLES]) == (3, 2)
    assert (a[G.A_MEM_START], a[G.A_MEM_END]) == (300 * MIB, 812 * MIB)

    # The parent: 17 periods, 5 of them busy.
    a = attrs(stream, spans["takwin.cycle"])
    assert a[G.A_DEV_SM] == pytest.approx(round((12 * 3 + 5 * 97) / 17, 3))
    assert a[G.A_SM] == pytest.approx(round(5 * 95 / 17, 3))


def test_unavailable_figures_say_why():
    stream, spans, _ = load(DATA / "synthetic-one-gpu.json")
    a = attrs(stream, spans["short"])  # 5 ms inside a 200 ms period: no made-up number
    assert a[G.A_UTIL_UNAVAILABLE] == "span (5 ms) is shorter than the NVML sample period (200 ms)"
    assert not {G.A_SM, G.A_DEV_SM, G.A_PROC_SAMPLES} & set(a)
    assert a[G.A_MEM_START] == 812 * MIB  # memory readings do not depend on the sample period

    a = attrs(stream, spans["past_the_samples"])  # ends 0.5 s after the last sample
    assert a[G.A_UTIL_UNAVAILABLE] == "GPU 0: NVML samples cover 17 % of the span"

    a = attrs(stream, spans["before_memory"])  # starts before the first process-list read
    assert a[G.A_MEM_UNAVAILABLE] == "no GPU memory reading before the span started"
    assert a[G.A_DEV_SM] == 3.0 and G.A_MEM_START not in a


def test_two_gpus_attribution():
    stream, spans, _ = load(DATA / "synthetic-two-gpus.json")
    a = attrs(stream, spans["takwin.gpu_project"])
    # GPUs 0 and 2 are the target's; GPU 1 (another process at 80 %) is not counted.
    assert a[G.A_DEVICES] == [0, 2]
    assert a[G.A_SM] == (95 + 45) / 2 and a[G.A_MEM_UTIL] == (38 + 18) / 2
    assert a[G.A_DEV_SM] == (97 + 50) / 2 and a[G.A_DEV_SAMPLES] == 10 and a[G.A_PROC_SAMPLES] == 10
    assert (a[G.A_MEM_START], a[G.A_MEM_MAX]) == (400 * MIB, 912 * MIB)
    assert attrs(stream, spans["cpu_before"])[G.A_SM] == 0.0
    # A failed per-process query near the span: the target's figure is unavailable (a missing
    # sample must not read as 0 %), the device figure stays.
    a = attrs(stream, spans["near_the_error"])
    assert a[G.A_PROC_UNAVAILABLE] == "GPU 2: nvmlDeviceGetProcessUtilization: Unknown Error"
    assert G.A_SM not in a and a[G.A_DEV_SM] == 1.5


def test_a_process_without_a_gpu_context():
    _, spans, data = load(DATA / "synthetic-one-gpu.json")
    stream = GpuStream.from_dict(dict(data, pid=31337))  # a PID in no process list
    a = attrs(stream, spans["takwin.gpu_project"])
    assert a[G.A_DEVICES] == []
    assert a[G.A_UTIL_UNAVAILABLE] == "the process used no GPU: PID 31337 is in no NVML process list"
    assert a[G.A_MEM_UNAVAILABLE] == a[G.A_UTIL_UNAVAILABLE]


def test_nvml_clock_is_detected_not_assumed():
    now_rt, now_mono = 1_700_000_000_000_000_000, 5_000_000_000_000
    assert detect_clock(now_rt // 1000 - 150_000, now_rt, now_mono) == ("CLOCK_REALTIME", 0)
    assert detect_clock(now_mono // 1000 - 150_000, now_rt, now_mono) == ("CLOCK_MONOTONIC", now_rt - now_mono)
    assert detect_clock(42, now_rt, now_mono) is None
    st = GpuStream(1)
    st.set_clock(42, now_rt, now_mono)
    assert not st.clock_known() and "neither CLOCK_REALTIME nor CLOCK_MONOTONIC" in st.clock_error
    a = span_gpu(st, now_rt - 10**9, now_rt)
    assert a[G.A_UTIL_UNAVAILABLE] == st.clock_error


def test_stream_round_trips_and_horizons():
    stream, _, data = load(DATA / "synthetic-one-gpu.json")
    data.pop("spans")
    assert stream.to_dict() == data
    last = data["devices"][0]["samples"][G.GPU_UTIL]["samples"][-1]["timeStamp"]
    assert stream.sample_horizon_ns() == last * 1000
    assert stream.period_ms() == 200.0


def test_pruning_keeps_the_reading_a_later_span_starts_from():
    _, spans, data = load(DATA / "synthetic-one-gpu.json")
    live = GpuStream(data["pid"])  # as the sampler fills it: no raw copy kept
    ref = GpuStream.from_dict(data)
    live.clock, live.offset_ns = ref.clock, ref.offset_ns
    for d in data["devices"]:
        for k, b in d["samples"].items():
            live.add_samples(0, k, b["sampleValType"], b["samples"])
        live.add_process_utilization(0, d["process_utilization"])
        for r in d["compute_running_processes"]:
            live.add_processes(0, r["poll"], r["t_ns"], r["processes"])
    after = spans["cpu_after"]
    before = attrs(live, after)
    live.prune(after["start_ns"] - 300_000_000)  # drop what ended well before the span
    assert len(live.devices[0].series[G.GPU_UTIL].ts) < 20
    assert attrs(live, after) == before


# ---- the enricher ----------------------------------------------------------------------

def test_replay_enricher_through_the_session_hold():
    from tracer.session import ENRICHERS, _HeldSpans

    assert ENRICHERS["gpu"] is GpuEnricher
    stream, spans, _ = load(DATA / "synthetic-one-gpu.json")
    enr = GpuEnricher.replay(stream)
    held = _HeldSpans([enr])
    s = spans["takwin.gpu_project"]
    span = Span("t" * 32, "s" * 16, "", s["name"], s["start_ns"], s["end_ns"], {"thread.id": 7})
    (out,) = held.release([span], final=True)
    assert out.attributes["thread.id"] == 7 and out.attributes[G.A_SM] == 95.0
    summary = enr.summary()
    assert summary["status"] == "ok" and summary["spans"] == 1 and summary["util"] == 1
    assert summary["devices"][0]["used_by_target"] is True


@pytest.mark.skipif(AVAIL.available, reason="this machine has a GPU: the no-GPU path needs a machine without one")
def test_no_gpu_enricher_is_unavailable_and_leaves_spans_alone():
    t0 = time.monotonic()
    enr = GpuEnricher(os.getpid(), None)
    try:
        summary = enr.summary()
        assert summary == {"status": "unavailable", "reason": AVAIL.reason}
        assert AVAIL.reason  # e.g. "no NVIDIA driver: libnvidia-ml.so.1 not found"
        span = Span("t" * 32, "s" * 16, "", "x", 1, 2, {"a": 1})
        assert enr.enrich(span) is span
        assert enr.covered_until() >= 1 << 62  # holds nothing back
        enr.finish()
        enr.poll()
    finally:
        enr.close()
    assert time.monotonic() - t0 < 3.0  # no NVML: nothing to wait for


@pytest.mark.skipif(AVAIL.available, reason="this machine has a GPU")
def test_doctor_gives_the_same_reason():
    from tracer.doctor import WARN, check_nvml

    c = check_nvml()
    assert c.status == WARN and c.detail == f"GPU data unavailable: {AVAIL.reason}"
    assert c.data["reason"] == AVAIL.reason


@pytest.mark.skipif(AVAIL.available, reason="this machine has a GPU")
def test_trace_with_gpu_on_a_machine_without_one(ebpf, tmp_path):
    """A real trace of a real process with --gpu: it succeeds, and one line says why there is
    no GPU data, the same reason doctor gives."""
    # A minute of cycles, killed at the end: two traces and their attaches take a while on a
    # loaded machine. Its per-cycle lines are read away so it never blocks on a full pipe.
    target = subprocess.Popen([sys.executable, "-m", "tracer.reference", "--cycles", "3000"],
                              stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        pid = json.loads(target.stdout.readline())["pid"]
        threading.Thread(target=target.stdout.read, daemon=True).start()
        out = tmp_path / "spans.jsonl"
        cmd = [sys.executable, "-m", "tracer.cli", "trace", "--pid", str(pid), "--duration", "2", "--no-status",
               "-o", str(out)]
        r = subprocess.run([*cmd, "--gpu"], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
        assert r.returncode == 0, r.stderr
        gpu_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("gpu:")]
        assert gpu_lines == [f"gpu: unavailable: {AVAIL.reason}"]
        assert "Traceback" not in r.stderr
        spans = [json.loads(x) for x in out.read_text().splitlines()]
        assert spans  # tracing went on
        assert "ophamin.gpu" not in out.read_text()  # and no GPU attribute was made up

        r = subprocess.run([*cmd, "--no-gpu"], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
        assert r.returncode == 0, r.stderr
        assert not [ln for ln in r.stdout.splitlines() if ln.startswith("gpu:")]
    finally:
        target.kill()
        target.wait()


# ---- the reference substrate's GPU step ------------------------------------------------

def _gpu_libraries() -> bool:
    from tracer.reference.gpu import GpuWork

    return not GpuWork().reason


@pytest.mark.skipif(_gpu_libraries(), reason="a GPU array library with a CUDA device is present")
def test_reference_gpu_step_skips_with_a_reason_and_changes_nothing(tmp_path):
    from tests.test_reference import Recorder
    from tracer.reference import Takwin, stimuli

    rec = Recorder()
    t = Takwin(emitter=rec, seed=4)
    reason = t.enable_gpu()
    assert reason.startswith("no GPU array library with a CUDA device (") and "CuPy" in reason
    for s in stimuli(4, 3):
        t.run(s)
    t.close()
    assert len(rec.spans) == 7 * 3 and "takwin.gpu_project" not in {s["name"] for s in rec.spans}

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KIMERA_TELEMETRY_EMITTER_PATH", None)
    runs = {}
    for flag in ([], ["--gpu"]):
        r = subprocess.run([sys.executable, "-m", "tracer.reference", "--cycles", "4", "--seed", "4", *flag],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in r.stdout.splitlines()]
        runs[bool(flag)] = (lines[0], lines[-1], r.stderr)
    head, done, err = runs[True]
    assert head["gpu"] == {"enabled": False, "reason": reason, "backend": "", "device": ""}
    assert err.strip() == f"tracer.reference: GPU step skipped: {reason}"
    assert done == runs[False][1]  # same digest with and without --gpu
    assert "gpu" not in runs[False][0]


def test_reference_spec_names_the_gpu_step():
    from tracer.reference.takwin import Takwin
    from tracer.spec import load_spec

    spec = load_spec("reference")
    names = {t.function: t.name for t in spec.targets if t.kind == "span"}
    assert names["tracer.reference.takwin:Takwin._gpu_project"] == "takwin.gpu_project"
    assert callable(Takwin._gpu_project)


@pytest.mark.skipif(AVAIL.available, reason="this machine has a GPU")
def test_gpu_check_says_why_it_cannot_run_here():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stdout.strip() == f"gpu check cannot run here: GPU data unavailable: {AVAIL.reason}"


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.name)
def test_recorded_streams_show_the_gpu_step(path):
    """A stream bench/gpu.py recorded on a real GPU: the GPU step's spans clearly busy, the
    other steps near zero (the check the recorder printed, replayed)."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--replay", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
