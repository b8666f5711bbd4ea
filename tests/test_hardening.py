"""Hardening: privileges, bad input, faults of the target and of the tracer, overload, and
never harming the target. Real processes, real BPF, real uprobes; what the kernel shows is
checked directly (the int3 bytes in the target's text, perf-event fds, tracefs, bpftool).

Tests that load BPF request the `ebpf` fixture. The ones that change user (setpriv) need
root as well, which the same fixture implies.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import INTERPRETERS, TARGET_VENVS
from hardening_helpers import (
    INT3,
    Target,
    Tracer,
    as_nobody,
    assert_one_line_error,
    bpftool_perf_pids,
    children,
    code_bytes,
    make_zombie,
    perf_event_fds,
    probe_sites,
    run_cli,
    tracefs_entries,
    wait_for,
)

from tracer.capture.engine import EV_ENTRY, MAX_EVENTS_PER_POLL, CaptureEngine
from tracer.discover.elf import open_image
from tracer.discover.process import find_interpreter, proc_state
from tracer.export.otlp import OtlpHttp
from tracer.export.safe_file import open_output
from tracer.interpreters import find_interpreters, target_python
from tracer.otlpjson import STATUS_ERROR, Span, decode_request, read_spans
from tracer.plan.probes import plan_for
from tracer.plan.verify import ProbeRefused, verify_plan
from tracer.session import run_trace
from tracer.spec import parse_spec
from tracer.watch import EXECED, EXITED

DEBIAN_PY = "/usr/bin/python3.11"  # readable by `nobody`, unlike the pyenv builds under /root


def _one() -> tuple:
    """The interpreter for tests that need one, not all: pyenv 3.12 when present."""
    by_label = {i.label: i for i in INTERPRETERS}
    interp = by_label.get("pyenv-3.12.1") or (INTERPRETERS[-1] if INTERPRETERS else None)
    if interp is None:
        pytest.skip("no supported interpreter on this machine")
    return interp, target_python(interp, TARGET_VENVS)


@pytest.fixture
def one_python():
    return _one()[1]


def _spec_file(tmp_path: Path, *functions: str, events: tuple[str, ...] = ()) -> str:
    text = "".join(f'[[span]]\nfunction = "{f}"\n' for f in functions)
    text += "".join(f'[[event]]\nfunction = "{f}"\n' for f in events)
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return str(p)


SLEEPER = "import sys\ndef f(i): return i\nprint('ready', flush=True)\nsys.stdin.readline()\n"


# ---- bad input: one line, non-zero exit, no traceback, nothing written ------------------

def test_bad_pids_are_refused_in_one_line(ebpf, tmp_path, one_python):
    spec = _spec_file(tmp_path, "__main__:f")
    out = tmp_path / "never.jsonl"
    sleeper = subprocess.Popen(["sleep", "60"])
    zombie = make_zombie()
    try:
        cases = [("999999999", "no process with PID"), (str(sleeper.pid), "not a Python process"),
                 ("2", "kernel thread"), (str(zombie.pid), "zombie")]
        for pid, text in cases:
            for cmd in (["trace", "--pid", pid, "--spec", spec, "--output", str(out)], ["probes", "--pid", pid]):
                assert_one_line_error(run_cli(*cmd), text)
            assert not out.exists(), "an output file was created for a refused target"
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


def test_unsupported_interpreters_are_refused_in_one_line(ebpf, tmp_path):
    old = [i for i in find_interpreters(include_unsupported=True) if not i.supported]
    if not old:
        pytest.skip("no unsupported CPython (2.x, <3.9) on this machine")
    spec = _spec_file(tmp_path, "__main__:f")
    for interp in old:
        # Python 2 has no print(flush=): write and flush by hand.
        t = Target(interp.path, "import sys, time\nsys.stdout.write('ready\\n'); sys.stdout.flush()\ntime.sleep(60)")
        try:
            t.expect("ready")
            r = run_cli("trace", "--pid", str(t.pid), "--spec", spec)
            assert_one_line_error(r, "supported")
            assert "3.9-3.13" in r.stderr, (interp.label, r.stderr)
        finally:
            t.kill()


def test_bad_specs_and_endpoints_are_refused_in_one_line(ebpf, tmp_path, one_python):
    t = Target(one_python, SLEEPER)
    try:
        t.expect("ready")
        pid = str(t.pid)
        assert_one_line_error(run_cli("trace", "--pid", pid, "--spec", str(tmp_path / "missing.toml")),
                              "no such built-in spec or file")
        bad = tmp_path / "bad.toml"
        bad.write_text('[[span]]\nfunction = "__main__:f"\n\n[[span]]\nfunction = "no colon"\n')
        assert_one_line_error(run_cli("trace", "--pid", pid, "--spec", str(bad)), f"{bad}:5:")
        bad.write_text("[[span]\nfunction = 1\n")
        assert_one_line_error(run_cli("trace", "--pid", pid, "--spec", str(bad)), str(bad))
        spec = _spec_file(tmp_path, "__main__:f")
        for url in ("collector:4318", "ftp://x/v1/traces", "http://"):
            assert_one_line_error(run_cli("trace", "--pid", pid, "--spec", spec, "--otlp-endpoint", url),
                                  "not an http:// or https:// URL")
    finally:
        t.kill()


def test_output_paths_that_must_not_be_written(ebpf, tmp_path, one_python):
    t = Target(one_python, SLEEPER)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "planted-link.jsonl"
    link.symlink_to(victim)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    hard = tmp_path / "hard.jsonl"
    os.link(victim, hard)
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("someone else's\n")
    os.chown(theirs, 65534, 65534)
    cases = [(link, "symbolic link"), (fifo, "not a regular file"), (tmp_path, "is a directory"),
             (tmp_path / "no" / "dir.jsonl", "No such file or directory"), (hard, "hard links"),
             (theirs, "belongs to uid 65534")]
    try:
        t.expect("ready")
        spec = _spec_file(tmp_path, "__main__:f")
        for path, text in cases:
            r = run_cli("trace", "--pid", str(t.pid), "--spec", spec, "--output", str(path), timeout=60)
            assert_one_line_error(r, text)
        assert victim.read_text() == "precious\n" and theirs.read_text() == "someone else's\n"
    finally:
        t.kill()


def test_output_file_mode_owner_and_truncation(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        monkeypatch.delenv("SUDO_UID", raising=False)
        fresh = tmp_path / "fresh.jsonl"
        os.close(open_output(str(fresh)))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # umask 0 still gives no group/world write
        loose = tmp_path / "loose.jsonl"
        loose.write_text("old content\n")
        os.chmod(loose, 0o6777)
        fd = open_output(str(loose))
        os.write(fd, b"new\n")
        os.close(fd)
        assert stat.S_IMODE(loose.stat().st_mode) == 0o755 and loose.read_text() == "new\n"
        if os.geteuid() == 0:
            # Under sudo, a created file belongs to the user who ran sudo; an existing one keeps its owner.
            monkeypatch.setenv("SUDO_UID", "65534")
            monkeypatch.setenv("SUDO_GID", "65534")
            mine = tmp_path / "mine.jsonl"
            os.close(open_output(str(mine)))
            assert (mine.stat().st_uid, mine.stat().st_gid) == (65534, 65534)
            os.close(open_output(str(loose)))
            assert loose.stat().st_uid == 0
    finally:
        os.umask(old)


# ---- OTLP/HTTP: never stalls tracing, bounded, every span counted once --------------------

def _spans(n: int, name: str = "s") -> list[Span]:
    return [Span(f"{k:032x}", f"{k + 1:016x}", "", name, 1, 2) for k in range(n)]


class _Collector(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.span_ids: list[str] = []
        self.got_request = threading.Event()
        self.hold = hold
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.got_request.set()
                if collector.hold is not None:
                    collector.hold.wait(60)
                collector.span_ids += [s.span_id for s in decode_request(json.loads(body))]
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *a) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_otlp_http_delivers_everything_to_a_collector():
    c = _Collector()
    try:
        ex = OtlpHttp(c.url, {"service.name": "t"})
        sent = _spans(1300)
        for k in range(0, 1300, 100):
            ex.export(sent[k:k + 100])
        ex.close()
        assert (ex.sent, ex.dropped) == (1300, 0)
        assert sorted(c.span_ids) == sorted(s.span_id for s in sent)
    finally:
        c.shutdown()


def test_otlp_http_unreachable_is_bounded_and_counted():
    ex = OtlpHttp(f"http://127.0.0.1:{_closed_port()}", {}, max_buffered=100)
    peak = 0
    for _ in range(20):
        ex.export(_spans(50))
        with ex._cv:
            peak = max(peak, len(ex.buffer) + ex._inflight)
    ex.close()
    assert peak <= 100
    assert ex.sent == 0 and ex.dropped == 1000 == ex.exported
    assert ex.last_error and ex.failures >= 1


def test_otlp_http_slow_collector_does_not_block_export():
    release = threading.Event()
    c = _Collector(hold=release)
    try:
        ex = OtlpHttp(c.url, {})
        ex.export(_spans(10))
        assert c.got_request.wait(30)  # the first POST is now held open by the collector
        done = threading.Event()
        threading.Thread(target=lambda: (ex.export(_spans(10)), done.set()), daemon=True).start()
        assert done.wait(30), "export() blocked behind a slow collector"
        release.set()
        ex.close()
        assert ex.sent + ex.dropped == 20 and ex.sent >= 10
    finally:
        release.set()
        c.shutdown()


# ---- privileges ----------------------------------------------------------------------------

NOBODY_LOOP = ("import sys, time\ndef f(i): return i + 1\nprint('ready', flush=True)\n"
               "for line in sys.stdin:\n    n = int(line)\n    for i in range(n): f(i)\n    print('done', n, flush=True)\n")


@pytest.fixture
def nobody_dir():
    import tempfile  # noqa: PLC0415

    d = Path(tempfile.mkdtemp(prefix="ophamin-nobody-"))
    os.chown(d, 65534, 65534)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def _needs_debian_python() -> None:
    if not os.access(DEBIAN_PY, os.X_OK):
        pytest.skip(f"{DEBIAN_PY} (an interpreter `nobody` can run) is missing")


def test_no_privileges_is_refused_before_anything(ebpf, nobody_dir):
    _needs_debian_python()
    spec = nobody_dir / "spec.toml"
    spec.write_text('[[span]]\nfunction = "__main__:f"\n')
    t = Target(DEBIAN_PY, NOBODY_LOOP, prefix=as_nobody())
    before = tracefs_entries_all()
    try:
        t.expect("ready")
        out = nobody_dir / "out.jsonl"
        for caps, text in (((), "lacks CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE"),
                           (("bpf", "perfmon"), "lacks CAP_SYS_PTRACE"),
                           (("bpf", "perfmon", "sys_ptrace"), "refuses perf-event uprobes")):
            r = run_cli("trace", "--pid", str(t.pid), "--spec", str(spec), "--output", str(out),
                        prefix=as_nobody(*caps))
            assert_one_line_error(r, text, code=77)
            assert not out.exists()
        assert tracefs_entries_all() == before  # bcc's tracefs fallback was never reached
    finally:
        t.kill()


def tracefs_entries_all() -> list[str]:
    try:
        return [ln for ln in Path("/sys/kernel/tracing/uprobe_events").read_text().splitlines() if "_bcc_" in ln]
    except OSError:
        return []


def test_capabilities_trace_own_processes_and_only_root_traces_others(ebpf, nobody_dir):
    """Non-root with capabilities (this kernel's uprobe PMU also wants CAP_SYS_ADMIN) traces
    its own user's process, is refused another user's, and root traces anyone's."""
    _needs_debian_python()
    spec = nobody_dir / "spec.toml"
    spec.write_text('[[span]]\nfunction = "__main__:f"\n')
    caps = as_nobody("bpf", "perfmon", "sys_ptrace", "sys_admin")
    mine = Target(DEBIAN_PY, NOBODY_LOOP, prefix=as_nobody(), cwd=str(nobody_dir))
    roots = Target(DEBIAN_PY, NOBODY_LOOP)
    try:
        mine.expect("ready")
        roots.expect("ready")
        for cmd in (["trace", "--pid", str(roots.pid), "--spec", str(spec)], ["probes", "--pid", str(roots.pid)]):
            assert_one_line_error(run_cli(*cmd, prefix=caps), "only root may trace another user's process", code=77)
        sites = probe_sites(mine.pid)
        for prefix in (caps, None):  # nobody with capabilities, then root: both on nobody's process
            tr = Tracer.start("--pid", str(mine.pid), "--spec", str(spec), "--json", "--no-status", prefix=prefix)
            tr.wait_attached()
            assert set(code_bytes(mine.pid, sites)) == {INT3}
            mine.send("250")
            mine.expect("done")
            tr.proc.send_signal(signal.SIGINT)
            assert tr.finish() == 0, tr.stderr
            res = json.loads(tr.stdout)
            assert res["stats"] and res["stats"][0]["count"] == 250, res
            assert not tracefs_entries(tr.proc.pid)
            assert code_bytes(mine.pid, sites) == [orig for _, _, orig in sites]  # every probe removed
    finally:
        mine.kill()
        roots.kill()


# ---- faults of the target: threads come and go, fork, SIGSTOP, exec inside open spans -------

FAULTS = r'''
import os, signal, sys, threading, time

def work(i):
    return i * 2

def outer():
    return inner()

def inner():
    say("inside")
    sys.stdin.readline()
    os.execv(sys.executable, [sys.executable, "-c", AFTER])

AFTER = """
import sys
def work(i): return i * 2
print("after-exec", sum(work(i) for i in range(70)), flush=True)
sys.stdin.readline()
"""

continued = False

def on_cont(signum, frame):
    global continued
    continued = True

def say(*words):
    os.write(1, (" ".join(map(str, words)) + "\n").encode())  # one write: parent and child share the pipe

say("ready")
for line in sys.stdin:
    cmd = line.split()[0]
    if cmd == "threads":
        ids, lock = [], threading.Lock()
        def run():
            with lock:
                ids.append(threading.get_native_id())
            for i in range(10):
                work(i)
        for wave in range(5):
            ts = [threading.Thread(target=run) for _ in range(4)]
            [t.start() for t in ts]
            [t.join() for t in ts]
        say("threads", *ids)
    elif cmd == "fork":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        pid = os.fork()
        if pid == 0:
            say("child", os.getpid(), sum(work(i) for i in range(100)))
            signal.sigwait({signal.SIGUSR1})
            os._exit(0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        say("forked", pid, sum(work(i) for i in range(30)))
    elif cmd == "stop":
        signal.signal(signal.SIGCONT, on_cont)
        say("looping")
        n = 0
        while not continued:
            for i in range(50):
                work(i)
            n += 50
            time.sleep(0.001)
        for i in range(100):
            work(i)
        say("looped", n + 100)
    elif cmd == "exec":
        outer()
'''


def test_target_faults(ebpf, interpreter):
    """On every interpreter: threads that appear and exit, a fork (the child runs untraced and
    correct, the parent exactly traced), SIGSTOP/SIGCONT, and an exec from inside two open
    spans (the tracer stops on it, emits both spans cut, and ignores the new program)."""
    interp, python = interpreter
    spec = parse_spec('[[span]]\nfunction = "__main__:work"\n[[span]]\nfunction = "__main__:outer"\n'
                      '[[span]]\nfunction = "__main__:inner"\n')
    t = Target(python, FAULTS)
    t.expect("ready")
    seen: dict = {}
    failure: list = []

    def drive(_capture) -> None:
        try:
            t.send("threads")
            seen["thread_ids"] = {int(x) for x in t.expect("threads")[1:]}
            t.send("fork")
            seen["child"] = t.expect("child")
            seen["forked"] = t.expect("forked")
            t.send("stop")
            t.expect("looping")
            os.kill(t.pid, signal.SIGSTOP)
            wait_for(lambda: proc_state(t.pid)[0] == "T", 10, "the target to stop")
            time.sleep(0.3)
            os.kill(t.pid, signal.SIGCONT)
            seen["looped"] = int(t.expect("looped")[1])
            t.send("exec")
            t.expect("inside")
            t.send("")
            seen["after"] = t.expect("after-exec")
        except BaseException as e:  # noqa: BLE001 - reported after run_trace returns
            failure.append(e)
            t.kill()

    th = None

    def on_attached(capture) -> None:
        nonlocal th
        th = threading.Thread(target=drive, args=(capture,))
        th.start()

    child = None
    try:
        res = run_trace(t.pid, spec, status=False, on_attached=on_attached, duration=300)
        th.join(120)
        if failure:
            raise failure[0]
        child = int(seen["child"][1])
        assert res.stopped_by == EXECED, res.stopped_by
        assert res.counters["execs"] == 1 and res.counters["dropped"] == 0, res.counters
        work = [s for s in res.spans if s.name == "work"]
        # 200 from the threads, 30 from the parent after fork, the SIGSTOP loop; none from the
        # child, none from the program exec'd afterwards (its 70 calls are ignored in the kernel).
        assert len(work) == 200 + 30 + seen["looped"], (len(work), seen["looped"])
        tids = Counter(s.attributes["thread.id"] for s in work)
        assert set(tids) == seen["thread_ids"] | {t.pid}  # the child's thread id is not among them
        assert sum(tids[tid] for tid in seen["thread_ids"]) == 200 and tids[t.pid] == 30 + seen["looped"]
        assert seen["child"][2] == str(sum(i * 2 for i in range(100)))
        assert seen["forked"][2] == str(sum(i * 2 for i in range(30)))
        assert seen["after"][1] == str(sum(i * 2 for i in range(70)))
        # The exec happened inside outer -> inner: both emitted, cut, nested, counted.
        cut = {s.name: s for s in res.spans if s.attributes.get("ophamin.cut") == "detach"}
        assert set(cut) == {"outer", "inner"}, [s.name for s in res.spans if s.name != "work"]
        assert cut["inner"].parent_span_id == cut["outer"].span_id
        for s in cut.values():
            assert s.status_code == STATUS_ERROR and "exec" in s.status_message
            assert s.end_ns >= s.start_ns
        assert res.losses.cut_at_detach == {"outer": 1, "inner": 1} and not res.losses.cut_at_attach
        # Detached: no breakpoint left in the forked child, nor in the image the target exec'd.
        for pid in (child, t.pid):
            sites = probe_sites(pid)
            assert code_bytes(pid, sites) == [orig for _, _, orig in sites], pid
    finally:
        t.kill()
        if child:
            os.kill(child, signal.SIGKILL)


# ---- the target dies mid-span: cut spans flushed, exit 0 ------------------------------------

DIES = r'''
import os, sys
def work(i):
    return i + 1
def outer():
    return inner()
def inner():
    os.write(1, b"inside\n")
    sys.stdin.readline()
os.write(1, b"ready\n")
sys.stdin.readline()
total = sum(work(i) for i in range(500))
outer()
'''


def test_target_killed_mid_span(ebpf, tmp_path, one_python, monkeypatch):
    """The target is SIGKILLed inside two spans: the tracer stops with exit 0, and its file
    holds every finished span plus the two open ones, closed as cut and nested. Also: a spec
    function that never appears is a warning, not an error; the output file is 0644 whatever
    the umask and, under sudo, belongs to the invoking user."""
    spec = _spec_file(tmp_path, "__main__:work", "__main__:outer", "__main__:inner", "__main__:never_defined")
    out = tmp_path / "spans.jsonl"
    t = Target(one_python, DIES)
    t.expect("ready")
    old = os.umask(0)
    try:
        tr = Tracer.start("--pid", str(t.pid), "--spec", spec, "--output", str(out), "--json", "--no-status",
                          env={"SUDO_UID": "65534", "SUDO_GID": "65534"})
        tr.wait_attached()
        t.send("")
        t.expect("inside")
        t.proc.kill()
        assert tr.finish() == 0, tr.stderr
    finally:
        os.umask(old)
        t.kill()
    res = json.loads(tr.stdout)
    assert res["stopped_by"] == EXITED
    assert res["losses"]["cut_at_detach"] == {"outer": 1, "inner": 1}
    assert any("__main__:never_defined" in line and "never seen" in line for line in tr.stderr), tr.stderr
    assert any("__main__:never_defined" in w for w in res["warnings"])
    spans = read_spans(str(out))
    assert res["spans"] == len(spans) == 502
    assert Counter(s.name for s in spans) == {"work": 500, "outer": 1, "inner": 1}
    cut = {s.name: s for s in spans if s.attributes.get("ophamin.cut") == "detach"}
    assert set(cut) == {"outer", "inner"} and cut["inner"].parent_span_id == cut["outer"].span_id
    assert all(s.status_code == STATUS_ERROR and s.end_ns >= s.start_ns for s in cut.values())
    assert max(s.end_ns for s in spans if s.name == "work") <= cut["inner"].start_ns <= cut["inner"].end_ns
    st = out.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and (st.st_uid, st.st_gid) == (65534, 65534)


# ---- the tracer is stopped or killed ----------------------------------------------------

LOOPS = r'''
import os, sys, threading, time
def work(i):
    return i + 1
def hold():
    n = 0
    while True:
        for i in range(20):
            work(i)
        n += 20
        if n % 2000 == 0:
            os.write(1, f"calls {n}\n".encode())
        time.sleep(0.005)
os.write(1, b"ready\n")
sys.stdin.readline()  # "go", once the tracer is attached: hold() is then entered in its sight
hold()
'''


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_detach_flush_and_count_otlp_drops(ebpf, tmp_path, one_python, signum):
    """SIGINT/SIGTERM: exit 0, every span in the file (the open `hold` one cut), every probe
    gone from the target, which runs on. The OTLP collector is unreachable meanwhile (a
    listener that never answers, or a closed port): tracing is not slowed, and every span is
    counted as dropped by that exporter."""
    spec = _spec_file(tmp_path, "__main__:work", "__main__:hold")
    out = tmp_path / "spans.jsonl"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)  # accepts connections in the kernel, never reads: every POST times out
    url = f"http://127.0.0.1:{silent.getsockname()[1]}" if signum == signal.SIGINT \
        else f"http://127.0.0.1:{_closed_port()}"
    t = Target(one_python, LOOPS)
    t.expect("ready")
    try:
        sites = probe_sites(t.pid)
        tr = Tracer.start("--pid", str(t.pid), "--spec", spec, "--output", str(out), "--otlp-endpoint", url,
                          "--json", "--no-status")
        tr.wait_attached()
        assert set(code_bytes(t.pid, sites)) == {INT3}
        t.send("go")
        t.expect("calls")
        t.expect("calls")
        tr.proc.send_signal(signum)
        assert tr.finish() == 0, tr.stderr
        assert code_bytes(t.pid, sites) == [orig for _, _, orig in sites]
        before = int(t.expect("calls")[1])
        assert int(t.expect("calls")[1]) > before  # the target runs on, untraced
    finally:
        t.kill()
        silent.close()
    res = json.loads(tr.stdout)
    assert res["stopped_by"] == signum.name
    spans = read_spans(str(out))
    assert res["spans"] == len(spans) and res["exporters"]["file"]["spans"] == len(spans)
    c = res["counters"]
    # Probes detached before the last read: every event the kernel made was read or counted.
    assert c["received_entries"] + c["dropped_entries"] == c["target_entries"]
    assert c["received_exits"] + c["dropped_exits"] == c["target_exits"]
    names = Counter(s.name for s in spans)
    assert names["hold"] == 1
    if not c["dropped"]:  # the usual case at this call rate
        assert names["work"] == c["target_entries"] - 1
    (cut,) = [s for s in spans if s.name == "hold"]
    assert cut.attributes["ophamin.cut"] == "detach" and signum.name in cut.status_message
    otlp = res["exporters"]["otlp_http"]
    assert otlp["sent"] == 0 and otlp["dropped"] == len(spans) and otlp["last_error"]


