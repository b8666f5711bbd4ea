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

from .access import require_tracing_access
from .assemble.spans import Assembler, Clock, Losses, resource_for
from .assemble.values import TypeAddrs
from .capture.engine import CaptureEngine
from .discover.elf import open_image
from .discover.process import find_interpreter
from .errors import TraceError
from .export.otlp import OtlpHttp, OtlpJsonFile
from .otlpjson import Span
from .report.running_stats import RunningStats
from .report.stats import SpanStats, span_stats
from .spec import Spec
from .watch import TargetWatch, unseen_targets


@dataclass(frozen=True)
class TraceOptions:
    output: str | None = None  # OTLP-JSON lines file
    otlp_endpoint: str | None = None  # OTLP/HTTP collector URL
    duration: float | None = None  # seconds; None = until stopped or the target exits
    status: bool = True  # live status line on a terminal
    mode: str = "exact"  # a key of CAPTURES
    with_sched: bool = False  # scheduler and memory attributes per span
    enrichers: tuple[str, ...] = ()  # keys of ENRICHERS, in order
    keep_spans: bool = True  # keep every span in the result (the API and tests read them); False: fixed memory

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
        return {"pid": self.pid, "interpreter": self.interpreter, "mode": self.mode,
                "spans": sum(s.count for s in self.stats) + sum(self.losses.cut_at_detach.values()),
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

    def drain(self) -> list[Span]: ...  # after the loop: stop the probes, read what the kernel still holds

    def counters(self) -> dict[str, int]: ...  # must include entry_hits, exit_hits, dropped

    def losses(self) -> Losses: ...

    def cut_spans(self, alive_mono_ns: int, reason: str) -> list[Span]: ...  # still open at the end, closed as cut

    def close(self) -> None: ...


class ExactCapture:
    """Exact mode: a probe at every entry and exit of Python frames, filtered in the kernel."""

    def __init__(self, pid: int, spec: Spec, opts: TraceOptions) -> None:
        self.pid = pid
        if opts.with_sched:
            # bpf/sched.c and tracer/correlate/ exist and are tested standalone; snapshotting
            # them from the capture handlers is not wired yet. Say so rather than half-work.
            raise TraceError("scheduler correlation per span is unavailable: not yet wired into capture "
                             "(see docs/correlation.md)")
        self.engine = CaptureEngine(pid, spec, with_sched=opts.with_sched)
        try:
            interp = self.engine.info.interp
            self.interpreter = interp.to_dict()
            self.resource = resource_for(spec, interp, pid)
            self.warnings = list(self.engine.info.warnings)
            self.assembler = Assembler(spec, pid, self.engine.info.layout,
                                       TypeAddrs.of(open_image(interp.host_path), interp.bias), Clock())
        except BaseException:
            self.engine.close()
            raise

    def poll(self, timeout_ms: int) -> list[Span]:
        return self.assembler.feed(self.engine.poll(timeout_ms))

    def drain(self) -> list[Span]:
        return self.assembler.feed(self.engine.finish())  # probes detached first: counters final

    def counters(self) -> dict[str, int]:
        return self.engine.counters()

    def losses(self) -> Losses:
        return self.assembler.losses()

    def cut_spans(self, alive_mono_ns: int, reason: str) -> list[Span]:
        return self.assembler.cut_spans(alive_mono_ns, reason)

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
    require_tracing_access(pid)  # before anything is written or loaded
    find_interpreter(pid)  # a bad target (gone, zombie, not CPython) is refused before an output file exists
    t_start = time.monotonic()
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    capture: Capture | None = None
    enrichers: list[Enricher] = []
    exporters: list = []
    watch: TargetWatch | None = None
    try:
        # Outputs first: a path that cannot be written fails before the target is touched.
        if opts.output:
            exporters.append(OtlpJsonFile(opts.output, {}))
        if opts.otlp_endpoint:
            exporters.append(OtlpHttp(opts.otlp_endpoint, {}))
        watch = TargetWatch(pid)
        capture = CAPTURES[opts.mode](pid, spec, opts)
        for ex in exporters:
            ex.resource = capture.resource
        enrichers = [ENRICHERS[n](pid, opts) for n in opts.enrichers]
        held = _HeldSpans(enrichers)
        attach_s = time.monotonic() - t_start
        if on_attached is not None:
            on_attached(capture)
        spans: list[Span] = []
        running = RunningStats()  # fixed memory, for runs that keep no spans
        seen: set[str] = set()
        n_spans = 0

        def deliver(done: list[Span]) -> None:
            nonlocal n_spans
            n_spans += len(done)
            for ex in exporters:
                ex.export(done)
            for s in done:
                seen.add(s.name)
                seen.update(e.name for e in s.events)
            if opts.keep_spans:
                spans.extend(done)
            else:
                running.add(s for s in done if "ophamin.cut" not in s.attributes)

        tty = opts.status and sys.stderr.isatty()
        last_status, last_hits = time.monotonic(), 0
        stopped_by = ""
        alive_ns = time.monotonic_ns()  # the last moment the target was known alive (cut spans end there)
        deadline = time.monotonic() + opts.duration if opts.duration else None
        while True:
            done = capture.poll(100)
            for e in enrichers:
                e.poll()
            deliver(held.release(done))
            checked_ns = time.monotonic_ns()
            if stop.reason:
                stopped_by = stop.reason
            elif deadline is not None and time.monotonic() >= deadline:
                stopped_by = "duration"
            else:
                stopped_by = watch.gone(capture.counters())
            if stopped_by:
                break
            alive_ns = checked_ns
            now = time.monotonic()
            if tty and now - last_status > 0.5:
                c = capture.counters()
                hits = c["entry_hits"] + c["exit_hits"]
                sys.stderr.write(_status_line(pid, c, n_spans, (hits - last_hits) / (now - last_status)))
                sys.stderr.flush()
                last_status, last_hits = now, hits
        for e in enrichers:
            e.poll()
        drained = capture.drain()
        checked_ns = time.monotonic_ns()
        if not watch.gone(capture.counters()):
            alive_ns = checked_ns  # stopped by a signal or the duration: the target lives on past detach
        reason = stopped_by if stopped_by.startswith("target") else f"tracer stopped ({stopped_by})"
        deliver(held.release(drained + capture.cut_spans(alive_ns, reason), final=True))
        counters = capture.counters()
        if tty:
            sys.stderr.write("\n")
        exp_info = {}
        for ex in exporters:
            ex.close()
            if isinstance(ex, OtlpHttp):
                exp_info["otlp_http"] = {"url": ex.url, "sent": ex.sent, "dropped": ex.dropped,
                                         "max_buffered": ex.max_buffered, "last_error": ex.last_error}
            else:
                exp_info["file"] = {"path": ex.path, "spans": ex.written}
        losses = capture.losses()
        seen.update(losses.cut_at_attach, losses.orphan_events)
        warnings = [*capture.warnings, *unseen_targets(spec, seen)]
        stats = span_stats(s for s in spans if "ophamin.cut" not in s.attributes) if opts.keep_spans \
            else running.stats()
        return TraceResult(pid, capture.interpreter, tuple(spans), tuple(stats), losses,
                           counters, stopped_by, time.monotonic() - t_start, attach_s,
                           tuple(warnings), exp_info, {e.name: e.summary() for e in enrichers}, opts.mode)
    finally:
        for e in enrichers:
            e.close()
        if capture is not None:
            capture.close()
        if watch is not None:
            watch.close()
        for ex in exporters:
            ex.close()  # idempotent; here for a run that failed before its normal close
        for s, h in old.items():
            signal.signal(s, h)


def launch(argv: list[str]) -> int:
    """Start a command for launch mode and wait until its interpreter is mapped."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

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
