"""Benchmark: ophamin-trace side by side with the tools people use today, on the same workloads.

    scripts/bench peers [--quick] [--pythons pyenv-3.11.7,pyenv-3.12.1] [--repeats 3]
                        [--workloads ref-2500,ref-50,richards,deltablue,nbody] [--readme]

For each interpreter, one harness process per workload (bench/peers/harness.py) runs the
workload segment by segment; every alternative times the same `run()` in that process:
untraced, the in-substrate emitter (no-op, OpenTelemetry; reference substrate only),
VizTracer, a sys.setprofile recorder, sys.monitoring callbacks (3.12+), py-spy at 100 Hz,
bcc's pythoncalls, and ophamin-trace with a small spec (the steps) and a large one (every
function of the workload's own modules), plus its sampled mode where this build has one.
Within a repeat the alternatives run in a rotated order, each workload in turn, with the
baseline twice; figures are paired per repeat and reported as median [p25, p75].

The true calls come from a separate counting run of the same segment (sys.monitoring on
3.12+, a profile function on all threads before) and are compared per function with what each
tool reports. Writes results/peers.json and results/peers.md; --readme also rewrites the README
section "Performance versus other tools". Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pyspy_ab  # noqa: E402
from peers import figures, runners, specs, venvs  # noqa: E402

DEFAULT_PYTHONS = ("pyenv-3.11.7", "pyenv-3.12.1")
CAPTURE_JSON = ROOT / "results" / "capture.json"
# bench/capture.py's figure: interpreters.<label>.cost_ns.bare = ns a Python call costs with the
# same probe sites holding an empty BPF program, over the untraced call.
CAPTURE_PATH = ("interpreters", "<label>", "cost_ns", "bare")
README_TITLE = "## Performance versus other tools"
LONG_SEGMENT_S = 2.0  # a baseline segment this long is timed once per repeat, not twice


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    bench: str  # the harness's --workload
    size: int = 1  # pyperformance: the loop count handed to the bench function
    cycle_s: float = 0.0  # reference: wanted length of one cycle (cycle_ms is calibrated to it)
    cycles: int = 1

    @property
    def reference(self) -> bool:
        return self.bench == "reference"


WORKLOADS = {
    "ref-2500": Workload("ref-2500", "reference substrate, ~2.5 s cycles", "reference", cycle_s=2.5, cycles=1),
    "ref-50": Workload("ref-50", "reference substrate, ~50 ms cycles", "reference", cycle_s=0.05, cycles=8),
    "richards": Workload("richards", "pyperformance richards", "richards", size=1),
    "deltablue": Workload("deltablue", "pyperformance deltablue", "deltablue", size=1000),
    "nbody": Workload("nbody", "pyperformance nbody", "nbody", size=40000),
    "go": Workload("go", "pyperformance go", "go", size=1),
}
DEFAULT_WORKLOADS = ("ref-2500", "ref-50", "richards", "deltablue", "nbody")


@dataclass(frozen=True)
class Alt:
    key: str
    title: str
    kind: str  # "inproc" or one of the external runners
    mode: str = "none"  # harness mode for in-process alternatives
    emitter: str = "noop"  # reference substrate build the alternative runs on
    reference_only: bool = False
    min_version: tuple[int, int] = (3, 0)

    @property
    def external(self) -> bool:
        return self.kind != "inproc"


ALTS = (
    Alt("untraced", "untraced", "inproc", emitter="bare"),
    Alt("emitter-noop", "in-substrate emitter, no-op", "inproc", emitter="noop", reference_only=True),
    Alt("emitter-otel", "in-substrate emitter, OpenTelemetry SDK", "inproc", emitter="otel", reference_only=True),
    Alt("viztracer", "VizTracer (in-process, every call)", "inproc", mode="viztracer"),
    Alt("setprofile", "sys.setprofile recorder", "inproc", mode="setprofile"),
    Alt("monitoring", "sys.monitoring recorder", "inproc", mode="monitoring", min_version=(3, 12)),
    Alt("py-spy", f"py-spy record --pid, {runners.PYSPY_RATE} Hz", "py-spy"),
    Alt("pythoncalls", "bcc pythoncalls (USDT)", "pythoncalls"),
    Alt("bare-probes", "bare probes (exact mode's sites, empty programs)", "bare-probes"),
    Alt("ophamin-small", "ophamin-trace exact, small spec (steps)", "ophamin"),
    Alt("ophamin-large", "ophamin-trace exact, large spec (every function)", "ophamin"),
    Alt("ophamin-sampled", f"ophamin-trace sampled, {runners.PYSPY_RATE} Hz", "ophamin-sampled"),
)


def _say(msg: str) -> None:
    print(f"[bench peers] {msg}", file=sys.stderr, flush=True)


def _timing(seg: dict) -> dict:
    return {k: seg[k] for k in ("wall_s", "cpu_s", "hwm_kb", "hwm0_kb", "start_ns", "end_ns") if k in seg}


def _machine(load_before: tuple[float, float, float]) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "host_python": platform.python_version(),
            "load_before": list(load_before)}


# ---- one cell: an interpreter and a workload ---------------------------------------------------

class Cell:
    def __init__(self, label: str, python: Path, wl: Workload, alts: list[Alt], tmp: Path) -> None:
        self.label, self.python, self.wl = label, python, wl
        self.params: dict = {}
        if wl.reference:
            cycle_ms = runners.calibrate_cycle_ms(python, wl.cycle_s)
            self.params = {"cycle_ms": cycle_ms, "cycles": wl.cycles}
            argv = ["--workload", "reference", "--cycle-ms", str(cycle_ms), "--cycles", str(wl.cycles)]
        else:
            self.params = {"size": wl.size}
            argv = ["--workload", wl.bench, "--size", str(wl.size)]
        self.argv = argv
        self.h = runners.Harness(str(python), argv)
        self.sessions: dict[str, runners.OphaminSession] = {}
        self.session_info: dict[str, dict] = {}
        self.version = tuple(int(x) for x in self.h.python.split(".")[:2])
        self.alts = [a for a in alts if (wl.reference or not a.reference_only) and self.version >= a.min_version]
        self.skipped = [a for a in alts if a not in self.alts and (wl.reference or not a.reference_only)]
        small_key = "reference" if wl.reference else wl.bench
        self.small = specs.small_spec(small_key, self.h.files)
        self.large = specs.large_spec(self.h.files)
        self.spec_paths = {}
        for kind, fns in (("small", self.small), ("large", self.large)):
            p = tmp / f"{label}-{wl.key}-{kind}.toml"
            p.write_text(specs.toml(fns, f"peers-{wl.key}"))
            self.spec_paths[kind] = str(p)
        self.runs: dict[str, list[dict]] = {a.key: [] for a in self.alts}
        self.truth: dict = {}

    @property
    def tool_base(self) -> str:
        """Tools run on the no-op build of the substrate and are compared with it."""
        return "emitter-noop" if self.wl.reference else "untraced"

    def count_truth(self) -> None:
        # The counting run is also the warm-up (imports, caches, first touch) of what follows.
        res = self.h.segment(mode="count", emitter="noop")
        per_fn = {(c["file"], c["line"]): c["starts"] for c in res["counts"]}
        self.truth = {
            "starts_all": res["starts_all"], "resumes_all": res["resumes_all"], "count_wall_s": res["wall_s"],
            "small": {f.ident: per_fn.get((f.file, f.line), 0) for f in self.small},
            "large": {f.ident: per_fn.get((f.file, f.line), 0) for f in self.large},
        }

    def _by_line(self) -> dict[tuple[str, int], str]:
        return {(f.file, f.line): f.ident for f in self.large}

    def order(self, repeat: int) -> list[Alt]:
        """Rotated per repeat; the tools' baseline goes first and, unless one segment takes
        seconds (then once is enough and the budget needs the time), again half-way. An
        alternative found unavailable (no USDT in this build, no --mode) is not retried."""
        base = next(a for a in self.alts if a.key == self.tool_base)
        gone = {k for k, runs in self.runs.items() if runs and runs[0].get("status") == "unavailable"}
        rest = [a for a in self.alts if a is not base and a.key not in gone]
        k = (repeat * 3) % len(rest) if rest else 0
        rest = rest[k:] + rest[:k]
        half = len(rest) // 2
        walls = [r["wall_s"] for r in self.runs.get(base.key, []) if "wall_s" in r]
        typical = statistics.median(walls) if walls else self.truth.get("count_wall_s", 0.0)
        twice = typical < LONG_SEGMENT_S
        return [base, *rest[:half], *([base] if twice else []), *rest[half:]]

    def run_alt(self, alt: Alt, repeat: int, caps: dict) -> dict:
        rec: dict = {"repeat": repeat, "status": "ok"}
        if alt.kind == "inproc":
            n_calls = self.truth["starts_all"] + self.truth["resumes_all"]
            res = self.h.segment(mode=alt.mode, emitter=alt.emitter if self.wl.reference else "noop",
                                 entries=max(1_000_000, min(30_000_000, 4 * n_calls)), parse=(repeat == 0))
            rec.update(_timing(res))
            if "seen" in res:
                self._inproc_seen(rec, res)
            return rec
        if alt.kind == "ophamin-sampled" and "sampled" not in caps["modes"]:
            return {"repeat": repeat, "status": "unavailable", "reason": "not available in this build (no --mode)"}
        if alt.kind == "ophamin" or alt.kind == "ophamin-sampled":
            return self._ophamin_segment(alt, rec)
        if alt.kind == "py-spy":
            run = runners.pyspy(self.h, str(venvs.pyspy(self.python)), "noop")
        elif alt.kind == "bare-probes":
            run = runners.bare_probes(self.h, "noop")
        else:
            run = runners.pythoncalls(self.h, "noop")
        rec.update(status=run.status, reason=run.reason, attach_s=run.attach_s, tool_cpu_total_s=run.cpu_total_s,
                   tool_peak_rss_kb=run.peak_rss_kb, tool_stop_s=run.stop_s)
        if run.segments:
            rec.update(_timing(run.segments[0]), tool_cpu_segment_s=run.segments[0]["tool_cpu_s"])
        if run.status == "ok" and alt.kind != "bare-probes":
            (self._pyspy_seen if alt.kind == "py-spy" else self._pythoncalls_seen)(rec, run)
        return rec

    def _ophamin_segment(self, alt: Alt, rec: dict) -> dict:
        """ophamin-trace stays attached to a harness of its own for all repeats (one compile and
        attach per spec, not per repeat); its segments still interleave with the others', and
        what it saw is split per segment by time window when it detaches (`finish()`)."""
        sess = self.sessions.get(alt.key)
        if sess is None:
            h = runners.Harness(str(self.python), self.argv)
            check = h.segment(mode="none", emitter="noop")  # the same run untraced, in this process
            extra = ("--mode", "sampled", "--hz", str(runners.PYSPY_RATE)) if alt.kind == "ophamin-sampled" else ()
            spec = self.spec_paths["large" if alt.key == "ophamin-large" else "small"]
            sess = self.sessions[alt.key] = runners.OphaminSession(h, spec, "noop", extra,
                                                                   calls_log=alt.kind == "ophamin")
            sess.process_check = _timing(check)
        if not sess.ok:
            return dict(rec, status=sess.run.status, reason=sess.run.reason)
        first = not sess.run.segments
        seg = sess.segment()
        rec.update(_timing(seg), tool_cpu_segment_s=seg["tool_cpu_s"], attach_s=sess.run.attach_s if first else None)
        return rec

    def finish(self) -> None:
        """Detach the ophamin-trace sessions and fill in what they saw, segment by segment."""
        for key, sess in self.sessions.items():
            run = sess.close()
            sess.harness.quit()
            recs = [r for r in self.runs[key] if r.get("status") == "ok" and "wall_s" in r]
            self.session_info[key] = {"process_check": getattr(sess, "process_check", None),
                                      "status": run.status, "reason": run.reason, "stop_s": run.stop_s,
                                      "cpu_total_s": run.cpu_total_s, "peak_rss_kb": run.peak_rss_kb}
            if run.status != "ok":
                for r in recs:
                    r.update(status=run.status, reason=run.reason)
                continue
            kind = "large" if key == "ophamin-large" else "small"
            ex = run.extra
            cut = ex["losses"].get("cut_at_detach", {})
            self.session_info[key].update(
                counters=ex["counters"], attach_s_reported=ex["attach_s_reported"], output_bytes=ex["output_bytes"],
                warnings=ex["warnings"], cut_at_attach=sum(ex["losses"].get("cut_at_attach", {}).values()),
                cut_at_detach=cut)
            for i, r in enumerate(recs):
                got = ex["per_segment"][i]
                if i == len(recs) - 1:  # a span still open at detach was entered in the last segment
                    got = {k: got.get(k, 0) + cut.get(k, 0) for k in set(got) | set(cut)}
                seen = {ident: got.get(ident, 0) for ident in self.truth[kind]}
                r["seen_fraction"] = figures.seen_fraction(seen, self.truth[kind])
                # Exact mode also counts every call in the kernel, ring-buffer drops or not: what it
                # saw is that count; the share of calls that became spans is given beside it.
                counted = (ex.get("calls_per_segment") or [None] * len(recs))[i]
                if counted is not None:
                    r["spans_fraction"] = r["seen_fraction"]
                    r["seen_fraction"] = figures.seen_fraction(
                        {ident: counted.get(ident, 0) for ident in self.truth[kind]}, self.truth[kind])
                # Events delivered for the segment: an entry and an exit per span seen.
                r["events"] = 2 * sum(seen.values())
                r["lost"] = ex["counters"]["dropped"]  # ring-buffer drops over the whole session
                r["tool_peak_rss_kb"] = run.peak_rss_kb
                r["tool_cpu_total_s"] = run.cpu_total_s
        self.sessions = {}

    def _inproc_seen(self, rec: dict, res: dict) -> None:
        by_line = self._by_line()
        seen: dict[str, int] = {}
        for s in res["seen"]:
            ident = by_line.get((s["file"], s["line"]))
            if ident:
                seen[ident] = seen.get(ident, 0) + s.get("starts", s.get("calls", 0))
        rec["seen_fraction"] = figures.seen_fraction(seen, self.truth["large"])
        rec["events"] = res.get("events")
        if res.get("events") is not None and "entries_cap" in res:
            rec["lost"] = max(0, res["events"] - res["entries_cap"] + 1) if res["events"] >= res["entries_cap"] else 0

    def _pyspy_seen(self, rec: dict, run: runners.ToolRun) -> None:
        names = {(Path(f.file).name, f.qualname.rsplit(".", 1)[-1]) for f in self.large}
        quals = {(Path(f.file).name, f.qualname) for f in self.large}
        present: set = set()
        in_workload = 0
        for stack, n in run.extra["stacks"]:
            hit = False
            for frame in stack:
                func, _, where = frame.rpartition(" (")
                fname = where.split(":", 1)[0]
                base = Path(fname).name
                if (base, func) in quals or (base, func.rsplit(".", 1)[-1]) in names:
                    present.add((base, func))
                    hit = True
            in_workload += n if hit else 0
        rec["samples"] = in_workload
        rec["functions_present"] = f"{len(present)} of {len(self.large)} functions"
        rec["events"] = run.extra["samples"]

    def _pythoncalls_seen(self, rec: dict, run: runners.ToolRun) -> None:
        calls = run.extra["calls"]
        seen = {}
        for f in self.large:
            leaf = f.qualname.rsplit(".", 1)[-1]
            seen[f.ident] = sum(n for name, n in calls.items() if name.endswith("." + leaf) or name == leaf)
        rec["seen_fraction"] = figures.seen_fraction(seen, self.truth["large"])
        rec["events"] = sum(calls.values())
        rec["pythoncalls_reported"] = dict(list(calls.items())[:20])

    def summary(self) -> dict:
        base_of = {a.key: ("untraced" if a.key in ("untraced", "emitter-noop", "emitter-otel") else self.tool_base)
                   for a in self.alts}
        by_repeat: dict[str, dict[int, list[dict]]] = {}
        for key, runs in self.runs.items():
            for r in runs:
                if r.get("status") == "ok" and r.get("wall_s") is not None:
                    by_repeat.setdefault(key, {}).setdefault(r["repeat"], []).append(r)
        calls = self.truth["starts_all"]
        alts = {}
        for a in ALTS:
            if a in self.alts:
                fig = figures.summarise(self.runs[a.key], by_repeat.get(base_of[a.key], {}), calls)
                fig.update(title=a.title, base=base_of[a.key], external=a.external)
                alts[a.key] = fig
            elif a in self.skipped:
                alts[a.key] = {"title": a.title, "status": "not applicable",
                               "reason": f"needs Python {a.min_version[0]}.{a.min_version[1]}+", "external": a.external}
        return {"label": self.label, "python": self.h.python, "workload": self.wl.key, "title": self.wl.title,
                "params": self.params, "truth": self.truth, "small_spec": [f.ident for f in self.small],
                "large_spec_functions": len(self.large), "alternatives": alts, "sessions": self.session_info,
                "raw": self.runs}


LADDER_RATES = (2_000, 5_000, 10_000, 20_000, 40_000, 80_000, 160_000)  # calls/s; two events per call


def rate_ladder(label: str, python: Path, tmp: Path, rates: tuple[int, ...], step_s: float) -> dict:
    """Events per second ophamin-trace sustains without loss: a paced call of one traced
    function, one rate per step; its spans are counted per step from the output file."""
    h = runners.Harness(str(python), ["--workload", "ladder", "--rates", ",".join(map(str, rates)),
                                      "--step-s", str(step_s)])
    try:
        target = specs.Function("__main__", "ladder_call", h.files[0], 0)
        spec = tmp / f"{label}-ladder.toml"
        spec.write_text(specs.toml([target], "peers-ladder"))

        sess = runners.OphaminSession(h, str(spec))
        if sess.ok:
            seg = sess.segment()
            # contiguous windows, one per step, so no span falls between two steps
            steps = seg["steps"]
            edges = [st["start_ns"] for st in steps] + [seg["end_ns"] + 10**9]
            sess.windows = [(edges[i], edges[i + 1] - 1) for i in range(len(steps))]
        run = sess.close()
    finally:
        h.quit()
    if run.status != "ok":
        return {"status": run.status, "reason": run.reason}
    got = run.extra["per_segment"]
    out_steps = []
    for st, g in zip(steps, got):
        seen = g.get(target.ident, 0)
        out_steps.append({"offered_events_per_s": 2 * st["achieved_per_s"], "calls": st["calls"], "seen": seen,
                          "lossless": seen == st["calls"]})
    sustained = 0.0
    for st in out_steps:
        if not st["lossless"]:
            break
        sustained = st["offered_events_per_s"]
    return {"status": "ok", "steps": out_steps, "sustained_events_per_s": sustained,
            "dropped": run.extra["counters"]["dropped"], "tool_cpu_segment_s": run.segments[0]["tool_cpu_s"],
            "segment_wall_s": run.segments[0]["wall_s"]}


# ---- the whole run --------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    load0 = os.getloadavg()
    t_start = time.monotonic()
    keys = [w for w in args.workloads.split(",") if w]
    bad = [w for w in keys if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"bench peers: unknown workload {bad[0]!r} (known: {', '.join(WORKLOADS)})")
    pythons = venvs.pythons(args.pythons, "bench peers")
    labels = list(pythons)
    t_setup = time.monotonic() - t_start
    caps = {"modes": runners.tracer_modes()}
    tmp = ROOT / "results" / "peers-specs"
    tmp.mkdir(parents=True, exist_ok=True)
    cells_out = []
    ladders: dict[str, dict] = {}
    for lb in labels:
        wls = [WORKLOADS[k] for k in keys]
        if args.quick:
            wls = [_quick(w) for w in wls]
        _say(f"{lb}: starting {len(wls)} workloads")
        cells = [Cell(lb, pythons[lb], w, list(ALTS), tmp) for w in wls]
        try:
            for c in cells:
                c.count_truth()
                _say(f"{lb} {c.wl.key}: {c.params}, {c.truth['starts_all']:,} Python calls per segment "
                     f"(+{c.truth['resumes_all']:,} resumptions)")
            for r in range(args.repeats):
                for c in cells:
                    t0 = time.monotonic()
                    for a in c.order(r):
                        t1 = time.monotonic()
                        rec = c.run_alt(a, r, caps)
                        rec["elapsed_s"] = time.monotonic() - t1
                        c.runs[a.key].append(rec)
                    _say(f"{lb} {c.wl.key}: repeat {r + 1}/{args.repeats} in {time.monotonic() - t0:.0f} s")
            for c in cells:
                c.finish()
            cells_out += [c.summary() for c in cells]
        finally:
            for c in cells:
                for sess in c.sessions.values():
                    sess.close()
                    sess.harness.quit()
                c.h.quit()
        rates = LADDER_RATES[:5] if args.quick else LADDER_RATES
        ladders[lb] = rate_ladder(lb, pythons[lb], tmp, rates, 0.5 if args.quick else 1.0)
        _say(f"{lb}: rate ladder: {ladders[lb].get('sustained_events_per_s', 0) / 1e3:,.0f} k events/s without loss")
    return {"machine": dict(_machine(load0), load_after=list(os.getloadavg())),
            "elapsed_s": time.monotonic() - t_start, "setup_s": t_setup, "repeats": args.repeats,
            "quick": args.quick, "capture_modes": sorted(caps["modes"]), "bare_probe": _bare_probe(),
            "cells": cells_out, "ladder": ladders}


def _quick(w: Workload) -> Workload:
    if w.reference:
        return Workload(w.key, w.title + " (quick)", w.bench, cycle_s=min(w.cycle_s, 0.3), cycles=min(w.cycles, 3))
    return Workload(w.key, w.title + " (quick)", w.bench, size=max(1, w.size // 4) if w.size > 1 else 1)


def _bare_probe() -> dict:
    """The bare kernel probe cost per Python call from bench/capture.py, if it has run."""
    where = CAPTURE_JSON.relative_to(ROOT)
    try:
        data = json.loads(CAPTURE_JSON.read_text())
    except (OSError, ValueError):
        return {"status": "absent", "reason": f"{where} not found or unreadable (run scripts/bench capture)"}
    vals = {}
    for label, d in (data.get("interpreters") or {}).items():
        v = (d.get("cost_ns") or {}).get("bare") if isinstance(d, dict) else None
        if isinstance(v, (int, float)):
            vals[label] = float(v)
    if not vals:
        return {"status": "absent", "reason": f"{where} has no {'.'.join(CAPTURE_PATH)}"}
    m = data.get("machine", {})
    return {"status": "ok", "values": vals, "load": m.get("loadavg_before"), "mtime": CAPTURE_JSON.stat().st_mtime}


def _bare_for(bare: dict, label: str, python: str) -> float | None:
    return bare.get("values", {}).get(label) if bare.get("status") == "ok" else None


def _per_call(c: dict, key: str) -> float | None:
    """An alternative's median per-call cost in target CPU ns on a cell, if it ran."""
    f = c["alternatives"].get(key, {})
    return (f.get("per_call_ns_cpu") or {}).get("median") if f.get("status") == "ok" else None


