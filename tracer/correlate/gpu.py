"""GPU correlation: what NVML saw while each span ran, as span attributes (`ophamin.gpu.*`).

Three parts, each usable alone:

- `GpuStream`: the samples NVML returned for one traced process, kept with NVML's own field
  names and units (timestamps in µs on NVML's CPU clock) and the clock bridge to span time
  (Unix-epoch ns). It is filled live by `tracer.correlate.nvml.NvmlSampler`, or loaded from a
  recorded or synthetic file (`to_dict` / `from_dict`, the format of `tests/data/gpu/*.json`).
- `span_gpu(stream, start_ns, end_ns)`: a pure function from a stream and a span's window to
  its attributes, by interval overlap (docs/correlation.md, "GPU").
- `GpuEnricher`: the `gpu` enricher of `tracer.session` (ENRICHERS["gpu"]): starts the
  sampler, holds spans until samples past their end have arrived, enriches them; with no
  GPU, driver or permission it reports `unavailable` and why, and leaves spans alone.
"""

from __future__ import annotations

import statistics
import threading
import time
from bisect import bisect_left, bisect_right, insort
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from ..otlpjson import Span

FORMAT = "ophamin-trace/nvml-stream/1"
GPU_UTIL = "NVML_GPU_UTILIZATION_SAMPLES"
MEM_UTIL = "NVML_MEMORY_UTILIZATION_SAMPLES"
MIN_COVERAGE = 0.9  # share of a span the device samples must cover for a utilisation figure
HOLD_MAX_NS = 2_000_000_000  # a span is never held longer than this waiting for samples
STALL_S = 1.0  # no completed poll for this long: the sampler is blocked in NVML
FINISH_WAIT_S = 2.0  # at the end of a trace, wait at most this long for the last samples
RETAIN_NS = 30 * 60 * 1_000_000_000  # samples older than this are dropped (live sampling only)

# Span attributes (docs/correlation.md, "GPU").
A_DEVICES = "ophamin.gpu.devices"
A_UUIDS = "ophamin.gpu.device_uuids"
A_SM = "ophamin.gpu.sm_util_pct"
A_MEM_UTIL = "ophamin.gpu.mem_util_pct"
A_PROC_SAMPLES = "ophamin.gpu.process_samples"
A_PROC_UNAVAILABLE = "ophamin.gpu.process_util_unavailable"
A_DEV_SM = "ophamin.gpu.device.sm_util_pct"
A_DEV_MEM_UTIL = "ophamin.gpu.device.mem_util_pct"
A_DEV_SAMPLES = "ophamin.gpu.device.samples"
A_PERIOD = "ophamin.gpu.sample_period_ms"
A_UTIL_UNAVAILABLE = "ophamin.gpu.util_unavailable"
A_MEM_START = "ophamin.gpu.memory.start_bytes"
A_MEM_END = "ophamin.gpu.memory.end_bytes"
A_MEM_MAX = "ophamin.gpu.memory.max_bytes"
A_MEM_SAMPLES = "ophamin.gpu.memory.samples"
A_MEM_UNAVAILABLE = "ophamin.gpu.memory.unavailable"


def detect_clock(newest_us: int, realtime_ns: int, monotonic_ns: int,
                 max_age_ns: int = 60_000_000_000, ahead_ns: int = 1_000_000_000) -> Optional[Tuple[str, int]]:
    """Which CPU clock NVML's µs timestamps are on, as (name, offset to add to ts*1000 for Unix ns).

    NVML documents its sample timestamps only as "CPU timestamp in microseconds"; drivers stamp
    them with the wall clock. The newest sample is at most a few sample periods old, so it
    must sit just before `now` on the clock NVML uses; None when it fits neither.
    """
    t = newest_us * 1000
    if -ahead_ns <= realtime_ns - t <= max_age_ns:
        return "CLOCK_REALTIME", 0
    if -ahead_ns <= monotonic_ns - t <= max_age_ns:
        return "CLOCK_MONOTONIC", realtime_ns - monotonic_ns
    return None


