"""Everyday use: -f / --module targets, the Python API, many processes with --match/--follow.

Real processes, real BPF, the real CLI in a subprocess. A tracer tells when its probes
are in with an "attached pid N" line on stderr; targets wait on stdin until then, so every
count below is exact and nothing depends on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from tracer.discover.container import container_id_of, process_attributes
from tracer.errors import SpecError
from tracer.interpreters import find_interpreters, target_python
from tracer.otlpjson import read_spans
from tracer.spec import spec_from_functions
from tracer.spec.modules import functions_in, module_targets

ROOT = Path(__file__).resolve().parents[1]
TRACER = [sys.executable, "-m", "tracer.cli"]
TIMEOUT = 180  # compiles take seconds each on a loaded two-core machine


class Tracer:
    """The CLI tracer in a subprocess, its stderr lines read as they come. Its stdin is a
    pipe: in launch mode the traced command inherits it."""

    def __init__(self, args: list[str], command: tuple[str, ...] = ()) -> None:
        argv = [*TRACER, *args, "--no-status", *(("--", *command) if command else ())]
        self.proc = subprocess.Popen(argv, cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, pattern: str, n: int = 1) -> list[re.Match]:
        found = []
        while len(found) < n:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} from the tracer: {''.join(self.stderr)}") from None
            if line == "":
                raise AssertionError(f"tracer exited before {pattern!r}: {''.join(self.stderr)}")
            m = re.search(pattern, line)
            if m:
                found.append(m)
        return found

    def finish(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _target(python: str, script: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    p = subprocess.Popen([python, str(script), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=str(cwd) if cwd else None)
    assert p.stdout.readline().strip() == "ready"  # imports done, waiting on stdin
    return p


def _go(p: subprocess.Popen) -> None:
    p.stdin.write("\n")
    p.stdin.flush()


# ---- -f ---------------------------------------------------------------------------------

PROGRAM = '''
import sys
class Helper:
    def step(self, i):
        return i * 2
def work(n):
    h = Helper()
    total = 0
    for i in range(n):
        total += h.step(i)
    return total
def outer():
    def inner():
        return 1
    return inner() + inner()
def untraced():
    return 0
print("ready", flush=True)
sys.stdin.readline()
for _ in range(5):
    work(7)
for _ in range(3):
    outer()
for _ in range(50):
    untraced()
print("done", flush=True)
'''


def test_launch_mode_with_module_and_function(ebpf, tmp_path):
    """`-- COMMAND`: the launched program reads the tracer's stdin, so it waits there until
    the probes are in; --module is listed from the launched process's own import roots."""
    _write_pkg(tmp_path)
    pyenv = [i for i in find_interpreters() if i.label.startswith("pyenv-")]
    python = target_python(pyenv[0], ROOT / ".cache" / "targets") if pyenv else sys.executable
    out = tmp_path / "spans.jsonl"
    # The app runs in tmp_path (its import root): start it through a shell that changes there.
    tr = Tracer(["-f", "__main__:work", "--module", "pkg.jobs", "-o", str(out)],
                command=("sh", "-c", f'cd {tmp_path} && exec "$0" app.py', python))
    try:
        pid = int(tr.wait_for(r"attached pid (\d+)")[0].group(1))
        tr.proc.stdin.write("\n")
        tr.proc.stdin.flush()
        rc, summary = tr.finish()
    finally:
        tr.kill()
    assert rc == 0, "".join(tr.stderr)
    spans = read_spans(str(out))
    assert {s.resource["process.pid"] for s in spans} == {pid}
    want = {"work": 5, **{k: v for k, v in MODULE_COUNTS.items() if k.startswith("pkg.jobs.")}}
    # Launch mode has the probes in before the program's first instruction, so the decorator's
    # one call at import time (which --pid attaches too late to see) is traced as well.
    want["pkg.jobs.deco"] = 1
    assert Counter(s.name for s in spans) == want
    assert "ready" in summary and "done" in summary  # the program's own output, then the table