# ---- reporting --------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# ophamin-trace versus other tools ({'quick smoke run' if res['quick'] else 'full run'})", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; load average before "
           f"{', '.join(f'{x:.2f}' for x in m['load_before'])}, after {', '.join(f'{x:.2f}' for x in m['load_after'])}. "
           f"{res['repeats']} repeats, run took {res['elapsed_s'] / 60:.1f} min (setup {res['setup_s']:.0f} s).", ""]
    labels = list(dict.fromkeys(c["label"] for c in res["cells"]))
    for lb in labels:
        cells = [c for c in res["cells"] if c["label"] == lb]
        out += [f"## {lb} (CPython {cells[0]['python']})", "", figures.HEADER]
        for c in cells:
            wl = f"{c['workload']} ({_params(c)})"
            for key, fig in c["alternatives"].items():
                out.append(figures.row(wl, fig["title"], fig, fig.get("external", False), key == "untraced"))
        out.append("")
    out += ladder_md(res)
    out += targets(res)
    out.append(NOTES)
    return "\n".join(out) + "\n"


def ladder_md(res: dict) -> list[str]:
    lines = ["## Events per second without loss (ophamin-trace, rate ladder)", "",
             "One traced function called at a paced rate, one rate per step; spans counted per step.", ""]
    for lb, lad in res["ladder"].items():
        if lad.get("status") != "ok":
            lines += [f"- {lb}: {lad.get('status')}: {lad.get('reason', '')}", ""]
            continue
        cells = " | ".join(f"{s['offered_events_per_s'] / 1e3:,.0f}k: {100 * s['seen'] / s['calls']:.1f} %"
                           for s in lad["steps"])
        lines.append(f"- {lb}: sustained {lad['sustained_events_per_s'] / 1e3:,.0f} k events/s without loss; "
                     f"seen per step (offered events/s: share of calls seen): {cells}; ring-buffer drops "
                     f"{lad['dropped']:,}; tracer CPU {lad['tool_cpu_segment_s']:.1f} s over {lad['segment_wall_s']:.1f} s")
    return lines + [""]