def _value(sample: dict) -> float:
    (v,) = sample["sampleValue"].values()
    return float(v)


@dataclass
class _Series:
    """One sample stream in time order: timestamps (NVML µs) and values."""

    ts: List[int] = field(default_factory=list)
    values: List[float] = field(default_factory=list)
    _period: Optional[float] = None

    def add(self, ts: int, value: float) -> None:
        if not self.ts or ts > self.ts[-1]:
            self.ts.append(ts)
            self.values.append(value)
        elif ts not in self.ts:
            i = bisect_left(self.ts, ts)
            self.ts.insert(i, ts)
            self.values.insert(i, value)
        if len(self.ts) <= 101:  # the period comes from the first 100 spacings: settled after that
            self._period = None

    def period(self) -> Optional[float]:
        """The sample period (µs): the median spacing of the first 100 samples."""
        if self._period is None and len(self.ts) >= 2:
            head = self.ts[:101]
            self._period = float(statistics.median(b - a for a, b in zip(head, head[1:])))
        return self._period

    def prune(self, before_us: int) -> None:
        k = bisect_left(self.ts, before_us)
        if k > 0:
            del self.ts[:k], self.values[:k]

    def overlaps(self, s: float, e: float, period: float) -> List[Tuple[float, float]]:
        """(overlap µs, value) of every sample whose period overlaps (s, e).

        Sample i covers (ts[i-1], ts[i]]; the first one, and one after a gap longer than two
        periods, cover one period before their timestamp.
        """
        out = []
        ts = self.ts
        for i in range(bisect_right(ts, s), len(ts)):
            prev = ts[i - 1] if i > 0 else None
            start = prev if prev is not None and ts[i] - prev <= 2 * period else ts[i] - period
            if start >= e:
                break
            ov = min(ts[i], e) - max(start, s)
            if ov > 0:
                out.append((ov, self.values[i]))
        return out


@dataclass
class _Device:
    index: int
    uuid: str = ""
    name: str = ""
    samples: Dict[str, dict] = field(default_factory=dict)  # raw: type -> {sampleValType, samples}
    process_utilization: List[dict] = field(default_factory=list)  # raw records
    compute_running_processes: List[dict] = field(default_factory=list)  # raw: {poll, t_ns, processes}
    errors: Dict[str, dict] = field(default_factory=dict)  # call -> {error, count, first_ns, last_ns}
    series: Dict[str, _Series] = field(default_factory=dict)
    proc_sm: _Series = field(default_factory=_Series)
    proc_mem: _Series = field(default_factory=_Series)
    memory: Dict[int, Optional[int]] = field(default_factory=dict)  # poll -> bytes (None: N/A)
    first_seen_ns: Optional[int] = None  # first time the target showed up on this device
    pids_seen: set = field(default_factory=set)  # every PID NVML listed on it (diagnostics)


