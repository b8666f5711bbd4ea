"""GPU check and recorder: the reference substrate with its GPU step, NVML sampled beside it.

On a machine with an NVIDIA GPU, NVML and CuPy or PyTorch with CUDA:

    scripts/gpu-check                        # = python3 bench/gpu.py --python python3
    python3 bench/gpu.py --out $OUT/recorded.json   # write the stream elsewhere
    python3 bench/gpu.py --replay tests/data/gpu/recorded-nvidia-h200.json

1. starts `python -m tracer.reference --gpu` (its CUDA context is created before it prints
   its PID line), samples NVML for that process with the tracer's own sampler
   (`tracer.correlate.nvml.NvmlSampler`, every record kept), and takes the spans:
   - `--spans ebpf`: from the tracer itself (`run_trace`, the eBPF capture, needs root + bcc);
   - `--spans hooks`: from the substrate's own call sites, through a stdlib-only recording
     emitter in the target (`time.time_ns()`, the clock spans carry), for machines where eBPF
     cannot run (a GPU box in a sandbox without uprobes);
   - `--spans auto` (default): ebpf when it can run here, else hooks, and says which;
2. writes the raw NVML stream, in the format of tests/data/gpu/ (NVML's field names and units,
   `"kind": "recorded"`), with the spans, to `--out` (default
   tests/data/gpu/recorded-<gpu name>.json);
3. prints every span's GPU figures, and checks that the GPU step's spans show clearly
   non-zero SM utilisation (median >= 20 %) and every other step near zero (median <= 5 %,
   judged on the span less one sample period at each end: see `check`). Exit 0 when that
   holds, 1 when it does not, 2 when it cannot run here (no GPU, no NVML, no GPU array
   library: the reason is printed).

Needs only the standard library and nvidia-ml-py in the tracer's Python (plus bcc for ebpf),
and CuPy or PyTorch in the target's (`--python`, default: this interpreter).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tracer.correlate.gpu import (  # noqa: E402
    A_DEV_SM,
    A_MEM_MAX,
    A_MEM_START,
    A_PROC_UNAVAILABLE,
    A_SM,
    A_UTIL_UNAVAILABLE,
    GpuEnricher,
    GpuStream,
    span_gpu,
)
from tracer.correlate.nvml import nvml_availability  # noqa: E402

GPU_STEP = "takwin.gpu_project"
PARENT = "takwin.cycle"
BUSY_MIN_PCT = 20.0  # the GPU step's median SM utilisation must reach this
IDLE_MAX_PCT = 5.0  # every other step's median must stay below this

# Runs inside the target for --spans hooks: the reference substrate with a recording emitter.
HOOKS_TARGET = r"""
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from tracer.reference import Takwin, stimuli
cycles, cycle_ms, gpu_ms, out = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]

class Span:
    def __init__(self, rec, name): self.rec, self.name = rec, name
    def set_attribute(self, k, v): pass
    def __enter__(self):
        self.start = time.time_ns(); return self
    def __exit__(self, *exc):
        self.rec.append({"name": self.name, "start_ns": self.start, "end_ns": time.time_ns(),
                         "thread.id": threading.get_native_id(), "source": "hooks"})

class Recorder:
    def __init__(self): self.spans = []
    def span(self, name): return Span(self.spans, name)
    def event(self, name, attributes=None): pass

rec = Recorder()
t = Takwin(emitter=rec, seed=0, cycle_ms=cycle_ms)
skipped = t.enable_gpu(gpu_ms)
g = t.gpu
print(json.dumps({"pid": os.getpid(), "gpu": {"enabled": not skipped, "reason": skipped,
      "backend": g.backend if g else "", "device": g.device if g else ""}}), flush=True)
sys.stdin.readline()  # the sampler is running
for s in stimuli(0, cycles if not skipped else 0):
    t.run(s)
