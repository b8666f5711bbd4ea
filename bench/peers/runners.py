"""Driving the harness, and attaching the external peers to it for one segment each.

Every external tool follows the same path: the harness prepares the workload and calls
`beacon()` every 5 ms; the tool starts (`t0`, the command start); the driver waits until the
tool shows it is attached (ophamin-trace: its first span, the beacon's, in the output file;
py-spy and pythoncalls: the line each prints once attached); then the harness times one
`run()` while the tool watches; then the tool gets SIGINT, writes what it saw and exits, and
its CPU time and peak RSS come from wait4().
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
PYSPY_RATE = 100
ATTACH_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 300.0
PYTHONCALLS = "/usr/sbin/pythoncalls-bpfcc"


class HarnessError(RuntimeError):
    pass


class Harness:
    """One running harness process (one interpreter, one workload)."""

    def __init__(self, python: str, argv: list[str], env: dict) -> None:
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name("harness.py")), *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(ROOT))
        hello = self._read(120)
        self.pid: int = hello["pid"]
        self.python: str = hello["python"]
        self.files: list[str] = hello["files"]

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise HarnessError(f"harness {' '.join(self.proc.args[1:])} gave no answer (exit {self.proc.poll()})")
        return json.loads(line)

    def _send(self, obj: dict | str) -> None:
        self.proc.stdin.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
        self.proc.stdin.flush()

    def segment(self, timeout: float = 900, **cmd) -> dict:
        self._send({"op": "segment", **cmd})
        return self._read(timeout)

    def begin_wait(self, **cmd) -> None:
        self._send({"op": "segment", "wait": True, **cmd})
        if not self._read(120).get("ready"):
            raise HarnessError("harness did not get ready")

    def go(self, run: bool = True, timeout: float = 900) -> dict:
        self._send("go" if run else "skip")
        return self._read(timeout)

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self._send({"op": "quit"})
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ToolRun:
    status: str  # "ok", "unavailable" (the tool cannot do this here) or "failed"
    reason: str = ""
    segment: dict | None = None  # the harness's result for the timed run
    attach_s: float | None = None  # command start -> first sign of attachment (ophamin: first span)
    cpu_segment_s: float | None = None  # the tool's own CPU while the segment ran
    cpu_total_s: float | None = None
    peak_rss_kb: int | None = None
    stdout: str = ""
    stderr: str = ""
    out_path: str = ""
    exit: int | None = None
    stop_s: float | None = None  # SIGINT -> exit: flushing what it saw
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("stdout", "stderr", "out_path")}
        d["stderr_tail"] = self.stderr[-400:]
        return d


def _tail(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class _Child:
    """A tool process, reaped with wait4() so its CPU time and peak RSS are known."""

    def __init__(self, argv: list[str], stdout, stderr, env: dict | None) -> None:
        self.proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, cwd=str(ROOT), env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.exit: int | None = None
        self.rusage = None

    def reap(self, block: bool = False) -> bool:
        if self.exit is None:
            pid, status, ru = os.wait4(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.exit, self.rusage = os.waitstatus_to_exitcode(status), ru
                self.proc.returncode = self.exit  # so Popen never waits on a reaped pid
        return self.exit is not None

    def stop(self, timeout: float) -> bool:
        """SIGINT, then wait up to `timeout`; SIGKILL after. True if it stopped on SIGINT."""
        if not self.reap():
            os.kill(self.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while not self.reap() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.exit is None:
            os.kill(self.pid, signal.SIGKILL)
            self.reap(block=True)
            return False
        return True


def attached_segment(harness: Harness, argv: list[str], attached: Callable[[str, str, str], int | None],
                     out_path: str, emitter: str, env: dict | None = None) -> ToolRun:
    """Run `argv` against the harness for one timed segment (see the module docstring).

    `attached(out_path, stdout, stderr)` returns the Unix ns at which the tool was attached,
    or None while it is not yet.
    """
    with tempfile.TemporaryDirectory(prefix="peers-tool-") as tmp:
        so, se = Path(tmp, "stdout"), Path(tmp, "stderr")
        harness.begin_wait(mode="none", emitter=emitter)
        t0 = time.time_ns()
        with open(so, "w") as fo, open(se, "w") as fe:
            child = _Child(argv, fo, fe, env)
        run = ToolRun("ok", out_path=out_path)

        def texts() -> tuple[str, str]:
            return so.read_text(errors="replace"), se.read_text(errors="replace")

        at = None
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while at is None and not child.reap() and time.monotonic() < deadline:
            time.sleep(0.02)
            at = attached(out_path, *texts())
        if at is None:
            harness.go(run=False)
            gone = child.exit is not None
            child.stop(10)
            run.stdout, run.stderr = texts()
            # A tool that exits with an error before attaching cannot do this here; one that
            # hangs, or exits 0 without attaching, failed.
            run.status = "unavailable" if gone and child.exit != 0 else "failed"
            run.reason = _tail(run.stderr) or _tail(run.stdout) or f"not attached within {ATTACH_TIMEOUT_S:.0f} s"
            return run
        run.attach_s = (at - t0) / 1e9
        c0 = _cpu_s(child.pid)
        run.segment = harness.go()
        c1 = _cpu_s(child.pid)
        if c0 is not None and c1 is not None:
            run.cpu_segment_s = c1 - c0
        t_stop = time.monotonic()
        if not child.stop(STOP_TIMEOUT_S):
            run.status, run.reason = "failed", f"did not stop within {STOP_TIMEOUT_S:.0f} s of SIGINT"
        run.stop_s = time.monotonic() - t_stop
        ru = child.rusage
        run.cpu_total_s = ru.ru_utime + ru.ru_stime
        run.peak_rss_kb = ru.ru_maxrss
        run.stdout, run.stderr = texts()
        run.exit = child.exit  # tools differ in what they return on SIGINT: each parser judges
        return run


# ---- ophamin-trace ------------------------------------------------------------------------

def _first_span_ns(out_path: str, stdout: str, stderr: str) -> int | None:
    from tracer.otlpjson import decode_request  # noqa: PLC0415

    try:
        with open(out_path) as f:
            line = f.readline()
        spans = list(decode_request(json.loads(line)))
    except (OSError, ValueError):
        return None
    return min(s.start_ns for s in spans) if spans else None


def tracer_modes() -> set[str]:
    """Capture modes this build's `trace` command accepts (`--mode` may not exist yet)."""
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "tracer.cli", "trace", "--help"],
                         capture_output=True, text=True, cwd=str(ROOT)).stdout
    if "--mode" not in out:
        return {"exact"}
    from tracer.session import CAPTURES  # noqa: PLC0415

    return set(CAPTURES)