def _params(c: dict) -> str:
    p = c["params"]
    calls = f"{c['truth']['starts_all']:,} calls"
    if "cycle_ms" in p:
        return f"{p['cycles']} x cycle_ms={p['cycle_ms']}, {calls}"
    return f"size {p['size']}, {calls}"


def targets(res: dict) -> list[str]:
    """The issue's targets, measured, one line each, plus the in-process comparison."""
    lines = ["## Targets", ""]
    for c in res["cells"]:
        a = c["alternatives"]
        tag = f"{c['label']} {c['workload']}"
        for k in ("ophamin-small", "ophamin-large"):
            f = a.get(k, {})
            if f.get("status") != "ok" or "seen" not in f:
                lines.append(f"- {tag} {k}: {f.get('status', 'not run')} {f.get('reason', '')}".rstrip())
                continue
            w = f["seen"]["worst"]
            verdict = "MET" if f["seen"]["all_exact"] else "NOT MET"
            lost = f"{f['lost_events']['max']:,.0f}" if f.get("lost_events") else "?"
            how = "counted in the kernel" if "spans_seen" in f else "saw as spans"
            spans = ""
            if "spans_seen" in f:
                sw = f["spans_seen"]["worst"]
                spans = f"; as spans {100 * (sw['fraction'] or 0):.2f} %"
            lines.append(f"- {tag} {k}: {how} {100 * (w['fraction'] or 0):.2f} % of {w['true_calls']:,} true calls "
                         f"(worst repeat; exact per function in every repeat: {verdict}; "
                         f"{w['n_short']} functions short, {w['n_over']} over{spans}; most events lost in a "
                         f"repeat {lost})")
    lines.append("")
    bp = res["bare_probe"]
    if bp.get("status") == "ok":
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(bp["mtime"]))
        load = ", ".join(f"{x:.1f}" for x in bp["load"]) if bp.get("load") else "?"
        lines.append(f"Bare probe cost: `{CAPTURE_JSON.relative_to(ROOT)}` ({'.'.join(CAPTURE_PATH)}), written "
                     f"{when}, load average then {load}.")
        lines.append("")
    for c in res["cells"]:
        a = c["alternatives"]
        f = a.get("ophamin-small", {})
        pc = (f.get("per_call_ns_cpu") or {}).get("median") if f.get("status") == "ok" else None
        if pc is None or c["truth"]["starts_all"] < 100_000:
            continue
        # The bare probes on this same workload: the like-for-like base (the call loop of
        # bench/capture.py, given beside, has a smaller working set and cheaper frames).
        bare = _per_call(c, "bare-probes")
        loop = _bare_for(res["bare_probe"], c["label"], c["python"])
        parts = [f"- {c['label']} {c['workload']}: exact mode costs {pc:,.0f} ns a call (target CPU, small spec)"]
        if bare:
            verdict = "MET" if pc / bare <= 1.25 else "NOT MET"
            parts.append(f"bare probes on this workload {bare:,.0f} ns: ratio {pc / bare:.2f} (target <= 1.25: "
                         f"{verdict})")
        else:
            parts.append("bare probes on this workload: not measured")
        large = _per_call(c, "ophamin-large")
        if large and bare:
            parts.append(f"large spec (every call emitted) {large:,.0f} ns: ratio {large / bare:.2f}")
        if loop:
            parts.append(f"bare probes in bench/capture.py's call loop {loop:,.0f} ns")
        for k in ("viztracer", "setprofile", "monitoring"):
            g = a.get(k, {})
            v = (g.get("per_call_ns_cpu") or {}).get("median") if g.get("status") == "ok" else None
            if v:
                parts.append(f"{k} {v:,.0f} ns (x{pc / v:.1f})")
        lines.append("; ".join(parts))
    lines.append("")
    samp = [c for c in res["cells"] if c["alternatives"].get("ophamin-sampled", {}).get("status") == "ok"]
    if samp:
        for c in samp:
            s, p = c["alternatives"]["ophamin-sampled"], c["alternatives"].get("py-spy", {})
            so = s["overhead_pct"]["median"] if s.get("overhead_pct") else None
            po = p["overhead_pct"]["median"] if p.get("overhead_pct") else None
            lines.append(f"- {c['label']} {c['workload']}: sampled {so:+.1f} % vs py-spy {po:+.1f} % wall "
                         f"({'MET' if so is not None and po is not None and so <= po else 'NOT MET'})"
                         if so is not None and po is not None else f"- {c['label']} {c['workload']}: sampled n/a")
    else:
        lines.append("- sampled mode: not available in this build (the trace command has no --mode); row kept, "
                     "figures pending")
    lines += pyspy_ab.summary_lines()
    ok_rates = [(c["alternatives"][k], c) for c in res["cells"] for k in ("ophamin-small", "ophamin-large")
                if c["alternatives"].get(k, {}).get("status") == "ok"]
    clean = [f["events_per_s"]["max"] for f, _ in ok_rates if f.get("events_per_s") and f["lost_events"]["max"] == 0]
    lossy = [f["events_per_s"]["min"] for f, _ in ok_rates if f.get("events_per_s") and f["lost_events"]["max"] > 0]
    lines.append(f"- ophamin-trace events/s: highest rate with no loss {max(clean) / 1e3:,.1f} k/s; "
                 f"lowest rate with loss {min(lossy) / 1e3:,.1f} k/s" if clean and lossy else
                 f"- ophamin-trace events/s: no-loss rates up to {max(clean) / 1e3:,.1f} k/s" if clean else
                 "- ophamin-trace events/s: every run lost events")
    return lines + [""]


