"""The tracing loop: any number of attached processes polled in one loop, one set of exporters.

`run_trace` (one process, to the end), the CLI's `--match`/several `--pid` and the Python
API (`tracer.api`, which runs this loop in a background thread) all drive a `TraceLoop`:

* every process gets its own `Capture` (its own BPF program: the target's PID and layout
  are compiled in) and its own enrichers; spans are stamped with that process's resource
  (`process.pid`, command line, executable, `container.id` when it runs in a container),
  so one file or one OTLP endpoint holds them all, one ResourceSpans per process;
* a process that exits is drained, detached and summed up on its own; the others go on;
* with a `ProcessMatcher` and `follow`, /proc is scanned every `follow_interval` seconds
  and new matching processes are attached while the others run.

Attaching compiles a BPF program (about a second on a loaded two-core machine, see
bench/everyday.py); while it compiles the loop polls no one, so a busy target's ring
buffer may fill: that shows as counted drops, never as silent loss.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from .access import require_tracing_access
from .discover.container import process_attributes
from .discover.process import find_interpreter
from .discover.scan import ProcessMatcher, start_time
from .errors import TraceError
from .export.otlp import OtlpHttp, OtlpJsonFile
from .otlpjson import Span
from .report.running_stats import RunningStats
from .report.stats import span_stats
from .session import CAPTURES, ENRICHERS, Capture, Enricher, TraceOptions, TraceResult, _HeldSpans, _status_line
from .spec import Spec
from .watch import TargetWatch, unseen_targets

LIVENESS_S = 0.1  # how often each process is checked for exit (and PID reuse)
# (pid) -> (the spec for that process, warnings about it)
SpecFor = Callable[[int], "tuple[Spec, list[str]]"]


@dataclass
class _Live:
    seq: int
    pid: int
    start_time: int | None
    capture: Capture
    resource: dict
    enrichers: list[Enricher]
    held: _HeldSpans
    mode: str
    t0: float
    attach_s: float
    warnings: list[str]
    spec: Spec
    watch: TargetWatch  # exit (by pidfd: a reused PID is never taken for the target) and exec
    spans: list[Span] = field(default_factory=list)
    running: RunningStats = field(default_factory=RunningStats)  # the table in fixed memory (keep_spans off)
    seen: set = field(default_factory=set)  # span and event names that occurred
    n_spans: int = 0
    checked: float = 0.0  # when liveness was last checked
    alive_ns: int = 0  # CLOCK_MONOTONIC: the last moment the target was known alive (cut spans end there)
    calls_at: float = 0.0  # when its call counts were last written to the calls log


@dataclass(frozen=True)
class FleetResult:
    """Every process one loop traced, in attach order, and what it left out."""

    targets: tuple[TraceResult, ...]
    stopped_by: str
    duration_s: float
    exporters: dict
    skipped: tuple[dict, ...] = ()  # matched, not a supported CPython: {pid, command_line, reason}
    failed: tuple[dict, ...] = ()  # matched, attach failed: {pid, command_line, reason}
    warnings: tuple[str, ...] = ()
    match: str | None = None

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(s for t in self.targets for s in t.spans)

    def for_pid(self, pid: int) -> TraceResult:
        for t in self.targets:
            if t.pid == pid:
                return t
        raise TraceError(f"process {pid} was not traced in this run")

    def to_dict(self) -> dict:
        return {"match": self.match, "stopped_by": self.stopped_by, "duration_s": self.duration_s,
                "processes": [t.to_dict() for t in self.targets], "skipped": list(self.skipped),
                "failed": list(self.failed), "warnings": list(self.warnings), "exporters": dict(self.exporters)}


def check_targets(pids) -> None:
    """Refuse a bad target (no access to it, gone, a zombie, not a supported CPython) in one
    line before anything is created: the exporters open their files when the loop is built."""
    for pid in pids:
        require_tracing_access(pid)
        find_interpreter(pid)


class TraceLoop:
    def __init__(self, spec: Spec | SpecFor, options: TraceOptions, *, sched_auto: bool = False,
                 matcher: ProcessMatcher | None = None, follow: bool = False, follow_interval: float = 0.5,
                 on_spans: Callable[[list[Span]], None] | None = None,
                 on_attached: Callable[[Capture], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        opts = options
        if opts.mode not in CAPTURES:
            raise TraceError(f"unknown capture mode {opts.mode!r} (known: {', '.join(sorted(CAPTURES))})")
        unknown = [n for n in opts.enrichers if n not in ENRICHERS]
        if unknown:
            raise TraceError(f"unknown enricher {unknown[0]!r} (known: {', '.join(sorted(ENRICHERS)) or 'none'})")
        if follow and matcher is None:
            raise TraceError("--follow needs --match REGEX (which processes to follow)")
        self.options = opts
        self.spec_for: SpecFor = spec if callable(spec) else (lambda _pid: (spec, []))  # type: ignore[assignment]
        self.sched_auto = sched_auto
        self.sched_unavailable = ""  # why with sched_auto the scheduler attributes are absent
        self.matcher = matcher
        self.follow = follow
        self.follow_interval = max(0.1, follow_interval)
        self.on_spans = on_spans
        self.on_attached = on_attached
        self.log = log
        self.stop_reason = ""
        self.t_start = time.monotonic()
        self.live: dict[int, _Live] = {}
        self.results: list[tuple[int, TraceResult]] = []
        self.failed: list[dict] = []
        self.warnings: list[str] = []
        self._seq = 0
        self._finished_spans = 0
        self._closed: FleetResult | None = None
        self.exporters: list = []
        # Opened here, like the exporters, so a bad path fails before anything attaches.
        self._calls_log = None
        if opts.calls_log:
            try:
                self._calls_log = open(opts.calls_log, "a", buffering=1)  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise TraceError(f"cannot write the calls log {opts.calls_log}: {e.strerror}") from None
        if opts.output:
            self.exporters.append(OtlpJsonFile(opts.output))
        if opts.otlp_endpoint:
            self.exporters.append(OtlpHttp(opts.otlp_endpoint))

    # ---- attaching --------------------------------------------------------------------
    def attach(self, pid: int) -> Capture:
        """Attach to one process (compile, probe, seed). Raises TraceError."""
        if pid in self.live:
            raise TraceError(f"process {pid} is already traced")
        t0 = time.monotonic()
        require_tracing_access(pid)  # before anything is loaded (tracer/access.py)
        started = start_time(pid)
        spec, warnings = self.spec_for(pid)
        watch = TargetWatch(pid)
        opts = self.options
        capture: Capture | None = None
        reason = ""
        if self.sched_auto and not self.sched_unavailable:
            try:
                capture = CAPTURES[opts.mode](pid, spec, replace(opts, with_sched=True))
                opts = replace(opts, with_sched=True)
            except TraceError as e:
                reason = str(e)
        try:
            if capture is None:
                capture = CAPTURES[opts.mode](pid, spec, replace(opts, with_sched=False) if self.sched_auto else opts)
                if reason:  # only now is it known that sched alone failed, not the process
                    self.sched_unavailable = reason
        except BaseException:
            watch.close()
            raise
        try:
            # Completed in place: a capture that stamps spans with its own resource dict then
            # stamps the full one, and _deliver has no per-span copy to make.
            capture.resource.update(process_attributes(pid))
            resource = capture.resource
            enrichers = [ENRICHERS[n](pid, opts) for n in opts.enrichers]
        except BaseException:
            capture.close()
            watch.close()
            raise
        self._seq += 1
        live = _Live(self._seq, pid, started, capture, resource, enrichers, _HeldSpans(enrichers), opts.mode, t0,
                     time.monotonic() - t0, [*warnings, *capture.warnings], spec, watch,
                     alive_ns=time.monotonic_ns())
        self.live[pid] = live
        if self.log:
            interp = capture.interpreter
            self.log(f"attached pid {pid} (CPython {interp.get('version', '?')}, {live.attach_s:.1f} s): "
                     f"{resource.get('process.command_line', '')}")
            for w in live.warnings:
                self.log(f"warning: pid {pid}: {w}")
        if self.on_attached is not None:
            self.on_attached(capture)
        return capture

    def attach_matching(self) -> int:
        """Attach to every new process the matcher finds; a failure is recorded, not raised."""
        if self.matcher is None:
            return 0
        n = 0
        for c in self.matcher.scan():
            if self.stop_reason:
                break
            try:
                self.attach(c.pid)
                n += 1
            except TraceError as e:
                self.failed.append({"pid": c.pid, "command_line": c.command_line, "reason": str(e)})
                if self.log:
                    self.log(f"not traced: pid {c.pid}: {e}")
        return n

    # ---- running ----------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Ask the loop to end (safe from another thread or a signal handler)."""
        if not self.stop_reason:
            self.stop_reason = reason

    def _deliver(self, t: _Live, done: list[Span]) -> None:
        if not done:
            return
        done = [s if s.resource is t.resource else replace(s, resource=t.resource) for s in done]
        t.n_spans += len(done)
        for ex in self.exporters:
            ex.export(done)
        for s in done:
            t.seen.add(s.name)
            t.seen.update(e.name for e in s.events)
        if self.options.keep_spans:
            t.spans.extend(done)
        else:
            t.running.add(s for s in done if "ophamin.cut" not in s.attributes)
        if self.on_spans is not None:
            self.on_spans(done)

    def step(self, timeout_ms: int = 100) -> None:
        """Poll every process once (about `timeout_ms` in all); detach those that exited."""
        if not self.live:
            time.sleep(timeout_ms / 1000)
            return
        per = max(0, timeout_ms // len(self.live))
        for t in list(self.live.values()):
            done = t.capture.poll(per)
            for e in t.enrichers:
                e.poll()
            self._deliver(t, t.held.release(done))
            now = time.monotonic()
            if self._calls_log is not None and now - t.calls_at >= self.options.calls_interval:
                t.calls_at = now
                t0 = time.time_ns()
                self._log_calls(t, t.capture.calls(), t0, final=False)
            if now - t.checked >= LIVENESS_S:  # a poll and a counter read per process: not on every step
                t.checked = now
                checked_ns = time.monotonic_ns()
                gone = t.watch.gone(t.capture.counters())
                if gone:
                    self._finish(t, gone)
                else:
                    t.alive_ns = checked_ns

    def run(self) -> str:
        """Trace until stopped, the duration is up, or (without follow) every process exited."""
        opts = self.options
        deadline = time.monotonic() + opts.duration if opts.duration else None
        tty = opts.status and sys.stderr.isatty()
        last_scan = last_status = time.monotonic()
        last_hits = 0
        while True:
            self.step(100)
            now = time.monotonic()
            if self.follow and not self.stop_reason and now - last_scan >= self.follow_interval:
                self.attach_matching()
                last_scan = time.monotonic()
            if self.stop_reason:
                break
            if deadline is not None and now >= deadline:
                self.stop("duration")
                break
            if not self.live and not self.follow:
                self.stop("target exited")
                break
            if tty and now - last_status > 0.5:
                hits = self._status(now - last_status, last_hits)
                last_status, last_hits = now, hits
        if tty:
            sys.stderr.write("\n")
        return self.stop_reason

    def _status(self, dt: float, last_hits: int) -> int:
        cs = [t.capture.counters() for t in self.live.values()]
        hits = sum(c["entry_hits"] + c["exit_hits"] for c in cs)
        spans = sum(t.n_spans for t in self.live.values()) + self._finished_spans
        rate = max(0, hits - last_hits) / dt if dt > 0 else 0.0
        if len(self.live) == 1 and not self.matcher:
            t = next(iter(self.live.values()))
            sys.stderr.write(_status_line(t.pid, cs[0], t.n_spans, rate))
        else:
            lost = sum(c["dropped"] for c in cs)
            sys.stderr.write(f"\r[ophamin-trace] {len(self.live)} processes  hits {hits:,} ({rate:,.0f}/s)  "
                             f"spans {spans:,}  lost {lost:,}   ")
        sys.stderr.flush()
        return hits

    def _log_calls(self, t: _Live, calls: dict, t0: int, final: bool) -> None:
        """One line of the calls log: each function's calls so far, read between `t0` and now (Unix
        ns): every call that ended before time_unix_nano is in, none that ended after read_end_unix_nano."""
        line = {"time_unix_nano": t0, "read_end_unix_nano": time.time_ns(), "pid": t.pid, "final": final,
                "status": calls.get("status")}
        if calls.get("status") == "ok":
            line["started"] = {f["name"]: f["started"] for f in calls["functions"]}
            line["calls"] = {f["name"]: f["calls"] for f in calls["functions"]}
            line["errors"] = {f["name"]: f["errors"] for f in calls["functions"] if f["errors"]}
        else:
            line["reason"] = calls.get("reason", "")
        self._calls_log.write(json.dumps(line) + "\n")

    # ---- detaching --------------------------------------------------------------------
    def _finish(self, t: _Live, reason: str) -> TraceResult:
        try:
            for e in t.enrichers:
                finish = getattr(e, "finish", None)  # optional: may wait (bounded) for its last data
                if finish is not None:
                    finish()
                e.poll()
            drained = t.capture.drain()  # the probes go first, so the counters are final
            checked_ns = time.monotonic_ns()
            if not t.watch.gone(t.capture.counters()):
                t.alive_ns = checked_ns  # the tracer stopped: the target lives on past detach
            why = reason if reason.startswith("target") else f"tracer stopped ({reason})"
            self._deliver(t, t.held.release(drained + t.capture.cut_spans(t.alive_ns, why), final=True))
            counters = t.capture.counters()
            t0 = time.time_ns()
            calls = t.capture.calls()
            if self._calls_log is not None:
                self._log_calls(t, calls, t0, final=True)
            losses = t.capture.losses()
            t.seen.update(losses.cut_at_attach, losses.orphan_events)
            # Called while traced, even if the ring dropped every span of it: no "never seen" warning.
            t.seen.update(f["name"] for f in calls.get("functions", ()) if f["started"] or f["calls"])
            stats = span_stats(s for s in t.spans if "ophamin.cut" not in s.attributes) if self.options.keep_spans \
                else t.running.stats()
            res = TraceResult(t.pid, t.capture.interpreter, tuple(t.spans), tuple(stats), losses, counters, reason,
                              time.monotonic() - t.t0, t.attach_s, (*t.warnings, *unseen_targets(t.spec, t.seen)),
                              {}, {e.name: e.summary() for e in t.enrichers}, t.mode, t.resource, calls)
        finally:
            self.live.pop(t.pid, None)
            for e in t.enrichers:
                e.close()
            t.capture.close()
            t.watch.close()
        self.results.append((t.seq, res))
        self._finished_spans += t.n_spans
        if self.log:
            self.log(f"detached pid {t.pid} ({reason}): {t.n_spans:,} spans, "
                     f"{counters['dropped']:,} ring-buffer drops")
        return res

    def close(self) -> FleetResult:
        """Detach every process still traced, flush and close the exporters. Idempotent."""
        if self._closed is not None:
            return self._closed
        reason = self.stop_reason or "stopped"
        err: BaseException | None = None
        for t in list(self.live.values()):
            try:
                self._finish(t, reason)
            except BaseException as e:  # noqa: BLE001 - detach the others first, then raise
                err = err or e
        exp_info = {}
        if self._calls_log is not None:
            self._calls_log.close()
            exp_info["calls_log"] = {"path": self.options.calls_log}
        for ex in self.exporters:
            ex.close()
            if isinstance(ex, OtlpHttp):
                exp_info["otlp_http"] = {"url": ex.url, "sent": ex.sent, "dropped": ex.dropped,
                                         "last_error": ex.last_error}
            else:
                exp_info["file"] = {"path": ex.path, "spans": ex.written}
        warnings = list(self.warnings)
        if self.sched_unavailable:
            warnings.append(f"scheduler attributes unavailable: {self.sched_unavailable}")
        self._closed = FleetResult(
            tuple(r for _, r in sorted(self.results, key=lambda x: x[0])), reason, time.monotonic() - self.t_start,
            exp_info, tuple(self.matcher.skipped) if self.matcher else (), tuple(self.failed), tuple(warnings),
            self.matcher.pattern if self.matcher else None)
        if err is not None:
            raise err
        return self._closed


@contextmanager
def stop_on_signals(loop: TraceLoop) -> Iterator[None]:
    """SIGINT and SIGTERM end the loop cleanly (main thread only: elsewhere, a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame) -> None:
        loop.stop(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
