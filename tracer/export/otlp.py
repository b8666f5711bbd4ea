"""OTLP exporters: an OTLP-JSON lines file (the Collector's file format) and OTLP/HTTP
with JSON encoding to a collector, buffered within a stated bound, drops counted.

One exporter serves every process of a run: a span's own `resource` (set by the tracing
loop, one per process) picks its ResourceSpans; the resource given at construction is
for spans that carry none."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import deque

from ..errors import TraceError
from ..otlpjson import Span, dumps_line, encode_request

SCOPE = "ophamin-trace"


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
        # O_NOFOLLOW: never write through a symlink planted where the output should go.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise TraceError(f"cannot write {path}: {e.strerror}") from None
        self._f = os.fdopen(fd, "w", encoding="utf-8")
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
        self._f.close()


class OtlpHttp:
    """POST /v1/traces as JSON. Keeps at most `max_buffered` spans while the collector is
    unreachable; older spans beyond that are dropped and counted."""

    def __init__(self, endpoint: str, resource: dict | None = None, max_buffered: int = 50_000) -> None:
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/v1/traces") else "/v1/traces")
        self.resource = resource or {}
        self.buffer: deque[Span] = deque()
        self.max_buffered = max_buffered
        self.dropped = 0
        self.sent = 0
        self.last_error = ""

    def export(self, spans: list[Span]) -> None:
        self.buffer.extend(spans)
        while len(self.buffer) > self.max_buffered:
            self.buffer.popleft()
            self.dropped += 1
        self.flush()

    def flush(self) -> None:
        while self.buffer:
            batch = [self.buffer[i] for i in range(min(512, len(self.buffer)))]
            body = json.dumps(encode_grouped(batch, self.resource)).encode()
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    r.read()
            except (urllib.error.URLError, OSError) as e:
                self.last_error = str(getattr(e, "reason", e))
                return  # keep them buffered; tracing goes on
            for _ in batch:
                self.buffer.popleft()
            self.sent += len(batch)

    def close(self) -> None:
        self.flush()
        self.dropped += len(self.buffer)
        self.buffer.clear()
