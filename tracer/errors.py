"""Errors a user sees as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations


class TraceError(Exception):
    """A failure the user can act on. `str(e)` is the whole message."""

    exit_code = 2


class TargetGone(TraceError):
    """The target process exited (or never existed)."""


class NotPython(TraceError):
    """The target maps no CPython interpreter."""


class Unsupported(TraceError):
    """The interpreter is CPython, but a version or build this tool cannot trace."""


class PrivilegeError(TraceError):
    """The tracer lacks the privileges to load BPF or read the target."""

    exit_code = 77


class SpecError(TraceError):
    """A malformed trace spec (the message carries the file and line)."""