def test_sigkill_leaves_no_probe_behind(ebpf, tmp_path, one_python):
    """After the tracer is SIGKILLed the kernel has removed every breakpoint from the target's
    text, no tracefs probe exists for it, and bpftool lists no uprobe of it."""
    spec = _spec_file(tmp_path, "__main__:work", "__main__:hold")
    t = Target(one_python, LOOPS)
    t.expect("ready")
    try:
        sites = probe_sites(t.pid)
        tr = Tracer.start("--pid", str(t.pid), "--spec", spec, "--no-status")
        tr.wait_attached()
        t.send("go")
        assert set(code_bytes(t.pid, sites)) == {INT3}
        assert perf_event_fds(tr.proc.pid) >= len(sites)
        attached = bpftool_perf_pids()
        if attached is not None:
            assert attached.get(tr.proc.pid) == len(sites), attached
        assert not tracefs_entries(tr.proc.pid)
        tr.proc.kill()
        tr.proc.wait(30)
        wait_for(lambda: code_bytes(t.pid, sites) == [orig for _, _, orig in sites], 10, "breakpoints removed")
        assert not tracefs_entries(tr.proc.pid)
        after = bpftool_perf_pids()
        assert after is None or tr.proc.pid not in after
        before = int(t.expect("calls")[1])
        assert int(t.expect("calls")[1]) > before
    finally:
        t.kill()


