"""Is the traced process still the one we attached to, running the image we probe?

* Exit: a pidfd (pidfd_open) names that very process, so a PID reused by another process
  after the target exits is never mistaken for it; the fd turns readable when the process
  exits (a zombie has exited). Where pidfds are missing, /proc state is the fallback.
* Exec: the kernel side counts the target's `sched_process_exec` (counter `execs`) and
  ignores every probe hit after it, since the new image is another program.
"""

from __future__ import annotations

import os
import select
from typing import Iterable

from .discover.process import is_alive
from .spec import Spec

EXITED = "target exited"
EXECED = "target exec'd (the interpreter it was traced in is gone)"


class TargetWatch:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self._fd = None

    def exited(self) -> bool:
        if self._fd is None:
            return not is_alive(self.pid)
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        return bool(p.poll(0))

    def gone(self, counters: dict[str, int]) -> str:
        """Why tracing must stop ("" while the target runs the traced image)."""
        if counters.get("execs"):
            return EXECED
        return EXITED if self.exited() else ""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def unseen_targets(spec: Spec, seen: Iterable[str]) -> list[str]:
    """A warning for each spec function that produced nothing in the whole trace."""
    names = set(seen)
    return [f"{t.function} ({t.kind} {t.name!r}) was never seen: not called while traced, or no such function"
            for t in spec.targets if t.name not in names]
