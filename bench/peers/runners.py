"""Driving the harness, and attaching the external peers to it.

Every external tool follows the same path (`ToolSession`): the harness prepares the workload
and calls `beacon()` every 5 ms; the tool starts (`t0`, the command start); the driver waits
until the tool shows it is attached (ophamin-trace: its first span, the beacon's, in the output
file; py-spy and pythoncalls: the line each prints once attached); then the harness times
`run()` while the tool watches, once or for several segments (each segment's wall-clock window
is known, so what the tool saw can be split per segment); then the tool gets SIGINT, writes
what it saw and exits, and its CPU time and peak RSS come from wait4().
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

    def __init__(self, python: str, argv: list[str]) -> None:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TERM")}
        # One hash seed for every harness: the same dict layouts in each process.
        env = dict(keep, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
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


def calibrate_cycle_ms(python: Path, cycle_s: float) -> int:
    """cycle_ms giving about `cycle_s` of CPU per cycle on this interpreter: two short runs,
    a straight line through them (the substrate's work grows linearly with cycle_ms)."""
    h = Harness(str(python), ["--workload", "reference", "--cycle-ms", "20", "--cycles", "3"])
    try:
        h.segment(mode="none", emitter="noop")
        pts = []
        for c in (20, 100):
            r = h.segment(mode="none", emitter="noop", cycle_ms=c)
            pts.append((c, r["cpu_s"] / 3))
    finally:
        h.quit()
    (c0, t0), (c1, t1) = pts
    slope = (t1 - t0) / (c1 - c0)
    fixed = t0 - slope * c0
    return max(1, round((cycle_s - fixed) / slope)) if slope > 0 else 20


def _family(pid: int) -> list[int]:
    """A process and its children (a tool started through a shell wrapper runs in a child)."""
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _hwm_kb(pid: int) -> int | None:
    """Peak RSS of a live process's current image. (wait4's ru_maxrss would not do: it also
    counts the pre-exec copy of the forking driver, which grows as it parses results.)"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


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
    """What one tool session produced: status, the segments it watched, its own costs."""

    status: str  # "ok", "unavailable" (the tool cannot do this here) or "failed"
    reason: str = ""
    segments: list = field(default_factory=list)  # the harness's results, each with tool_cpu_s
    attach_s: float | None = None  # command start -> first sign of attachment (ophamin: first span)
    cpu_total_s: float | None = None
    peak_rss_kb: int | None = None
    stdout: str = ""
    stderr: str = ""
    exit: int | None = None
    stop_s: float | None = None  # SIGINT -> exit: flushing what it saw
    extra: dict = field(default_factory=dict)


def _tail(text: str) -> str:
    """A tool's complaint in one line: its first line, and its last if there are more."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) > 1:
        return f"{lines[0]} ... {lines[-1]}"
    return lines[0] if lines else ""


class _Child:
    """A tool process, reaped with wait4() so its CPU time and peak RSS are known."""

    def __init__(self, argv: list[str], stdout, stderr, env: dict | None) -> None:
        self.proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, cwd=str(ROOT), env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.exit: int | None = None
        self.rusage = None
        self.peak_kb = 0

    def reap(self, block: bool = False) -> bool:
        if self.exit is None:
            self.peak_kb = max(self.peak_kb, *(_hwm_kb(p) or 0 for p in _family(self.pid)))
            pid, status, ru = os.wait4(self.pid, 0 if block else os.WNOHANG)
            if pid:
                self.exit, self.rusage = os.waitstatus_to_exitcode(status), ru
                self.proc.returncode = self.exit  # so Popen never waits on a reaped pid
        return self.exit is not None

    def stop(self, timeout: float) -> bool:
        """SIGINT to its process group (as Ctrl-C would: Debian's pythoncalls-bpfcc is a shell
        wrapper that does not pass a signal on to the tool it runs), then wait up to `timeout`;
        SIGKILL after. True if it stopped on SIGINT."""
        if not self.reap():
            os.killpg(self.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while not self.reap() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.exit is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.reap(block=True)
            return False
        return True


class ToolSession:
    """An external tool attached to a harness for one or more timed segments.

    `attached(out_path, stdout, stderr)` returns the Unix ns at which the tool was attached,
    or None while it is not yet. If it never attaches, `ok` is False and `close()` says why.
    """

    def __init__(self, harness: Harness, argv: list[str], attached: Callable[[str, str, str], int | None],
                 out_path: str = "", emitter: str = "noop", env: dict | None = None) -> None:
        self.harness, self.emitter, self.out_path = harness, emitter, out_path
        self._tmp = tempfile.TemporaryDirectory(prefix="peers-tool-")
        self._so, self._se = Path(self._tmp.name, "stdout"), Path(self._tmp.name, "stderr")
        self.run = ToolRun("ok")
        harness.begin_wait(mode="none", emitter=emitter)
        t0 = time.time_ns()
        with open(self._so, "w") as fo, open(self._se, "w") as fe:
            self.child = _Child(argv, fo, fe, env)
        at = None
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while at is None and not self.child.reap() and time.monotonic() < deadline:
            time.sleep(0.02)
            at = attached(out_path, *self._texts())
        self.ok = at is not None
        self._waiting = True  # the harness is beaconing, ready for its first timed run
        if not self.ok:
            harness.go(run=False)
            self._waiting = False
            gone = self.child.exit is not None
            self.child.stop(10)
            self.run.stdout, self.run.stderr = self._texts()
            # A tool that exits with an error before attaching cannot do this here; one that
            # hangs, or exits 0 without attaching, failed.
            self.run.status = "unavailable" if gone and self.child.exit != 0 else "failed"
            self.run.reason = (_tail(self.run.stderr) or _tail(self.run.stdout)
                               or f"not attached within {ATTACH_TIMEOUT_S:.0f} s")
        else:
            self.run.attach_s = (at - t0) / 1e9

    def _texts(self) -> tuple[str, str]:
        return self._so.read_text(errors="replace"), self._se.read_text(errors="replace")

    def segment(self) -> dict:
        """One timed run of the workload while the tool watches; adds the tool's CPU meanwhile."""
        if not self._waiting:
            self.harness.begin_wait(mode="none", emitter=self.emitter)
        self._waiting = False
        self._prepared()
        family = _family(self.child.pid)
        c0 = [_cpu_s(p) for p in family]
        seg = self.harness.go()
        c1 = [_cpu_s(p) for p in family]
        both = [(a, b) for a, b in zip(c0, c1) if a is not None and b is not None]
        seg["tool_cpu_s"] = sum(b - a for a, b in both) if both else None
        self.run.segments.append(seg)
        self._ran(seg)
        return seg

    def _prepared(self) -> None:
        """Called once the harness has prepared the workload, just before the timed run."""

    def _ran(self, seg: dict) -> None:
        """Called after the timed run, before the harness may prepare the next one."""

    def close(self) -> ToolRun:
        run = self.run
        if self.ok:
            if self._waiting:
                self.harness.go(run=False)
                self._waiting = False
            t_stop = time.monotonic()
            if not self.child.stop(STOP_TIMEOUT_S):
                run.status, run.reason = "failed", f"did not stop within {STOP_TIMEOUT_S:.0f} s of SIGINT"
            run.stop_s = time.monotonic() - t_stop
            ru = self.child.rusage
            run.cpu_total_s = ru.ru_utime + ru.ru_stime
            run.peak_rss_kb = self.child.peak_kb or None
            run.stdout, run.stderr = self._texts()
            run.exit = self.child.exit  # tools differ in what they return on SIGINT: each parser judges
        self._tmp.cleanup()
        return run


# ---- ophamin-trace ------------------------------------------------------------------------

def _first_span_ns(out_path: str, stdout: str, stderr: str) -> int | None:
    try:
        with open(out_path) as f:
            line = f.readline()
        starts = [int(sp["startTimeUnixNano"]) for rs in json.loads(line)["resourceSpans"]
                  for ss in rs["scopeSpans"] for sp in ss["spans"]]
    except (OSError, ValueError, KeyError):
        return None
    return min(starts) if starts else None


def _attached_line_ns(out_path: str, stdout: str, stderr: str) -> int | None:
    """Sampled mode: its "attached pid" line (printed once the perf events are in). A sampler
    at 100 Hz almost never lands in the 5 ms beacon's microsecond, so no beacon span proves it."""
    return time.time_ns() if "] attached pid " in stderr else None


def spans_by_window(out_path: str, windows: list[tuple[int, int]]) -> list[dict[str, int]]:
    """Spans per name whose start falls in each (start_ns, end_ns) window. Only names and
    start times are read, so a file of a million spans stays cheap."""
    counts: list[dict[str, int]] = [{} for _ in windows]
    with open(out_path) as f:
        for line in f:
            for rs in json.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for sp in ss["spans"]:
                        t = int(sp["startTimeUnixNano"])
                        for i, (lo, hi) in enumerate(windows):
                            if lo <= t <= hi:
                                counts[i][sp["name"]] = counts[i].get(sp["name"], 0) + 1
                                break
    return counts


def calls_by_window(log_path: str, windows: list[tuple[int, int]]) -> list[dict[str, int] | None]:
    """Calls started per function in each (start_ns, end_ns) window, from the tracer's --calls-log: the
    first line read wholly after the window minus the last line read wholly before it (none
    before: zero). None for a window no pair of lines brackets alone (another window falls
    between them too)."""
    try:
        with open(log_path) as f:
            lines = [json.loads(x) for x in f if x.strip()]
    except (OSError, ValueError):
        return [None for _ in windows]
    lines = [x for x in lines if x.get("status") == "ok"]
    out: list[dict[str, int] | None] = []
    for lo, hi in windows:
        before = [x for x in lines if x["read_end_unix_nano"] < lo]
        after = [x for x in lines if x["time_unix_nano"] > hi]
        if not after:
            out.append(None)
            continue
        b, a = (before[-1] if before else None), after[0]
        t0 = b["read_end_unix_nano"] if b else 0
        if any(w != (lo, hi) and t0 < w[1] and w[0] < a["time_unix_nano"] for w in windows):
            out.append(None)
            continue
        # Starts, as the ground truth counts: a call running across the window's end (a worker
        # thread's loop) began in it.
        base = b["started"] if b else {}
        out.append({k: n - base.get(k, 0) for k, n in a["started"].items()})
    return out


def tracer_modes() -> set[str]:
    """Capture modes this build's `trace` command accepts (`--mode` may not exist yet)."""
    out = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "tracer.cli", "trace", "--help"],
                         capture_output=True, text=True, cwd=str(ROOT)).stdout
    if "--mode" not in out:
        return {"exact"}
    from tracer.session import CAPTURES  # noqa: PLC0415

    return set(CAPTURES)


