"""OTLP exporters: an OTLP-JSON lines file (the Collector's file format) and OTLP/HTTP
with JSON encoding to a collector, buffered within a stated bound, drops counted."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import deque

from ..errors import TraceError
from ..otlpjson import Span, dumps_line, encode_request

SCOPE = "ophamin-trace"


class OtlpJsonFile:
    def __init__(self, path: str, resource: dict) -> None:
        # O_NOFOLLOW: never write through a symlink planted where the output should go.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise TraceError(f"cannot write {path}: {e.strerror}") from None
        self._f = os.fdopen(fd, "w", encoding="utf-8")
        self.path = path
        self.resource = resource
        self.written = 0

    def export(self, spans: list[Span]) -> None:
        if spans:
            self._f.write(dumps_line(spans, self.resource, SCOPE))
            self._f.flush()
            self.written += len(spans)

    def close(self) -> None:
        self._f.close()


class OtlpHttp:
    """POST /v1/traces as JSON. Keeps at most `max_buffered` spans while the collector is
    unreachable; older spans beyond that are dropped and counted."""

    def __init__(self, endpoint: str, resource: dict, max_buffered: int = 50_000) -> None:
        self.url = endpoint.rstrip("/") + ("" if endpoint.rstrip("/").endswith("/v1/traces") else "/v1/traces")
        self.resource = resource
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
            body = json.dumps(encode_request(batch, self.resource, SCOPE)).encode()
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