class GpuStream:
    """Samples NVML returned for one target process (see module docstring). Thread-safe:
    the sampler thread appends while the tracing thread reads."""

    def __init__(self, pid: int, keep_raw: bool = False, provenance: Optional[dict] = None) -> None:
        self.pid = pid
        self.keep_raw = keep_raw
        self.provenance = dict(provenance or {})
        self.driver: Optional[str] = None
        self.clock: Optional[str] = None  # "CLOCK_REALTIME" | "CLOCK_MONOTONIC"
        self.clock_error = ""
        self.offset_ns = 0
        self.devices: Dict[int, _Device] = {}
        self.mem_polls: List[Tuple[int, int]] = []  # (t_ns, poll) of each process-list read, in time order
        self._poll_seen: set = set()
        self.last_poll_ns = 0
        self.lock = threading.Lock()

    # ---- filling --------------------------------------------------------------------

    def add_device(self, index: int, uuid: str = "", name: str = "") -> None:
        with self.lock:
            d = self.devices.setdefault(index, _Device(index))
            d.uuid, d.name = uuid, name

    def set_driver(self, driver: Optional[str]) -> None:
        self.driver = driver

    def set_clock(self, newest_us: int, realtime_ns: int, monotonic_ns: int) -> None:
        got = detect_clock(newest_us, realtime_ns, monotonic_ns)
        if got is None:
            self.clock_error = (f"NVML sample timestamps are on neither CLOCK_REALTIME nor CLOCK_MONOTONIC "
                                f"(newest {newest_us} µs, realtime now {realtime_ns // 1000} µs)")
            return
        self.clock, self.offset_ns = got

    def clock_known(self) -> bool:
        return self.clock is not None

    def to_span_ns(self, ts_us: float) -> int:
        return int(ts_us * 1000) + self.offset_ns

    def to_nvml_us(self, t_ns: int) -> int:
        return (t_ns - self.offset_ns) // 1000

    def add_samples(self, index: int, sample_type: str, value_type: int, records: List[dict]) -> None:
        with self.lock:
            d = self.devices.setdefault(index, _Device(index))
            series = d.series.setdefault(sample_type, _Series())
            for r in records:
                series.add(int(r["timeStamp"]), _value(r))
            if self.keep_raw:
                d.samples.setdefault(sample_type, {"sampleValType": value_type, "samples": []})["samples"] += records

    def add_process_utilization(self, index: int, records: List[dict]) -> None:
        with self.lock:
            d = self.devices.setdefault(index, _Device(index))
            for r in sorted(records, key=lambda r: r["timeStamp"]):
                if int(r["pid"]) != self.pid:
                    continue
                d.proc_sm.add(int(r["timeStamp"]), float(r["smUtil"]))
                d.proc_mem.add(int(r["timeStamp"]), float(r["memUtil"]))
                if self.clock is not None:
                    seen = self.to_span_ns(int(r["timeStamp"]))
                    if d.first_seen_ns is None or seen < d.first_seen_ns:
                        d.first_seen_ns = seen
            if self.keep_raw:
                d.process_utilization += records

    def add_processes(self, index: int, poll: int, t_ns: int, processes: List[dict]) -> None:
        """One read of the device's process list: the target's entries (none: no context)."""
        with self.lock:
            d = self.devices.setdefault(index, _Device(index))
            mine = [p for p in processes if int(p["pid"]) == self.pid]
            if any(p.get("usedGpuMemory") is None for p in mine):
                d.memory[poll] = None
            else:
                d.memory[poll] = sum(int(p["usedGpuMemory"]) for p in mine)
            if mine and (d.first_seen_ns is None or t_ns < d.first_seen_ns):
                d.first_seen_ns = t_ns
            if poll not in self._poll_seen:
                # One entry per poll, whichever device was read first in it.
                self._poll_seen.add(poll)
                insort(self.mem_polls, (t_ns, poll))
            if self.keep_raw:
                d.compute_running_processes.append({"poll": poll, "t_ns": t_ns, "processes": mine})

    def note_pids(self, index: int, pids: List[int]) -> None:
        """PIDs NVML listed on a device, the target's or not: when the target never shows up,
        they tell a PID-namespace mismatch from a process that really used no GPU."""
        with self.lock:
            self.devices.setdefault(index, _Device(index)).pids_seen.update(int(p) for p in pids)

    def add_error(self, index: int, call: str, error: str, t_ns: Optional[int] = None) -> None:
        t = time.time_ns() if t_ns is None else t_ns
        with self.lock:
            d = self.devices.setdefault(index, _Device(index))
            e = d.errors.setdefault(call, {"error": error, "count": 0, "first_ns": t, "last_ns": t})
            e["error"], e["count"], e["last_ns"] = error, e["count"] + 1, t

    def mark_poll(self, t_ns: int) -> None:
        self.last_poll_ns = t_ns

    def prune(self, before_ns: int) -> None:
        """Drop what is older than `before_ns` (live sampling keeps a bounded history)."""
        if self.keep_raw or self.clock is None:
            return
        before_us = self.to_nvml_us(before_ns)
        with self.lock:
            for d in self.devices.values():
                for s in (*d.series.values(), d.proc_sm, d.proc_mem):
                    s.prune(before_us)
            k = bisect_left(self.mem_polls, (before_ns, -1))
            if k > 1:  # keep one reading before the horizon: it is the next span's start value
                for _t, poll in self.mem_polls[:k - 1]:
                    self._poll_seen.discard(poll)
                    for d in self.devices.values():
                        d.memory.pop(poll, None)
                del self.mem_polls[:k - 1]

    # ---- horizons -------------------------------------------------------------------

    def sample_horizon_ns(self) -> int:
        """Span time up to which every device's utilisation samples have arrived (0: none yet)."""
        if self.clock is None:
            return 0
        with self.lock:
            ends = [d.series[GPU_UTIL].ts[-1] for d in self.devices.values()
                    if GPU_UTIL in d.series and d.series[GPU_UTIL].ts]
        return self.to_span_ns(min(ends)) if ends else 0

    def period_ms(self) -> Optional[float]:
        with self.lock:
            ps = [d.series[GPU_UTIL].period() for d in self.devices.values() if GPU_UTIL in d.series]
        ps = [p for p in ps if p]
        return max(ps) / 1000 if ps else None

    # ---- the file format ------------------------------------------------------------

    def to_dict(self) -> dict:
        with self.lock:
            return {
                "format": FORMAT,
                "provenance": dict(self.provenance),
                "pid": self.pid,
                "driver": self.driver,
                "clock": {"nvml_timestamp_unit": "us", "domain": self.clock, "offset_ns": self.offset_ns},
                "devices": [{
                    "index": d.index, "uuid": d.uuid, "name": d.name,
                    "samples": {k: {"sampleValType": v["sampleValType"], "samples": list(v["samples"])}
                                for k, v in d.samples.items()},
                    "process_utilization": list(d.process_utilization),
                    "compute_running_processes": list(d.compute_running_processes),
                    "errors": {k: dict(v) for k, v in d.errors.items()},
                    "pids_seen": sorted(d.pids_seen),
                } for d in sorted(self.devices.values(), key=lambda d: d.index)],
            }

    @classmethod
    def from_dict(cls, data: dict) -> GpuStream:
        if data.get("format") != FORMAT:
            raise ValueError(f"not an NVML stream file (format {data.get('format')!r}, want {FORMAT!r})")
        s = cls(int(data["pid"]), keep_raw=True, provenance=data.get("provenance"))
        s.driver = data.get("driver")
        clock = data.get("clock") or {}
        if clock.get("domain"):
            s.clock, s.offset_ns = clock["domain"], int(clock.get("offset_ns", 0))
        for dev in data["devices"]:
            i = int(dev["index"])
            s.add_device(i, dev.get("uuid", ""), dev.get("name", ""))
            for kind, block in dev.get("samples", {}).items():
                s.add_samples(i, kind, int(block["sampleValType"]), list(block["samples"]))
            s.add_process_utilization(i, list(dev.get("process_utilization", [])))
            for rec in dev.get("compute_running_processes", []):
                s.add_processes(i, int(rec["poll"]), int(rec["t_ns"]), list(rec["processes"]))
            s.devices[i].errors = {k: dict(v) for k, v in dev.get("errors", {}).items()}
            s.note_pids(i, dev.get("pids_seen", []))
        s.last_poll_ns = max((t for t, _ in s.mem_polls), default=0)
        return s


