"""Helpers for tests/test_hardening.py: real processes (targets, CLI tracers) and what the
kernel shows about them (probe bytes in the target's text, perf-event fds, tracefs entries)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracer.discover.elf import open_image
from tracer.discover.process import find_interpreter, proc_state
from tracer.plan.probes import plan_for

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tracer.cli"]
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
INT3 = 0xCC
TRACEFS_UPROBES = "/sys/kernel/tracing/uprobe_events"


def as_nobody(*caps: str) -> list[str]:
    """A command prefix: run as `nobody`, with these capabilities (e.g. "bpf") made ambient."""
    if not caps:
        return list(NOBODY)
    c = ",".join("+" + x for x in caps)
    return [*NOBODY, f"--inh-caps={c}", f"--ambient-caps={c}"]


def run_cli(*args: str, prefix: list[str] | None = None, env: dict | None = None, timeout: float = 240,
            **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, HOME="/tmp", **(env or {}))
    return subprocess.run([*(prefix or []), *CLI, *args], capture_output=True, text=True, cwd=str(ROOT),
                          env=e, timeout=timeout, **kw)


def assert_one_line_error(r: subprocess.CompletedProcess, text: str, code: int | None = None) -> None:
    assert r.returncode != 0, (r.stdout, r.stderr)
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ophamin-trace: error: "), r.stderr
    assert text in lines[0], lines[0]


def describe(pid: int) -> str:
    """State, kernel wait channel and children of a process, for failure messages."""
    out = []
    for p in [pid, *children(pid)]:
        try:
            st = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = Path(f"/proc/{p}/wchan").read_text()
        except OSError:
            st, wchan = "gone", ""
        out.append(f"{p}: {st} {wchan}")
    return ", ".join(out)


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Target:
    """A Python process driven line by line over stdin/stdout."""

    def __init__(self, python: str, program: str, *, prefix: list[str] | None = None, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen([*(prefix or []), python, "-c", program], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, cwd=cwd)
        self.pid = self.proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        self._pending: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put("")  # EOF

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float = 120) -> list[str]:
        """The words of the next line starting with `prefix` (other lines are kept for later)."""
        for i, line in enumerate(self._pending):
            if line.startswith(prefix):
                del self._pending[i]
                return line.split()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"target {self.pid}: no line {prefix!r} within {timeout} s "
                                     f"(lines so far: {self._pending}; {describe(self.pid)})") from None
            if line.startswith(prefix):
                return line.split()
            if line == "":
                raise AssertionError(f"target {self.pid} closed its output before {prefix!r}")
            self._pending.append(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@dataclass
class Tracer:
    """`ophamin-trace` as a separate process; `attached` is set once it says it is attached."""

    proc: subprocess.Popen
    stderr: list[str] = field(default_factory=list)
    attached: threading.Event = field(default_factory=threading.Event)
    stdout: str = ""

    @classmethod
    def start(cls, *args: str, prefix: list[str] | None = None, env: dict | None = None) -> Tracer:
        e = dict(os.environ, HOME="/tmp", **(env or {}))
        p = subprocess.Popen([*(prefix or []), *CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=str(ROOT), env=e)
        t = cls(p)
        t._reader = threading.Thread(target=t._read_err, daemon=True)
        t._reader.start()
        return t

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            if "attached pid" in line:
                self.attached.set()

    def wait_attached(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not self.attached.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"tracer did not attach (rc {self.proc.poll()}): {self.stderr}")

    def finish(self, timeout: float = 120) -> int:
        """Wait for exit; then `stdout` and all of `stderr` are in."""
        self.stdout = self.proc.stdout.read()
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return self.proc.returncode


def probe_sites(pid: int) -> list[tuple[str, int, int]]:
    """(label, runtime address, first byte in the image file) of every site planned for `pid`."""
    interp = find_interpreter(pid)
    image = open_image(interp.host_path)
    plan = plan_for(image, interp.version)
    return [(s.label, s.vaddr + interp.bias, image.read(s.vaddr, 1)[0]) for s in plan.sites]


def code_bytes(pid: int, sites: list[tuple[str, int, int]]) -> list[int]:
    """The first byte at each site as the target's memory holds it now (read-only access)."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return [os.pread(fd, 1, addr)[0] for _, addr, _ in sites]
    finally:
        os.close(fd)


def wait_for(predicate, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def perf_event_fds(pid: int) -> int:
    """How many perf-event file descriptors a process holds (each uprobe or tracepoint is one)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    n += 1
            except OSError:
                pass
    except FileNotFoundError:
        return 0
    return n


def tracefs_entries(tracer_pid: int) -> list[str]:
    try:
        with open(TRACEFS_UPROBES) as f:
            return [ln for ln in f.read().splitlines() if f"_bcc_{tracer_pid}" in ln.split(" ", 1)[0]]
    except OSError:
        return []


def bpftool_perf_pids() -> dict[int, int] | None:
    """pid -> number of perf-event BPF attachments it owns (`bpftool perf list`), None without bpftool."""
    try:
        out = subprocess.run(["bpftool", "perf", "list"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    pids: dict[int, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[0] == "pid" and "uprobe" in line:
            pids[int(parts[1])] = pids.get(int(parts[1]), 0) + 1
    return pids


def make_zombie() -> subprocess.Popen:
    """A child that has exited and is not reaped (yet): state Z."""
    p = subprocess.Popen(["true"])
    wait_for(lambda: (proc_state(p.pid) or ("?",))[0] == "Z", 10, "a zombie")
    return p
