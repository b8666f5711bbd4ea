"""`ophamin-trace doctor`, `--version` and `--help`, run as the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tracer import __version__
from tracer.doctor import CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, Check, effective_caps
from tracer.interpreters import SUPPORTED, find_interpreters

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "ophamin-trace"
if not EXE.exists():
    EXE = ROOT / ".venv" / "bin" / "ophamin-trace"

EXPECTED_CHECKS = {
    "privileges", "tracefs", "kernel: uprobes", "kernel: tracepoints", "kernel: BPF ring buffer",
    "kernel: BTF", "kernel: kprobes", "kernel headers", "bcc import", "bcc compile + load",
    "NVML (GPU)", "interpreters",
}


def run(*args: str, env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(EXE), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, cwd="/")


def by_name(out: str) -> dict[str, dict]:
    checks = json.loads(out)
    return {c["name"]: c for c in checks}


@pytest.mark.ebpf
def test_doctor_passes_as_root_and_proves_uprobe_and_ringbuf(ebpf):
    r = run("doctor", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = by_name(r.stdout)
    assert set(checks) == EXPECTED_CHECKS
    assert not [c for c in checks.values() if c["status"] == "FAIL"]
    assert checks["privileges"]["status"] == "PASS"
    load = checks["bcc compile + load"]
    assert load["status"] == "PASS", load
    d = load["data"]
    # The uprobe fired exactly once per marked labs() call, in the doctor's own process,
    # and the hits came back through the ring buffer with the arguments that were passed.
    assert d["hits"] == d["calls"] == 3
    assert d["args"] == d["expected_args"]
    assert d["hits_pid_match"] and d["hits_tid_match"]
    assert d["compile_s"] > 0
    assert checks["kernel: BPF ring buffer"]["data"]["proved_by_load"] is True
    # NVML may be absent; it must never FAIL.
    assert checks["NVML (GPU)"]["status"] in ("PASS", "WARN")
    listed = checks["interpreters"]["data"]["interpreters"]
    assert [i["label"] for i in listed] == [i.label for i in find_interpreters(include_unsupported=True)]
    assert all(i["supported"] == (tuple(map(int, i["version"].split(".")))[:2] in SUPPORTED) for i in listed)


@pytest.mark.ebpf
def test_doctor_text_report(ebpf):
    r = run("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    load = next(ln for ln in lines if "bcc compile + load" in ln)
    assert load.startswith("PASS") and "fired 3/3" in load and "compile " in load and " ms" in load
    assert lines[-1].startswith("verdict: tracing can work here")
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.ebpf
def test_doctor_reports_a_failed_compile_as_fail_with_clean_json(ebpf):
    # A header tree that does not exist: bcc cannot compile. libbcc prints diagnostics on
    # stdout; the doctor must keep them out of the JSON and report one FAIL.
    r = run("doctor", "--json", env={"BCC_KERNEL_SOURCE": "/nonexistent-headers"})
    assert r.returncode == 1
    checks = by_name(r.stdout)
    assert checks["bcc compile + load"]["status"] == "FAIL"
    said = checks["bcc compile + load"]["lines"]
    assert any("nonexistent-headers" in ln or "kernel headers" in ln for ln in said), said
    assert checks["kernel headers"]["status"] == "INFO"
    assert "Traceback" not in r.stdout + r.stderr


def _as_nobody() -> tuple[str, ...]:
    """A prefix that runs the command without privileges: as `nobody`, or, where `nobody`
    cannot reach the checkout (a clone under /root), as uid 0 with every capability dropped."""
    if os.geteuid() != 0:
        return ()  # already unprivileged
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed")
    nobody = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    if subprocess.run([*nobody, "test", "-x", str(EXE)]).returncode == 0:
        return nobody
    return (setpriv, "--inh-caps=-all", "--bounding-set=-all")


def test_doctor_as_nobody_fails_privileges_cleanly():
    r = run("doctor", prefix=_as_nobody(), env={"HOME": "/nonexistent"})
    assert r.returncode != 0
    priv = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL") and "privileges" in ln]
    assert priv, r.stdout
    assert "CAP_BPF" in priv[0]
    assert "verdict: tracing cannot work here" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_doctor_json_as_nobody_skips_the_load():
    r = run("doctor", "--json", prefix=_as_nobody(), env={"HOME": "/nonexistent"})
    assert r.returncode == 1
    checks = by_name(r.stdout)
    assert checks["privileges"]["status"] == "FAIL"
    assert checks["bcc compile + load"]["status"] == "SKIP"
    assert "needs privileges" in checks["bcc compile + load"]["detail"]
    assert "Traceback" not in r.stderr


def test_effective_caps_reads_the_bits(tmp_path):
    status = tmp_path / "status"
    bits = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE)
    status.write_text(f"Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t{bits:016x}\n")
    assert effective_caps(str(status)) == 0xC000080000
    status.write_text("Name:\tx\n")
    with pytest.raises(ValueError):
        effective_caps(str(status))


def test_check_is_frozen_and_serialises():
    c = Check("x", "WARN", "detail", "fix it", ("a", "b"), {"k": [1, 2]})
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["lines"] == ["a", "b"] and d["status"] == "WARN"
    with pytest.raises(AttributeError):
        c.status = "PASS"  # type: ignore[misc]


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"ophamin-trace, version {__version__}"


def test_help_lists_doctor_with_examples():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    assert "doctor" in r.stdout and "Examples:" in r.stdout
    r = run("doctor", "--help")
    assert r.returncode == 0, r.stderr
    assert "Examples:" in r.stdout and "sudo ophamin-trace doctor --json" in r.stdout