t.close()
json.dump(rec.spans, open(out, "w"))
print("done", flush=True)
"""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def ebpf_reason() -> str:
    if os.geteuid() != 0:
        return "not root"
    try:
        import bcc  # noqa: F401, PLC0415

        import tracer.session  # noqa: F401, PLC0415
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    if not Path("/sys/kernel/tracing/uprobe_events").exists():
        return "no uprobe_events in tracefs"
    return ""


def recording_enricher(holder: Dict[str, Any]):
    def make(pid: int, opts: Any) -> GpuEnricher:
        holder["enricher"] = GpuEnricher(pid, opts, keep_raw=True)
        return holder["enricher"]
    return make


def run_ebpf(args, env) -> tuple:
    from tracer.session import ENRICHERS, run_trace  # noqa: PLC0415
    from tracer.spec import load_spec  # noqa: PLC0415

    holder: Dict[str, Any] = {}
    ENRICHERS["gpu-record"] = recording_enricher(holder)
    proc = subprocess.Popen([args.python, "-m", "tracer.reference", "--gpu", "--cycles", str(args.cycles),
                             "--cycle-ms", str(args.cycle_ms), "--gpu-ms", str(args.gpu_ms), "--wait-for-attach",
                             "--out", os.devnull], env=env, stdout=subprocess.PIPE, text=True)
    head = json.loads(proc.stdout.readline() or "{}")
    if not head.get("gpu", {}).get("enabled"):
        proc.kill()
        return head, None, []
    res = run_trace(proc.pid, load_spec("reference"), status=False, enrichers=("gpu-record",),
                    on_attached=lambda _c: os.kill(proc.pid, signal.SIGUSR1))
    proc.wait()
    spans = [{"name": s.name, "start_ns": s.start_ns, "end_ns": s.end_ns, "thread.id": s.thread_id,
              "source": "ebpf"} for s in res.spans]
    return head, holder["enricher"].stream, spans


def run_hooks(args, env, tmp: Path) -> tuple:
    spans_file = tmp / "gpu-hooks-spans.json"
    proc = subprocess.Popen([args.python, "-c", HOOKS_TARGET, str(ROOT), str(args.cycles), str(args.cycle_ms),
                             str(args.gpu_ms), str(spans_file)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    head = json.loads(proc.stdout.readline() or "{}")
    if not head.get("gpu", {}).get("enabled"):
        proc.communicate("\n", timeout=60)
        return head, None, []
    enricher = GpuEnricher(proc.pid, None, keep_raw=True)
    try:
        summary = enricher.summary()
        if summary["status"] == "unavailable":
            proc.communicate("\n", timeout=60)
            return head, None, []
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.stdout.readline()
        proc.wait()
        enricher.finish()
    finally:
        enricher.close()
    spans = json.loads(spans_file.read_text())
    spans_file.unlink()
    return head, enricher.stream, spans


def table(stream: GpuStream, spans: List[dict], devices=None) -> List[dict]:
    rows = []
    for s in spans:
        a = span_gpu(stream, s["start_ns"], s["end_ns"], devices)
        rows.append({"name": s["name"], "start_ns": s["start_ns"], "end_ns": s["end_ns"],
                     "ms": (s["end_ns"] - s["start_ns"]) / 1e6, **a})
    return rows


def fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def check(stream: GpuStream, spans: List[dict], devices) -> tuple:
    """(passed, lines): the GPU step busy, every other step near zero, on the target's own SM
    figure where NVML gives one, else on the device's.

    A step is judged on its span less one sample period at each end: those edge periods may be
    shared with a neighbouring GPU step (a figure blends whole periods), the inner ones cannot,
    since the GPU step waits for the device before it returns. The GPU step is judged whole.
    """
    period_ns = int((stream.period_ms() or 0) * 1e6)
    judged = []
    for s in spans:
        if s["name"] == PARENT:
            continue
        lo, hi = s["start_ns"], s["end_ns"]
        if s["name"] != GPU_STEP:
            lo, hi = lo + period_ns, hi - period_ns
        if hi - lo >= period_ns:
            judged.append((s["name"], span_gpu(stream, lo, hi, devices)))
    # The target's own figure where NVML gives it for the GPU step, else the device's.
    gpu_attrs = [a for n, a in judged if n == GPU_STEP]
    key = A_SM if devices is None and gpu_attrs and all(A_SM in a for a in gpu_attrs) else A_DEV_SM
    by: Dict[str, List[float]] = {}
    for name, a in judged:
        if key in a:
            by.setdefault(name, []).append(a[key])
    lines = [f"check on {key} ({'the target process' if key == A_SM else 'the whole device'}); "
             f"other steps over their span less one {period_ns / 1e6:.1f} ms sample period at each end:"]
    busy = by.get(GPU_STEP, [])
    ok = bool(busy) and statistics.median(busy) >= BUSY_MIN_PCT
    lines.append(f"  {GPU_STEP}: median {statistics.median(busy):.1f} % over {len(busy)} spans "
                 f"(want >= {BUSY_MIN_PCT:g})" if busy else f"  {GPU_STEP}: no span with a figure")
    others = [n for n in by if n != GPU_STEP]
    ok = ok and bool(others)
    for name in sorted(others):
        m = statistics.median(by[name])
        ok = ok and m <= IDLE_MAX_PCT
        lines.append(f"  {name}: median {m:.1f} % over {len(by[name])} spans (want <= {IDLE_MAX_PCT:g})")
    if not others:
        lines.append("  no other step long enough to judge (raise --cycle-ms)")
    return ok, lines


def report(stream: GpuStream, spans: List[dict]) -> int:
    devices = None
    if not any(d.first_seen_ns is not None for d in stream.devices.values()):
        seen = sorted(set().union(*(d.pids_seen for d in stream.devices.values())))
        devices = sorted(stream.devices)
        print(f"note: the target (PID {stream.pid}) never appeared in NVML's process lists (PIDs NVML listed: "
              f"{seen or 'none'}); figures below are over every GPU, whole-device only")
    rows = table(stream, spans, devices)
    if devices is not None:  # the target's own figures mean nothing when NVML never listed it
        drop = (A_SM, "ophamin.gpu.mem_util_pct", "ophamin.gpu.process_samples", A_MEM_START, A_MEM_MAX)
        rows = [{k: v for k, v in r.items() if k not in drop} for r in rows]
    print(f"{'span':30} {'ms':>9} {'SM% proc':>9} {'mem% proc':>9} {'SM% dev':>8} {'samples':>7} "
          f"{'GPU MiB start':>13} {'max':>8}  note")
    def mib(r: dict, k: str) -> str:
        return fmt(r[k] / (1 << 20)) if k in r else "-"

    for r in rows:
        print(f"{r['name']:30} {r['ms']:9.1f} {fmt(r.get(A_SM)):>9} {fmt(r.get('ophamin.gpu.mem_util_pct')):>9} "
              f"{fmt(r.get(A_DEV_SM)):>8} {fmt(r.get('ophamin.gpu.device.samples')):>7} {mib(r, A_MEM_START):>13} "
              f"{mib(r, A_MEM_MAX):>8}  {r.get(A_UTIL_UNAVAILABLE, '') or r.get(A_PROC_UNAVAILABLE, '')}")
    for d in stream.devices.values():
        ts = d.proc_sm.ts
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
        period = d.series["NVML_GPU_UTILIZATION_SAMPLES"].period() if "NVML_GPU_UTILIZATION_SAMPLES" in d.series else None
        print(f"GPU {d.index} {d.name}: device sample period {fmt(period and period / 1000)} ms; "
              f"target's process samples {len(ts)}, shortest spacing {fmt(gaps[0] / 1000 if gaps else None)} ms, "
              f"p10 {fmt(gaps[len(gaps) // 10] / 1000 if gaps else None)} ms; errors {d.errors or 'none'}")
    ok, lines = check(stream, spans, devices)
    print("\n".join(lines))
    print("verdict:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the substrate (CuPy or PyTorch)")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--cycle-ms", type=int, default=2500, help="the real substrate's cycle length")
    ap.add_argument("--gpu-ms", type=float, default=800.0)
    ap.add_argument("--spans", choices=("auto", "ebpf", "hooks"), default="auto")
    ap.add_argument("--out", help="where to write the recorded stream (default tests/data/gpu/recorded-<gpu>.json)")
    ap.add_argument("--replay", help="print and check a recorded stream file instead of recording")
    args = ap.parse_args()

    if args.replay:
        data = json.loads(Path(args.replay).read_text())
        return report(GpuStream.from_dict(data), data.get("spans", []))

    avail = nvml_availability()
    if not avail.available:
        print(f"gpu check cannot run here: GPU data unavailable: {avail.reason}")
        return 2
    mode = args.spans
    why = ebpf_reason()
    if mode == "auto":
        mode = "hooks" if why else "ebpf"
        print(f"span source: {mode}" + (f" (eBPF cannot run here: {why})" if why else ""))
    elif mode == "ebpf" and why:
        print(f"gpu check cannot run with --spans ebpf: {why}")
        return 2
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KIMERA_TELEMETRY_EMITTER_PATH", None)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    head, stream, spans = run_ebpf(args, env) if mode == "ebpf" else run_hooks(args, env, tmp)
    gpu = head.get("gpu", {})
    if stream is None:
        print(f"gpu check cannot run here: GPU step skipped: {gpu.get('reason') or 'NVML unavailable'}")
        return 2
    try:
        from importlib.metadata import version  # noqa: PLC0415

        nvml_version = version("nvidia-ml-py")
    except Exception:  # noqa: BLE001
        nvml_version = "?"
    stream.provenance = {
        "kind": "recorded", "recorded_by": "bench/gpu.py", "span_source": mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": avail.devices[0]["name"], "driver": avail.driver,
        "nvidia_ml_py": nvml_version, "backend": gpu.get("backend"),
        "target_python": args.python, "tracer_python": platform.python_version(),
        "cycles": args.cycles, "cycle_ms": args.cycle_ms, "gpu_ms": args.gpu_ms,
    }
    data = stream.to_dict()
    data["spans"] = spans
    out = Path(args.out) if args.out else ROOT / "tests" / "data" / "gpu" / f"recorded-{slug(avail.devices[0]['name'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded stream: {out} ({len(spans)} spans)")
    return report(GpuStream.from_dict(data), spans)


if __name__ == "__main__":
    sys.exit(main())
