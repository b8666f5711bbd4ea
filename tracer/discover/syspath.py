"""Where a running Python process imports its modules from, read from outside.

The tracer cannot ask the target for `sys.path`, and must not import the target's code.
This rebuilds the same list from what /proc shows, in the interpreter's own order: the
script's directory (or the working directory for `-m`/`-c`), PYTHONPATH, the standard
library, then site-packages (the venv's when argv[0] sits in one, then the base
interpreter's), with the plain directory lines of their `.pth` files. Import hooks
(zip imports, meta-path finders such as new-style editable installs) are not followed.

Paths are the target's own; `host(pid, path)` opens them through /proc/PID/root, so a
process in a container resolves to its own files.
"""

from __future__ import annotations

import os

from ..capture.names import main_arg


def host(pid: int, path: str) -> str:
    """A path of the target's, as this tracer opens it."""
    return f"/proc/{pid}/root{path}"


def _argv_env(pid: int) -> tuple[list[str], dict[str, str]]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.decode(errors="replace").partition("=")[::2] for kv in f.read().split(b"\0") if kv)
    except OSError:
        return [], {}
    return argv, env


def _which(pid: int, name: str, env: dict[str, str], cwd: str) -> str | None:
    if "/" in name:
        return os.path.normpath(os.path.join(cwd, name))
    for d in env.get("PATH", "").split(":"):
        if d and os.path.exists(host(pid, os.path.join(d, name))):
            return os.path.join(d, name)
    return None


def _venv_cfg(pid: int, venv: str) -> dict[str, str] | None:
    try:
        with open(host(pid, os.path.join(venv, "pyvenv.cfg")), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in lines) if k.strip()}


def _pth_dirs(pid: int, site: str) -> list[str]:
    """Directory lines of a site dir's .pth files ('import ...' lines are code: skipped)."""
    out = []
    try:
        names = sorted(n for n in os.listdir(host(pid, site)) if n.endswith(".pth"))
    except OSError:
        return out
    for n in names:
        try:
            with open(host(pid, os.path.join(site, n)), encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            line = line.strip()
            if line and not line.startswith(("#", "import ", "import\t")):
                d = os.path.normpath(os.path.join(site, line))
                if os.path.isdir(host(pid, d)):
                    out.append(d)
    return out


def source_roots(pid: int, version: tuple[int, int, int]) -> list[str]:
    """The target's import roots (its own paths), most preferred first, each once."""
    argv, env = _argv_env(pid)
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return []
    roots: list[str] = []
    main = main_arg(pid)
    if main is not None and main[0] == "script":
        roots.append(os.path.dirname(os.path.normpath(os.path.join(cwd, main[1]))))
    else:
        roots.append(cwd)  # -m, -c and the REPL put the working directory first
    roots += [os.path.normpath(os.path.join(cwd, p)) for p in env.get("PYTHONPATH", "").split(":") if p]
    xy = f"python{version[0]}.{version[1]}"
    base = os.path.dirname(os.path.dirname(exe))
    stdlib = [os.path.join(base, "lib", xy)]
    sites = []
    system_sites = True
    argv0 = _which(pid, argv[0], env, cwd) if argv else None
    if argv0:
        venv = os.path.dirname(os.path.dirname(argv0))
        cfg = _venv_cfg(pid, venv)
        if cfg is not None:
            sites.append(os.path.join(venv, "lib", xy, "site-packages"))
            system_sites = cfg.get("include-system-site-packages", "false").lower() == "true"
    if system_sites:
        sites += [os.path.join(base, "lib", xy, "site-packages"),
                  os.path.join(base, "local", "lib", xy, "dist-packages"),
                  os.path.join(base, "lib", "python3", "dist-packages")]
    roots += stdlib
    for s in sites:
        roots += [s, *_pth_dirs(pid, s)]
    seen: set[str] = set()
    out = []
    for r in roots:
        if r not in seen and os.path.isdir(host(pid, r)):
            seen.add(r)
            out.append(r)
    return out
