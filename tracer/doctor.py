"""`ophamin-trace doctor`: can this machine trace, and if not, what to do about it.

Every check reports PASS, WARN, FAIL, INFO or SKIP with a one-line fix. Only a FAIL means
tracing cannot work; the command then exits non-zero. The bcc check does not stop at
`import bcc`: it compiles and loads a tiny program that attaches a uprobe to a libc function
in this very process, calls that function, and reads the hits back from a BPF ring buffer, so
a PASS proves the whole path (headers, compiler, verifier, uprobe, ring buffer) end to end.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gzip
import json
import os
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .capture.output import CapturedOutput
from .privileges import CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, effective_caps, missing_caps  # noqa: F401

PASS, WARN, FAIL, INFO, SKIP = "PASS", "WARN", "FAIL", "INFO", "SKIP"

TRACEFS = Path("/sys/kernel/tracing")
TRACEPOINTS = ("sched/sched_switch", "sched/sched_wakeup", "sched/sched_migrate_task", "kmem/rss_stat")
SETUP_HINT = "run `sudo scripts/test` (or `sudo scripts/demo`) once: it installs and configures this"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""
    lines: tuple[str, ...] = ()  # extra detail shown indented under the check
    data: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
            "lines": list(self.lines),
            "data": dict(self.data),
        }


# ---- helpers ----------------------------------------------------------------------------


def kernel_config() -> tuple[dict[str, str], str | None]:
    """The running kernel's build config and where it came from (None if not published)."""
    sources = (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}"))
    for src in sources:
        try:
            raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        except OSError:
            continue
        conf: dict[str, str] = {}
        for line in raw.decode(errors="replace").splitlines():
            m = re.match(r"(CONFIG_\w+)=(.*)", line)
            if m:
                conf[m.group(1)] = m.group(2)
            m = re.match(r"# (CONFIG_\w+) is not set", line)
            if m:
                conf[m.group(1)] = "n"
        return conf, str(src)
    return {}, None


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def tracefs_mount() -> str | None:
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "tracefs":
                return parts[1]
    except OSError:
        pass
    return None


def _exists(p: Path) -> bool | None:
    """True/False, or None when permissions hide the answer (tracefs is root-only)."""
    try:
        p.stat()
        return True
    except PermissionError:
        return None
    except OSError:
        return False


# ---- checks -----------------------------------------------------------------------------


def check_privileges() -> Check:
    euid = os.geteuid()
    try:
        caps = effective_caps()
    except (OSError, ValueError) as e:
        return Check("privileges", FAIL, f"cannot read effective capabilities: {e}",
                     "run as root: sudo ophamin-trace ...")
    missing = missing_caps(caps)
    data = {"euid": euid, "cap_eff": f"{caps:016x}", "missing": missing}
    who = "root" if euid == 0 else f"uid {euid}"
    if euid == 0:
        # Root without capabilities: a container or a cleared bounding set.
        fix = "give this root cap_bpf,cap_perfmon,cap_sys_ptrace (e.g. a privileged container)"
    else:
        fix = "run as root (sudo ophamin-trace ...) or grant cap_bpf,cap_perfmon,cap_sys_ptrace"
    if not missing:
        from .access import uprobe_pmu_error  # noqa: PLC0415 - the same preflight the tracer runs

        pmu = uprobe_pmu_error()
        data["uprobe_pmu_error"] = pmu
        if pmu:
            return Check("privileges", FAIL, f"{who} has CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE but cannot create "
                         f"perf-event uprobes: {pmu}", "this kernel also wants CAP_SYS_ADMIN for uprobe perf events: "
                         "run as root", data=data)
        return Check("privileges", PASS, f"{who}; effective CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE; perf-event uprobes "
                     "can be created", data=data)
    return Check(
        "privileges", FAIL,
        f"{who} lacks {', '.join(missing)} (CapEff {caps:016x}): cannot load BPF or attach uprobes",
        fix, data=data,
    )


def check_tracefs() -> Check:
    where = tracefs_mount()
    if where is None:
        return Check("tracefs", FAIL, "tracefs is not mounted",
                     f"mount -t tracefs nodev {TRACEFS} (or {SETUP_HINT})")
    if Path(where) != TRACEFS:
        return Check("tracefs", WARN, f"tracefs mounted at {where}, not {TRACEFS}",
                     f"mount -t tracefs nodev {TRACEFS}", data={"mount": where})
    return Check("tracefs", PASS, f"mounted at {where}", data={"mount": where})


