"""Chrome trace-event JSON (the format ui.perfetto.dev and chrome://tracing open).

Spans become complete events (`ph: "X"`), span events become thread-scoped instants
(`ph: "i"`), and `M` metadata events name each process and thread. Timestamps are
microseconds relative to the earliest span, so a double keeps nanosecond precision
(absolute Unix-epoch microseconds would keep only about a quarter of a microsecond); the
epoch of time zero is in `otherData.epoch_ns`.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..otlpjson import Span

# Perfetto needs integer pids/tids; these stand in when the file lacks them, and the
# process/thread name says so instead of pretending to be a real id.
NO_PID = 0
NO_TID = 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _depths(spans: Sequence[Span]) -> Dict[Tuple[str, str], int]:
    by_key = {(s.trace_id, s.span_id): s for s in spans}
    memo: Dict[Tuple[str, str], int] = {}
    for s in spans:
        chain: List[Tuple[str, str]] = []
        k: Optional[Tuple[str, str]] = (s.trace_id, s.span_id)
        # Climb to the first ancestor of known depth (or the root); a parent loop in a
        # malformed file stops the climb instead of spinning.
        while k is not None and k not in memo and k not in chain:
            chain.append(k)
            cur = by_key[k]
            pk = (cur.trace_id, cur.parent_span_id)
            k = pk if cur.parent_span_id and pk in by_key else None
        base = memo[k] if k is not None and k in memo else -1
        for i, ck in enumerate(reversed(chain)):
            memo[ck] = base + 1 + i
    return memo


def _us(ns: int) -> float:
    return round(ns / 1000.0, 3)


def chrome_trace(spans: Sequence[Span]) -> dict:
    """The trace as a dict ready for json.dump."""
    if not spans:
        return {"traceEvents": [], "displayTimeUnit": "ms", "otherData": {"epoch_ns": 0, "spans": 0}}
    t0 = min(s.start_ns for s in spans)
    depth = _depths(spans)
    procs: Dict[int, str] = {}
    threads: Dict[Tuple[int, int], str] = {}
    body: List[Tuple[Tuple[int, int, int, int], dict]] = []
    for s in spans:
        raw_pid = s.resource.get("process.pid")
        pid = int(raw_pid) if raw_pid is not None else NO_PID
        tid = s.thread_id if s.thread_id is not None else NO_TID
        svc = s.resource.get("service.name") or s.resource.get("process.executable.name") or "process"
        procs.setdefault(pid, f"{svc} (pid {pid})" if raw_pid is not None else f"{svc} (no process.pid)")
        tname = s.attributes.get("thread.name")
        threads.setdefault((pid, tid), str(tname) if tname else
                           (f"thread {tid}" if s.thread_id is not None else "no thread.id"))
        args = {k: _jsonable(v) for k, v in s.attributes.items()}
        args.update({"span_id": s.span_id, "parent_span_id": s.parent_span_id, "trace_id": s.trace_id})
        if s.status_code == 2:
            args["status"] = "ERROR" + (f": {s.status_message}" if s.status_message else "")
        ts = _us(s.start_ns - t0)
        d = depth.get((s.trace_id, s.span_id), 0)
        # Sort key: time, then longer (enclosing) first, then shallower: Perfetto nests
        # complete events on one thread by this order.
        body.append(((s.start_ns, -(s.end_ns - s.start_ns), d, 0),
                     {"name": s.name, "cat": s.scope or "span", "ph": "X", "ts": ts,
                      "dur": _us(max(0, s.end_ns - s.start_ns)), "pid": pid, "tid": tid, "args": args}))
        for e in s.events:
            body.append(((e.time_ns, 0, d + 1, 1),
                         {"name": e.name, "cat": "event", "ph": "i", "s": "t", "ts": _us(e.time_ns - t0),
                          "pid": pid, "tid": tid,
                          "args": {**{k: _jsonable(v) for k, v in e.attributes.items()},
                                   "span_id": s.span_id}}))
    body.sort(key=lambda kv: kv[0])
    meta = []
    for pid, name in sorted(procs.items()):
        meta.append({"name": "process_name", "ph": "M", "ts": 0, "pid": pid, "tid": 0,
                     "args": {"name": name}})
    for (pid, tid), name in sorted(threads.items()):
        meta.append({"name": "thread_name", "ph": "M", "ts": 0, "pid": pid, "tid": tid,
                     "args": {"name": name}})
    return {
        "traceEvents": meta + [ev for _, ev in body],
        "displayTimeUnit": "ms",
        "otherData": {"epoch_ns": t0, "spans": len(spans), "generator": "ophamin-trace"},
    }


def write_chrome_trace(spans: Sequence[Span], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(chrome_trace(spans), f, separators=(",", ":"))
