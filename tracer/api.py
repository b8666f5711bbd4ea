"""The Python API: trace processes from a program (Ophamin, a notebook, a test) rather than
from the command line.

    from tracer import api

    with api.attach(pid, spec="reference") as session:
        os.kill(pid, signal.SIGUSR1)          # e.g. let the substrate start its batch
        for span in session.spans():          # finished spans, as they complete,
            print(span.name, span.duration_ns)  # until the target exits or stop()
    session.per_step_timing   # {"takwin.step2_encode": {"median_ms", "p10_ms", "p90_ms", "count"}, ...}
    session.profile           # Ophamin's BatchResourceProfile, attribution_kind="per_cycle"

`attach` returns once the probes are in (a bad PID or spec raises `TraceError` there);
tracing then runs in a background thread, so the caller is free to drive its workload.
Leaving the `with` block stops tracing, drains what the kernel still holds and detaches;
the results are read after it. `launch(argv, ...)` starts a command first and traces it
the same way. Runnable example: examples/ophamin_api.py; reference: docs/api.md.
"""

from __future__ import annotations

import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import replace
from typing import Dict, Iterator, Optional, Sequence, Union

from .correlate.profile import BatchResourceProfile, build_profile
from .discover.launch import launch as _launch
from .errors import TraceError
from .loop import FleetResult, TraceLoop, check_targets
from .otlpjson import Span
from .report.stats import span_stats, step_timing_ms
from .session import TraceOptions
from .spec import Spec
from .spec.adhoc import SpecRequest

SpecLike = Union[str, "os.PathLike[str]", Spec, None]
_END = object()


class TraceSession:
    """One tracing run over one or more processes. Thread-safe to read; results after the end."""

    def __init__(self, loop: TraceLoop, pids: Sequence[int]) -> None:
        self._loop = loop
        self.pids: tuple[int, ...] = tuple(pids)
        self._queue: queue.Queue[object] = queue.Queue()
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        self._result: Optional[FleetResult] = None
        loop.on_spans = self._queue.put
        self._thread = threading.Thread(target=self._run, name="ophamin-trace", daemon=True)

    # ---- the background loop ----------------------------------------------------------
    def _start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop.run()
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result/__exit__
            self._error = e
        finally:
            try:
                self._result = self._loop.close()
            except BaseException as e:  # noqa: BLE001
                self._error = self._error or e
            self._done.set()
            self._queue.put(_END)

    # ---- while running ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def sched_unavailable(self) -> str:
        """Why spans carry no scheduler/memory attributes ("" when they do or were not asked)."""
        return self._loop.sched_unavailable

    def spans(self, timeout: Optional[float] = None) -> Iterator[Span]:
        """Finished spans in completion order, each once, until the run ends (the targets
        exit, `stop()`, or the duration). With `timeout`, also ends after that many
        seconds without a span."""
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return
            if item is _END:
                self._queue.put(_END)  # a later call ends at once too
                return
            yield from item  # type: ignore[misc]

    def stop(self, wait: bool = True) -> None:
        """End the run: drain, detach, close the exporters."""
        self._loop.stop("stopped")
        if wait:
            self.wait()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the run to end (targets exited, stop, duration); True once it has."""
        return self._done.wait(timeout)

    # ---- after the end ----------------------------------------------------------------
    @property
    def result(self) -> FleetResult:
        """Every process's TraceResult (spans, stats, losses, counters), in attach order."""
        if not self._done.is_set():
            raise TraceError("the trace is still running: stop() or wait() first")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _spans_of(self, pid: Optional[int]) -> tuple[Span, ...]:
        res = self.result
        if pid is not None:
            return res.for_pid(pid).spans
        if len(res.targets) > 1:
            raise TraceError(f"{len(res.targets)} processes were traced: name one (pid=...)")
        return res.spans

    @property
    def per_step_timing(self) -> Dict[str, Dict[str, float]]:
        """Per span name: median_ms, p10_ms, p90_ms, count (every span; one process traced)."""
        return self.per_step_timing_for(None)

    @property
    def profile(self) -> BatchResourceProfile:
        """Ophamin's BatchResourceProfile, attribution_kind="per_cycle" (one process traced)."""
        return self.profile_for(None)

    def per_step_timing_for(self, pid: Optional[int]) -> Dict[str, Dict[str, float]]:
        return step_timing_ms(span_stats(self._spans_of(pid)))

    def profile_for(self, pid: Optional[int]) -> BatchResourceProfile:
        """What `ophamin-trace profile FILE` prints for this process's spans. Without the
        scheduler attributes every measured field is None, and each cycle's `unavailable`
        (and `sched_unavailable` here) says why."""
        return build_profile(self._spans_of(pid))


def _session(pids: Sequence[int], spec: SpecLike, functions: Sequence[str], modules: Sequence[str],
             sched: Optional[bool], options: TraceOptions) -> TraceSession:
    request = SpecRequest(os.fspath(spec) if isinstance(spec, os.PathLike) else spec, tuple(functions),
                          tuple(modules))
    base = request.base()
    opts = replace(options, with_sched=bool(sched), status=False)
    check_targets(pids)
    loop = TraceLoop(lambda pid: request.for_pid(pid, base), opts, sched_auto=sched is None)
    try:
        for pid in pids:
            loop.attach(pid)
    except BaseException:
        loop.close()
        raise
    return TraceSession(loop, pids)


@contextmanager
def attach(pid: Union[int, Sequence[int]], spec: SpecLike = None, *, functions: Sequence[str] = (),
           modules: Sequence[str] = (), sched: Optional[bool] = None, output: Optional[str] = None,
           otlp_endpoint: Optional[str] = None, duration: Optional[float] = None,
           enrichers: Sequence[str] = (), mode: str = "exact") -> Iterator[TraceSession]:
    """Trace running processes for the duration of the `with` block.

    pid: one PID or several. spec: a built-in spec name ("reference", "kimera"), a TOML
    path or a `Spec`; None means "reference" unless `functions`/`modules` name the targets
    ("module:qualname[=span.name]" / dotted prefixes, as -f and --module). sched: True
    requires the scheduler/memory attributes, False leaves them out, None (default) asks
    for them and, where they are unavailable, traces without them and says why in
    `session.sched_unavailable` and in the profile's `unavailable`. output / otlp_endpoint:
    also export the spans (OTLP-JSON file, OTLP/HTTP collector).
    """
    pids = [pid] if isinstance(pid, int) else list(pid)
    if not pids:
        raise TraceError("attach: no PID given")
    opts = TraceOptions(output=output, otlp_endpoint=otlp_endpoint, duration=duration,
                        enrichers=tuple(enrichers), mode=mode)
    session = _session(pids, spec, functions, modules, sched, opts)
    session._start()
    try:
        yield session
    finally:
        session.stop()


@contextmanager
def launch(argv: Sequence[str], spec: SpecLike = None, **kwargs) -> Iterator[TraceSession]:
    """Start `argv` and trace it like `attach` (same keyword arguments); the run ends when
    the command exits or the `with` block does. The command is held (its interpreter mapped,
    no Python run yet) until the probes are in, so its very first calls are traced too; it
    keeps running if the block ends first."""
    launched = _launch(list(argv))
    try:
        with attach(launched.pid, spec, **kwargs) as session:
            launched.resume()
            yield session
    finally:
        if launched.stopped:
            launched.kill()  # started here and never traced: not left behind
