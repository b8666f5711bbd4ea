"""OTLP-JSON: the OpenTelemetry file format (one ExportTraceServiceRequest per line).

One reader and one writer shared by every stage that touches span files: the in-process
emitter (which runs inside targets, so this module stays importable on Python 3.9 with no
third-party packages), the tracer's file exporter, parity and the reports.

Wire rules followed (OTLP/JSON spec): trace and span ids are lowercase hex, 64-bit integers
are decimal strings, enums are integers, attribute values are AnyValue objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
SPAN_KIND_INTERNAL = 1


class OtlpJsonError(ValueError):
    """A line that is not valid OTLP-JSON; the message names the file and line."""


@dataclass(frozen=True)
class SpanEvent:
    name: str
    time_ns: int
    attributes: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "time_ns": self.time_ns, "attributes": dict(self.attributes)}


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    name: str
    start_ns: int
    end_ns: int
    attributes: Dict[str, Any] = field(default_factory=dict)
    events: Tuple[SpanEvent, ...] = ()
    status_code: int = STATUS_UNSET
    status_message: str = ""
    resource: Dict[str, Any] = field(default_factory=dict)
    scope: str = ""

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def thread_id(self) -> Optional[int]:
        tid = self.attributes.get("thread.id")
        return int(tid) if tid is not None else None

    def to_dict(self) -> dict:
        return {
            "trace_id": self.trace_id, "span_id": self.span_id,
            "parent_span_id": self.parent_span_id, "name": self.name,
            "start_ns": self.start_ns, "end_ns": self.end_ns,
            "attributes": dict(self.attributes),
            "events": [e.to_dict() for e in self.events],
            "status_code": self.status_code, "status_message": self.status_message,
            "resource": dict(self.resource), "scope": self.scope,
        }


# ---- encoding -------------------------------------------------------------------------

def any_value(v: Any) -> dict:
    # bool before int: bool is an int subclass.
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [any_value(x) for x in v]}}
    if isinstance(v, dict):  # what the reader makes of a kvlistValue
        return {"kvlistValue": {"values": key_values(v)}}
    if v is None:
        return {}
    return {"stringValue": str(v)}


def key_values(attrs: Dict[str, Any]) -> List[dict]:
    return [{"key": k, "value": any_value(v)} for k, v in attrs.items()]


def span_to_otlp(s: Span) -> dict:
    out: Dict[str, Any] = {
        "traceId": s.trace_id,
        "spanId": s.span_id,
        "name": s.name,
        "kind": SPAN_KIND_INTERNAL,
        "startTimeUnixNano": str(s.start_ns),
        "endTimeUnixNano": str(s.end_ns),
        "attributes": key_values(s.attributes),
        "events": [
            {"timeUnixNano": str(e.time_ns), "name": e.name, "attributes": key_values(e.attributes)}
            for e in s.events
        ],
        "status": {"code": s.status_code, **({"message": s.status_message} if s.status_message else {})},
    }
    if s.parent_span_id:
        out["parentSpanId"] = s.parent_span_id
    return out


def encode_request(spans: Iterable[Span], resource: Dict[str, Any], scope: str,
                   scope_version: str = "") -> dict:
    """One ExportTraceServiceRequest holding spans that share a resource and a scope."""
    return {
        "resourceSpans": [{
            "resource": {"attributes": key_values(resource)},
            "scopeSpans": [{
                "scope": {"name": scope, **({"version": scope_version} if scope_version else {})},
                "spans": [span_to_otlp(s) for s in spans],
            }],
        }]
    }


def dumps_line(spans: Iterable[Span], resource: Dict[str, Any], scope: str,
               scope_version: str = "") -> str:
    """encode_request() as one compact JSON line, written as text directly: the tracer exports
    tens of thousands of spans a second, and building the dicts for json.dumps cost more than
    everything else it does per span. Same JSON value as json.dumps(encode_request(...))."""
    version = f',"version":{_q(scope_version)}' if scope_version else ""
    return ('{"resourceSpans":[{"resource":{"attributes":[' + ",".join(_kv(k, v) for k, v in resource.items())
            + ']},"scopeSpans":[{"scope":{"name":' + _q(scope) + version + '},"spans":['
            + ",".join(_span_json(s) for s in spans) + "]}]}]}\n")


_q = json.encoder.encode_basestring_ascii  # a JSON string literal (C-accelerated), as json.dumps writes it
_KV: Dict[tuple, str] = {}  # (key, type, value) -> its KeyValue JSON: span attributes repeat (thread, function)
_KV_MAX = 8192


def _any_json(v: Any) -> str:
    t = type(v)
    if t is bool:
        return '{"boolValue":true}' if v else '{"boolValue":false}'
    if t is int:
        return '{"intValue":"' + str(v) + '"}'
    if t is str:
        return '{"stringValue":' + _q(v) + "}"
    return json.dumps(any_value(v), separators=(",", ":"))


def _kv(k: str, v: Any) -> str:
    t = type(v)
    if t is str or t is int or t is bool:
        key = (k, t, v)
        out = _KV.get(key)
        if out is None:
            if len(_KV) >= _KV_MAX:
                _KV.clear()
            out = _KV[key] = '{"key":' + _q(k) + ',"value":' + _any_json(v) + "}"
        return out
    return '{"key":' + _q(k) + ',"value":' + _any_json(v) + "}"


def _span_json(s: Span) -> str:
    events = ",".join('{"timeUnixNano":"' + str(e.time_ns) + '","name":' + _q(e.name) + ',"attributes":['
                      + ",".join(_kv(k, v) for k, v in e.attributes.items()) + "]}" for e in s.events)
    status = '{"code":' + str(int(s.status_code)) + (',"message":' + _q(s.status_message) if s.status_message else "")
    parent = ',"parentSpanId":' + _q(s.parent_span_id) if s.parent_span_id else ""
    return ('{"traceId":' + _q(s.trace_id) + ',"spanId":' + _q(s.span_id) + ',"name":' + _q(s.name)
            + ',"kind":' + str(SPAN_KIND_INTERNAL) + ',"startTimeUnixNano":"' + str(int(s.start_ns))
            + '","endTimeUnixNano":"' + str(int(s.end_ns)) + '","attributes":['
            + ",".join(_kv(k, v) for k, v in s.attributes.items()) + '],"events":[' + events + '],"status":'
            + status + "}" + parent + "}")


# ---- decoding -------------------------------------------------------------------------

def value_of(v: dict) -> Any:
    if not isinstance(v, dict):
        raise OtlpJsonError(f"attribute value is not an object: {v!r}")
    # Each AnyValue kind has one JSON type: anything else is refused, not coerced
    # ("false" is not False, {} is not a string).
    if "stringValue" in v:
        return _typed(v["stringValue"], str, "stringValue")
    if "boolValue" in v:
        return _typed(v["boolValue"], bool, "boolValue")
    if "intValue" in v:
        return _int(v["intValue"], "intValue")
    if "doubleValue" in v:
        d = v["doubleValue"]
        try:
            if isinstance(d, bool) or not isinstance(d, (int, float, str)):
                raise TypeError
            return float(d)
        except (TypeError, ValueError):
            raise OtlpJsonError(f"doubleValue {d!r} is not a number") from None
    if "arrayValue" in v:
        return [value_of(x) for x in _list(_obj(v["arrayValue"], "arrayValue").get("values"), "values")]
    if "kvlistValue" in v:
        return attrs_of(_list(_obj(v["kvlistValue"], "kvlistValue").get("values"), "values"))
    if "bytesValue" in v:
        return _typed(v["bytesValue"], str, "bytesValue")
    return None


def _typed(v: Any, kind: type, what: str) -> Any:
    if not isinstance(v, kind):
        raise OtlpJsonError(f"{what} {v!r} is not a {'string' if kind is str else 'boolean'}")
    return v


def _int(v: Any, what: str) -> int:
    # int() alone accepts floats (truncating) and raises OverflowError on inf: neither is OTLP.
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise OtlpJsonError(f"{what} {v!r} is not an integer")
    try:
        return int(v)
    except ValueError:
        raise OtlpJsonError(f"{what} {v!r} is not an integer") from None


def _obj(v: Any, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise OtlpJsonError(f"{what} is not an object")
    return v


def _list(v: Any, what: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise OtlpJsonError(f"{what} is not a list")
    return v


def attrs_of(kvs: Any) -> Dict[str, Any]:
    if not isinstance(kvs, list):
        raise OtlpJsonError("attributes must be a list of {key, value}")
    out = {}
    for kv in kvs:
        if not isinstance(kv, dict) or "key" not in kv:
            raise OtlpJsonError(f"attribute without a key: {kv!r}")
        out[str(kv["key"])] = value_of(kv.get("value", {}))
    return out


def _hex_id(v: Any, width: int, what: str) -> str:
    s = str(v or "")
    if s and (len(s) != width or any(c not in "0123456789abcdefABCDEF" for c in s)):
        raise OtlpJsonError(f"{what} {s!r} is not {width} hex digits")
    return s.lower()


def _span_of(d: Any, resource: Dict[str, Any], scope: str) -> Span:
    if not isinstance(d, dict):
        raise OtlpJsonError("span is not an object")
    try:
        start = _int(d["startTimeUnixNano"], "startTimeUnixNano")
        end = _int(d["endTimeUnixNano"], "endTimeUnixNano")
        name = d["name"]
    except KeyError as e:
        raise OtlpJsonError(f"span lacks {e}") from None
    if not isinstance(name, str):
        raise OtlpJsonError("span name is not a string")
    events = []
    for e in _list(d.get("events"), "events"):
        if not isinstance(e, dict) or "name" not in e or "timeUnixNano" not in e:
            raise OtlpJsonError(f"span {name!r}: malformed event: {e!r}")
        events.append(SpanEvent(str(e["name"]), _int(e["timeUnixNano"], "timeUnixNano"),
                                attrs_of(e.get("attributes") or [])))
    status = d.get("status") or {}
    if not isinstance(status, dict):
        raise OtlpJsonError(f"span {name!r}: status is not an object")
    return Span(
        trace_id=_hex_id(d.get("traceId"), 32, "traceId"),
        span_id=_hex_id(d.get("spanId"), 16, "spanId"),
        parent_span_id=_hex_id(d.get("parentSpanId"), 16, "parentSpanId"),
        name=name, start_ns=start, end_ns=end,
        attributes=attrs_of(d.get("attributes") or []),
        events=tuple(events),
        status_code=_int(status.get("code", 0) or 0, "status code"),
        status_message=str(status.get("message", "") or ""),
        resource=resource, scope=scope,
    )


def decode_request(obj: Any) -> Iterator[Span]:
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceSpans"), list):
        raise OtlpJsonError("not an ExportTraceServiceRequest (no resourceSpans list)")
    for rs in obj["resourceSpans"]:
        if not isinstance(rs, dict):
            raise OtlpJsonError("resourceSpans entry is not an object")
        resource = attrs_of(_obj(rs.get("resource"), "resource").get("attributes") or [])
        for ss in _list(rs.get("scopeSpans"), "scopeSpans"):
            if not isinstance(ss, dict):
                raise OtlpJsonError("scopeSpans entry is not an object")
            scope = str(_obj(ss.get("scope"), "scope").get("name", ""))
            for d in _list(ss.get("spans"), "spans"):
                yield _span_of(d, resource, scope)


def read_spans(path: str) -> List[Span]:
    """Every span in an OTLP-JSON lines file, in file order. Raises OtlpJsonError."""
    spans: List[Span] = []
    # Bytes, decoded per line, so that a non-UTF-8 line is reported with its number.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise OtlpJsonError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                spans.extend(decode_request(json.loads(line)))
            except json.JSONDecodeError as e:
                raise OtlpJsonError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            except RecursionError:
                raise OtlpJsonError(f"{path}:{lineno}: nested too deeply") from None
            except OtlpJsonError as e:
                raise OtlpJsonError(f"{path}:{lineno}: {e}") from None
    return spans