def test_function_flag_errors_are_one_line():
    for arg, text in (("nocolon", "must be module:qualname"), ("a:b:c", "must be module:qualname"),
                      ("app:1x", "function must be 'module:qualname'"), ("app:f=", "span name after '=' is empty")):
        r = subprocess.run([*TRACER, "--pid", "1", "-f", arg], capture_output=True, text=True, cwd=str(ROOT))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(SpecError, match="named twice"):
        spec_from_functions(["m:f", "m:f=other"])
    spec = spec_from_functions(["app.jobs:Worker.run=job.run", "app.db:query"])
    assert [(t.target_id, t.module, t.qualname, t.name) for t in spec.targets] == [
        (1, "app.jobs", "Worker.run", "job.run"), (2, "app.db", "query", "query")]


# ---- --module ---------------------------------------------------------------------------

PKG_INIT = '''
def setup():
    return 1
'''
PKG_JOBS = '''
import functools

def deco(f):
    @functools.wraps(f)
    def wrapper(*a):
        return f(*a)
    return wrapper

def run(n):
    return n

class A:
    def run(self, n):
        return n + 1

class B:
    def run(self, n):
        return n + 2
    class Inner:
        def poll(self):
            return 3

@deco
def decorated(x):
    def nested(y):
        return y
    return nested(x)

if True:
    def conditional():
        return 4

square = lambda v: v * v
'''
APP = '''
import sys
import pkg, pkg.jobs as jobs
class Helper:
    def step(self, i):
        return i * 2
def work(n):
    h = Helper()
    total = 0
    for i in range(n):
        total += h.step(i)
    return total
def outer():
    def inner():
        return 1
    return inner() + inner()
def untraced():
    return 0
print("ready", flush=True)
sys.stdin.readline()
for _ in range(5):
    work(7)
for _ in range(3):
    outer()
for _ in range(50):
    untraced()
pkg.setup()
for i in range(4):
    jobs.run(i)
for i in range(3):
    jobs.A().run(i)
for i in range(2):
    jobs.B().run(i)
jobs.B.Inner().poll()
for i in range(5):
    jobs.decorated(i)
jobs.conditional()
jobs.square(3)
print("done", flush=True)
'''
MODULE_COUNTS = {"pkg.setup": 1, "pkg.jobs.run": 4, "pkg.jobs.A.run": 3, "pkg.jobs.B.run": 2,
                 "pkg.jobs.B.Inner.poll": 1, "pkg.jobs.decorated": 5, "pkg.jobs.decorated.<locals>.nested": 5,
                 "pkg.jobs.deco.<locals>.wrapper": 5, "pkg.jobs.conditional": 1}


def _write_pkg(root: Path) -> Path:
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text(PKG_INIT)
    (root / "pkg" / "jobs.py").write_text(PKG_JOBS)
    (root / "app.py").write_text(APP)
    return root / "app.py"


def test_functions_in_lists_every_def():
    names = [q for q, _ in functions_in(PKG_JOBS)]
    assert names == ["deco", "deco.<locals>.wrapper", "run", "A.run", "B.run", "B.Inner.poll", "decorated",
                     "decorated.<locals>.nested", "conditional"]
    lines = dict(functions_in(PKG_JOBS))
    assert lines["decorated"] == PKG_JOBS.splitlines().index("@deco") + 1  # co_firstlineno: the decorator


def test_function_and_module_flags_give_exact_counts(ebpf, interpreter, tmp_path):
    """-f functions of __main__ and --module pkg together, on every interpreter."""
    interp, python = interpreter
    app = _write_pkg(tmp_path)
    out = tmp_path / "spans.jsonl"
    p = _target(python, app, cwd=tmp_path)
    tr = Tracer(["--pid", str(p.pid), "-f", "__main__:work", "-f", "__main__:Helper.step=helper.step",
                 "-f", "__main__:outer.<locals>.inner", "--module", "pkg", "-o", str(out)])
    try:
        tr.wait_for(rf"attached pid {p.pid}\b")
        _go(p)
        assert p.stdout.readline().strip() == "done"
        p.wait(timeout=TIMEOUT)
        rc, summary = tr.finish()
    finally:
        p.kill()
        tr.kill()
    assert rc == 0, "".join(tr.stderr)
    spans = read_spans(str(out))
    want = {"work": 5, "helper.step": 35, "outer.<locals>.inner": 6, **MODULE_COUNTS}
    # deco itself ran at import, before attach: never seen, never counted; untraced()
    # and the lambda are not targets.
    assert Counter(s.name for s in spans) == want, (interp.label, Counter(s.name for s in spans))
    assert all(s.resource["process.pid"] == p.pid for s in spans)
    step = next(s for s in spans if s.name == "helper.step")
    assert step.attributes["code.function"] == "step" and step.attributes["code.namespace"] == "__main__"
    a_run = next(s for s in spans if s.name == "pkg.jobs.A.run")
    assert a_run.attributes["code.namespace"] == "pkg.jobs"
    by_id = {s.span_id: s for s in spans}
    assert all(by_id[s.parent_span_id].name == "work" for s in spans if s.name == "helper.step")
    assert "helper.step" in summary and "drops: 0" in summary


