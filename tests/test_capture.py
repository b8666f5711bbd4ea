"""Exact capture on every interpreter: real processes, real BPF, real uprobes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from tracer.otlpjson import STATUS_ERROR
from tracer.session import run_trace
from tracer.spec import parse_spec

PROGRAM = r'''
import sys, threading, asyncio
def leaf(x): return x + 1
def target(n, s): return leaf(n)
def deep(n): return 0 if n == 0 else 1 + deep(n - 1)
def boom(): raise ValueError("x")
def middle(): return boom()
def outer():
    try: middle()
    except ValueError: return 1
def keyf(x): return -x
def gen(n):
    for i in range(n): yield i
async def coro(): return 3
def make():
    def inner(): return 1
    return inner
class Box:
    class Inner:
        def meth(self): return 2
sys.stdin.readline()
for i in range(500): target(i, "hello")
deep(100)
for _ in range(3): outer()
sorted(range(50), key=keyf); list(map(keyf, range(50)))
list(gen(5))
asyncio.run(coro())
f = make()
for _ in range(7): f()
for _ in range(4): Box.Inner().meth()
ts = [threading.Thread(target=lambda: [target(i, "t") for i in range(25)]) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print("done", flush=True)
sys.stdin.readline()
'''

SPEC = parse_spec('''
[[span]]
function = "__main__:target"
attributes = { n = "n", s = "s", "s.len" = "len(s)" }
[[span]]
function = "__main__:deep"
[[span]]
function = "__main__:boom"
[[span]]
function = "__main__:middle"
[[span]]
function = "__main__:outer"
[[span]]
function = "__main__:keyf"
[[span]]
function = "__main__:gen"
[[span]]
function = "__main__:coro"
[[span]]
function = "__main__:make.<locals>.inner"
[[span]]
function = "__main__:Box.Inner.meth"
''')


def _traced_run(python: str):
    p = subprocess.Popen([python, "-c", PROGRAM], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = []

    def drive(engine):
        p.stdin.write(b"\n")
        p.stdin.flush()
        out.append(p.stdout.readline())
        time.sleep(0.2)
        p.stdin.write(b"\n")
        p.stdin.flush()

    time.sleep(0.3)
    th = None

    def on_attached(engine):
        nonlocal th
        th = threading.Thread(target=drive, args=(engine,))
        th.start()

    try:
        res = run_trace(p.pid, SPEC, status=False, on_attached=on_attached, duration=30)
    finally:
        if th:
            th.join()
        p.wait(timeout=10)
    assert out == [b"done\n"]
    return res


def test_exact_counts_nesting_and_status(ebpf, interpreter, request):
    interp, python = interpreter
    if interp.label.startswith("debian-"):
        # Known gap, kept visible: on the stripped, LTO-built Debian 3.11.2 the functions
        # called from C (sorted(key=...), map) are not seen; every other case is exact.
        request.applymarker(pytest.mark.xfail(strict=True, reason="C-to-Python calls missed on "
                                              "Debian's stripped 3.11.2 build"))
    res = _traced_run(python)
    counts = Counter(s.name for s in res.spans)
    assert counts == {"target": 600, "deep": 101, "boom": 3, "middle": 3, "outer": 3, "keyf": 100,
                      "gen": 1, "coro": 1, "make.<locals>.inner": 7, "Box.Inner.meth": 4}, counts
    assert res.counters["dropped"] == 0
    assert not res.losses.cut_at_attach and not res.losses.cut_at_detach
    by_id = {s.span_id: s for s in res.spans}
    # Recursion deeper than 64 frames nests exactly: one root, each level the child of the last.
    deep = [s for s in res.spans if s.name == "deep"]
    roots = [s for s in deep if not s.parent_span_id]
    assert len(roots) == 1
    depth = max(_depth(s, by_id) for s in deep)
    assert depth == 100
    # An exception raised through two callers: boom and middle are ERROR, outer (handles it) is not.
    for s in res.spans:
        if s.name in ("boom", "middle"):
            assert s.status_code == STATUS_ERROR and s.status_message == "ValueError"
        if s.name == "outer":
            assert s.status_code != STATUS_ERROR
        if s.name == "boom":
            assert by_id[s.parent_span_id].name == "middle"
    # Arguments captured from the frame.
    first = next(s for s in res.spans if s.name == "target")
    assert first.attributes["n"] == 0 and first.attributes["s"] == "hello" and first.attributes["s.len"] == 5
    # Four threads each made 25 calls, told apart by thread id.
    per_thread = Counter(s.attributes["thread.id"] for s in res.spans if s.name == "target")
    assert sorted(per_thread.values()) == [25, 25, 25, 25, 500]
    # The generator is one span from first resumption to release.
    g = next(s for s in res.spans if s.name == "gen")
    assert g.attributes.get("ophamin.resumes", 0) + g.attributes.get("ophamin.suspensions", 0) >= 5


def _depth(s, by_id) -> int:
    d = 0
    while s.parent_span_id and s.parent_span_id in by_id:
        s = by_id[s.parent_span_id]
        d += 1
    return d


def test_bad_targets_are_one_line_errors(tmp_path):
    exe = [sys.executable, "-m", "tracer.cli"]
    sleeper = subprocess.Popen(["sleep", "5"])
    old = subprocess.Popen(["/root/.pyenv/versions/2.7.18/bin/python", "-c", "import time; time.sleep(5)"]) \
        if __import__("os").path.exists("/root/.pyenv/versions/2.7.18/bin/python") else None
    try:
        time.sleep(0.3)
        cases = [("999999", "no process with PID"), (str(sleeper.pid), "not a Python process")]
        if old:
            cases.append((str(old.pid), "not a supported CPython"))
        for pid, text in cases:
            r = subprocess.run([*exe, "probes", "--pid", pid], capture_output=True, text=True,
                               cwd=str(__import__("pathlib").Path(__file__).parents[1]))
            assert r.returncode != 0
            assert "Traceback" not in r.stderr
            assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        sleeper.kill()
        if old:
            old.kill()