# ---- attribution -----------------------------------------------------------------------

def _error_in(d: _Device, prefix: str, lo_ns: int, hi_ns: int) -> str:
    for call, e in d.errors.items():
        if call.startswith(prefix) and e["first_ns"] <= hi_ns and e["last_ns"] >= lo_ns:
            return f"{call}: {e['error']}"
    return ""


def _device_util(stream: GpuStream, d: _Device, s_ns: int, e_ns: int) -> dict:
    """Utilisation figures of one device over (s_ns, e_ns), or {"reason": ...}."""
    series = d.series.get(GPU_UTIL)
    period = series.period() if series else None
    if not series or period is None:
        err = _error_in(d, "nvmlDeviceGetSamples", 0, 1 << 62)
        return {"reason": f"GPU {d.index}: no NVML utilisation samples" + (f" ({err})" if err else "")}
    dur_us = (e_ns - s_ns) / 1000
    if dur_us < period:
        return {"reason": f"span ({dur_us / 1000:.3g} ms) is shorter than the NVML sample period "
                          f"({period / 1000:.4g} ms)"}
    s_us, e_us = (s_ns - stream.offset_ns) / 1000, (e_ns - stream.offset_ns) / 1000
    sm = series.overlaps(s_us, e_us, period)
    covered = sum(ov for ov, _ in sm)
    if covered < MIN_COVERAGE * dur_us:
        err = _error_in(d, "nvmlDeviceGetSamples", s_ns, e_ns)
        return {"reason": f"GPU {d.index}: NVML samples cover {100 * covered / dur_us:.0f} % of the span"
                          + (f" ({err})" if err else "")}
    mem_series = d.series.get(MEM_UTIL)
    mem = mem_series.overlaps(s_us, e_us, period) if mem_series else []
    mem_cov = sum(ov for ov, _ in mem)
    out = {"period_us": period, "device_samples": len(sm),
           "device_sm": sum(ov * v for ov, v in sm) / covered,
           "device_mem": sum(ov * v for ov, v in mem) / mem_cov if mem_cov >= MIN_COVERAGE * dur_us else None}
    # The target's own share: NVML returns a process sample only for periods in which it used
    # the GPU, so a period the device samples cover with no process sample counts as 0 %.
    err = _error_in(d, "nvmlDeviceGetProcessUtilization", s_ns - 1_000_000_000, e_ns + int(2 * period * 1000))
    if err:
        out["process_reason"] = f"GPU {d.index}: {err}"
        return out
    psm = d.proc_sm.overlaps(s_us, e_us, period)
    pmem = d.proc_mem.overlaps(s_us, e_us, period)
    out["process_samples"] = len(psm)
    out["sm"] = min(100.0, sum(ov * v for ov, v in psm) / covered)
    out["mem"] = min(100.0, sum(ov * v for ov, v in pmem) / covered)
    return out