TWICE = r'''
import os, sys
def work(i):
    return i + 1
os.write(1, b"ready\n")
for line in sys.stdin:
    n = int(line)
    for i in range(n):
        work(i)
    os.write(1, f"done {n}\n".encode())
'''


def test_two_tracers_on_one_target(ebpf, tmp_path, one_python):
    """Both attach and both see every call; killing one leaves the other exact."""
    spec = _spec_file(tmp_path, "__main__:work")
    t = Target(one_python, TWICE)
    t.expect("ready")
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    try:
        tracers = [Tracer.start("--pid", str(t.pid), "--spec", spec, "--output", str(f), "--json", "--no-status")
                   for f in files]
        for tr in tracers:
            tr.wait_attached()
        # Bursts of at most 2,400 calls: 4,800 events fit in each tracer's ring unread, so
        # neither can drop however slowly it is scheduled.
        t.send("1500")
        t.expect("done")
        wait_for(lambda: _count_spans(files[1]) == 1500, 60, "tracer B to write 1500 spans")
        tracers[1].proc.kill()
        tracers[1].proc.wait(30)
        t.send("1000")
        t.expect("done")
        wait_for(lambda: _count_spans(files[0]) == 2500, 60, "tracer A to write 2500 spans")
        tracers[0].proc.send_signal(signal.SIGINT)
        assert tracers[0].finish() == 0, tracers[0].stderr
    finally:
        t.kill()
    a = json.loads(tracers[0].stdout)
    assert a["counters"]["target_entries"] == a["counters"]["target_exits"] == 2500
    assert a["counters"]["dropped"] == 0 and a["spans"] == 2500
    assert _count_spans(files[1]) == 1500
    ids = [{s.span_id for s in read_spans(str(f))} for f in files]
    assert len(ids[0]) == 2500 and len(ids[1]) == 1500


