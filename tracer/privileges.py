"""What tracing needs from the kernel's capability model, read in one place."""

from __future__ import annotations

from pathlib import Path

CAP_SYS_PTRACE, CAP_PERFMON, CAP_BPF = 19, 38, 39
NEEDED_CAPS = {"CAP_BPF": CAP_BPF, "CAP_PERFMON": CAP_PERFMON, "CAP_SYS_PTRACE": CAP_SYS_PTRACE}


def effective_caps(status_path: str = "/proc/self/status") -> int:
    for line in Path(status_path).read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise ValueError(f"no CapEff line in {status_path}")


def missing_caps(caps: int | None = None) -> list[str]:
    """Names of the capabilities tracing needs that this process lacks (root included:
    a root without them, as in an unprivileged container, cannot load BPF either)."""
    caps = effective_caps() if caps is None else caps
    return [n for n, bit in NEEDED_CAPS.items() if not caps >> bit & 1]
