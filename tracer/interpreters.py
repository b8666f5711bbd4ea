"""The CPython interpreters this machine carries, and per-interpreter target venvs.

The tracer supports CPython 3.9-3.13; tests and benchmarks run targets on every one found.
Running this module with --make-venvs builds one venv per interpreter (with the packages the
reference substrate's OpenTelemetry emitter and numpy path use), so targets run the same
interpreter image as the original while seeing those packages.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED = ((3, 9), (3, 10), (3, 11), (3, 12), (3, 13))
TARGET_PACKAGES = ("opentelemetry-sdk>=1.24", "numpy")


@dataclass(frozen=True)
class Interpreter:
    label: str  # e.g. "pyenv-3.12.1" or "debian-3.11.2"
    path: str  # the executable
    version: tuple[int, int, int]

    @property
    def supported(self) -> bool:
        return self.version[:2] in SUPPORTED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = ".".join(map(str, self.version))
        d["supported"] = self.supported
        return d


def _pyenv_root() -> Path | None:
    env = os.environ.get("PYENV_ROOT")
    for cand in (env, os.path.expanduser("~/.pyenv"), "/root/.pyenv"):
        try:
            if cand and Path(cand, "versions").is_dir():
                return Path(cand)
        except OSError:  # /root is 0700: a non-root caller cannot look inside
            continue
    return None


def find_interpreters(include_unsupported: bool = False) -> list[Interpreter]:
    """Every CPython build the BRIEF names that exists here (pyenv builds and Debian's)."""
    found: list[Interpreter] = []
    root = _pyenv_root()
    if root is not None:
        for d in sorted((root / "versions").iterdir()):
            m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", d.name)
            exe = d / "bin" / "python"
            if m and exe.exists():
                found.append(Interpreter(f"pyenv-{d.name}", str(exe), tuple(map(int, m.groups()))))
    debian = Path("/usr/bin/python3.11")
    if debian.exists():
        out = subprocess.run(
            [str(debian), "-c", "import sys; print(*sys.version_info[:3])"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        found.append(Interpreter(f"debian-{'.'.join(out)}", str(debian), tuple(map(int, out))))
    found.sort(key=lambda i: (i.version, i.label))
    return [i for i in found if include_unsupported or i.supported]


def target_python(interp: Interpreter, venvs: Path) -> str:
    """The venv python for this interpreter if built, else the bare interpreter."""
    exe = venvs / interp.label / "bin" / "python"
    return str(exe) if exe.exists() else interp.path


def default_target_python(venvs: Path) -> str:
    """The benchmarks' default target: pyenv 3.12.1 where it exists, else the first found."""
    interps = {i.label: i for i in find_interpreters()}
    interp = interps.get("pyenv-3.12.1") or next(iter(interps.values()))
    return target_python(interp, venvs)


def make_venvs(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for interp in find_interpreters():
        venv = dest / interp.label
        if not (venv / "bin" / "python").exists():
            print(f"[setup] target venv {venv}", file=sys.stderr)
            subprocess.run([interp.path, "-m", "venv", str(venv)], check=True)
        for pkg in TARGET_PACKAGES:
            r = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                 "--disable-pip-version-check", "--only-binary=:all:", pkg],
                capture_output=True, text=True,
            )
            if r.returncode != 0:
                # numpy wheels may not exist for every build; the substrate then uses its
                # pure-Python path and says so. The emitter's SDK is required.
                if pkg.startswith("opentelemetry"):
                    raise SystemExit(f"cannot install {pkg} for {interp.label}: {r.stderr[-400:]}")
                print(f"[setup] {interp.label}: {pkg} unavailable, pure-Python path", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--make-venvs", type=Path)
    ap.add_argument("--all", action="store_true", help="include unsupported versions")
    args = ap.parse_args()
    if args.make_venvs:
        make_venvs(args.make_venvs)
    else:
        for i in find_interpreters(include_unsupported=args.all):
            print(i.label, i.path, "supported" if i.supported else "unsupported")


if __name__ == "__main__":
    main()