def _memory(stream: GpuStream, devices: List[_Device], s_ns: int, e_ns: int) -> dict:
    """GPU memory of the target on `devices` at the last reading at or before the span's start,
    at the last one at or before its end, and the largest reading in between (bytes)."""
    polls = stream.mem_polls
    hi = bisect_right(polls, (e_ns, 1 << 62))
    lo = bisect_right(polls, (s_ns, 1 << 62)) - 1
    # Walk back to the last complete reading before the start: a poll where some device's
    # process list could not be read says nothing about that device.
    while lo >= 0 and any(polls[lo][1] not in d.memory for d in devices):
        lo -= 1
    if lo < 0:
        return {A_MEM_UNAVAILABLE: "no GPU memory reading before the span started"}
    totals = []
    for _t, poll in polls[lo:hi]:
        if any(poll not in d.memory for d in devices):
            continue
        vals = [d.memory[poll] for d in devices]
        if any(v is None for v in vals):
            return {A_MEM_UNAVAILABLE: "NVML reports usedGpuMemory as not available"}
        totals.append(sum(vals))
    return {A_MEM_START: totals[0], A_MEM_END: totals[-1], A_MEM_MAX: max(totals), A_MEM_SAMPLES: len(totals)}


def span_gpu(stream: GpuStream, start_ns: int, end_ns: int,
             devices: Optional[List[int]] = None) -> Dict[str, Any]:
    """The `ophamin.gpu.*` attributes of a span running from start_ns to end_ns (Unix ns),
    over the GPUs the target had used by then (or over `devices`, for diagnostics)."""
    with stream.lock:
        if stream.clock is None:
            reason = stream.clock_error or "no NVML utilisation sample arrived (NVML clock unknown)"
            return {A_UTIL_UNAVAILABLE: reason, A_MEM_UNAVAILABLE: reason}
        if devices is not None:
            used = [stream.devices[i] for i in sorted(devices) if i in stream.devices]
        else:
            used = sorted((d for d in stream.devices.values()
                           if d.first_seen_ns is not None and d.first_seen_ns <= end_ns), key=lambda d: d.index)
        out: Dict[str, Any] = {A_DEVICES: [d.index for d in used], A_UUIDS: [d.uuid for d in used]}
        if not used:
            reason = f"the process used no GPU: PID {stream.pid} is in no NVML process list"
            out[A_UTIL_UNAVAILABLE] = reason
            out[A_MEM_UNAVAILABLE] = reason
            return out
        figs = [_device_util(stream, d, start_ns, end_ns) for d in used]
        reasons = [f["reason"] for f in figs if "reason" in f]
        if reasons:
            out[A_UTIL_UNAVAILABLE] = reasons[0]
        else:
            n = len(figs)
            out[A_PERIOD] = round(max(f["period_us"] for f in figs) / 1000, 3)
            out[A_DEV_SM] = round(sum(f["device_sm"] for f in figs) / n, 3)
            if all(f["device_mem"] is not None for f in figs):
                out[A_DEV_MEM_UTIL] = round(sum(f["device_mem"] for f in figs) / n, 3)
            out[A_DEV_SAMPLES] = sum(f["device_samples"] for f in figs)
            preasons = [f["process_reason"] for f in figs if "process_reason" in f]
            if preasons:
                out[A_PROC_UNAVAILABLE] = preasons[0]
            else:
                out[A_SM] = round(sum(f["sm"] for f in figs) / n, 3)
                out[A_MEM_UTIL] = round(sum(f["mem"] for f in figs) / n, 3)
                out[A_PROC_SAMPLES] = sum(f["process_samples"] for f in figs)
        out.update(_memory(stream, used, start_ns, end_ns))
        return out


