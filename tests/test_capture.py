"""Exact capture on every interpreter: real processes, real BPF, real uprobes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter

from tracer.otlpjson import STATUS_ERROR
from tracer.session import run_trace
from tracer.spec import parse_spec

ROOT = str(__import__("pathlib").Path(__file__).resolve().parents[1])

PROGRAM = r'''
import sys, threading, asyncio, os
def leaf(x): return x + 1
def crec(n): return 0 if n == 0 else sum(map(crec, [n - 1])) + 1
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
crec(40)
sys.path.insert(0, os.environ["LATE_DIR"])
import late_mod  # imported after attach: its code objects did not exist when probes went in
for _ in range(9): late_mod.work(3)
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
[[span]]
function = "__main__:crec"
[[span]]
function = "late_mod:work"
''')


def _run_program(python: str, program: str, spec, env: dict | None = None):
    """Run `program` (which waits for a line, works, prints "done", waits again) under the tracer."""
    p = subprocess.Popen([python, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env={**os.environ, **(env or {})})
    out = []

    def drive():
        p.stdin.write(b"\n")
        p.stdin.flush()
        out.append(p.stdout.readline())
        time.sleep(0.2)
        p.stdin.write(b"\n")
        p.stdin.flush()

    time.sleep(0.3)
    th = threading.Thread(target=drive)
    try:
        res = run_trace(p.pid, spec, status=False, on_attached=lambda _c: th.start(), duration=30)
    finally:
        if th.is_alive() or th.ident:
            th.join()
        p.wait(timeout=10)
    assert out == [b"done\n"]
    return res


def _traced_run(python: str, late_dir: str):
    return _run_program(python, PROGRAM, SPEC, {"LATE_DIR": late_dir})


def test_exact_counts_nesting_and_status(ebpf, interpreter, tmp_path):
    interp, python = interpreter
    (tmp_path / "late_mod.py").write_text("def work(n):\n    return n * 2\n")
    res = _traced_run(python, str(tmp_path))
    counts = Counter(s.name for s in res.spans)
    assert counts == {"target": 600, "deep": 101, "boom": 3, "middle": 3, "outer": 3, "keyf": 100,
                      "gen": 1, "coro": 1, "make.<locals>.inner": 7, "Box.Inner.meth": 4, "crec": 41,
                      "work": 9}, counts
    assert res.counters["dropped"] == 0
    assert not res.losses.cut_at_attach and not res.losses.cut_at_detach
    # The kernel counted and timed every call itself, from the same timestamps as the spans.
    assert res.calls["status"] == "ok"
    kernel = {f["name"]: f for f in res.calls["functions"]}
    assert {k: f["calls"] for k, f in kernel.items() if f["calls"]} == counts
    assert all(f["started"] == f["calls"] for f in kernel.values())  # nothing ran across attach or detach
    assert kernel["boom"]["errors"] == kernel["middle"]["errors"] == 3 and kernel["outer"]["errors"] == 0
    for name, n in counts.items():
        durs = sorted(s.duration_ns for s in res.spans if s.name == name)
        k = kernel[name]
        assert abs(k["total_ns"] - sum(durs)) <= 1_000 * n, (name, k, sum(durs))  # clock re-syncs: ns, not µs
        assert abs(k["max_ns"] - durs[-1]) <= 1_000, (name, k, durs[-1])
        # The histogram's median bucket holds the spans' median (buckets are 25 % wide at most).
        assert 0.8 * durs[(n - 1) // 2] <= k["p50_ns"] <= 1.25 * durs[n // 2] + 4, (name, k, durs)
    by_id = {s.span_id: s for s in res.spans}
    # Recursion deeper than 64 frames nests exactly: one root, each level the child of the last.
    deep = [s for s in res.spans if s.name == "deep"]
    roots = [s for s in deep if not s.parent_span_id]
    assert len(roots) == 1
    depth = max(_depth(s, by_id) for s in deep)
    assert depth == 100
    # Recursion through C (map calls crec): each level is a frame entered from C.
    assert max(_depth(s, by_id) for s in res.spans if s.name == "crec") == 40
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


DEEP_C = r'''
import sys
def crec(n): return 0 if n == 0 else sum(map(crec, [n - 1])) + 1
sys.stdin.readline()
crec(100)
print("done", flush=True)
sys.stdin.readline()
'''


def test_recursion_through_c_deeper_than_uretprobes(ebpf, interpreter):
    """101 frames nested through C calls: beyond the kernel's 64 nested uretprobes a build that
    inlines the C caller's frame clear (Debian's 3.11) cannot see those exits; they must be
    counted, never silently lost. Every other build pairs all of them."""
    interp, python = interpreter
    res = _run_program(python, DEEP_C, parse_spec('[[span]]\nfunction = "__main__:crec"\n'))
    seen = sum(1 for s in res.spans if s.name == "crec" and "ophamin.cut" not in s.attributes)
    cut = res.losses.cut_at_detach.get("crec", 0)
    # Cut spans are reported too, marked: never counted as seen.
    assert sum(1 for s in res.spans if s.attributes.get("ophamin.cut") == "detach") == cut
    assert seen + cut == 101 and not res.losses.cut_at_attach
    if interp.label.startswith("debian-"):
        assert cut > 0 and res.counters["stack_overflow"] == cut
    else:
        assert seen == 101


CUT = r'''
import sys
def gen():
    yield 1
    yield 2
def long_running():
    sys.stdin.readline()  # the tracer attaches while the program waits here
    return 1
g = gen()
next(g)  # suspended before attach
long_running()
list(g)
for _ in range(3): list(gen())
print("done", flush=True)
sys.stdin.readline()
'''


def test_frames_running_at_attach_are_cut_not_invented(ebpf, interpreter):
    """A call already running at attach and a generator suspended before it: their starts are
    unknown, so neither becomes a span; both are counted cut at attach. Later calls are exact."""
    interp, python = interpreter
    spec = parse_spec('[[span]]\nfunction = "__main__:gen"\n[[span]]\nfunction = "__main__:long_running"\n')
    res = _run_program(python, CUT, spec)
    assert Counter(s.name for s in res.spans) == {"gen": 3}
    assert res.losses.cut_at_attach == {"gen": 1, "long_running": 1}


LOOP = r'''
import sys
def f(x): return x
def g(x): return f(x) + 1
sys.stdin.readline()
for i in range(2000): g(i)
sorted(range(100), key=f)
print("done", flush=True)
sys.stdin.readline()
'''


def test_entry_sites_read_the_frame_register_the_plan_proved(ebpf, interpreter):
    """3.11+: every RESUME-family site reads the frame from a register (two reads and a map
    lookup cheaper than the thread state); a verifying build checks, at every entry, that the
    register holds the thread state's current frame."""
    from tracer.capture.engine import CaptureEngine

    interp, python = interpreter
    p = subprocess.Popen([python, "-c", LOOP], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        time.sleep(0.3)
        eng = CaptureEngine(p.pid, parse_spec('[[span]]\nfunction = "__main__:f"\n'), verify_frame_register=True)
        try:
            if interp.version[:2] >= (3, 11):
                assert all(s.frame_register for s in eng.info.plan.by_role("entry")), eng.info.plan.sites
            p.stdin.write(b"\n")
            p.stdin.flush()
            assert p.stdout.readline() == b"done\n"
            events = eng.drain()
            c = eng.counters()
        finally:
            eng.close()
        assert c["entry_hits"] >= 2100 and c["frame_reg_mismatch"] == 0, c
        assert sum(1 for e in events if e.kind == 1) == 2100
    finally:
        p.kill()
        p.wait()


STARTUP = '''
def early(): return 1
early(); early()  # the program's very first calls
def later(n): return n
for i in range(5): later(i)
'''


def test_launch_mode_sees_the_first_calls(ebpf, interpreter, tmp_path):
    """`ophamin-trace -- python prog.py` holds the command until its interpreter is mapped, so
    the calls it makes microseconds after start are traced too; through `env` as well."""
    interp, python = interpreter
    prog = tmp_path / "prog.py"
    prog.write_text(STARTUP)
    spec = tmp_path / "spec.toml"
    spec.write_text('[[span]]\nfunction = "__main__:early"\n[[span]]\nfunction = "__main__:later"\n')
    for argv in ([python, str(prog)], ["/usr/bin/env", python, str(prog)]):
        r = subprocess.run([sys.executable, "-m", "tracer.cli", "--spec", str(spec), "--no-gpu", "--json", "--",
                            *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        out = __import__("json").loads(r.stdout)
        assert {s["name"]: s["count"] for s in out["stats"]} == {"early": 2, "later": 5}, out
        assert out["stopped_by"] == "target exited"


CALLS_OVER_TIME = r'''
import time
def tick(i): return i
for i in range(40):
    tick(i)
    time.sleep(0.01)
'''


def test_calls_log_counts_every_call_as_it_goes(ebpf, interpreter, tmp_path):
    """--calls-log: lines while the target runs, counts that only grow, and a final line at
    detach equal to the summary's kernel count (and to the spans, nothing being dropped)."""
    _interp, one_python = interpreter
    prog = tmp_path / "prog.py"
    prog.write_text(CALLS_OVER_TIME)
    log = tmp_path / "calls.jsonl"
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "-f", "__main__:tick", "--no-gpu", "--json",
                        "--calls-log", str(log), "--calls-interval", "0.05", "--", one_python, str(prog)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = __import__("json").loads(r.stdout)
    lines = [__import__("json").loads(x) for x in log.read_text().splitlines()]
    assert len(lines) >= 3 and [x["final"] for x in lines].count(True) == 1 and lines[-1]["final"]
    seq = [x["calls"]["tick"] for x in lines]
    assert all(x["started"]["tick"] >= x["calls"]["tick"] for x in lines)
    assert seq == sorted(seq) and any(0 < v < 40 for v in seq) and seq[-1] == 40, seq
    assert [x["time_unix_nano"] for x in lines] == sorted(x["time_unix_nano"] for x in lines)
    assert out["calls"]["functions"][0]["calls"] == 40 == out["stats"][0]["count"]
    bad = subprocess.run([sys.executable, "-m", "tracer.cli", "-f", "__main__:tick", "--no-gpu",
                          "--calls-log", str(tmp_path / "no" / "such" / "dir"), "--", one_python, str(prog)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "calls log" in bad.stderr, bad.stderr


def test_launch_mode_refuses_what_is_not_python(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tracer.cli", "--no-gpu", "--", "/bin/true"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "before its interpreter was mapped" in r.stderr, r.stderr


def test_a_dropped_exit_never_lends_its_start_to_another_call():
    """Pairing logic alone (real events are in the tests above): when a ring-buffer drop loses
    A's exit and B's call then reuses A's frame address, B is its own span and A is counted."""
    from tracer.assemble.spans import Assembler, Clock
    from tracer.assemble.values import TypeAddrs
    from tracer.capture.engine import EV_ENTRY, EV_EXIT, RawEvent
    from tracer.discover.layout import layout_from_table

    spec = parse_spec('[[span]]\nfunction = "m:a"\n[[span]]\nfunction = "m:b"\n')
    asm = Assembler(spec, os.getpid(), layout_from_table((3, 12, 0)), TypeAddrs({}, -1, -1, -1), Clock())

    def ev(ts, kind, target, start=0, frame=0x1000, code=0x2000):
        return RawEvent(ts, 7, kind, target, frame, code + target, "", (0, 0), (), start=start)

    done = asm.feed([ev(1, EV_ENTRY, 1), ev(5, EV_ENTRY, 2), ev(9, EV_EXIT, 2, start=5),  # a's exit dropped
                     ev(20, EV_ENTRY, 1), ev(30, EV_EXIT, 2, start=25)])  # a's exit and b's entry dropped
    assert [(s.name, s.end_ns - s.start_ns) for s in done] == [("b", 4)]
    assert asm.losses().unpaired == {"a": 2, "b": 1}
    # The same function: a's exit dropped, then a's next call at that address loses its entry.
    # Its exit names its own start: no span from the first call's entry to the second's exit.
    done = asm.feed([ev(40, EV_ENTRY, 1), ev(50, EV_ENTRY, 1, frame=0x3000), ev(60, EV_EXIT, 1, start=55),
                     ev(70, EV_EXIT, 1, start=50, frame=0x3000)])
    assert [(s.name, s.end_ns - s.start_ns) for s in done] == [("a", 20)]
    assert asm.losses().unpaired == {"a": 4, "b": 1}