def _count_spans(path: Path) -> int:
    try:
        return len(read_spans(str(path)))
    except (OSError, ValueError):
        return -1


def _has_spans(path: Path, n: int) -> bool:
    """At least `n` spans in the complete lines at the head of a file that is still growing
    (under overload it grows by hundreds of MB a second: never read it whole)."""
    seen = 0
    try:
        with open(path) as f:
            for line in f:
                if not line.endswith("\n"):
                    return False  # the tracer is writing this one
                for rs in json.loads(line).get("resourceSpans", []):
                    for ss in rs.get("scopeSpans", []):
                        seen += len(ss.get("spans", []))
                if seen >= n:
                    return True
    except (OSError, ValueError):
        return False
    return False


# ---- overload: the ring buffer overflows; drops are exact, the tracer goes on ------------

OVERLOAD = "import os, sys\n" + "".join(f"def f{k}(): return {k}\n" for k in range(10)) + r'''
def burst(n):
    for _ in range(n):
        f0(); f1(); f2(); f3(); f4(); f5(); f6(); f7(); f8(); f9()
os.write(1, b"ready\n")
for line in sys.stdin:
    n = int(line)
    if n < 0:
        while True:
            burst(1000)
    burst(n)
    os.write(1, b"done\n")
'''
OVERLOAD_FUNCTIONS = [f"__main__:f{k}" for k in range(10)] + ["__main__:burst"]