NOTES = """## How to read this

- Wall overhead and per-call cost are paired within a repeat (an alternative against the mean of
  the two baseline runs of the same repeat), then median [p25, p75] over repeats. Per call =
  (traced - untraced) / Python frame starts of one segment (the ground truth's count, all threads);
  "CPU" uses the target's own CPU time (user + kernel, so uprobe traps count), which a loaded
  machine disturbs far less than wall time.
- Reference substrate: "untraced" is the build with no emitter wiring; the tools run on the no-op
  build and are compared with it, so their figures exclude the emitter's own (tiny) cost.
- True calls seen: per function of the spec (ophamin-trace) or of the large spec (in-process
  tracers, pythoncalls), against a separate counting run; `100 % exact` = every function's count
  equal in every repeat. ophamin-trace exact: "counted" is the kernel's count of calls started in
  the segment (its --calls-log), "spans" the share that reached user space as spans. py-spy
  samples: it sees no calls, only stacks.
- Bare probes: exact mode's probe sites on the same workload, each running an empty BPF program;
  exact mode's per-call cost is compared with theirs (target <= 1.25x).
- Tracer CPU / peak RSS: an external tool's own process (CPU during the segment; peak RSS over its
  life, bcc's compile included); an in-process tracer's extra CPU and extra peak RSS in the target.
- Attach: command start to the first span (ophamin-trace: the harness's beacon function, called
  every 5 ms) or to the tool's own "attached" line (py-spy, pythoncalls).
- Events/s: events recorded per second of the segment (ophamin-trace: an entry and an exit per
  span delivered); "lost" = ring-buffer drops (ophamin-trace) or buffer overflow (VizTracer).
"""


