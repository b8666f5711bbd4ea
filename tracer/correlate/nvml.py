"""NVML beside the capture: is it usable here, and a sampler thread that records what it says.

Everything that touches the driver is here; `tracer.correlate.gpu` turns what is recorded into
span attributes and never calls NVML itself.

- `nvml_availability()` answers "can GPU data be had on this machine, and if not, why" in one
  line. `doctor` and the `gpu` enricher both use it (through `open_nvml`), so they always
  give the same reason.
- `NvmlSampler` runs in a daemon thread of the tracer process. About every 50 ms it reads, on
  every GPU: the device's utilisation samples (`nvmlDeviceGetSamples`, SM and memory), the
  per-process utilisation samples (`nvmlDeviceGetProcessUtilization`), each time passing the
  newest timestamp it has already seen (`lastSeenTimeStamp`) so NVML returns only fresh samples
  rather than a rolling average, and the target's GPU memory (`nvmlDeviceGetComputeRunningProcesses`).
  Records keep NVML's own field names and units (`tracer.correlate.gpu.GpuStream`).

NVML calls can block (a wedged driver, a GPU falling off the bus). The tracer's main loop never
calls NVML: the sampler does, in its own thread, and the enricher only reads what the thread
stored and notices when the thread stops making progress. `nvml_availability()` bounds its wait.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

POLL_S = 0.05  # several polls per NVML sample period (1/6 s at the shortest)
MEMORY_EVERY = 2  # read the process list every 2nd poll (100 ms)
AVAILABILITY_TIMEOUT_S = 5.0
# Sample types read with nvmlDeviceGetSamples, by the constant's name in pynvml.
SAMPLE_TYPES = ("NVML_GPU_UTILIZATION_SAMPLES", "NVML_MEMORY_UTILIZATION_SAMPLES")
# nvmlValue_t member for each nvmlValueType_t (NVML_VALUE_TYPE_DOUBLE = 0, ... UNSIGNED_SHORT = 6).
VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


@dataclass(frozen=True)
class NvmlAvailability:
    available: bool
    reason: str  # "" when available; else one line saying why not
    driver: Optional[str] = None
    devices: Tuple[Dict[str, Any], ...] = ()  # {index, name, uuid}

    def to_dict(self) -> dict:
        return {"available": self.available, "reason": self.reason, "driver": self.driver,
                "devices": [dict(d) for d in self.devices]}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def init_failure_reason(nvml: Any, e: BaseException) -> str:
    """One line for an nvmlInit failure, naming the cause a user can act on."""
    err = getattr(nvml, "NVMLError", None)
    if err is None or not isinstance(e, err):
        return f"nvmlInit failed: {type(e).__name__}: {e}"
    by_class = (("NVMLError_LibraryNotFound", "no NVIDIA driver: libnvidia-ml.so.1 not found"),
                ("NVMLError_DriverNotLoaded", "NVIDIA driver not loaded (NVML: Driver Not Loaded)"),
                ("NVMLError_NoPermission", "no permission to use NVML (NVML: Insufficient Permissions)"),
                ("NVMLError_LibRmVersionMismatch", "NVML library and kernel driver versions differ "
                                                   "(NVML: RM has detected an NVML/RM version mismatch)"))
    for cls, text in by_class:
        c = getattr(nvml, cls, None)
        if c is not None and isinstance(e, c):
            return text
    return f"nvmlInit failed (NVML: {e})"


@dataclass
class NvmlSession:
    """An initialised NVML and the handles of every GPU; `close()` shuts NVML down."""

    nvml: Any
    availability: NvmlAvailability
    handles: List[Any] = field(default_factory=list)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a failed shutdown changes nothing reported
            self.nvml.nvmlShutdown()


def open_nvml() -> Tuple[NvmlAvailability, Optional[NvmlSession]]:
    """Initialise NVML and list the GPUs. May block as long as the driver does: call it from a
    thread whose wait is bounded (`nvml_availability`, `NvmlSampler`)."""
    try:
        import pynvml as nvml  # noqa: PLC0415 - nvidia-ml-py; optional at run time
    except ImportError as e:
        return NvmlAvailability(False, f"nvidia-ml-py is not installed (import pynvml: {e})"), None
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - any failure here means: no GPU data, say why
        return NvmlAvailability(False, init_failure_reason(nvml, e)), None
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        handles, devices = [], []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            handles.append(h)
            devices.append({"index": i, "name": _text(nvml.nvmlDeviceGetName(h)),
                            "uuid": _text(nvml.nvmlDeviceGetUUID(h))})
    except Exception as e:  # noqa: BLE001
        NvmlSession(nvml, NvmlAvailability(False, "")).close()
        return NvmlAvailability(False, f"NVML query failed: {type(e).__name__}: {e}"), None
    if not devices:
        NvmlSession(nvml, NvmlAvailability(False, "")).close()
        return NvmlAvailability(False, f"no NVIDIA GPU found (driver {driver})", driver), None
    avail = NvmlAvailability(True, "", driver, tuple(devices))
    return avail, NvmlSession(nvml, avail, handles)


def _bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    box: list = []
    th = threading.Thread(target=lambda: box.append(fn()), name=f"ophamin-{what}", daemon=True)
    th.start()
    th.join(timeout_s)
    return box[0] if box else None


def nvml_availability(timeout_s: float = AVAILABILITY_TIMEOUT_S) -> NvmlAvailability:
    """Whether NVML works here, with the driver and GPUs, or one line saying why not."""
    def probe() -> NvmlAvailability:
        avail, session = open_nvml()
        if session is not None:
            session.close()
        return avail

    got = _bounded(probe, timeout_s, "nvml-probe")
    if got is None:
        return NvmlAvailability(False, f"NVML did not answer within {timeout_s:g} s (nvmlInit blocked)")
    return got


# ---- NVML structures -> records (NVML's field names and units) --------------------------

def sample_record(sample: Any, value_type: int) -> dict:
    """A `c_nvmlSample_t` as {timeStamp, sampleValue: {<nvmlValue_t member>: value}}."""
    member = VALUE_MEMBERS[value_type] if 0 <= value_type < len(VALUE_MEMBERS) else "uiVal"
    return {"timeStamp": int(sample.timeStamp), "sampleValue": {member: getattr(sample.sampleValue, member)}}


def process_utilization_record(sample: Any) -> dict:
    """A `c_nvmlProcessUtilizationSample_t` as a dict of its fields."""
    return {name: int(getattr(sample, name)) for name, _ in sample._fields_}


def process_info_record(info: Any) -> dict:
    """A process of `nvmlDeviceGetComputeRunningProcesses` (pynvml's friendly object of
    `c_nvmlProcessInfo_t`); `usedGpuMemory` is None where NVML says not available."""
    return {k: v for k, v in vars(info).items()}


def _error_name(nvml: Any, e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if not isinstance(e, nvml.NVMLError) else str(e)


class NvmlSampler:
    """Reads NVML in a daemon thread into a `GpuStream` (see module docstring).

    `ready` is set once NVML is open (or failed to open: `availability` says which).
    `last_poll_mono` is the monotonic time of the last completed poll: a value that stops
    moving while the thread is alive means an NVML call is blocked.
    """

    def __init__(self, pid: int, stream: Any, poll_s: float = POLL_S) -> None:
        self.pid = pid
        self.stream = stream
        self.poll_s = poll_s
        self.ready = threading.Event()
        self.availability: Optional[NvmlAvailability] = None
        self.failure = ""  # set if the sampler stopped on an error after starting
        self.last_poll_mono = 0.0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ophamin-nvml", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 1.0) -> bool:
        """Ask the thread to stop; False if it is still inside an NVML call after timeout_s."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ---- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        avail, session = open_nvml()
        self.availability = avail
        if session is None:
            self.ready.set()
            return
        try:
            self._sample(session)
        except Exception as e:  # noqa: BLE001 - the sampler must never take tracing down
            self.failure = f"NVML sampler stopped: {type(e).__name__}: {e}"
            self.ready.set()
        finally:
            session.close()

    def _sample(self, session: NvmlSession) -> None:
        nvml = session.nvml
        types = [(n, getattr(nvml, n)) for n in SAMPLE_TYPES]
        stream = self.stream
        for d in session.availability.devices:
            stream.add_device(d["index"], d["uuid"], d["name"])
        stream.set_driver(session.availability.driver)
        # lastSeenTimeStamp per (device, query), on NVML's clock. The first device query asks
        # for the whole buffer (0) once, to learn which clock NVML stamps with; after that
        # only samples newer than the newest seen are asked for.
        last: Dict[Tuple[int, str], int] = {}
        t_start_ns = time.time_ns()
        self._learn_clock(session, types, last, t_start_ns)
        self.ready.set()
        while not self._stop.is_set():
            self.polls += 1
            for i, h in enumerate(session.handles):
                for name, st in types:
                    self._read_samples(nvml, h, i, name, st, last)
                self._read_process_utilization(nvml, h, i, last)
                if self.polls % MEMORY_EVERY == 1:
                    self._read_processes(nvml, h, i)
            stream.mark_poll(time.time_ns())
            self.last_poll_mono = time.monotonic()
            self._stop.wait(self.poll_s)

    def _learn_clock(self, session: NvmlSession, types: list, last: Dict[Tuple[int, str], int],
                     t_start_ns: int) -> None:
        nvml, stream = session.nvml, self.stream
        newest = 0
        for h in session.handles:
            for _name, st in types:
                try:
                    _vt, samples = nvml.nvmlDeviceGetSamples(h, st, 0)
                except nvml.NVMLError:
                    continue
                if samples:
                    newest = max(newest, max(int(s.timeStamp) for s in samples))
        if newest:
            stream.set_clock(newest, time.time_ns(), time.monotonic_ns())
        # Start every query just before the tracer started: samples older than that describe
        # no span, and asking from 0 would return the driver's whole history. With no sample
        # yet (clock unknown) ask from 0; the clock is learnt from the first samples that come.
        start_us = stream.to_nvml_us(t_start_ns - 2_000_000_000) if stream.clock_known() else 0
        for i in range(len(session.handles)):
            for name, _ in types:
                last[(i, name)] = start_us
            last[(i, "process")] = start_us

    def _read_samples(self, nvml: Any, h: Any, i: int, name: str, st: int, last: dict) -> None:
        try:
            vt, samples = nvml.nvmlDeviceGetSamples(h, st, last[(i, name)])
        except nvml.NVMLError as e:
            if e.value != nvml.NVML_ERROR_NOT_FOUND:  # NOT_FOUND: nothing new since lastSeen
                self.stream.add_error(i, "nvmlDeviceGetSamples/" + name, _error_name(nvml, e))
            return
        recs = [sample_record(s, vt) for s in samples if int(s.timeStamp) > last[(i, name)]]
        if recs:
            last[(i, name)] = max(r["timeStamp"] for r in recs)
            if not self.stream.clock_known():
                self.stream.set_clock(last[(i, name)], time.time_ns(), time.monotonic_ns())
            self.stream.add_samples(i, name, vt, recs)

    def _read_process_utilization(self, nvml: Any, h: Any, i: int, last: dict) -> None:
        try:
            samples = nvml.nvmlDeviceGetProcessUtilization(h, last[(i, "process")])
        except nvml.NVMLError as e:
            # NOT_FOUND: no process had a sample since lastSeen. pynvml raises NVMLError(SUCCESS)
            # when the size query already succeeds, which means the same: no samples.
            if e.value not in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_SUCCESS):
                self.stream.add_error(i, "nvmlDeviceGetProcessUtilization", _error_name(nvml, e))
            return
        fresh = [s for s in samples if int(s.timeStamp) > last[(i, "process")]]
        if fresh:
            # lastSeenTimeStamp is the newest sample of any process: the next call then returns
            # only what is newer, for every process.
            last[(i, "process")] = max(int(s.timeStamp) for s in fresh)
            self.stream.note_pids(i, [int(s.pid) for s in fresh])
            mine = [process_utilization_record(s) for s in fresh if int(s.pid) == self.pid]
            if mine:
                self.stream.add_process_utilization(i, mine)

    def _read_processes(self, nvml: Any, h: Any, i: int) -> None:
        t0 = time.time_ns()
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
        except nvml.NVMLError as e:
            self.stream.add_error(i, "nvmlDeviceGetComputeRunningProcesses", _error_name(nvml, e))
            return
        t1 = time.time_ns()
        self.stream.note_pids(i, [int(p.pid) for p in procs])
        # Only the target's entries are kept: other processes' memory describes no span.
        self.stream.add_processes(i, self.polls, (t0 + t1) // 2,
                                  [process_info_record(p) for p in procs if int(p.pid) == self.pid])
