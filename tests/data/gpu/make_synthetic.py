"""Writes the SYNTHETIC NVML streams in this folder (no GPU was involved in making them).

    python tests/data/gpu/make_synthetic.py      # rewrites synthetic-*.json

The records use NVML's own field names and units, as nvidia-ml-py's ctypes structures define
them: `c_nvmlSample_t` {timeStamp (µs, CPU clock), sampleValue (nvmlValue_t: uiVal for
NVML_VALUE_TYPE_UNSIGNED_INT = 1)}, `c_nvmlProcessUtilizationSample_t` {pid, timeStamp,
smUtil, memUtil, encUtil, decUtil}, and the processes of
`nvmlDeviceGetComputeRunningProcesses` (`c_nvmlProcessInfo_t`: {pid, usedGpuMemory (bytes),
gpuInstanceId, computeInstanceId}). `poll` and `t_ns` (Unix ns, the tracer's clock when it
read the process list), `errors` and `pids_seen` (every PID NVML listed on the device) are the
tracer's own fields. The values are invented so that the
expected attribution can be worked out by hand (tests/test_gpu.py does): a 200 ms sample
period (inside NVML's documented 1/6 s to 1 s), aligned on round times.

A recorded stream from a real device has the same layout (bench/gpu.py writes it) and says
`"kind": "recorded"` in its provenance.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
T0 = 1_700_000_000_000_000  # µs since the Unix epoch (2023-11-14T22:13:20Z)
P = 200_000  # sample period, µs
MIB = 1 << 20
PID = 4242
INVALID = 0xFFFFFFFF  # NVML's "no instance" for gpuInstanceId / computeInstanceId outside MIG


def samples(values: list) -> dict:
    """Device samples at T0 + k*P for k = 1.., with the given values."""
    return {"sampleValType": 1, "samples": [{"timeStamp": T0 + (k + 1) * P, "sampleValue": {"uiVal": v}}
                                             for k, v in enumerate(values)]}


def proc(pid: int, k: int, sm: int, mem: int) -> dict:
    return {"pid": pid, "timeStamp": T0 + k * P, "smUtil": sm, "memUtil": mem, "encUtil": 0, "decUtil": 0}


def polls(mem_at) -> list:
    """Process-list reads every 100 ms from T0 + 50 ms: 40 reads (4 s)."""
    out = []
    for j in range(40):
        t_us = T0 + 50_000 + j * 100_000
        used = mem_at((t_us - T0) / 1e6)
        procs = [] if used is None else [{"pid": PID, "usedGpuMemory": used, "gpuInstanceId": INVALID,
                                          "computeInstanceId": INVALID}]
        out.append({"poll": 2 * j + 1, "t_ns": t_us * 1000, "processes": procs})
    return out


def busy(k: int) -> bool:  # the GPU step runs from 1.0 s to 2.0 s: sample periods k = 6..10
    return 6 <= k <= 10


def one_gpu() -> dict:
    ks = range(1, 21)
    dev = {
        "index": 0, "uuid": "GPU-00000000-0000-4000-8000-000000000000", "name": "synthetic (no real device)",
        "samples": {
            "NVML_GPU_UTILIZATION_SAMPLES": samples([97 if busy(k) else 3 for k in ks]),
            "NVML_MEMORY_UTILIZATION_SAMPLES": samples([40 if busy(k) else 1 for k in ks]),
        },
        # The target only in the busy periods (NVML lists a process only for periods in which
        # it used the GPU); another process at 3 % throughout, which the target must not get.
        "process_utilization": sorted([proc(PID, k, 95, 38) for k in ks if busy(k)] +
                                      [proc(777, k, 3, 1) for k in ks], key=lambda r: r["timeStamp"]),
        "compute_running_processes": polls(lambda t: 812 * MIB if 1.2 <= t < 1.8 else 300 * MIB),
        "errors": {},
        "pids_seen": [777, PID],
    }
    return {
        "format": "ophamin-trace/nvml-stream/1",
        "provenance": {"kind": "synthetic", "description": "made by tests/data/gpu/make_synthetic.py; "
                       "no GPU was involved. One GPU, 200 ms sample period, the target's GPU step at 1.0-2.0 s."},
        "pid": PID, "driver": None,
        "clock": {"nvml_timestamp_unit": "us", "domain": "CLOCK_REALTIME", "offset_ns": 0},
        "devices": [dev],
        "spans": [span(n, a, b) for n, a, b in (
            ("takwin.cycle", 0.2, 3.6), ("cpu_before", 0.2, 1.0), ("takwin.gpu_project", 1.0, 2.0),
            ("cpu_after", 2.0, 3.6), ("straddle", 0.9, 1.3), ("short", 1.5, 1.505),
            ("past_the_samples", 3.9, 4.5), ("before_memory", 0.01, 0.3))],
    }


def span(name: str, a: float, b: float) -> dict:
    return {"name": name, "start_ns": (T0 + round(a * 1e6)) * 1000, "end_ns": (T0 + round(b * 1e6)) * 1000}


def two_gpus() -> dict:
    ks = range(1, 21)
    base = one_gpu()
    d0 = base["devices"][0]
    d1 = {  # another process's GPU: the target never appears on it
        "index": 1, "uuid": "GPU-11111111-1111-4111-8111-111111111111", "name": "synthetic (no real device)",
        "samples": {"NVML_GPU_UTILIZATION_SAMPLES": samples([80 for _ in ks]),
                    "NVML_MEMORY_UTILIZATION_SAMPLES": samples([20 for _ in ks])},
        "process_utilization": [proc(999, k, 80, 20) for k in ks],
        "compute_running_processes": [dict(r, processes=[]) for r in polls(lambda t: None)],
        "errors": {},
        "pids_seen": [999],
    }
    d2 = {  # the target's second GPU: half as busy in the GPU step, 100 MiB throughout
        "index": 2, "uuid": "GPU-22222222-2222-4222-8222-222222222222", "name": "synthetic (no real device)",
        "samples": {"NVML_GPU_UTILIZATION_SAMPLES": samples([50 if busy(k) else 0 for k in ks]),
                    "NVML_MEMORY_UTILIZATION_SAMPLES": samples([20 if busy(k) else 0 for k in ks])},
        "process_utilization": [proc(PID, k, 45, 18) for k in ks if busy(k)],
        "compute_running_processes": polls(lambda t: 100 * MIB),
        # One transient failure of the per-process query at 3.0-3.1 s: spans around it get no
        # per-process figure (a missing sample must not read as 0 %), the rest are unaffected.
        "errors": {"nvmlDeviceGetProcessUtilization": {
            "error": "Unknown Error", "count": 2, "first_ns": (T0 + 3_000_000) * 1000,
            "last_ns": (T0 + 3_100_000) * 1000}},
        "pids_seen": [PID],
    }
    base["provenance"]["description"] = ("made by tests/data/gpu/make_synthetic.py; no GPU was involved. "
                                         "Three GPUs; the target uses 0 and 2, another process uses 1.")
    base["devices"] = [d0, d1, d2]
    base["spans"] = [span(n, a, b) for n, a, b in (
        ("takwin.gpu_project", 1.0, 2.0), ("cpu_before", 0.2, 1.0), ("near_the_error", 2.6, 3.2))]
    return base


def main() -> None:
    for name, data in (("synthetic-one-gpu.json", one_gpu()), ("synthetic-two-gpus.json", two_gpus())):
        (HERE / name).write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