def _kinds(events) -> tuple[int, int]:
    entries = sum(e.kind == EV_ENTRY for e in events)
    return entries, len(events) - entries


def test_ring_buffer_overflow_is_counted_exactly(ebpf, interpreter):
    """Every function of the target traced, 30,001 calls made while nothing reads the ring:
    per kind, events read + events dropped = calls made, exactly; a poll never takes more than
    MAX_EVENTS_PER_POLL; afterwards tracing goes on with nothing lost."""
    _interp, python = interpreter
    spec = parse_spec("".join(f'[[span]]\nfunction = "{f}"\n' for f in OVERLOAD_FUNCTIONS))
    t = Target(python, OVERLOAD)
    t.expect("ready")
    engine = CaptureEngine(t.pid, spec)
    try:
        t.send("3000")
        t.expect("done")
        first = engine.poll(0)
        assert len(first) == MAX_EVENTS_PER_POLL  # the ring holds more: the poll stopped at its bound
        events = first + _drain_all(engine)
        calls = 3000 * 10 + 1
        c = engine.counters()
        assert c["target_entries"] == c["target_exits"] == calls, c
        entries, exits = _kinds(events)
        assert (entries, exits) == (c["received_entries"], c["received_exits"])
        assert entries + c["dropped_entries"] == calls and exits + c["dropped_exits"] == calls, c
        assert c["dropped"] == c["dropped_entries"] + c["dropped_exits"] > 0
        # The kernel's own count of every call does not travel through the ring: exact regardless.
        kernel = {s.name: s.calls for s in engine.call_stats()}
        assert kernel == {**{f"f{k}": 3000 for k in range(10)}, "burst": 1}, kernel
        dropped = c["dropped"]
        t.send("100")  # 2,002 events: they fit in the ring, nothing may be lost now
        t.expect("done")
        assert _kinds(_drain_all(engine)) == (1001, 1001)
        assert engine.counters()["dropped"] == dropped
    finally:
        engine.close()
        t.kill()


