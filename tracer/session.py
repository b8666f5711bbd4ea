"""One tracing run, end to end: discover -> plan -> capture -> assemble -> correlate -> export.

The CLI and the Python API both call `run_trace`. It always detaches and flushes, whether
it stops on Ctrl-C, SIGTERM, a duration, or the target's exit, and reports every loss.

Two seams keep the stages apart (OpenTelemetry-SDK style: a narrow interface, the work
behind it, plug-ins registered by name):

* a `Capture` turns one target's probe hits into finished spans (`ExactCapture`: the
  entry/exit engine plus the span assembler; other modes register in `CAPTURES`);
* an `Enricher` adds attributes to finished spans from data sampled beside the capture (GPU
  samples, for instance). Spans are held back until every enricher's data covers their end,
  so a streaming exporter never sends a span whose attributes are still incomplete.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .assemble.spans import Assembler, Clock, Losses, resource_for
from .assemble.values import TypeAddrs
from .capture.engine import CaptureEngine
from .correlate.sched_spans import SchedSpans
from .discover.elf import open_image
from .discover.process import is_alive
from .errors import TraceError
from .export.otlp import OtlpHttp, OtlpJsonFile
from .otlpjson import Span
from .report.stats import SpanStats, span_stats
from .spec import Spec


@dataclass(frozen=True)
class TraceOptions:
    output: str | None = None  # OTLP-JSON lines file
    otlp_endpoint: str | None = None  # OTLP/HTTP collector URL
    duration: float | None = None  # seconds; None = until stopped or the target exits
    status: bool = True  # live status line on a terminal
    mode: str = "exact"  # a key of CAPTURES
    with_sched: bool = False  # scheduler and memory attributes per span
    enrichers: tuple[str, ...] = ()  # keys of ENRICHERS, in order
    keep_spans: bool = True  # keep every span in the result (the API and tests read them)

    def to_dict(self) -> dict:
        return {"output": self.output, "otlp_endpoint": self.otlp_endpoint, "duration": self.duration,
                "mode": self.mode, "with_sched": self.with_sched, "enrichers": list(self.enrichers)}


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

    def to_dict(self) -> dict:
        return {"pid": self.pid, "interpreter": self.interpreter, "mode": self.mode, "spans": len(self.spans),
                "stats": [s.to_dict() for s in self.stats], "losses": self.losses.to_dict(),
                "counters": dict(self.counters), "stopped_by": self.stopped_by,
                "duration_s": self.duration_s, "attach_s": self.attach_s,
                "warnings": list(self.warnings), "exporters": dict(self.exporters),
                "enrichers": dict(self.enrichers)}


# ---- the capture seam -------------------------------------------------------------------

class Capture(Protocol):
    """One attached target. Built attached; `close()` detaches (idempotent)."""

    pid: int
    interpreter: dict  # Interpreter.to_dict()
    resource: dict  # OpenTelemetry resource attributes of its spans
    warnings: list[str]

    def poll(self, timeout_ms: int) -> list[Span]: ...  # spans finished since the last call

    def drain(self) -> list[Span]: ...  # after the loop: what is still buffered in the kernel

    def counters(self) -> dict[str, int]: ...  # must include entry_hits, exit_hits, dropped

    def losses(self) -> Losses: ...

    def close(self) -> None: ...


class ExactCapture:
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
                                       sched_attrs=self.sched.attributes if self.sched else None)
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

    def drain(self) -> list[Span]:
        return self.assembler.feed(self.engine.drain())

    def counters(self) -> dict[str, int]:
        c = self.engine.counters()
        if self.sched is not None:
            c.update(self.sched.counters())
        return c

    def losses(self) -> Losses:
        return self.assembler.losses()

    def close(self) -> None:
        self.engine.close()


# Capture modes by name: a factory (pid, spec, options) -> an attached Capture.
CAPTURES: dict[str, Callable[[int, Spec, TraceOptions], Capture]] = {"exact": ExactCapture}


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


# Enrichers by name: a factory (pid, options) -> an Enricher.
ENRICHERS: dict[str, Callable[[int, TraceOptions], Enricher]] = {}


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

class _Stop:
    def __init__(self) -> None:
        self.reason = ""

    def __call__(self, signum, _frame) -> None:
        self.reason = signal.Signals(signum).name


def _status_line(pid: int, c: dict[str, int], spans: int, rate: float) -> str:
    return (f"\r[ophamin-trace] pid {pid}  hits {c['entry_hits'] + c['exit_hits']:,} ({rate:,.0f}/s)  "
            f"spans {spans:,}  lost {c['dropped']:,}   ")


def run_trace(pid: int, spec: Spec, *, on_attached: Callable[[Capture], None] | None = None,
              options: TraceOptions | None = None, **kwargs) -> TraceResult:
    """Attach to `pid`, trace until stopped, detach. Keyword arguments are TraceOptions fields."""
    opts = options or TraceOptions(**kwargs)
    if opts.mode not in CAPTURES:
        raise TraceError(f"unknown capture mode {opts.mode!r} (known: {', '.join(sorted(CAPTURES))})")
    unknown = [n for n in opts.enrichers if n not in ENRICHERS]
    if unknown:
        raise TraceError(f"unknown enricher {unknown[0]!r} (known: {', '.join(sorted(ENRICHERS)) or 'none'})")
    t_start = time.monotonic()
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    capture: Capture | None = None
    enrichers: list[Enricher] = []
    exporters: list = []
    try:
        capture = CAPTURES[opts.mode](pid, spec, opts)
        if opts.output:
            exporters.append(OtlpJsonFile(opts.output, capture.resource))
        if opts.otlp_endpoint:
            exporters.append(OtlpHttp(opts.otlp_endpoint, capture.resource))
        enrichers = [ENRICHERS[n](pid, opts) for n in opts.enrichers]
        held = _HeldSpans(enrichers)
        attach_s = time.monotonic() - t_start
        if on_attached is not None:
            on_attached(capture)
        spans: list[Span] = []
        n_spans = 0

        def deliver(done: list[Span]) -> None:
            nonlocal n_spans
            n_spans += len(done)
            for ex in exporters:
                ex.export(done)
            if opts.keep_spans:
                spans.extend(done)

        tty = opts.status and sys.stderr.isatty()
        last_status, last_hits = time.monotonic(), 0
        stopped_by = ""
        deadline = time.monotonic() + opts.duration if opts.duration else None
        while True:
            done = capture.poll(100)
            for e in enrichers:
                e.poll()
            deliver(held.release(done))
            if stop.reason:
                stopped_by = stop.reason
            elif deadline is not None and time.monotonic() >= deadline:
                stopped_by = "duration"
            elif not is_alive(pid):
                stopped_by = "target exited"
            if stopped_by:
                break
            now = time.monotonic()
            if tty and now - last_status > 0.5:
                c = capture.counters()
                hits = c["entry_hits"] + c["exit_hits"]
                sys.stderr.write(_status_line(pid, c, n_spans, (hits - last_hits) / (now - last_status)))
                sys.stderr.flush()
                last_status, last_hits = now, hits
        for e in enrichers:
            e.poll()
        deliver(held.release(capture.drain(), final=True))
        counters = capture.counters()
        if tty:
            sys.stderr.write("\n")
        exp_info = {}
        for ex in exporters:
            ex.close()
            if isinstance(ex, OtlpHttp):
                exp_info["otlp_http"] = {"url": ex.url, "sent": ex.sent, "dropped": ex.dropped,
                                         "last_error": ex.last_error}
            else:
                exp_info["file"] = {"path": ex.path, "spans": ex.written}
        return TraceResult(pid, capture.interpreter, tuple(spans), tuple(span_stats(spans)), capture.losses(),
                           counters, stopped_by, time.monotonic() - t_start, attach_s,
                           tuple(capture.warnings), exp_info, {e.name: e.summary() for e in enrichers}, opts.mode)
    finally:
        for e in enrichers:
            e.close()
        if capture is not None:
            capture.close()
        for s, h in old.items():
            signal.signal(s, h)


def launch(argv: list[str]) -> int:
    """Start a command for launch mode and wait until its interpreter is mapped."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    from .discover.process import find_interpreter  # noqa: PLC0415

    try:
        p = subprocess.Popen(argv)
    except OSError as e:
        raise TraceError(f"cannot start {argv[0]}: {e.strerror}") from None
    for _ in range(500):
        try:
            find_interpreter(p.pid)
            return p.pid
        except TraceError:
            if p.poll() is not None:
                raise TraceError(f"{argv[0]} exited (status {p.returncode}) before it could be traced") from None
            time.sleep(0.01)
    os.kill(p.pid, signal.SIGTERM)
    raise TraceError(f"{argv[0]} did not start a supported CPython interpreter within 5 s")
