"""One tracing run, end to end: discover -> plan -> capture -> assemble -> correlate -> export.

`run_trace` traces one process to the end; the loop behind it (`tracer/loop.py`) also runs
several processes at once (`--match`, several `--pid`) and feeds the Python API
(`tracer/api.py`). It always detaches and flushes, whether it stops on Ctrl-C, SIGTERM, a
duration, or the target's exit, and reports every loss.

Two seams keep the stages apart (OpenTelemetry-SDK style: a narrow interface, the work
behind it, plug-ins registered by name):

* a `Capture` turns one target's probe hits into finished spans (`ExactCapture`: the
  entry/exit engine plus the span assembler; other modes register in `CAPTURES`);
* an `Enricher` adds attributes to finished spans from data sampled beside the capture (GPU
  samples, for instance). Spans are held back until every enricher's data covers their end,
  so a streaming exporter never sends a span whose attributes are still incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from .assemble.samples import SampleAssembler
from .assemble.spans import Assembler, Clock, Losses, resource_for
from .assemble.values import TypeAddrs
from .capture.calls import calls_summary, calls_unavailable
from .capture.engine import CaptureEngine
from .capture.sampler import DEFAULT_HZ, SampleEngine
from .correlate.gpu import GpuEnricher
from .correlate.sched_spans import SchedSpans
from .discover.elf import open_image
from .otlpjson import Span
from .report.stats import SpanStats
from .spec import Spec


@dataclass(frozen=True)
class TraceOptions:
    output: str | None = None  # OTLP-JSON lines file
    otlp_endpoint: str | None = None  # OTLP/HTTP collector URL
    duration: float | None = None  # seconds; None = until stopped or the target exits
    status: bool = True  # live status line on a terminal
    mode: str = "exact"  # a key of CAPTURES
    hz: int = DEFAULT_HZ  # sampled mode: samples per second per CPU
    with_sched: bool = False  # scheduler and memory attributes per span
    enrichers: tuple[str, ...] = ()  # keys of ENRICHERS, in order
    keep_spans: bool = True  # keep every span in the result (the API and tests read them); False: fixed memory
    calls_log: str | None = None  # JSON lines: the kernel's per-function call counts, every calls_interval s
    calls_interval: float = 1.0

    def to_dict(self) -> dict:
        return {"output": self.output, "otlp_endpoint": self.otlp_endpoint, "duration": self.duration,
                "mode": self.mode, **({"hz": self.hz} if self.mode == "sampled" else {}),
                "with_sched": self.with_sched, "enrichers": list(self.enrichers),
                **({"calls_log": self.calls_log, "calls_interval": self.calls_interval} if self.calls_log else {})}


@dataclass(frozen=True)
class TraceResult:
    pid: int
    interpreter: dict
    spans: tuple[Span, ...]
    stats: tuple[SpanStats, ...]
    losses: Losses
    counters: dict
    stopped_by: str
    duration_s: float
    attach_s: float
    warnings: tuple[str, ...] = field(default=())
    exporters: dict = field(default_factory=dict)
    enrichers: dict = field(default_factory=dict)  # name -> its summary (status, reason, figures)
    mode: str = "exact"
    resource: dict = field(default_factory=dict)  # the OpenTelemetry resource of its spans
    calls: dict = field(default_factory=dict)  # the kernel's count of every call (capture/calls.py)

    def to_dict(self) -> dict:
        return {"pid": self.pid, "interpreter": self.interpreter, "mode": self.mode,
                "spans": sum(s.count for s in self.stats) + sum(self.losses.cut_at_detach.values()),
                "resource": dict(self.resource),
                "stats": [s.to_dict() for s in self.stats], "losses": self.losses.to_dict(),
                "counters": dict(self.counters), "stopped_by": self.stopped_by,
                "duration_s": self.duration_s, "attach_s": self.attach_s,
                "warnings": list(self.warnings), "exporters": dict(self.exporters),
                "enrichers": dict(self.enrichers), "calls": dict(self.calls)}


# ---- the capture seam -------------------------------------------------------------------

class Capture(Protocol):
    """One attached target. Built attached; `close()` detaches (idempotent)."""

    pid: int
    interpreter: dict  # Interpreter.to_dict()
    resource: dict  # OpenTelemetry resource attributes of its spans (the loop may complete it in place)
    warnings: list[str]

    def poll(self, timeout_ms: int) -> list[Span]: ...  # spans finished since the last call

    def drain(self) -> list[Span]: ...  # after the loop: stop the probes, read what the kernel still holds

    def counters(self) -> dict[str, int]: ...  # must include entry_hits, exit_hits, dropped

    def calls(self) -> dict: ...  # the kernel's count of every call (tracer/capture/calls.py), or unavailable

    def losses(self) -> Losses: ...

    def cut_spans(self, alive_mono_ns: int, reason: str) -> list[Span]: ...  # still open at the end, closed as cut

    def close(self) -> None: ...


class _Assembled:
    """What every mode shares: an engine that stops and detaches, an assembler that keeps the
    open spans and the losses."""

    engine: CaptureEngine | SampleEngine
    assembler: Assembler | SampleAssembler

    def drain(self) -> list[Span]:
        return self.assembler.feed(self.engine.finish())  # probes detached first: counters final

    def losses(self) -> Losses:
        return self.assembler.losses()

    def cut_spans(self, alive_mono_ns: int, reason: str) -> list[Span]:
        return self.assembler.cut_spans(alive_mono_ns, reason)

    def close(self) -> None:
        self.engine.close()


class ExactCapture(_Assembled):
    """Exact mode: a probe at every entry and exit of Python frames, filtered in the kernel."""

    def __init__(self, pid: int, spec: Spec, opts: TraceOptions) -> None:
        self.pid = pid
        self.engine = CaptureEngine(pid, spec, with_sched=opts.with_sched)
        try:
            interp = self.engine.info.interp
            self.interpreter = interp.to_dict()
            self.resource = resource_for(spec, interp, pid)
            self.warnings = list(self.engine.info.warnings)
            # --sched: entry/exit snapshots of the span's thread -> ophamin.* attributes.
            self.sched = SchedSpans(self.engine.bpf) if opts.with_sched else None
            self.assembler = Assembler(spec, pid, self.engine.info.layout,
                                       TypeAddrs.of(open_image(interp.host_path), interp.bias), Clock(),
                                       sched_attrs=self.sched.attributes if self.sched else None,
                                       resource=self.resource)
        except BaseException:
            self.engine.close()
            raise

    def poll(self, timeout_ms: int) -> list[Span]:
        events = self.engine.poll(timeout_ms)
        if self.sched is None:
            return self.assembler.feed(events)
        # One more pass reads the event ring before the RSS ring: every RSS sample taken
        # before the last exit event is in when that span is assembled.
        spans = self.assembler.feed(events + self.engine.drain())
        self.sched.prune(self.assembler.open.values())
        return spans

    def counters(self) -> dict[str, int]:
        c = self.engine.counters()
        if self.sched is not None:
            c.update(self.sched.counters())
        return c

    def calls(self) -> dict:
        return calls_summary(self.engine.call_stats())



class SampledCapture(_Assembled):
    """Sampled mode: no probe in the interpreter; each target thread's Python stack is walked
    in the kernel `hz` times a second while it runs, and whenever it leaves a CPU
    (tracer/capture/sampler.py); spans are estimated from the samples
    (tracer/assemble/samples.py), with their boundary uncertainty as attributes."""

    def __init__(self, pid: int, spec: Spec, opts: TraceOptions) -> None:
        self.pid = pid
        self.engine = SampleEngine(pid, spec, opts.hz)
        try:
            interp = self.engine.info.interp
            self.interpreter = interp.to_dict()
            self.resource = resource_for(spec, interp, pid)
            self.warnings = list(self.engine.info.warnings)
            if opts.with_sched:
                self.warnings.append("--sched attributes need exact mode; sampled spans carry their time "
                                     "off CPU as ophamin.off_cpu_ns")
            self.assembler = SampleAssembler(spec, pid, Clock(), self.resource)
            self.assembler.seed(self.engine.seed_stacks, self.engine.seed_ns)
        except BaseException:
            self.engine.close()
            raise

    def poll(self, timeout_ms: int) -> list[Span]:
        spans = self.assembler.feed(self.engine.poll(timeout_ms))
        return spans + self.assembler.end_threads(self.engine.live_tids())

    def counters(self) -> dict[str, int]:
        c = self.engine.counters()
        # The loop's status line and summary read these names.
        c.update(entry_hits=c["samples"], exit_hits=c["switch_outs"])
        return c

    def calls(self) -> dict:
        return calls_unavailable("sampled mode places no probe where calls begin and end")


# Capture modes by name: a factory (pid, spec, options) -> an attached Capture.
CAPTURES: dict[str, Callable[[int, Spec, TraceOptions], Capture]] = {"exact": ExactCapture,
                                                                    "sampled": SampledCapture}


# ---- the enricher seam ------------------------------------------------------------------

class Enricher(Protocol):
    """Adds attributes to finished spans from data sampled beside the capture.

    A capability that is missing (no GPU, no driver) must not stop tracing: the factory
    still returns an enricher whose `summary()` says `unavailable` and why, and which
    leaves spans as they are.
    """

    name: str

    def poll(self) -> None: ...  # called about every 100 ms from the tracing loop

    def covered_until(self) -> int: ...  # Unix ns up to which its data is complete

    def enrich(self, span: Span) -> Span: ...

    def summary(self) -> dict: ...  # {"status": "ok" | "unavailable", "reason": str, ...}

    def close(self) -> None: ...

    # Optional: `finish()`, called once when capture stops, before the last spans are
    # released; it may wait (bounded) for data that covers them.


# Enrichers by name: a factory (pid, options) -> an Enricher.
ENRICHERS: dict[str, Callable[[int, TraceOptions], Enricher]] = {"gpu": GpuEnricher}


class _HeldSpans:
    """Finished spans wait here until every enricher has data past their end."""

    def __init__(self, enrichers: list[Enricher]) -> None:
        self.enrichers = enrichers
        self.held: list[Span] = []

    def release(self, spans: list[Span], final: bool = False) -> list[Span]:
        if not self.enrichers:
            return spans
        self.held.extend(spans)
        if final:
            ready, self.held = self.held, []
        else:
            horizon = min(e.covered_until() for e in self.enrichers)
            ready = [s for s in self.held if s.end_ns <= horizon]
            self.held = [s for s in self.held if s.end_ns > horizon]
        for e in self.enrichers:
            ready = [e.enrich(s) for s in ready]
        return ready


# ---- the run ----------------------------------------------------------------------------

def _status_line(pid: int, c: dict[str, int], spans: int, rate: float) -> str:
    return (f"\r[ophamin-trace] pid {pid}  hits {c['entry_hits'] + c['exit_hits']:,} ({rate:,.0f}/s)  "
            f"spans {spans:,}  lost {c['dropped']:,}   ")


def run_trace(pid: int, spec: Spec, *, on_attached: Callable[[Capture], None] | None = None,
              options: TraceOptions | None = None, **kwargs) -> TraceResult:
    """Attach to `pid`, trace until stopped, detach. Keyword arguments are TraceOptions fields.
    The loop itself (several processes, streaming) is `tracer.loop.TraceLoop`."""
    from .loop import TraceLoop, check_targets, stop_on_signals  # noqa: PLC0415 - loop.py imports this module

    check_targets([pid])
    loop = TraceLoop(spec, options or TraceOptions(**kwargs), on_attached=on_attached)
    try:
        with stop_on_signals(loop):
            loop.attach(pid)
            loop.run()
    finally:
        fleet = loop.close()
    res = fleet.targets[0]
    return replace(res, exporters=fleet.exporters, duration_s=fleet.duration_s)