def check_uprobes(conf: dict[str, str], conf_src: str | None) -> Check:
    evidence = []
    if conf:
        for key in ("CONFIG_UPROBES", "CONFIG_UPROBE_EVENTS"):
            evidence.append(f"{key}={conf.get(key, 'unset')}")
    pmu = _exists(Path("/sys/bus/event_source/devices/uprobe"))
    events = _exists(TRACEFS / "uprobe_events")
    evidence.append(f"uprobe PMU {'present' if pmu else 'absent'}")
    if events is not None:
        evidence.append(f"{TRACEFS}/uprobe_events {'present' if events else 'absent'}")
    conf_ok = conf.get("CONFIG_UPROBES") == "y" and conf.get("CONFIG_UPROBE_EVENTS") == "y"
    data = {"config_source": conf_src, "uprobe_pmu": pmu, "uprobe_events": events}
    if conf_ok or pmu or events:
        return Check("kernel: uprobes", PASS, "; ".join(evidence), data=data)
    if not conf and events is None and pmu is None:
        return Check("kernel: uprobes", SKIP, "cannot tell without privileges (no kernel config published)",
                     "run as root", data=data)
    return Check("kernel: uprobes", FAIL, "; ".join(evidence),
                 "use a kernel built with CONFIG_UPROBES=y and CONFIG_UPROBE_EVENTS=y", data=data)


def check_tracepoints() -> Check:
    found = {tp: _exists(TRACEFS / "events" / tp / "id") for tp in TRACEPOINTS}
    names = {tp: tp.replace("/", ":") for tp in TRACEPOINTS}
    if all(v is None for v in found.values()):
        return Check("kernel: tracepoints", SKIP, f"{TRACEFS}/events is readable only with privileges",
                     "run as root", data={"tracepoints": {names[k]: None for k in found}})
    missing = [names[k] for k, v in found.items() if not v]
    data = {"tracepoints": {names[k]: bool(v) for k, v in found.items()}}
    if not missing:
        return Check("kernel: tracepoints", PASS, ", ".join(names.values()), data=data)
    if tracefs_mount() is None:
        return Check("kernel: tracepoints", FAIL, "tracefs not mounted, cannot list tracepoints",
                     f"mount -t tracefs nodev {TRACEFS}", data=data)
    # The scheduler and rss_stat enrich spans; function spans themselves need only uprobes.
    return Check("kernel: tracepoints", WARN, f"missing {', '.join(missing)}: kernel context on spans "
                 "(off-CPU, run-queue, RSS) will be reported unavailable",
                 "use a kernel with CONFIG_TRACEPOINTS and the sched/kmem events", data=data)


def check_ringbuf(load: Check) -> Check:
    ver = kernel_version()
    data = {"kernel": platform.release(), "proved_by_load": load.status == PASS}
    if load.status == PASS:
        return Check("kernel: BPF ring buffer", PASS,
                     "a ring buffer was created, written by a uprobe and read back (bcc: compile + load)",
                     data=data)
    if ver >= (5, 8):
        return Check("kernel: BPF ring buffer", PASS if load.status == SKIP else WARN,
                     f"kernel {ver[0]}.{ver[1]} >= 5.8 (not exercised: bcc compile + load was "
                     f"{'skipped' if load.status == SKIP else 'not a PASS'})",
                     "" if load.status == SKIP else "see the bcc check below", data=data)
    return Check("kernel: BPF ring buffer", FAIL, f"kernel {ver[0]}.{ver[1]} < 5.8 has no BPF ring buffer",
                 "use a kernel >= 5.8", data=data)


