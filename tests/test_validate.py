"""The reference substrate, 30 cycles with its OpenTelemetry emitter on, traced from outside on
every interpreter: the eBPF spans match the emitter's one to one.

Timing agreement is measured and reported (scripts/bench, `ophamin-trace validate`), never
asserted here: it depends on the machine's load. Everything else parity checks must be exact.
"""

from __future__ import annotations

from collections import Counter

from tracer.commands import run_validate
from tracer.otlpjson import read_spans
from tracer.spec import load_spec

CYCLES = 30
STEP_SPANS = [t.name for t in load_spec("reference").targets if t.kind == "span" and t.name != "takwin.gpu_project"]


def test_thirty_cycles_match_the_emitter_one_to_one(ebpf, interpreter, tmp_path):
    interp, python = interpreter
    res = run_validate(CYCLES, 20, python, tmp_path, max_p99_us=50.0)
    p = res["parity"]
    overall = p["overall"]
    assert res["trace"]["counters"]["dropped"] == 0
    assert overall["hooks"] == overall["ebpf"] == overall["matched"] == CYCLES * len(STEP_SPANS), overall
    assert overall["recall"] == 1.0 and overall["precision"] == 1.0
    assert not p["missed"] and not p["extra"] and not p["reparented"], p["failures"]
    assert overall["reparented"] == 0
    # Every event the emitter wrote is matched, and every attribute both sides have agrees.
    assert overall["events_hooks"] == overall["events_ebpf"] == overall["events_matched"] > 0
    assert overall["values_compared"] > 0 and overall["values_disagreeing"] == 0
    assert not p["attribute_mismatches"]
    # Every attribute the reference spec captures is captured (nothing listed as not captured).
    assert not p["not_captured"], p["not_captured"]
    # The eBPF file itself: the cycle spans are roots, each step a child of its cycle, in order.
    spans = read_spans(res["ebpf"])
    assert Counter(s.name for s in spans) == {n: CYCLES for n in STEP_SPANS}
    by_id = {s.span_id: s for s in spans}
    for s in spans:
        if s.name == "takwin.cycle":
            assert not s.parent_span_id
        else:
            assert by_id[s.parent_span_id].name == "takwin.cycle"
    assert sorted(s.attributes["cycle.index"] for s in spans if s.name == "takwin.cycle") == list(range(CYCLES))
