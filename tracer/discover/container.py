"""Which container a process runs in, and the resource attributes that tell processes apart.

The container id comes from the process's cgroup path as the host sees it
(/proc/PID/cgroup): container runtimes name the cgroup after the 64-hex container id,
e.g. `/system.slice/docker-<id>.scope` (docker, systemd driver), `/docker/<id>` (cgroupfs
driver), `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope` (podman),
`/kubepods/burstable/pod<uid>/<id>`. The last 64-hex token of the deepest path wins; a
32-hex or shorter token is not a container id. A tracer that itself runs in a private
cgroup namespace sees paths relative to its own cgroup, which may hide the id: it then
reports none rather than a guess.
"""

from __future__ import annotations

import os
import re

_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")


def container_id_of(cgroup_text: str) -> str | None:
    """The container id in the text of a /proc/PID/cgroup file, if any."""
    best: tuple[int, str] | None = None
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        for depth, comp in reversed(list(enumerate(path.split("/")))):
            ids = _ID.findall(comp)
            if ids:
                # cgroup v2 (hierarchy 0) is the unified view: prefer it, then the deepest.
                rank = (2 if parts[0] == "0" else 1) * 1000 + depth
                if best is None or rank > best[0]:
                    best = (rank, ids[-1])
                break
    return best[1] if best else None


def container_id(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return container_id_of(f.read())
    except OSError:
        return None


def process_attributes(pid: int) -> dict:
    """OpenTelemetry resource attributes of one process beyond `resource_for`'s: the
    executable and, when it runs in one, its container."""
    out: dict = {}
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        out["process.executable.name"] = os.path.basename(exe)
        out["process.executable.path"] = exe
    except OSError:
        pass
    cid = container_id(pid)
    if cid:
        out["container.id"] = cid
    return out