class OphaminSession(ToolSession):
    """ophamin-trace (the worktree's CLI) attached for several segments; `close()` adds the
    JSON summary and the spans per name in each window to `extra` (by default one window per
    segment; set `windows` to count in others)."""

    windows: list[tuple[int, int]] | None = None

    def __init__(self, harness: Harness, spec_path: str, emitter: str = "noop",
                 extra_args: tuple[str, ...] = (), calls_log: bool = True) -> None:
        """`calls_log`: also have the tracer log the kernel's call counts (exact mode only)."""
        fd, out_path = tempfile.mkstemp(prefix="peers-ophamin-", suffix=".jsonl")
        os.close(fd)
        os.unlink(out_path)  # the tracer creates it; its first line is the attach signal
        self.calls_path = out_path[:-len(".jsonl")] + "-calls.jsonl" if calls_log else ""
        argv = [str(ROOT / ".venv/bin/python"), "-m", "tracer.cli", "--pid", str(harness.pid), "--spec", spec_path,
                "--output", out_path, "--json", "--no-status", *extra_args]
        if calls_log:
            argv += ["--calls-log", self.calls_path, "--calls-interval", "0.1"]
        sampled = "sampled" in extra_args
        self._log_at = 0  # how far the calls log has been read
        super().__init__(harness, argv, _attached_line_ns if sampled else _first_span_ns, out_path, emitter)

    # With the calls log, each window is bracketed by log lines read after the workload was
    # prepared and after the run ended: preparing the next segment (a new Takwin, a fresh module
    # import) runs functions of the spec, and those calls must not fall in a window the ground
    # truth, which counts `run()` alone, is compared with.
    def _prepared(self) -> None:
        if self.calls_path:
            self._await_log_line(time.time_ns())

    def _ran(self, seg: dict) -> None:
        if self.calls_path:
            self._await_log_line(seg["end_ns"])

    def _await_log_line(self, after_ns: int, timeout: float = 10.0) -> None:
        """Block until the calls log has a line whose read began after `after_ns`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.child.exit is None:
            try:
                with open(self.calls_path) as f:
                    f.seek(self._log_at)
                    for line in f:
                        if not line.endswith("\n"):
                            break  # a line still being written
                        self._log_at += len(line.encode())
                        if json.loads(line).get("time_unix_nano", 0) > after_ns:
                            return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    def close(self) -> ToolRun:
        run = super().close()
        try:
            if run.status != "ok":
                return run
            try:
                res = json.loads(run.stdout)
            except ValueError:
                run.status, run.reason = "failed", f"exit {run.exit}, no JSON summary: {_tail(run.stderr)}"
                return run
            windows = self.windows or [(s["start_ns"], s["end_ns"]) for s in run.segments]
            run.extra = {"counters": res["counters"], "losses": res["losses"], "attach_s_reported": res["attach_s"],
                         "spans": {s["name"]: s["count"] for s in res["stats"]}, "warnings": res["warnings"],
                         "output_bytes": os.path.getsize(self.out_path) if os.path.exists(self.out_path) else 0,
                         "per_segment": spans_by_window(self.out_path, windows),
                         "calls_per_segment": calls_by_window(self.calls_path, windows) if self.calls_path else None}
            return run
        finally:
            for p in (self.out_path, self.calls_path):
                if p and os.path.exists(p):
                    os.unlink(p)


# ---- py-spy ---------------------------------------------------------------------------------

def _pyspy_attached(out_path: str, stdout: str, stderr: str) -> int | None:
    return time.time_ns() if "Sampling process" in stdout + stderr else None


def pyspy(harness: Harness, pyspy_bin: str, emitter: str) -> ToolRun:
    """py-spy record at PYSPY_RATE Hz (its default, blocking mode) for one segment."""
    fd, out_path = tempfile.mkstemp(prefix="peers-pyspy-", suffix=".txt")
    os.close(fd)
    argv = [pyspy_bin, "record", "--pid", str(harness.pid), "--rate", str(PYSPY_RATE), "--format", "raw",
            "--output", out_path]
    try:
        sess = ToolSession(harness, argv, _pyspy_attached, out_path, emitter)
        if sess.ok:
            sess.segment()
        run = sess.close()
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


# ---- the bare probes (bench/peers/bare_probes.py) ---------------------------------------------

def _bare_attached(out_path: str, stdout: str, stderr: str) -> int | None:
    return time.time_ns() if "attached" in stdout else None


def bare_probes(harness: Harness, emitter: str) -> ToolRun:
    """Empty BPF programs on exact mode's probe sites, for one segment: the trap cost alone."""
    argv = [str(ROOT / ".venv/bin/python"), str(ROOT / "bench" / "peers" / "bare_probes.py"), str(harness.pid)]
    sess = ToolSession(harness, argv, _bare_attached, "", emitter)
    if sess.ok:
        sess.segment()
    return sess.close()


# ---- bcc pythoncalls -------------------------------------------------------------------------

def _pythoncalls_attached(out_path: str, stdout: str, stderr: str) -> int | None:
    return time.time_ns() if "Tracing calls in process" in stdout else None


def pythoncalls(harness: Harness, emitter: str) -> ToolRun:
    """bcc's pythoncalls (USDT function__entry) for one segment; its call table parsed."""
    if not os.path.exists(PYTHONCALLS):
        return ToolRun("unavailable", f"{PYTHONCALLS} not installed (Debian package bpfcc-tools)")
    sess = ToolSession(harness, [PYTHONCALLS, "-l", "python", str(harness.pid)], _pythoncalls_attached, "", emitter)
    if sess.ok:
        sess.segment()
    run = sess.close()
    if run.status == "ok" and "# CALLS" not in run.stdout:
        run.status, run.reason = "failed", f"exit {run.exit}, no call table: {_tail(run.stderr)}"
    if run.status == "ok":
        calls: dict[str, int] = {}
        for line in run.stdout.split("# CALLS", 1)[1].splitlines():
            name, _, n = line.strip().rpartition(" ")
            if name and n.isdigit():
                calls[name.strip()] = int(n)
        run.extra = {"calls": calls}
    return run
