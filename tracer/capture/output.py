"""Collect what libbcc and clang print while compiling, so neither a report nor --json
output is cluttered: libbcc writes some diagnostics to stdout (fd 1), clang to stderr (fd 2)."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile


class CapturedOutput:
    text = ""

    def __enter__(self) -> CapturedOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        for fd in self.saved:
            os.dup2(self.file.fileno(), fd)
        return self

    def __exit__(self, *exc: object) -> None:
        # C stdio may hold buffered text; flush it while the fds still point at the file.
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()

    def tail(self, n: int = 8) -> str:
        return " | ".join(self.text.strip().splitlines()[-n:])
