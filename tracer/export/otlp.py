"""OTLP exporters: an OTLP-JSON lines file (the Collector's file format) and OTLP/HTTP
with JSON encoding to a collector, buffered within a stated bound, drops counted.

One exporter serves every process of a run: a span's own `resource` (set by the tracing
loop, one per process) picks its ResourceSpans; the resource given at construction is
for spans that carry none."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import deque

from ..errors import TraceError
from ..otlpjson import Span, dumps_line, encode_request
from .safe_file import open_output

SCOPE = "ophamin-trace"
MAX_BUFFERED = 50_000  # spans held for an unreachable collector; older ones beyond are dropped and counted
BATCH = 512
SEND_TIMEOUT_S = 2.0
CLOSE_TIMEOUT_S = 5.0  # how long close() waits for the last sends before counting the rest dropped
MAX_BACKOFF_S = 8.0


def by_resource(spans: list[Span], default: dict) -> list[tuple[dict, list[Span]]]:
    """Spans grouped by resource, in first-seen order (spans of one process share one dict)."""
    groups: dict[int, tuple[dict, list[Span]]] = {}
    for s in spans:
        r = s.resource or default
        groups.setdefault(id(r), (r, []))[1].append(s)
    return list(groups.values())


def encode_grouped(spans: list[Span], default: dict) -> dict:
    """One ExportTraceServiceRequest with a ResourceSpans per resource."""
    return {"resourceSpans": [rs for r, group in by_resource(spans, default)
                              for rs in encode_request(group, r, SCOPE)["resourceSpans"]]}


class OtlpJsonFile:
    def __init__(self, path: str, resource: dict | None = None) -> None:
        # open_output: no symlink, no FIFO/device, no hard link, never world-writable (safe_file.py).
        self._f = open(open_output(path), "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.path = path
        self.resource = resource or {}
        self.written = 0

    def export(self, spans: list[Span]) -> None:
        if spans:
            for resource, group in by_resource(spans, self.resource):
                self._f.write(dumps_line(group, resource, SCOPE))
            self._f.flush()
            self.written += len(spans)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class OtlpHttp:
    """POST /v1/traces as JSON, from a sender thread, so a slow or unreachable collector never
    stalls the tracing loop (which must keep draining the kernel's ring buffer).

    At most `max_buffered` spans wait (in flight included); beyond that the oldest are dropped
    and counted. After `close()`, every span given to `export()` is counted exactly once, in
    `sent` or in `dropped`."""

    def __init__(self, endpoint: str, resource: dict | None = None, max_buffered: int = MAX_BUFFERED) -> None:
        u = urllib.parse.urlsplit(endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise TraceError(f"--otlp-endpoint {endpoint!r}: not an http:// or https:// URL")
        base = endpoint.rstrip("/")
        self.url = base if base.endswith("/v1/traces") else base + "/v1/traces"
        self.resource = resource or {}
        self.max_buffered = max_buffered
        self.buffer: deque[Span] = deque()
        self._inflight = 0
        self.dropped = 0
        self.sent = 0
        self.exported = 0
        self.failures = 0
        self.last_error = ""
        self._closing = False
        self._abandoned = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ophamin-otlp-http", daemon=True)
        self._thread.start()

    def export(self, spans: list[Span]) -> None:
        if not spans:
            return
        with self._cv:
            self.exported += len(spans)
            self.buffer.extend(spans)
            while self.buffer and len(self.buffer) + self._inflight > self.max_buffered:
                self.buffer.popleft()
                self.dropped += 1
            self._cv.notify()

    def _post(self, batch: list[Span]) -> str:
        body = json.dumps(encode_grouped(batch, self.resource)).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=SEND_TIMEOUT_S) as r:
                r.read()
        except (urllib.error.URLError, OSError, ValueError) as e:
            return str(getattr(e, "reason", e)) or type(e).__name__
        return ""

    def _run(self) -> None:
        backoff = 0.0
        while True:
            with self._cv:
                while not self.buffer and not self._closing:
                    self._cv.wait()
                if not self.buffer:
                    return
                batch = [self.buffer.popleft() for _ in range(min(BATCH, len(self.buffer)))]
                self._inflight = len(batch)
            error = self._post(batch)
            with self._cv:
                self._inflight = 0
                if self._abandoned:
                    return  # close() already counted these as dropped
                if not error:
                    self.sent += len(batch)
                    backoff = 0.0
                    continue
                self.failures += 1
                self.last_error = error
                if self._closing:
                    # One try per batch while closing; what cannot be sent now is dropped.
                    self.dropped += len(batch) + len(self.buffer)
                    self.buffer.clear()
                    return
                self.buffer.extendleft(reversed(batch))
                while self.buffer and len(self.buffer) > self.max_buffered:
                    self.buffer.popleft()
                    self.dropped += 1
                backoff = min(MAX_BACKOFF_S, backoff * 2 or 0.25)
                self._cv.wait(backoff)  # woken early by close()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout_s)
        with self._cv:
            if self._thread.is_alive():
                self._abandoned = True
                self.dropped += len(self.buffer) + self._inflight
                self.buffer.clear()
                self._inflight = 0
