"""Create an output file the safe way, whoever runs the tracer and wherever the path points.

Rules (docs/hardening.md):

* Never through a symlink planted at the path (O_NOFOLLOW), never into a FIFO, device,
  socket or directory (a regular file only: opened non-blocking, checked with fstat before a
  single byte is written or truncated), never into a hard link (st_nlink must be 1: a link
  planted in a shared directory would point the write at another file).
* An existing file is overwritten only if it belongs to the invoking user (or to root).
* A new file is created 0644 minus the umask, so it is never group- or world-writable; an
  existing file loses any group/world write bit. Setuid/setgid bits are never kept.
* Under sudo, a file the tracer creates belongs to the invoking user (SUDO_UID/SUDO_GID),
  not to root: the user asked for it and must be able to remove it. An existing file keeps
  its owner.
"""

from __future__ import annotations

import os
import stat

from ..errors import TraceError

NEW_FILE_MODE = 0o644


def invoking_ids() -> tuple[int, int] | None:
    """(uid, gid) of the user behind sudo when running as root under sudo, else None."""
    if os.geteuid() != 0:
        return None
    try:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ["SUDO_GID"])
    except (KeyError, ValueError):
        return None
    return (uid, gid) if uid > 0 else None


def open_output(path: str) -> int:
    """A write-only fd for `path`, empty, created or validated as above. Raises TraceError."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    created = True
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE)
    except FileExistsError:
        created = False
        fd = _open_existing(path, flags)
    except OSError as e:
        raise TraceError(f"cannot write {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not created:
            _check_existing(path, st)
            os.ftruncate(fd, 0)
        mode = stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID)
        if mode != stat.S_IMODE(st.st_mode):
            os.fchmod(fd, mode)
        ids = invoking_ids()
        if created and ids is not None:
            os.fchown(fd, *ids)
        os.set_blocking(fd, True)
    except TraceError:
        os.close(fd)
        raise
    except OSError as e:
        os.close(fd)
        raise TraceError(f"cannot write {path}: {e.strerror}") from None
    return fd


def _open_existing(path: str, flags: int) -> int:
    try:
        return os.open(path, flags)
    except OSError as e:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = 0
        if stat.S_ISLNK(mode):
            raise TraceError(f"refusing to write {path}: it is a symbolic link") from None
        if stat.S_ISDIR(mode):
            raise TraceError(f"cannot write {path}: it is a directory") from None
        if mode and not stat.S_ISREG(mode):
            raise TraceError(f"refusing to write {path}: not a regular file") from None
        raise TraceError(f"cannot write {path}: {e.strerror}") from None


def _check_existing(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise TraceError(f"refusing to write {path}: not a regular file")
    if st.st_nlink != 1:
        raise TraceError(f"refusing to write {path}: it has {st.st_nlink} hard links")
    allowed = {0, os.geteuid(), os.getuid()}
    ids = invoking_ids()
    if ids is not None:
        allowed.add(ids[0])
    if st.st_uid not in allowed:
        raise TraceError(f"refusing to overwrite {path}: it belongs to uid {st.st_uid}, not to the invoking user")