def write_readme(md_table: str, res: dict) -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    section = f"{README_TITLE}\n\n{md_table.strip()}\n"
    if README_TITLE in text:
        head, rest = text.split(README_TITLE, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def readme_table(res: dict) -> str:
    """The README's short form: wall overhead per workload and the per-call costs, per interpreter."""
    m = res["machine"]
    lines = [f"`scripts/bench peers` ({res['repeats']} repeats, {res['elapsed_s'] / 60:.0f} min) on {m['cpu']}, "
             f"{m['cores']} cores, Linux {m['kernel']}, load average {m['load_before'][0]:.1f} before and "
             f"{m['load_after'][0]:.1f} after: the machine was shared with other jobs, and wall times on it move by "
             "tens of percent between runs, so small overheads below are noise; the per-call CPU costs are the "
             "robust figures. Wall-time overhead against untraced, median over repeats; in brackets, the share of "
             "the true calls of the spec (ophamin-trace) or of every workload function (in-process tracers) that "
             "the tool reported. `results/peers.md` has the full table (spread, per-call ns, attach time, the "
             "tracer's own CPU and peak RSS, events/s, the targets).", ""]
    for lb in dict.fromkeys(c["label"] for c in res["cells"]):
        cells = [c for c in res["cells"] if c["label"] == lb]
        lines.append(f"CPython {cells[0]['python']} ({lb}):")
        lines.append("")
        lines.append("| alternative | " + " | ".join(c["workload"] for c in cells) + " |")
        lines.append("|---|" + "---|" * len(cells))
        for a in ALTS:
            cols = []
            for c in cells:
                f = c["alternatives"].get(a.key)
                if f is None:
                    cols.append("")
                elif f["status"] != "ok":
                    cols.append("n/a")
                elif a.key == "untraced":
                    cols.append(f"{f['wall_s']['median']:.2f} s")
                else:
                    o = f["overhead_pct"]["median"] if f.get("overhead_pct") else None
                    txt = f"{o:+.0f} %" if o is not None else "–"
                    shares = [_share(f.get(k, {}).get("worst")) for k in ("seen", "spans_seen")]
                    if shares[0]:
                        spans = f"; spans {shares[1]}" if shares[1] and shares[1] != shares[0] else ""
                        txt += f" ({shares[0]}{spans})"
                    cols.append(txt)
            lines.append(f"| {a.title} | " + " | ".join(cols) + " |")
        lines.append("")
        per_call = []
        for c in cells:
            if c["truth"]["starts_all"] < 100_000:
                continue
            parts = []
            for k, name in (("ophamin-small", "exact mode"), ("viztracer", "VizTracer"), ("setprofile", "setprofile"),
                            ("monitoring", "sys.monitoring")):
                f = c["alternatives"].get(k, {})
                v = (f.get("per_call_ns_cpu") or {}).get("median") if f.get("status") == "ok" else None
                if v is not None:
                    parts.append(f"{name} {v / 1e3:.2f} µs")
            bare = _per_call(c, "bare-probes")
            if bare:
                parts.append(f"bare probe pair {bare / 1e3:.2f} µs")
            per_call.append(f"{c['workload']}: " + ", ".join(parts))
        if per_call:
            lines += ["Per call, target CPU: " + "; ".join(per_call) + ".", ""]
    ab = pyspy_ab.summary_lines()
    if ab:
        lines += [*ab, ""]
    lines.append("n/a: sys.monitoring exists from 3.12; bcc's pythoncalls needs USDT probes, which these builds "
                 "lack (on Debian's 3.11 it attaches and sees 0 calls); sampled mode sees only calls long enough "
                 "to be sampled (its share counts every true call, most far shorter than the 10 ms period at "
                 "100 Hz; see [docs/sampled.md](docs/sampled.md)). "
                 "ophamin-trace exact's share is the kernel's own count of the calls that started (every call, "
                 "whatever the ring buffer dropped; docs/capture.md); after the semicolon, the share that became "
                 "spans: the rest are ring-buffer drops, counted and reported, and the rate ladder in "
                 "`results/peers.md` gives the event rate it sustains without loss. The bare probes row is exact "
                 "mode's probe sites running empty BPF programs: the trap cost it is built on.")
    return "\n".join(lines)


def _share(w: dict | None) -> str:
    """A seen_fraction as the README shows it ("" when there is none)."""
    if not w or w["fraction"] is None:
        return ""
    pct = 100 * w["fraction"]
    return "100 %" if w["exact"] else f"{pct:.1f} %" if pct >= 99.5 else f"{pct:.0f} %"


def _interrupted(signum: int, _frame) -> None:
    raise SystemExit(f"bench peers: stopped by {signal.Signals(signum).name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pythons", default=",".join(DEFAULT_PYTHONS), help="interpreter labels (see .cache/targets)")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"from: {', '.join(WORKLOADS)}")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per alternative (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repeat")
    ap.add_argument("--readme", action="store_true", help="rewrite the README section from this run")
    ap.add_argument("--out", default=str(ROOT / "results"), help="results folder")
    ap.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the tables from a saved peers.json")
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["bare_probe"] = _bare_probe()
        _write(res, Path(args.out), args.readme)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench peers: needs root (eBPF tools attach to the harness)")
    # SIGTERM (and SIGINT, which a background job may have ignored) unwind through the
    # `finally` blocks, so harnesses and tools are stopped rather than orphaned.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    _write(run(args), Path(args.out), args.readme)


def _write(res: dict, out: Path, readme: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    (out / "peers.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "peers.md").write_text(md)
    if readme:
        write_readme(readme_table(res), res)
    print(md)
    _say(f"wrote {out / 'peers.md'} and {out / 'peers.json'} (the run took {res['elapsed_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
