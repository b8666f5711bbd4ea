"""May this process trace that one? Checked before anything is loaded or written.

Three questions, each answered by the kernel itself rather than guessed:

1. The capabilities tracing needs (`tracer.privileges.missing_caps`).
2. Whether this kernel lets these credentials create a *perf-event* uprobe (the uprobe PMU).
   bcc tries that first and silently falls back to a tracefs probe (`uprobe_events`) when the
   kernel refuses. A tracefs probe is owned by no file descriptor: it outlives a tracer that is
   SIGKILLed. So the PMU must work, and that is tested with one `perf_event_open` on a scratch
   file nobody maps (no breakpoint is placed anywhere, no BPF is loaded). Measured on this
   project's 6.18 kernel: the PMU needs CAP_SYS_ADMIN; CAP_PERFMON alone gets EACCES.
3. Whether the target belongs to another user. Only root may trace it: capabilities such as
   CAP_SYS_PTRACE would let a non-root tracer read anyone's memory, which is not what running
   this tool as a user should grant.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

from .errors import PrivilegeError, TargetGone
from .privileges import missing_caps

UPROBE_PMU_TYPE = "/sys/bus/event_source/devices/uprobe/type"
_SYS_PERF_EVENT_OPEN = 298  # x86-64
_PERF_FLAG_FD_CLOEXEC = 8


class _PerfEventAttr(ctypes.Structure):
    # The head of struct perf_event_attr; the kernel accepts any size it knows (here 128 bytes,
    # PERF_ATTR_SIZE_VER7) and zero bytes past the fields it reads.
    _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64),
                ("read_format", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
                ("config1", ctypes.c_uint64),  # uprobe_path
                ("config2", ctypes.c_uint64),  # probe_offset
                ("tail", ctypes.c_uint8 * 64)]


@dataclass(frozen=True)
class Owner:
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    gids: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"uids": list(self.uids), "gids": list(self.gids)}


def uprobe_pmu_error() -> str | None:
    """None when this process may create perf-event uprobes, else the kernel's reason."""
    return _uprobe_pmu_error(os.geteuid(), _effective_caps_key())


def _effective_caps_key() -> str:
    with open("/proc/self/status") as f:
        return next((ln for ln in f if ln.startswith("CapEff:")), "")


@lru_cache(maxsize=4)
def _uprobe_pmu_error(_euid: int, _caps: str) -> str | None:
    try:
        with open(UPROBE_PMU_TYPE) as f:
            pmu = int(f.read())
    except (OSError, ValueError) as e:
        return f"no uprobe PMU ({UPROBE_PMU_TYPE}: {getattr(e, 'strerror', None) or e})"
    libc = ctypes.CDLL(None, use_errno=True)
    # A scratch file that no process maps: registering a uprobe on it places no breakpoint.
    try:
        scratch = tempfile.NamedTemporaryFile(prefix="ophamin-pmu-")  # noqa: SIM115 - closed below
    except OSError:
        return None  # nowhere to write one: the check after attaching (tracefs_probes_of) still guards
    with scratch:
        scratch.write(b"\x90" * 4096)
        scratch.flush()
        path = ctypes.create_string_buffer(scratch.name.encode())
        attr = _PerfEventAttr(type=pmu, size=ctypes.sizeof(_PerfEventAttr), sample_period=1,
                              flags=1, config1=ctypes.addressof(path), config2=0)  # flags bit 0: disabled
        fd = libc.syscall(_SYS_PERF_EVENT_OPEN, ctypes.byref(attr), 0, -1, -1, _PERF_FLAG_FD_CLOEXEC)
        err = ctypes.get_errno()
    if fd < 0:
        return f"perf_event_open(uprobe PMU): {os.strerror(err)}"
    os.close(fd)
    return None


def owner_of(pid: int) -> Owner:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise TargetGone(f"no process with PID {pid}") from None
    fields = {ln.split(":", 1)[0]: ln.split(":", 1)[1].split() for ln in lines if ":" in ln}
    return Owner(tuple(int(x) for x in fields["Uid"]), tuple(int(x) for x in fields["Gid"]))


def _user_name(uid: int) -> str:
    import pwd  # noqa: PLC0415

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def require_tracing_access(pid: int) -> None:
    """Raise PrivilegeError (one line, exit 77) unless this process may trace `pid`."""
    missing = missing_caps()
    if missing:
        raise PrivilegeError(f"tracing needs root or CAP_BPF+CAP_PERFMON+CAP_SYS_PTRACE, this process lacks "
                             f"{', '.join(missing)} (try: sudo ophamin-trace ...)")
    reason = uprobe_pmu_error()
    if reason is not None:
        raise PrivilegeError(f"this kernel refuses perf-event uprobes to this process ({reason}); they need "
                             "root or CAP_SYS_ADMIN here, and tracefs probes, which a killed tracer would "
                             "leave behind, are not used (try: sudo ophamin-trace ...)")
    require_own_process(pid)


def require_own_process(pid: int) -> None:
    """Raise PrivilegeError unless `pid` runs as this (non-root) user, with this group, or we are root.
    Even its memory layout (`probes` prints the load bias) is not for other users to see."""
    if os.geteuid() == 0:
        return
    me = os.getuid()
    target = owner_of(pid)
    if any(u != me for u in target.uids) or any(g != os.getgid() for g in target.gids):
        raise PrivilegeError(f"PID {pid} runs as {_user_name(target.uids[1])}, not as {_user_name(me)}: "
                             "only root may trace another user's process")


def tracefs_probes_of(tracer_pid: int, events: str = "/sys/kernel/tracing/uprobe_events") -> list[str]:
    """tracefs uprobe entries bcc made for `tracer_pid` (its names end in `_bcc_PID`)."""
    try:
        with open(events) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.split(" ", 1)[0].endswith(f"_bcc_{tracer_pid}")]