def ophamin(harness: Harness, spec_path: str, emitter: str, extra_args: tuple[str, ...] = (),
            read_output: Callable[[str], dict] | None = None) -> ToolRun:
    """One attached segment under ophamin-trace; `read_output(path)` may digest the span file
    before it is deleted (its result lands in `extra["output"]`)."""
    fd, out_path = tempfile.mkstemp(prefix="peers-ophamin-", suffix=".jsonl")
    os.close(fd)
    os.unlink(out_path)  # the tracer creates it; its first line is the attach signal
    argv = [str(ROOT / ".venv/bin/python"), "-m", "tracer.cli", "--pid", str(harness.pid), "--spec", spec_path,
            "--output", out_path, "--json", "--no-status", *extra_args]
    try:
        run = attached_segment(harness, argv, _first_span_ns, out_path, emitter)
        if run.status == "ok":
            try:
                res = json.loads(run.stdout)
            except ValueError:
                run.status, run.reason = "failed", f"exit {run.exit}, no JSON summary: {_tail(run.stderr)}"
                return run
            run.extra = {"counters": res["counters"], "losses": res["losses"], "attach_s_reported": res["attach_s"],
                         "spans": {s["name"]: s["count"] for s in res["stats"]}, "warnings": res["warnings"],
                         "output_bytes": os.path.getsize(out_path) if os.path.exists(out_path) else 0}
            if read_output is not None:
                run.extra["output"] = read_output(out_path)
        return run
    finally:
        if os.path.exists(out_path):
            os.unlink(out_path)


# ---- py-spy ---------------------------------------------------------------------------------

def _pyspy_attached(out_path: str, stdout: str, stderr: str) -> int | None:
    return time.time_ns() if "Sampling process" in stdout + stderr else None


def pyspy(harness: Harness, pyspy_bin: str, emitter: str) -> ToolRun:
    fd, out_path = tempfile.mkstemp(prefix="peers-pyspy-", suffix=".txt")
    os.close(fd)
    argv = [pyspy_bin, "record", "--pid", str(harness.pid), "--rate", str(PYSPY_RATE), "--format", "raw",
            "--output", out_path]
    try:
        run = attached_segment(harness, argv, _pyspy_attached, out_path, emitter)
        if run.status == "ok" and "Wrote raw" not in run.stdout + run.stderr:
            run.status, run.reason = "failed", f"exit {run.exit}, no profile written: {_tail(run.stderr)}"
        if run.status == "ok":
            stacks = []
            with open(out_path) as f:
                for line in f:
                    stack, _, n = line.rstrip("\n").rpartition(" ")
                    if stack and n.isdigit():
                        stacks.append((stack.split(";"), int(n)))
            run.extra = {"samples": sum(n for _, n in stacks), "stacks": stacks}
        return run
    finally:
        os.unlink(out_path)


# ---- bcc pythoncalls -------------------------------------------------------------------------

def _pythoncalls_attached(out_path: str, stdout: str, stderr: str) -> int | None:
    return time.time_ns() if "Tracing calls in process" in stdout else None


def pythoncalls(harness: Harness, emitter: str) -> ToolRun:
    if not os.path.exists(PYTHONCALLS):
        return ToolRun("unavailable", f"{PYTHONCALLS} not installed (Debian package bpfcc-tools)")
    run = attached_segment(harness, [PYTHONCALLS, "-l", "python", str(harness.pid)], _pythoncalls_attached, "",
                           emitter)
    if run.status == "ok" and "# CALLS" not in run.stdout:
        run.status, run.reason = "failed", f"exit {run.exit}, no call table: {_tail(run.stderr)}"
    if run.status == "ok":
        calls: dict[str, int] = {}
        body = run.stdout.split("# CALLS", 1)[1]
        for line in body.splitlines():
            name, _, n = line.strip().rpartition(" ")
            if name and n.isdigit():
                calls[name.strip()] = int(n)
        run.extra = {"calls": calls}
    return run