def check_btf(conf: dict[str, str]) -> Check:
    from .correlate.btf import task_offsets  # noqa: PLC0415
    from .errors import TraceError  # noqa: PLC0415

    present = Path("/sys/kernel/btf/vmlinux").exists()
    data = {"btf_vmlinux": present, "CONFIG_DEBUG_INFO_BTF": conf.get("CONFIG_DEBUG_INFO_BTF")}
    # Function spans need no BTF; the scheduler programs (--sched) read task_struct fields
    # at the offsets the running kernel's BTF gives.
    if not present:
        return Check("kernel: BTF", WARN, "/sys/kernel/btf/vmlinux absent: spans work, --sched is unavailable "
                     "(its task_struct offsets come from BTF)", "use a kernel with CONFIG_DEBUG_INFO_BTF=y",
                     data=data)
    try:
        offs = task_offsets()
    except TraceError as e:
        return Check("kernel: BTF", WARN, f"BTF present but unusable for --sched: {e}", "", data=data)
    data["task_struct"] = offs.to_dict()
    return Check("kernel: BTF", PASS, f"/sys/kernel/btf/vmlinux: task_struct pid +{offs.pid}, tgid +{offs.tgid}, "
                 f"se.sum_exec_runtime +{offs.sum_exec_runtime} (for --sched)", data=data)


def check_kprobes(conf: dict[str, str]) -> Check:
    pmu = Path("/sys/bus/event_source/devices/kprobe").exists()
    have = conf.get("CONFIG_KPROBES") == "y" or pmu
    state = "available" if have else "not available" + (" (CONFIG_KPROBES is off)" if conf else "")
    return Check("kernel: kprobes", INFO, f"{state}; not needed: ophamin-trace uses only uprobes and "
                 "tracepoints", data={"kprobes": have})


def check_headers() -> Check:
    rel = platform.release()
    moddir = Path("/lib/modules") / rel
    env = os.environ.get("BCC_KERNEL_SOURCE")
    links = {}
    for name in ("build", "source"):
        p = moddir / name
        links[name] = {"path": str(p), "target": os.path.realpath(p) if p.exists() else None,
                       "symlink": p.is_symlink()}
    lines = tuple(f"{v['path']} -> {v['target'] or 'missing'}" for v in links.values())
    data: dict[str, Any] = {"kernel": rel, "links": links, "BCC_KERNEL_SOURCE": env}
    if env:
        return Check("kernel headers", INFO, f"BCC_KERNEL_SOURCE={env} overrides the lookup", lines=lines,
                     data=data)
    build, source = links["build"]["target"], links["source"]["target"]
    if build and Path(build, "include").is_dir():
        m = re.search(r"linux-headers-(.+?)-(?:amd64|arm64|common)$", build)
        hdr_ver = m.group(1) if m else None
        data["headers_version"] = hdr_ver
        if hdr_ver and not rel.startswith(hdr_ver) and build.startswith("/usr/src/"):
            data["linked_by_setup"] = True
            detail = (f"kernel {rel} ships no headers; setup linked Debian's nearest ({hdr_ver}): arch tree "
                      "as build, -common tree as source. Safe: only uprobe/tracepoint programs are built, "
                      "none reads kernel structs")
            if not source:
                return Check("kernel headers", FAIL, detail + "; but source is missing",
                             f"ln -sfn /usr/src/linux-headers-{hdr_ver}-common {moddir}/source", lines, data)
            return Check("kernel headers", PASS, detail, lines=lines, data=data)
        return Check("kernel headers", PASS, f"headers for {rel}", lines=lines, data=data)
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return Check("kernel headers", PASS, "none under /lib/modules; bcc will use "
                     "/sys/kernel/kheaders.tar.xz", lines=lines, data=data)
    return Check("kernel headers", FAIL, f"no headers for {rel}: bcc cannot compile",
                 f"{SETUP_HINT} (it links Debian's nearest linux-headers)", lines=lines, data=data)


def check_bcc_import() -> tuple[Check, Any]:
    try:
        import bcc  # the import is the check
    except Exception as e:  # any failure here means "no usable bcc"
        return Check("bcc import", FAIL, f"import bcc failed: {type(e).__name__}: {e}",
                     "apt-get install python3-bpfcc and use a venv with --system-site-packages "
                     f"({SETUP_HINT})"), None
    where = getattr(bcc, "__file__", "?")
    data = {"module": where, "version": getattr(bcc, "__version__", None)}
    if not hasattr(bcc, "BPF"):
        # The PyPI package named bcc is an unrelated library that shadows Debian's module.
        return Check("bcc import", FAIL, f"`bcc` at {where} is not the BPF Compiler Collection",
                     "pip uninstall bcc (unrelated PyPI package); Debian's python3-bpfcc provides it",
                     data=data), None
    return Check("bcc import", PASS, f"bcc {data['version']} from {where}", data=data), bcc