def test_module_flag_errors_and_limits(tmp_path):
    """The listing reads a real process's import roots; bad prefixes and a set that cannot
    fit the kernel tables are one-line errors; names past the kernel's slots are warned."""
    _write_pkg(tmp_path)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "__init__.py").write_text("".join(f"def f{i}():\n    pass\n" for i in range(1100)))
    (tmp_path / "crowd.py").write_text("".join(f"class C{i}:\n    def __init__(self):\n        pass\n"
                                               for i in range(6)))
    py310 = next((i for i in find_interpreters() if i.version[:2] == (3, 10)), None)
    python = target_python(py310, ROOT / ".cache" / "targets") if py310 else sys.executable
    p = _target(python, tmp_path / "app.py", cwd=tmp_path)
    try:
        for prefix, text in (("nosuch", "--module nosuch: no nosuch.py or package directory"),
                             ("big", "1100 functions need 1100 kernel match rules"),
                             ("bad-name", "not a dotted module name")):
            r = subprocess.run([*TRACER, "--pid", str(p.pid), "--module", prefix, "--no-status"],
                               capture_output=True, text=True, cwd=str(ROOT))
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        from tracer.spec import Spec  # noqa: PLC0415

        targets, warnings = module_targets(p.pid, ["crowd"], (3, 10, 0), Spec("t", "t"))
        assert len(targets) == 4  # co_name "__init__" x6: four slots in the kernel
        assert any("2 functions not traced" in w and "__init__ x2" in w for w in warnings), warnings
        targets, warnings = module_targets(p.pid, ["crowd"], (3, 12, 0), Spec("t", "t"))
        assert len(targets) == 6 and not warnings  # qualnames C0.__init__ ... differ
    finally:
        p.kill()
        p.wait()


# ---- the Python API ---------------------------------------------------------------------