def _drain_all(engine) -> list:
    out = []
    while True:
        batch = engine.drain()
        if not batch:
            return out
        out += batch


def test_tracer_stays_stoppable_under_sustained_overload(ebpf, tmp_path, one_python):
    """A target calling traced functions as fast as it can for as long as it lives: the tracer
    keeps polling in bounded batches, stops on SIGINT, and accounts for every event."""
    spec = _spec_file(tmp_path, *OVERLOAD_FUNCTIONS)
    t = Target(one_python, OVERLOAD)
    t.expect("ready")
    try:
        tr = Tracer.start("--pid", str(t.pid), "--spec", spec, "--json", "--no-status",
                          "--output", str(tmp_path / "spans.jsonl"))
        tr.wait_attached()
        t.send("-1")
        wait_for(lambda: _has_spans(tmp_path / "spans.jsonl", 1001), 120, "spans under overload")
        tr.proc.send_signal(signal.SIGINT)
        assert tr.finish(timeout=60) == 0, tr.stderr
    finally:
        t.kill()
    res = json.loads(tr.stdout)
    c = res["counters"]
    assert res["stopped_by"] == "SIGINT" and c["dropped"] > 0
    assert c["received_entries"] + c["dropped_entries"] == c["target_entries"]
    assert c["received_exits"] + c["dropped_exits"] == c["target_exits"]
    # Every call that ended is in the kernel's count, dropped spans included; the ten leaves are
    # called in turn, so their counts differ by one at most; every burst of 1,000 but the one
    # running at detach ended (entry sites go one by one: a burst may end uncounted leaves).
    kernel = {f["name"]: f["calls"] for f in res["calls"]["functions"]}
    assert sum(kernel.values()) == c["target_exits"] > 0
    leaves = [kernel[f"f{k}"] for k in range(10)]
    assert max(leaves) - min(leaves) <= 1 and kernel["burst"] >= min(leaves) // 1000 > 0, kernel
    # Nothing ran at attach (the target waited on stdin): an exit whose entry the ring dropped is
    # told apart by the start the kernel sends with it (test below), never counted cut at attach.
    assert res["losses"]["cut_at_attach"] == {}, res["losses"]


