"""Launch mode: start a command stopped, so the probes are in before its first Python call.

The child asks to be traced (PTRACE_TRACEME) and execs the command. The tracer then lets it run
one system call at a time, through any chain of execs (`env python3`, a shebang), until a
supported CPython interpreter is mapped: the executable itself for a static build, or the
libpython the dynamic loader has just mapped. At that point no Python code has run (the loader
has not even finished), the caller attaches its uprobes, and `resume()` detaches: from then on
the program runs untouched. ptrace is used only to stop and continue the child, never to read
or write its memory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from ..errors import TraceError
from .process import Interpreter, find_interpreter

PTRACE_TRACEME, PTRACE_DETACH, PTRACE_SYSCALL, PTRACE_SETOPTIONS = 0, 17, 24, 0x4200
PTRACE_O_TRACESYSGOOD, PTRACE_O_TRACEEXEC, PTRACE_O_EXITKILL = 0x1, 0x10, 0x100000
PTRACE_EVENT_EXEC = 4
SYSCALL_STOP = signal.SIGTRAP | 0x80
MAX_WAIT_S = 10.0  # a command that maps no CPython interpreter by then is not a Python program

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, pid: int, data: int = 0) -> None:
    if _libc.ptrace(request, pid, None, ctypes.c_void_p(data)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _traceme() -> None:  # runs in the child between fork and exec
    _ptrace(PTRACE_TRACEME, 0)


@dataclass
class LaunchedProcess:
    """A command started by the tracer, stopped with its interpreter mapped until `resume()`."""

    popen: subprocess.Popen
    interpreter: Interpreter
    stopped: bool = True

    @property
    def pid(self) -> int:
        return self.popen.pid

    def resume(self) -> None:
        """Detach: the program runs on, untraced by ptrace (the uprobes stay)."""
        if self.stopped:
            self.stopped = False
            _ptrace(PTRACE_DETACH, self.pid)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()  # a ptrace-stopped process still dies of SIGKILL
        self.popen.wait()


def launch(argv: list[str]) -> LaunchedProcess:
    """Start `argv`; return once its CPython interpreter is mapped, before any Python runs."""
    if not argv:
        raise TraceError("launch mode needs a command after --")
    try:
        p = subprocess.Popen(argv, preexec_fn=_traceme)  # noqa: PLW1509 - the child only calls ptrace
    except OSError as e:
        raise TraceError(f"cannot start {argv[0]}: {e.strerror}") from None
    try:
        interp = _run_until_interpreter(p, argv[0])
    except BaseException:
        if p.poll() is None:
            p.kill()
        p.wait()
        raise
    return LaunchedProcess(p, interp)


def _run_until_interpreter(p: subprocess.Popen, name: str) -> Interpreter:
    pid = p.pid
    _, status = os.waitpid(pid, 0)  # the stop at the first exec
    if not os.WIFSTOPPED(status):
        raise TraceError(f"{name} exited (status {os.waitstatus_to_exitcode(status)}) before it could be traced")
    # EXITKILL: if the tracer dies while the child is held, the child dies too, not left stopped.
    _ptrace(PTRACE_SETOPTIONS, pid, PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL)
    deadline = time.monotonic() + MAX_WAIT_S
    last_maps = b""
    while True:
        maps = _maps(pid)
        if maps != last_maps:  # only a new mapping (or an exec) can bring the interpreter
            last_maps = maps
            try:
                return find_interpreter(pid)
            except TraceError as e:
                if "supported" in str(e) or time.monotonic() > deadline:
                    raise TraceError(f"{name}: {e}") from None
        if time.monotonic() > deadline:
            raise TraceError(f"{name} mapped no CPython 3.9-3.13 interpreter within {MAX_WAIT_S:g} s: "
                             "not a Python program (launch mode traces the process started, not its children)")
        sig = os.WSTOPSIG(status)
        inject = 0 if sig in (SYSCALL_STOP, signal.SIGTRAP) else sig  # pass real signals on
        _ptrace(PTRACE_SYSCALL, pid, inject)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(status):
            raise TraceError(f"{name} exited (status {os.waitstatus_to_exitcode(status)}) before its "
                             "interpreter was mapped")


def _maps(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return f.read()
    except OSError:
        return b""