BPF_TEST = r"""
#include <uapi/linux/ptrace.h>

struct hit { u32 pid; u32 tid; u64 arg; u64 ts; };
BPF_RINGBUF_OUTPUT(hits, 8);

int on_labs(struct pt_regs *ctx) {
    u64 arg = PT_REGS_PARM1(ctx);
    // Only our own marked calls: other code in this process may call labs too.
    if ((arg >> 32) != MAGIC_HI)
        return 0;
    struct hit *h = hits.ringbuf_reserve(sizeof(struct hit));
    if (!h)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->arg = arg;
    h->ts = bpf_ktime_get_ns();
    hits.ringbuf_submit(h, 0);
    return 0;
}
"""
MAGIC_HI = 0x0BAD5EED
CALLS = 3


def check_bcc_load(bcc: Any, privileged: bool) -> Check:
    name = "bcc compile + load"
    if bcc is None:
        return Check(name, SKIP, "skipped: bcc is not importable", "fix the bcc import first")
    if not privileged:
        return Check(name, SKIP, "skipped: needs privileges", "run as root: sudo ophamin-trace doctor")
    libc_path = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_path)
    libc.labs.restype = ctypes.c_long
    libc.labs.argtypes = [ctypes.c_long]
    got: list[tuple[int, int, int]] = []
    timings: dict[str, float] = {}
    b = None
    sent = [(MAGIC_HI << 32) | i for i in range(1, CALLS + 1)]
    cap = CapturedOutput()
    try:
        with cap:
            t0 = time.perf_counter()
            b = bcc.BPF(text=BPF_TEST.encode(), cflags=[f"-DMAGIC_HI={MAGIC_HI:#x}ULL"])
            t1 = time.perf_counter()
            b.attach_uprobe(name="c", sym="labs", fn_name="on_labs", pid=os.getpid())
            t2 = time.perf_counter()

            def on_hit(_cpu: int, data: int, _size: int) -> None:
                h = b["hits"].event(data)
                got.append((h.pid, h.tid, h.arg))

            b["hits"].open_ring_buffer(on_hit)
            for v in sent:
                libc.labs(v)
            b.ring_buffer_poll(timeout=200)
            b.ring_buffer_consume()
            t3 = time.perf_counter()
        timings = {"compile_s": t1 - t0, "attach_s": t2 - t1, "roundtrip_s": t3 - t2}
    except Exception as e:  # every failure is a finding, reported in one line
        tail = [ln for ln in getattr(cap, "text", "").splitlines() if ln.strip()][-3:]
        return Check(name, FAIL, f"{type(e).__name__}: {e}".strip(),
                     f"check the kernel headers and privileges above ({SETUP_HINT})", lines=tuple(tail))
    finally:
        if b is not None:
            b.cleanup()
    me, tid = os.getpid(), threading.get_native_id()
    data = {
        "libc": libc_path, "symbol": "labs", "calls": CALLS, "hits": len(got),
        "hits_pid_match": all(p == me for p, _, _ in got),
        "hits_tid_match": all(t == tid for _, t, _ in got),
        "args": [a for _, _, a in got], "expected_args": sent,
        **{k: round(v, 4) for k, v in timings.items()},
        "compiler_output_lines": len(cap.text.splitlines()),
    }
    ms = f"compile {timings['compile_s'] * 1000:.0f} ms, attach {timings['attach_s'] * 1000:.0f} ms"
    if data["args"] == sent and data["hits_pid_match"]:
        return Check(name, PASS, f"uprobe on libc labs() fired {len(got)}/{CALLS} times in this process, "
                     f"hits read back from a BPF ring buffer; {ms}", data=data)
    return Check(name, FAIL, f"uprobe hits {len(got)}/{CALLS} (args {data['args']}); {ms}",
                 "the program loaded but events did not arrive: check kernel uprobe support", data=data)