HOLD = r'''
import os, sys
def leaf(): pass
def fill(n):
    for _ in range(n):
        leaf()
def hold():
    os.write(1, b"full\n")
    return sys.stdin.readline()
os.write(1, b"ready\n")
sys.stdin.readline()
fill(100_000)
hold()
os.write(1, b"done\n")
'''


def test_an_exit_whose_entry_was_dropped_is_counted_unpaired(ebpf, interpreter):
    """`hold()` starts while the ring is full (200,000 events unread before it) and returns after
    the ring was drained: its exit arrives alone. The assembler counts it unpaired (the kernel
    sent the call's start with it), not cut at attach, and makes no span of it."""
    from tracer.assemble.spans import Assembler, Clock  # noqa: PLC0415
    from tracer.assemble.values import TypeAddrs  # noqa: PLC0415

    _interp, python = interpreter
    spec = parse_spec("".join(f'[[span]]\nfunction = "__main__:{f}"\n' for f in ("leaf", "fill", "hold")))
    t = Target(python, HOLD)
    t.expect("ready")
    engine = CaptureEngine(t.pid, spec)
    try:
        t.send("go")
        t.expect("full")
        events = _drain_all(engine)
        t.send("x")
        t.expect("done")
        wait_for(lambda: engine.counters()["target_exits"] == 100_002, 10, "hold() returned")
        events += _drain_all(engine)
        assert engine.counters()["dropped_entries"] > 0
        asm = Assembler(spec, t.pid, engine.info.layout, TypeAddrs({}, -1, -1, -1), Clock())
        spans = asm.feed(events)
        losses = asm.losses()
        assert "hold" not in {s.name for s in spans} and losses.unpaired.get("hold") == 1, losses
        assert losses.cut_at_attach == {}, losses
        assert {s.name: s.calls for s in engine.call_stats()}["hold"] == 1
    finally:
        engine.close()
        t.kill()


# ---- never harm the target: verified probe sites, memory only read -------------------------

