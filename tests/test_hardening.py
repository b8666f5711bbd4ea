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
    code_bytes,
    make_zombie,
    perf_event_fds,
    probe_sites,
    run_cli,
    tracefs_entries,
    wait_for,
)

from tracer.capture.engine import EV_ENTRY, CaptureEngine
from tracer.discover.elf import open_image
from tracer.discover.process import find_interpreter
from tracer.export.otlp import OtlpHttp
from tracer.export.safe_file import open_output
from tracer.interpreters import find_interpreters, target_python
from tracer.otlpjson import STATUS_ERROR, Span, decode_request, read_spans
from tracer.plan.probes import ProbePlan, plan_for
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
        p = subprocess.Popen([interp.path, "-c", "import time; time.sleep(60)"])
        try:
            wait_for(lambda p=p: os.path.exists(f"/proc/{p.pid}/maps") and "python" in
                     open(f"/proc/{p.pid}/maps").read(), 10, "the interpreter to map")
            r = run_cli("trace", "--pid", str(p.pid), "--spec", spec)
            assert_one_line_error(r, "supported")
            assert "3.9-3.13" in r.stderr, (interp.label, r.stderr)
        finally:
            p.kill()
            p.wait()


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
        r = run_cli("trace", "--pid", str(roots.pid), "--spec", str(spec), prefix=caps)
        assert_one_line_error(r, "only root may trace another user's process", code=77)
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