def check_nvml() -> Check:
    # The same availability function the `gpu` enricher uses: doctor and trace give one reason.
    from .correlate.nvml import nvml_availability

    name = "NVML (GPU)"
    fix_none = "none needed: GPU attribution is reported unavailable, tracing works without it"
    got = nvml_availability()
    data = {"driver": got.driver, "gpus": [d["name"] for d in got.devices], "reason": got.reason}
    if not got.available:
        fix = "pip install nvidia-ml-py" if got.reason.startswith("nvidia-ml-py") else fix_none
        return Check(name, WARN, f"GPU data unavailable: {got.reason}", fix, data=data)
    names = [f"{d['index']}: {d['name']}" for d in got.devices]
    return Check(name, PASS, f"driver {got.driver}, {len(names)} GPU(s): {', '.join(names)}", data=data)


def check_interpreters() -> Check:
    from .interpreters import find_interpreters

    try:
        found = find_interpreters(include_unsupported=True)
    except PermissionError as e:
        return Check("interpreters", WARN, f"cannot search {e.filename} without privileges",
                     "run as root to list the interpreters")
    except Exception as e:
        return Check("interpreters", WARN, f"interpreter discovery failed: {type(e).__name__}: {e}")
    lines = tuple(f"{i.label:<16} {i.path}  {'supported' if i.supported else 'unsupported'}" for i in found)
    data = {"interpreters": [i.to_dict() for i in found]}
    n_ok = sum(i.supported for i in found)
    if n_ok:
        return Check("interpreters", PASS, f"{n_ok} supported CPython build(s) of {len(found)} found",
                     lines=lines, data=data)
    # A target may run an interpreter elsewhere; the doctor only sees the usual places.
    return Check("interpreters", WARN, f"no supported CPython (3.9-3.13) found in the usual places "
                 f"({len(found)} found)", "targets must run CPython 3.9-3.13", lines=lines, data=data)


def run_checks() -> list[Check]:
    conf, conf_src = kernel_config()
    priv = check_privileges()
    bcc_imp, bcc = check_bcc_import()
    load = check_bcc_load(bcc, privileged=priv.status == PASS)
    return [
        priv,
        check_tracefs(),
        check_uprobes(conf, conf_src),
        check_tracepoints(),
        check_ringbuf(load),
        check_btf(conf),
        check_kprobes(conf),
        check_headers(),
        bcc_imp,
        load,
        check_nvml(),
        check_interpreters(),
    ]


# ---- command ----------------------------------------------------------------------------


def render(checks: list[Check]) -> str:
    colors = {PASS: "green", WARN: "yellow", FAIL: "red", INFO: "blue", SKIP: "white"}
    out = [f"ophamin-trace doctor: kernel {platform.release()} ({platform.machine()})"]
    for c in checks:
        out.append(f"{click.style(c.status, fg=colors[c.status], bold=True)}  {c.name:<24} {c.detail}")
        out.extend(f"{'':<30}{ln}" for ln in c.lines)
        if c.fix and c.status in (FAIL, WARN, SKIP):
            out.append(f"{'':<30}fix: {c.fix}")
    fails = [c.name for c in checks if c.status == FAIL]
    warns = sum(c.status == WARN for c in checks)
    if fails:
        out.append(f"verdict: tracing cannot work here ({len(fails)} FAIL: {', '.join(fails)}; {warns} WARN)")
    else:
        out.append(f"verdict: tracing can work here (0 FAIL, {warns} WARN)")
    return "\n".join(out)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as a JSON list.")
def doctor(as_json: bool) -> None:
    """Check that this machine can trace: privileges, kernel, tracefs, bcc, headers, GPU, interpreters.

    Each check prints PASS, WARN, FAIL, INFO or SKIP with a one-line fix. The bcc check
    compiles and loads a real BPF program (a uprobe on libc's labs() in the doctor's own
    process, feeding a BPF ring buffer) and reports the compile time. Exit status is 1 when
    any check FAILs (tracing cannot work), else 0.

    \b
    Examples:
      sudo ophamin-trace doctor
      sudo ophamin-trace doctor --json | jq '.[] | select(.status=="FAIL")'
    """
    checks = run_checks()
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        click.echo(render(checks))
    if any(c.status == FAIL for c in checks):
        # SystemExit, not ctx.exit: cli.main runs click with standalone_mode=False, where a
        # click Exit code is returned rather than used as the process status.
        sys.exit(1)