def test_probe_plan_verifier_refuses_planted_addresses(ebpf, interpreter):
    """The real plan passes; a site moved one byte, a site inside an instruction, a site
    claiming another instruction, and a site in no function are each refused."""
    _interp, python = interpreter
    t = Target(python, SLEEPER)
    try:
        t.expect("ready")
        p = t.proc
        interp = find_interpreter(p.pid)
        image = open_image(interp.host_path)
        plan = plan_for(image, interp.version)
        verify_plan(image, plan, p.pid, interp.bias)

        def refused(site, text):
            bad = replace(plan, sites=(site, *plan.sites[1:]))
            with pytest.raises(ProbeRefused, match=text) as e:
                verify_plan(image, bad, p.pid, interp.bias)
            assert "\n" not in str(e.value)

        s0 = plan.sites[0]
        refused(replace(s0, vaddr=s0.vaddr + 1), "refusing to place a probe")
        inside, claimed = _inside_an_instruction(image, s0.vaddr)
        refused(replace(s0, vaddr=inside, instruction=claimed), "not an instruction boundary")
        refused(replace(s0, instruction="nop"), "the plan says 'nop'")
        refused(replace(s0, vaddr=image.section_range(".text")[0] - 8), "no instruction boundary is proven|not")
    finally:
        t.kill()


def _inside_an_instruction(image, start: int) -> tuple[int, str]:
    """An address strictly inside a multi-byte instruction after `start`, and what a decoder
    starting there (wrongly) reads."""
    import capstone  # noqa: PLC0415

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for addr, size, _m, _o in md.disasm_lite(image.read(start, 256), start):
        if size >= 3:
            inside = addr + 1
            for _a, _s, m, o in md.disasm_lite(image.read(inside, 16), inside, 1):
                return inside, f"{m} {o}".strip()
    raise AssertionError("no multi-byte instruction near the site")


PLANTED = r'''
import atexit, dataclasses, sys
import bcc
import tracer.capture.engine as engine
calls = []
real_attach = bcc.BPF.attach_uprobe
def counting_attach(self, *a, **k):
    calls.append(k.get("addr"))
    return real_attach(self, *a, **k)
bcc.BPF.attach_uprobe = counting_attach
real_plan = engine.plan_for
def planted(image, version, layout=None):
    plan = real_plan(image, version, layout)
    s = plan.sites[0]
    return dataclasses.replace(plan, sites=(dataclasses.replace(s, vaddr=s.vaddr + 1), *plan.sites[1:]))
engine.plan_for = planted
atexit.register(lambda: open(sys.argv[1], "w").write(str(len(calls))))
from tracer.cli import main
main(sys.argv[2:])
'''


def test_tracer_refuses_a_planted_wrong_address(ebpf, tmp_path, one_python):
    """End to end: the CLI, handed a plan whose first site is one byte off, refuses with one
    line and attaches no uprobe at all."""
    spec = _spec_file(tmp_path, "__main__:f")
    t = Target(one_python, SLEEPER)
    t.expect("ready")
    count = tmp_path / "attach-calls"
    try:
        sites = probe_sites(t.pid)
        r = subprocess.run([sys.executable, "-c", PLANTED, str(count), "trace", "--pid", str(t.pid), "--spec", spec],
                           capture_output=True, text=True, cwd=str(Path(__file__).parents[1]), timeout=240)
        assert_one_line_error(r, "refusing to place a probe at", code=2)
        assert count.read_text() == "0"
        assert code_bytes(t.pid, sites) == [orig for _, _, orig in sites]
    finally:
        t.kill()


def test_target_memory_is_only_read(ebpf, tmp_path, one_python):
    """Under strace: every file of the target the tracer opens (its memory, maps, binaries) is
    opened read-only, and it never writes another process's memory or uses ptrace."""
    spec = _spec_file(tmp_path, "__main__:work", "__main__:hold")
    t = Target(one_python, LOOPS)
    t.expect("ready")
    log = tmp_path / "strace.log"
    try:
        cmd = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", str(log),
               "-e", "trace=open,openat,openat2,process_vm_writev,ptrace"]
        tr = Tracer.start("--pid", str(t.pid), "--spec", spec, "--no-status", "--duration", "600", prefix=cmd)
        tr.wait_attached(timeout=400)
        t.send("go")
        t.expect("calls")
        (tracer_pid,) = children(tr.proc.pid)  # the tracer, under strace
        os.kill(tracer_pid, signal.SIGINT)
        assert tr.finish() == 0, tr.stderr
    finally:
        t.kill()
    mine = [ln for ln in log.read_text().splitlines() if f"/proc/{t.pid}/" in ln and "open" in ln]
    assert any(f'"/proc/{t.pid}/mem"' in ln for ln in mine), "the tracer never read the target's memory?"
    for ln in mine:
        assert "O_RDONLY" in ln and "O_WRONLY" not in ln and "O_RDWR" not in ln, ln
    text = log.read_text()
    assert "process_vm_writev(" not in text and " ptrace(" not in text
