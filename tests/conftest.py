"""Shared fixtures: the interpreters on this machine and the eBPF capability gate.

eBPF tests skip with a reason when eBPF cannot run here, except under CI=true, where
they fail: CI must never pass by skipping the real thing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.interpreters import find_interpreters, target_python  # noqa: E402

TARGET_VENVS = ROOT / ".cache" / "targets"
INTERPRETERS = find_interpreters()


def ebpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: loading BPF programs needs root (or CAP_BPF+CAP_PERFMON)"
    if not Path("/sys/kernel/tracing/uprobe_events").exists():
        return "tracefs is not mounted at /sys/kernel/tracing (scripts/test mounts it)"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"bcc is not importable: {e}"
    return None


@pytest.fixture(scope="session")
def ebpf() -> None:
    """Request this fixture in any test that loads BPF."""
    reason = ebpf_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"eBPF unavailable in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(params=INTERPRETERS, ids=[i.label for i in INTERPRETERS])
def interpreter(request):
    """Every supported interpreter on the machine, as (Interpreter, python path to run)."""
    interp = request.param
    return interp, target_python(interp, TARGET_VENVS)


def pytest_collection_modifyitems(config, items):
    if not INTERPRETERS and os.environ.get("CI") == "true":
        raise pytest.UsageError("no supported Python interpreters found in CI")
