"""One venv per interpreter for the peers benchmark, under .cache/bench-peers/<label>/.

Built from the interpreter itself (not the shared target venvs, which stay untouched), with
the peers and the benchmarks: pyperformance (pyperf, the benchmark sources), VizTracer, py-spy
and the OpenTelemetry SDK (the substrate's emitter), plus numpy where a wheel exists (the
substrate's fast path, as in the target venvs). Idempotent: a stamp holding the package list
marks a finished install; the second run only checks it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / ".cache" / "bench-peers"
PACKAGES = ("pyperformance", "viztracer", "py-spy", "opentelemetry-sdk>=1.24")
OPTIONAL = ("numpy",)


def _stamp_text() -> str:
    return hashlib.sha256(repr((PACKAGES, OPTIONAL)).encode()).hexdigest()[:16]


def _say(msg: str) -> None:
    print(f"[bench peers] {msg}", file=sys.stderr, flush=True)


def ensure(label: str, base_python: str) -> Path:
    """The venv's python for `label`, creating or completing the venv first if needed."""
    d = HOME / label
    py = d / "bin" / "python"
    stamp = d / ".peers-stamp"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == _stamp_text():
        return py
    if d.exists():
        shutil.rmtree(d)
    _say(f"creating {d} from {base_python} with {', '.join(PACKAGES)}")
    subprocess.run([base_python, "-m", "venv", str(d)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *PACKAGES], check=True)
    for pkg in OPTIONAL:
        if subprocess.run([*pip, "--only-binary", ":all:", pkg], capture_output=True).returncode != 0:
            _say(f"{label}: no {pkg} wheel; the substrate runs its pure-Python path there")
    stamp.write_text(_stamp_text() + "\n")
    return py


def pyspy(python: Path) -> Path:
    return python.parent / "py-spy"


def pythons(labels_csv: str, who: str) -> dict[str, Path]:
    """The peers venv's python per interpreter label (comma-separated), each venv made if needed;
    an unknown label is a one-line error naming the ones this machine has."""
    sys.path.insert(0, str(ROOT))
    from tracer.interpreters import find_interpreters  # noqa: PLC0415

    interps = {i.label: i for i in find_interpreters()}
    labels = [x for x in labels_csv.split(",") if x]
    missing = [x for x in labels if x not in interps]
    if missing:
        raise SystemExit(f"{who}: no interpreter {missing[0]!r} here (have: {', '.join(sorted(interps))})")
    return {lb: ensure(lb, interps[lb].path) for lb in labels}