def _example():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("ophamin_api", ROOT / "examples" / "ophamin_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_example_profile_matches_cli(ebpf, tmp_path):
    """The example (examples/ophamin_api.py) and the CLI trace the same batch of the
    reference substrate at once; their per-cycle profiles agree."""
    cycles = 6
    example = _example()
    proc = example.start_substrate(cycles, 20)
    cli_out, api_out = tmp_path / "cli.jsonl", tmp_path / "api.jsonl"
    tr = Tracer(["--pid", str(proc.pid), "--spec", "reference", "--sched", "-o", str(cli_out)])
    try:
        tr.wait_for(rf"attached pid {proc.pid}\b")
        r = subprocess.run([sys.executable, str(ROOT / "examples" / "ophamin_api.py"), "--pid", str(proc.pid),
                            "--output", str(api_out)], capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=TIMEOUT) == 0
        rc, _ = tr.finish()
        assert rc == 0, "".join(tr.stderr)
    finally:
        proc.kill()
        tr.kill()
    api = json.loads(r.stdout)
    steps = ("takwin.cycle", "takwin.step1_screen", "takwin.step2_encode", "takwin.step3_step4_traverse",
             "takwin.step5_consolidate", "takwin.step6_vault", "takwin.step7_render")
    # Streamed while the batch ran: every span, once.
    assert api["streamed"] == {s: cycles for s in steps}
    assert {k: v["count"] for k, v in api["per_step_timing"].items()} == {s: cycles for s in steps}
    prof = api["profile"]
    assert prof["attribution_kind"] == "per_cycle" and prof["n_cycles"] == cycles
    assert [c["cycle_index"] for c in prof["per_cycle"]] == list(range(cycles))
    assert all(c["attribution_kind"] == "per_cycle" for c in prof["per_cycle"])

    def cli_profile(path: Path) -> dict:
        r = subprocess.run([*TRACER, "profile", str(path)], capture_output=True, text=True, cwd=str(ROOT))
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    # The API's spans are the ones its exporter wrote: the CLI's profile of that file is
    # the API's profile exactly.
    own = cli_profile(api_out)
    assert own["per_cycle"] == prof["per_cycle"]
    # The CLI tracer's own run: the same cycles. Its probes fire on the same instructions
    # just before or after the API's (two BPF programs on one uprobe), so wall times differ
    # by the other program's run time: microseconds (bench/everyday.py measures the gap).
    cli = cli_profile(cli_out)
    assert len(cli["per_cycle"]) == cycles
    # Both ran the scheduler programs: every cycle's CPU and RSS peak measured on both sides.
    assert not api["sched_unavailable"]
    for a, c in zip(prof["per_cycle"], cli["per_cycle"]):
        assert a["cycle_index"] == c["cycle_index"]
        assert abs(a["wall_time_s"] - c["wall_time_s"]) < 0.002, (a, c)
        assert a["cpu_time_attributed_s"] is not None and c["cpu_time_attributed_s"] is not None


def test_api_session_streams_and_reports(ebpf, tmp_path):
    """attach() returns with the probes in, here on two processes; spans stream while they
    run, each with its process's resource; results per process after the end; a bad PID
    is a TraceError at attach."""
    import tracer  # noqa: PLC0415

    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    pyenv = [i for i in find_interpreters() if i.label.startswith("pyenv-")]
    python = target_python(pyenv[-1], ROOT / ".cache" / "targets") if pyenv else sys.executable
    procs = [_target(python, script), _target(python, script)]
    pids = [p.pid for p in procs]
    try:
        with tracer.attach(pids, functions=["__main__:work", "__main__:Helper.step"], sched=False) as session:
            assert session.running and session.pids == tuple(pids)
            for p in procs:
                _go(p)
            names = Counter((s.resource["process.pid"], s.name) for s in session.spans())
        assert [p.wait(timeout=TIMEOUT) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    assert not session.running
    assert names == {(pid, n): c for pid in pids for n, c in (("work", 5), ("Helper.step", 35))}
    assert session.result.stopped_by == "target exited"
    assert [t.pid for t in session.result.targets] == pids
    with pytest.raises(tracer.TraceError, match="2 processes were traced"):
        session.per_step_timing  # noqa: B018
    for pid in pids:
        timing = session.per_step_timing_for(pid)
        assert timing["work"]["count"] == 5 and timing["work"]["p10_ms"] <= timing["work"]["median_ms"]
        prof = session.profile_for(pid)  # not a Takwin trace: each root span (work) is a cycle
        assert prof.n_cycles == 5 and prof.process_count_max == 1 and prof.attribution_kind == "per_cycle"
        assert {s.name: s.count for s in prof.per_step_timing}["Helper.step"] == 35
    with pytest.raises(tracer.TraceError, match="no process with PID"), tracer.attach(999_999_999):
        pass


# ---- many processes ---------------------------------------------------------------------

WORKER = '''
import sys
def tick(i):
    return i
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[2])):
    tick(i)
'''


def _cgroup2() -> Path | None:
    """A writable cgroup v2 hierarchy, to put a process in a container-like cgroup."""
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if parts[2] == "cgroup2" and os.access(parts[1], os.W_OK):
            return Path(parts[1])
    return None


class FakeContainer:
    """A real cgroup named the way docker's systemd driver names a container's."""

    def __init__(self, root: Path) -> None:
        self.id = secrets.token_hex(32)
        self.parent = root / f"ophamin-test-{secrets.token_hex(4)}"
        self.path = self.parent / f"docker-{self.id}.scope"
        self.path.mkdir(parents=True)

    def wrap(self, argv: list[str]) -> list[str]:
        # The shell joins the cgroup, then execs the target: it runs there from its first instruction.
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        for d in (self.path, self.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def test_container_id_from_cgroup_paths():
    cid = "4f" * 32
    cases = {
        f"0::/system.slice/docker-{cid}.scope\n": cid,
        f"12:memory:/docker/{cid}\n0::/\n": cid,
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b.slice/cri-containerd-{cid}.scope": cid,
        f"0::/machine.slice/libpod-{cid}.scope/container": cid,
        f"0::/kubepods/besteffort/pod0f1e/{cid}": cid,
        "4:memory:/process_api/128954b0a935bdfc65a697dcc2bc642c\n0::/\n": None,  # 32 hex: not an id
        "0::/user.slice/user-0.slice/session-1.scope\n": None,
    }
    for text, want in cases.items():
        assert container_id_of(text) == want, text


def test_container_id_of_a_real_process(tmp_path):
    root = _cgroup2()
    if root is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no writable cgroup v2 hierarchy to run a process in a container cgroup")
        pytest.skip("no writable cgroup v2 hierarchy")
    box = FakeContainer(root)
    p = subprocess.Popen(box.wrap([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        attrs = process_attributes(p.pid)
        assert attrs["container.id"] == box.id
        assert attrs["process.executable.name"].startswith("python")
        assert "container.id" not in process_attributes(os.getpid()) or container_id_of(
            Path("/proc/self/cgroup").read_text())
    finally:
        p.kill()
        p.wait()
        box.remove()


def test_match_follow_attaches_before_and_after(ebpf, tmp_path):
    """Three workers started before the tracer, one after (with --follow), on different
    interpreters; each one's spans are told apart by its resource attributes."""
    token = f"everyday-{secrets.token_hex(4)}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    pythons = [target_python(i, ROOT / ".cache" / "targets") for i in find_interpreters()] or [sys.executable]
    out = tmp_path / "spans.jsonl"
    root = _cgroup2()
    box = FakeContainer(root) if root else None
    workers: dict[int, tuple[subprocess.Popen, int]] = {}
    decoy = subprocess.Popen(["sh", "-c", "sleep 60; true", "worker.py", token])  # matches, not Python
    tr = None
    try:
        for n in (3, 4, 5):
            p = _target(pythons[n % len(pythons)], script, token, str(n))
            workers[p.pid] = (p, n)
        tr = Tracer(["--match", rf"worker\.py {token}", "--follow", "-f", "__main__:tick", "-o", str(out),
                     "--json"])
        attached = {int(m.group(1)) for m in tr.wait_for(r"attached pid (\d+)", 3)}
        assert attached == set(workers)
        argv = [pythons[6 % len(pythons)], str(script), token, "6"]
        late = subprocess.Popen(box.wrap(argv) if box else argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert late.stdout.readline().strip() == "ready"
        workers[late.pid] = (late, 6)
        assert int(tr.wait_for(r"attached pid (\d+)")[0].group(1)) == late.pid
        for p, _ in workers.values():
            _go(p)
        for p, _ in workers.values():
            assert p.wait(timeout=TIMEOUT) == 0
        detached = {int(m.group(1)) for m in tr.wait_for(r"detached pid (\d+) \(target exited\)", 4)}
        assert detached == set(workers)
        tr.proc.send_signal(signal.SIGTERM)  # --follow runs until stopped
        rc, summary = tr.finish()
    finally:
        for p, _ in workers.values():
            p.kill()
        decoy.kill()
        decoy.wait()
        if tr is not None:
            tr.kill()
        if box:
            box.remove()
    assert rc == 0, "".join(tr.stderr)
    spans = read_spans(str(out))
    per_pid = Counter(s.resource["process.pid"] for s in spans)
    assert per_pid == {pid: n for pid, (_, n) in workers.items()}
    assert {s.name for s in spans} == {"tick"}
    for s in spans:
        assert token in s.resource["process.command_line"]
        assert s.resource["host.name"] == os.uname().nodename
        if box and s.resource["process.pid"] == late.pid:
            assert s.resource["container.id"] == box.id
        else:
            assert "container.id" not in s.resource
    fleet = json.loads(summary)
    assert fleet["stopped_by"] == "SIGTERM"
    assert sorted(t["pid"] for t in fleet["processes"]) == sorted(workers)
    assert decoy.pid in {s["pid"] for s in fleet["skipped"]}
    assert all(t["counters"]["dropped"] == 0 for t in fleet["processes"])