# ---- the enricher ----------------------------------------------------------------------

class GpuEnricher:
    """`ENRICHERS["gpu"]`: NVML samples of the target attributed to its spans.

    Live (`GpuEnricher(pid, opts)`): starts an `NvmlSampler` and waits a bounded time for NVML
    to open. Replay (`GpuEnricher.replay(stream)`): attributes a recorded stream, no NVML.
    """

    name = "gpu"

    def __init__(self, pid: int, opts: Any = None, *, init_timeout_s: float = 3.0, keep_raw: bool = False) -> None:
        from .nvml import NvmlSampler  # noqa: PLC0415

        self.pid = pid
        self.stream = GpuStream(pid, keep_raw=keep_raw, provenance={"kind": "recorded"})
        self.sampler: Optional[NvmlSampler] = NvmlSampler(pid, self.stream)
        self._counts = {"spans": 0, "util": 0, "util_unavailable": 0, "memory": 0}
        self._unavailable = ""
        self.sampler.start()
        if not self.sampler.ready.wait(init_timeout_s):
            self._unavailable = f"NVML did not answer within {init_timeout_s:g} s (nvmlInit blocked)"
            self.sampler.stop(0)  # should nvmlInit return later, the thread ends instead of sampling
        elif self.sampler.availability is not None and not self.sampler.availability.available:
            self._unavailable = self.sampler.availability.reason

    @classmethod
    def replay(cls, stream: GpuStream) -> GpuEnricher:
        e = cls.__new__(cls)
        e.pid, e.stream, e.sampler = stream.pid, stream, None
        e._counts = {"spans": 0, "util": 0, "util_unavailable": 0, "memory": 0}
        e._unavailable = ""
        return e

    def _degraded(self) -> str:
        """Why live samples stopped coming, or ""."""
        s = self.sampler
        if s is None:
            return ""
        if s.failure:
            return s.failure
        if s.last_poll_mono and time.monotonic() - s.last_poll_mono > STALL_S:
            return f"NVML sampler stalled: no poll completed for {time.monotonic() - s.last_poll_mono:.1f} s"
        return ""

    def poll(self) -> None:
        if self.sampler is not None and not self._unavailable:
            self.stream.prune(time.time_ns() - RETAIN_NS)

    def covered_until(self) -> int:
        if self._unavailable or self.sampler is None or self._degraded():
            return 1 << 63
        horizon = min(self.stream.sample_horizon_ns(), self.stream.last_poll_ns)
        return max(horizon, time.time_ns() - HOLD_MAX_NS)

    def finish(self) -> None:
        """At the end of a trace: wait (bounded) until samples past now have arrived, so the
        last spans are covered too."""
        if self._unavailable or self.sampler is None:
            return
        now = time.time_ns()
        deadline = time.monotonic() + FINISH_WAIT_S
        while time.monotonic() < deadline and not self._degraded():
            if min(self.stream.sample_horizon_ns(), self.stream.last_poll_ns) >= now:
                return
            time.sleep(0.02)

    def enrich(self, span: Span) -> Span:
        if self._unavailable:
            return span
        attrs = span_gpu(self.stream, span.start_ns, span.end_ns)
        why = self._degraded()
        if why and A_UTIL_UNAVAILABLE not in attrs and span.end_ns > self.stream.sample_horizon_ns():
            attrs = {k: v for k, v in attrs.items() if k in (A_DEVICES, A_UUIDS)}
            attrs[A_UTIL_UNAVAILABLE] = attrs[A_MEM_UNAVAILABLE] = why
        self._counts["spans"] += 1
        self._counts["util"] += A_DEV_SM in attrs
        self._counts["util_unavailable"] += A_UTIL_UNAVAILABLE in attrs
        self._counts["memory"] += A_MEM_START in attrs
        return replace(span, attributes={**span.attributes, **attrs})

    def summary(self) -> dict:
        if self._unavailable:
            return {"status": "unavailable", "reason": self._unavailable}
        st = self.stream
        with st.lock:
            devices = [{"index": d.index, "name": d.name, "uuid": d.uuid,
                        "used_by_target": d.first_seen_ns is not None,
                        "samples": {k: len(v.ts) for k, v in d.series.items()},
                        "process_samples": len(d.proc_sm.ts),
                        "errors": {k: dict(v) for k, v in d.errors.items()}} for d in st.devices.values()]
        out = {"status": "ok", "reason": "", "driver": st.driver, "clock": st.clock,
               "sample_period_ms": st.period_ms(), "devices": devices, **{f"{k}": v for k, v in self._counts.items()}}
        why = self._degraded() or st.clock_error
        if why:
            out["status"], out["reason"] = "degraded", why
        elif not any(d["used_by_target"] for d in devices):
            others = sorted(set().union(*(d.pids_seen for d in st.devices.values())))
            out["reason"] = (f"PID {self.pid} used no GPU (it appeared in no NVML process list"
                             + (f"; NVML listed PIDs {', '.join(map(str, others[:8]))}: another PID namespace?"
                                if others else "") + ")")
        return out

    def close(self) -> None:
        if self.sampler is not None:
            # A thread stuck inside NVML is left behind (daemon): it must not block detaching.
            self.sampler.stop(1.0)
