"""Fuzzing the two parsers that read what users and other programs hand us: the trace spec
(TOML) and OTLP-JSON span files. Whatever the input, the only exception is the parser's own
error type (SpecError, OtlpJsonError), whose message is one line; never a crash of another kind.

Derandomized (a fixed example sequence per test), so CI is deterministic; each test still
runs hundreds of generated inputs, most of them close to valid (structure-aware strategies),
where the interesting bugs are.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.errors import SpecError
from tracer.otlpjson import OtlpJsonError, decode_request, dumps_line, encode_request, read_spans
from tracer.spec import parse_spec

FUZZ = settings(max_examples=400, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _one_line(e: Exception) -> None:
    assert str(e) and "\n" not in str(e).strip(), repr(str(e))


# ---- the spec parser --------------------------------------------------------------------

def _check_spec(text: str) -> None:
    try:
        spec = parse_spec(text, "fuzz.toml")
    except SpecError as e:
        _one_line(e)
        return
    # Accepted: it must be a usable spec.
    assert spec.targets
    assert len({t.function for t in spec.targets}) == len(spec.targets)
    for t in spec.targets:
        assert t.kind in ("span", "event") and t.name
        assert ":" in t.function
        spec.to_dict()


@FUZZ
@given(st.text())
def test_spec_any_text(text):
    _check_spec(text)


_ident = st.text(string.ascii_letters + "_", min_size=1, max_size=8)
_funcish = st.one_of(
    st.builds(lambda m, q: f"{m}:{q}", st.lists(_ident, min_size=1, max_size=3).map(".".join),
              st.lists(st.one_of(_ident, st.just("<locals>")), min_size=1, max_size=3).map(".".join)),
    st.text(max_size=20))
_scalar = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=12), _funcish)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(v), repr(v))
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # a TOML basic string is a JSON string for these purposes


_valid_func = st.builds(lambda m, q: f"{m}:{q}", st.lists(_ident, min_size=1, max_size=3).map(".".join),
                        st.lists(_ident, min_size=1, max_size=3).map(".".join))
_valid_attrs = st.dictionaries(st.text(string.ascii_letters + ".", min_size=1, max_size=8),
                               st.one_of(_ident, _ident.map(lambda p: f"len({p})")), max_size=3)
_attrs = st.dictionaries(st.text(string.ascii_letters + "._", min_size=1, max_size=8),
                         st.one_of(_ident, _ident.map(lambda p: f"len({p})"), _ident.map(lambda p: f"self.{p}"),
                                   st.integers(), st.text(max_size=10)), max_size=4)


@st.composite
def _spec_documents(draw) -> str:
    """TOML documents shaped like specs, with any field possibly wrong."""
    out = []
    if draw(st.booleans()):
        out.append("[service]")
        out.append(f"name = {_toml_value(draw(_scalar if _rarely(draw) else _ident))}")
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["spans", "service"])) if _rarely(draw) else draw(st.sampled_from(["span", "event"]))
        out.append(f"[[{kind}]]")
        if not _rarely(draw):
            out.append(f"function = {_toml_value(draw(_funcish if _rarely(draw) else _valid_func))}")
        if draw(st.booleans()):
            out.append(f"name = {_toml_value(draw(_scalar if _rarely(draw) else _ident))}")
        if draw(st.booleans()):
            a = draw(_attrs if _rarely(draw) else _valid_attrs)
            out.append("attributes = {" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in a.items()) + "}")
        if _rarely(draw):
            out.append(f"{draw(_ident)} = {_toml_value(draw(_scalar))}")
    return "\n".join(out) + "\n"


@FUZZ
@given(_spec_documents())
def test_spec_structured(text):
    _check_spec(text)


# ---- the OTLP-JSON reader ----------------------------------------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20)


def _maybe(draw, valid):
    """The valid value most of the time, anything else now and then."""
    # Hypothesis favours boundary values: junk on a middle value keeps it rare.
    return draw(_json) if draw(st.integers(0, 11)) == 5 else valid


def _rarely(draw) -> bool:
    return draw(st.integers(0, 7)) == 3


_valid_any = st.one_of(
    st.text(max_size=8).map(lambda v: {"stringValue": v}),
    st.integers(-2**63, 2**63 - 1).map(lambda v: {"intValue": str(v)}),
    st.floats(allow_nan=False).map(lambda v: {"doubleValue": v}),
    st.booleans().map(lambda v: {"boolValue": v}),
    st.lists(st.integers(0, 9).map(lambda v: {"intValue": str(v)}), max_size=3).map(
        lambda v: {"arrayValue": {"values": v}}))


@st.composite
def _any_value(draw):
    if _rarely(draw):
        key = draw(st.sampled_from(["stringValue", "intValue", "doubleValue", "boolValue", "arrayValue",
                                    "kvlistValue", "bytesValue", "other"]))
        return {key: draw(_json)}
    return draw(_valid_any)


@st.composite
def _requests(draw):
    """ExportTraceServiceRequest-shaped objects, each field possibly replaced by junk."""
    def kvs():
        return [_maybe(draw, {"key": draw(st.text(max_size=6)), "value": draw(_any_value())})
                for _ in range(draw(st.integers(0, 3)))]

    spans = []
    for _ in range(draw(st.integers(1, 3))):
        span = {"traceId": _maybe(draw, draw(st.text("0123456789abcdef", min_size=32, max_size=32))),
                "spanId": _maybe(draw, draw(st.text("0123456789abcdef", min_size=16, max_size=16))),
                "name": _maybe(draw, "s"),
                "startTimeUnixNano": _maybe(draw, str(draw(st.integers(0, 2**64)))),
                "endTimeUnixNano": _maybe(draw, str(draw(st.integers(0, 2**64)))),
                "attributes": _maybe(draw, kvs()),
                "events": _maybe(draw, [{"name": "e", "timeUnixNano": _maybe(draw, "1"), "attributes": kvs()}]),
                "status": _maybe(draw, {"code": _maybe(draw, 2), "message": _maybe(draw, "m")})}
        if _rarely(draw):
            span.pop(draw(st.sampled_from(sorted(span))))
        spans.append(span)
    scope = {"scope": _maybe(draw, {"name": "x"}), "spans": _maybe(draw, spans)}
    rs = {"resource": _maybe(draw, {"attributes": kvs()}), "scopeSpans": _maybe(draw, [scope])}
    return {"resourceSpans": _maybe(draw, [rs])}


def _check_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        _check_file(Path(d) / "fuzz.jsonl", data)


def _check_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        spans = read_spans(str(path))
    except OtlpJsonError as e:
        _one_line(e)
        assert str(e).startswith(str(path)), str(e)
        return
    # Accepted: what was read writes back and reads again to the same spans.
    if spans:
        line = dumps_line(spans, spans[0].resource, spans[0].scope)
        # The text writer says what json.dumps of the request's dicts says.
        ref = json.dumps(encode_request(spans, spans[0].resource, spans[0].scope))
        assert json.dumps(json.loads(line), sort_keys=True) == json.dumps(json.loads(ref), sort_keys=True)
        path.write_text(line)
        again = read_spans(str(path))
        assert _canonical(again) == _canonical(spans)


def _canonical(spans) -> str:
    # JSON text, so that a NaN attribute compares equal to itself.
    return json.dumps([s.to_dict() | {"resource": {}} for s in spans], sort_keys=True)


@FUZZ
@given(st.binary(max_size=300))
def test_otlp_any_bytes(data):
    _check_line(data)


@FUZZ
@given(_requests())
def test_otlp_structured(req):
    _check_line(json.dumps(req).encode() + b"\n")


@FUZZ
@given(_json)
def test_otlp_decode_request_any_object(obj):
    try:
        list(decode_request(obj))
    except OtlpJsonError as e:
        _one_line(e)


def test_otlp_deep_nesting_is_an_error_not_a_crash(tmp_path):
    # Nesting deep enough to exhaust the recursion limit inside an attribute value.
    deep = '{"arrayValue": {"values": [' * 3000 + "{}" + "]}}" * 3000
    line = ('{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "s", "startTimeUnixNano": "1", '
            '"endTimeUnixNano": "2", "attributes": [{"key": "k", "value": ' + deep + '}]}]}]}]}')
    p = tmp_path / "deep.jsonl"
    p.write_text(line + "\n")
    try:
        read_spans(str(p))
    except OtlpJsonError as e:
        _one_line(e)
