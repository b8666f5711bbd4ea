"""`--match REGEX`: the Python processes on this host whose command line matches.

The command line is /proc/PID/cmdline with its NULs read as spaces; the pattern is
searched in it (`re.search`, so anchor it with ^ or $ for a whole-line match). Never
matched: the tracer itself and its ancestors (the `sudo` or shell that started it carries
the pattern in its own command line), kernel threads (no command line). A match that is
not a supported CPython (a shell, `grep`, Python 2) is skipped, and kept with its reason
in `skipped` so the summary can say what was left out. Each process is judged once, by
(PID, start time, command line): a reused PID is a new process, and so is a shell that
execs Python in place. A process younger than `YOUNG_S` that maps no interpreter yet is
judged again at the next scan (it may be between exec and loading libpython).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import NotPython, TraceError
from .process import find_interpreter

YOUNG_S = 2.0


@dataclass(frozen=True)
class Candidate:
    pid: int
    start_time: int  # clock ticks since boot (/proc/PID/stat field 22)
    command_line: str

    def to_dict(self) -> dict:
        return {"pid": self.pid, "command_line": self.command_line}


def start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _self_and_ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        pid = _parent(pid)
    return out


class ProcessMatcher:
    def __init__(self, pattern: str, *, retry_young: bool = True) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise TraceError(f"--match {pattern!r}: not a regular expression ({e})") from None
        self.pattern = pattern
        self.retry_young = retry_young  # False when there is no later scan (no --follow)
        self._judged: set[tuple[int, int, str]] = set()
        self._exclude = _self_and_ancestors()
        self.skipped: list[dict] = []  # {pid, command_line, reason}

    def scan(self) -> list[Candidate]:
        """Python processes that match and were not seen by an earlier scan."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in self._exclude:
                continue
            cmd = command_line(pid)
            if not cmd or not self.regex.search(cmd):
                continue
            st = start_time(pid)
            if st is None or (pid, st, cmd) in self._judged:
                continue
            try:
                find_interpreter(pid)
            except NotPython as e:
                if not self.retry_young or _age_s(st) >= YOUNG_S:
                    self._judged.add((pid, st, cmd))
                    self.skipped.append({"pid": pid, "command_line": cmd, "reason": str(e)})
                continue
            except TraceError as e:
                self._judged.add((pid, st, cmd))
                self.skipped.append({"pid": pid, "command_line": cmd, "reason": str(e)})
                continue
            self._judged.add((pid, st, cmd))
            found.append(Candidate(pid, st, cmd))
        return sorted(found, key=lambda c: c.start_time)


def _age_s(start_ticks: int) -> float:
    try:
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
    except (OSError, ValueError):
        return YOUNG_S
    return up - start_ticks / os.sysconf("SC_CLK_TCK")
