"""The in-substrate telemetry emitter: the hooks a substrate calls to describe its own work.

This is the emitter the Kimera-side proposal describes. ophamin-trace is judged against the
spans it writes (parity), so it has to be exact, cheap when off, and importable inside any
target: it runs on Python 3.9-3.13 and needs nothing but the standard library until the
OpenTelemetry emitter is actually constructed.

- `NoOpEmitter` (the default): every call returns at once; `span()` hands back one shared
  context manager, so a wired substrate allocates nothing per span.
- `OpenTelemetryEmitter(export_to=PATH)`: the OpenTelemetry SDK, with a small exporter that
  appends each finished span as one OTLP-JSON line (tracer.otlpjson) to PATH.
- `emitter_from_env()`: the OpenTelemetry emitter when $KIMERA_TELEMETRY_EMITTER_PATH names a
  file, else the no-op one, as the proposal specifies.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any, ContextManager, Dict, Optional, Protocol, runtime_checkable

from . import otlpjson

ENV_VAR = "KIMERA_TELEMETRY_EMITTER_PATH"
SERVICE_NAME = "takwin-reference"
SCOPE_NAME = "kimera.telemetry.emitter"
TELEMETRY_SOURCE = "hooks"  # tells parity these spans came from in-process hooks, not eBPF


class EmitterUnavailable(RuntimeError):
    """The selected emitter cannot run here (e.g. the OpenTelemetry SDK is not installed)."""


@runtime_checkable
class SpanHandle(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


@runtime_checkable
class TelemetryEmitter(Protocol):
    """What a substrate calls. `span(name, attributes)` is a context manager yielding a SpanHandle;
    attributes given here are set before the span's start is stamped."""

    def span(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> ContextManager[SpanHandle]: ...

    def event(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> None: ...


# ---- no-op ------------------------------------------------------------------------------

class _NoOpSpan:
    """Context manager and span handle in one object, shared by every no-op span."""

    __slots__ = ()

    def __enter__(self) -> _NoOpSpan:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        return None


_NOOP_SPAN = _NoOpSpan()


class NoOpEmitter:
    """The default: records nothing and allocates nothing per call."""

    __slots__ = ()
    kind = "noop"

    def span(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> _NoOpSpan:
        return _NOOP_SPAN

    def event(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> None:
        return None

    def shutdown(self) -> None:
        return None


# ---- OpenTelemetry ----------------------------------------------------------------------

def _load_sdk() -> Dict[str, Any]:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
    except ImportError as e:
        raise EmitterUnavailable(
            f"OpenTelemetryEmitter needs the OpenTelemetry SDK (package opentelemetry-sdk), "
            f"which this interpreter cannot import: {e}"
        ) from None
    return {
        "trace": trace, "Resource": Resource, "TracerProvider": TracerProvider,
        "SimpleSpanProcessor": SimpleSpanProcessor, "SpanExporter": SpanExporter,
        "SpanExportResult": SpanExportResult,
    }


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def readable_to_span(rs: Any) -> otlpjson.Span:
    """An SDK ReadableSpan as the project's frozen otlpjson.Span."""
    ctx = rs.context
    parent = rs.parent
    status = rs.status
    code = getattr(status.status_code, "value", 0) if status is not None else 0
    events = tuple(
        otlpjson.SpanEvent(e.name, int(e.timestamp), dict(e.attributes or {}))
        for e in (rs.events or ())
    )
    resource = dict(rs.resource.attributes) if rs.resource is not None else {}
    scope = rs.instrumentation_scope.name if rs.instrumentation_scope is not None else ""
    return otlpjson.Span(
        trace_id=_hex(ctx.trace_id, 32),
        span_id=_hex(ctx.span_id, 16),
        parent_span_id=_hex(parent.span_id, 16) if parent is not None else "",
        name=rs.name,
        start_ns=int(rs.start_time),
        end_ns=int(rs.end_time),
        attributes=dict(rs.attributes or {}),
        events=events,
        status_code=int(code),
        status_message=(status.description or "") if status is not None else "",
        resource=resource,
        scope=scope,
    )


def _make_exporter_class(sdk: Dict[str, Any]) -> type:
    base = sdk["SpanExporter"]
    result = sdk["SpanExportResult"]

    class OtlpJsonFileExporter(base):  # type: ignore[misc, valid-type]
        """Appends each export batch as one OTLP-JSON line; flushed per batch so a reader
        (parity, a tracer watching the file) never sees half a line after a crash."""

        def __init__(self, path: str) -> None:
            self._path = path
            self._lock = threading.Lock()
            self._file: Any = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives until shutdown

        def export(self, spans: Any) -> Any:
            by_key: Dict[Any, list] = {}
            for rs in spans:
                s = readable_to_span(rs)
                key = (tuple(sorted(s.resource.items())), s.scope)
                by_key.setdefault(key, []).append(s)
            with self._lock:
                if self._file is None:
                    return result.FAILURE
                for (res, scope), group in by_key.items():
                    self._file.write(otlpjson.dumps_line(group, dict(res), scope))
                self._file.flush()
            return result.SUCCESS

        def shutdown(self) -> None:
            with self._lock:
                if self._file is not None:
                    self._file.close()
                    self._file = None

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            with self._lock:
                if self._file is not None:
                    self._file.flush()
            return True

    return OtlpJsonFileExporter


class _OtelSpanCM:
    """Opens an SDK span as current, stamped with the thread that ran it."""

    __slots__ = ("_emitter", "_name", "_attributes", "_cm")

    def __init__(self, emitter: OpenTelemetryEmitter, name: str, attributes: Optional[Dict[str, Any]]) -> None:
        self._emitter = emitter
        self._name = name
        self._attributes = attributes
        self._cm: Any = None

    def __enter__(self) -> Any:
        t = threading.current_thread()
        attributes = {"thread.id": threading.get_native_id(), "thread.name": t.name}
        if self._attributes:
            attributes.update(self._attributes)
        self._cm = self._emitter._tracer.start_as_current_span(self._name, attributes=attributes, end_on_exit=False)
        span = self._cm.__enter__()
        # Stamp the start after the SDK's own work, right before control returns to the
        # wrapped call: the SDK runs tens of Python calls here, and under an exact tracer
        # each is slowed by a probe, which would otherwise widen every span (see
        # docs/parity.md). The SDK offers no public way to set the start later.
        span._start_time = time.time_ns()
        return span

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        end = time.time_ns()  # first thing on the way out, for the same reason
        cm, self._cm = self._cm, None
        span = self._emitter._trace.get_current_span()
        try:
            return cm.__exit__(exc_type, exc, tb)
        finally:
            span.end(end_time=end)


class OpenTelemetryEmitter:
    """Spans through the OpenTelemetry SDK, written to `export_to` as OTLP-JSON lines.

    The provider is private to this emitter (the global one is left alone, so a substrate
    that has its own OpenTelemetry setup is not disturbed). Events attach to the span that is
    current on the calling thread; with none current they are dropped, as the SDK does.
    """

    kind = "otel"

    def __init__(self, export_to: str, service_name: str = SERVICE_NAME) -> None:
        sdk = _load_sdk()
        self._trace = sdk["trace"]
        self.export_to = str(export_to)
        resource = sdk["Resource"].create({
            "service.name": service_name,
            "process.pid": os.getpid(),
            "telemetry.source": TELEMETRY_SOURCE,
        })
        self._exporter = _make_exporter_class(sdk)(self.export_to)
        # shutdown_on_exit registers the SDK's own atexit hook; ours below also covers a
        # provider the SDK version does not register.
        self._provider = sdk["TracerProvider"](resource=resource)
        self._provider.add_span_processor(sdk["SimpleSpanProcessor"](self._exporter))
        self._tracer = self._provider.get_tracer(SCOPE_NAME)
        self._closed = False
        atexit.register(self.shutdown)

    def span(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> _OtelSpanCM:
        return _OtelSpanCM(self, name, attributes)

    def event(self, name: str, attributes: Optional[Dict[str, Any]] = None) -> None:
        now = time.time_ns()
        current = self._trace.get_current_span()
        current.add_event(name, attributes=dict(attributes) if attributes else None, timestamp=now)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._provider.force_flush()
        self._provider.shutdown()


def emitter_from_env(environ: Optional[Dict[str, str]] = None) -> Any:
    """OpenTelemetryEmitter(export_to=$KIMERA_TELEMETRY_EMITTER_PATH) if set, else NoOpEmitter."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_VAR, "")
    if path:
        return OpenTelemetryEmitter(export_to=path)
    return NoOpEmitter()
