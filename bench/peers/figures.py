"""From the raw runs of one (interpreter, workload) cell to the figures of the table.

Every figure that compares with "untraced" is paired within a repeat: an alternative's run is
compared with the baseline runs of the same repeat (the mean of two, placed apart in the
order), then the median and quartiles are taken over repeats.
"""

from __future__ import annotations

import statistics
from typing import Any


def spread(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    qs = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": qs[0], "p75": qs[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def seen_fraction(seen: dict[str, int], truth: dict[str, int]) -> dict:
    """How much of the true calls of a set of functions a tool reported.

    `fraction` counts at most the true number per function (a tool cannot earn credit for one
    function by over-reporting another); `exact` means every function matches exactly.
    """
    total = sum(truth.values())
    got = sum(min(seen.get(k, 0), n) for k, n in truth.items())
    short = sorted(k for k, n in truth.items() if seen.get(k, 0) < n)
    over = sorted(k for k, n in truth.items() if seen.get(k, 0) > n)
    return {"true_calls": total, "seen_calls": got, "fraction": (got / total) if total else None,
            "exact": not short and not over, "functions": len(truth), "short": short[:20],
            "n_short": len(short), "over": over[:20], "n_over": len(over)}


MIN_CALLS = 10_000  # below this a per-call figure is noise divided by a small number: not given


def summarise(runs: list[dict], base_runs: dict[int, list[dict]], calls: int) -> dict[str, Any]:
    """Figures of one alternative. `base_runs[repeat]` are the baseline runs of that repeat;
    `calls` is the number of Python frame starts one run makes (the ground truth)."""
    ok = [r for r in runs if r.get("status", "ok") == "ok" and r.get("wall_s") is not None]
    over_pct, per_call_wall, per_call_cpu, extra_cpu, extra_hwm = [], [], [], [], []
    for r in ok:
        base = base_runs.get(r["repeat"], [])
        base = [b for b in base if b is not r]
        if not base:
            continue
        bw = statistics.fmean(b["wall_s"] for b in base)
        bc = statistics.fmean(b["cpu_s"] for b in base)
        # Peak RSS growth within the segment: the RSS at its start includes whatever an earlier
        # segment's tracer left allocated, so the growth, not the peak, is comparable.
        bh = statistics.fmean(b["hwm_kb"] - b["hwm0_kb"] for b in base)
        over_pct.append(100.0 * (r["wall_s"] - bw) / bw)
        if calls >= MIN_CALLS:
            per_call_wall.append((r["wall_s"] - bw) / calls * 1e9)
            per_call_cpu.append((r["cpu_s"] - bc) / calls * 1e9)
        extra_cpu.append(r["cpu_s"] - bc)
        extra_hwm.append((r["hwm_kb"] - r["hwm0_kb"] - bh) / 1024)
    out = {
        "runs_ok": len(ok), "runs": len(runs),
        "status": "ok" if ok else (runs[0].get("status", "failed") if runs else "not run"),
        "reason": next((r.get("reason", "") for r in runs if r.get("reason")), ""),
        "wall_s": spread([r["wall_s"] for r in ok]),
        "cpu_s": spread([r["cpu_s"] for r in ok]),
        "overhead_pct": spread(over_pct),
        "per_call_ns_wall": spread(per_call_wall),
        "per_call_ns_cpu": spread(per_call_cpu),
        "target_extra_cpu_s": spread(extra_cpu),
        "target_extra_peak_rss_mb": spread(extra_hwm),
        "attach_s": spread([r.get("attach_s") for r in ok]),
        "tool_cpu_segment_s": spread([r.get("tool_cpu_segment_s") for r in ok]),
        "tool_cpu_total_s": spread([r.get("tool_cpu_total_s") for r in ok]),
        "tool_peak_rss_mb": spread([r["tool_peak_rss_kb"] / 1024 for r in ok if r.get("tool_peak_rss_kb")]),
        "events_per_s": spread([r["events"] / r["wall_s"] for r in ok if r.get("events") is not None]),
        "lost_events": spread([r.get("lost") for r in ok]),
    }
    for key, field in (("seen", "seen_fraction"), ("spans_seen", "spans_fraction")):
        seen = [r[field] for r in ok if r.get(field)]
        if seen:
            worst = min(seen, key=lambda s: (s["fraction"] if s["fraction"] is not None else 1.0, s["exact"]))
            out[key] = {"worst": worst, "all_exact": all(s["exact"] for s in seen), "repeats": len(seen),
                        "fractions": [s["fraction"] for s in seen]}
    samples = [r["samples"] for r in ok if r.get("samples") is not None]
    if samples:
        out["samples"] = {"per_run": samples, "functions_present": [r.get("functions_present") for r in ok]}
    return out


# ---- markdown ------------------------------------------------------------------------------

def _num(s: dict | None, fmt: str, spread_too: bool = True) -> str:
    if not s:
        return "–"
    if not spread_too or s["n"] < 2:
        return format(s["median"], fmt)
    return f"{format(s['median'], fmt)} [{format(s['p25'], fmt)}, {format(s['p75'], fmt)}]"


def _seen_text(fig: dict) -> str:
    if "seen" in fig:
        w = fig["seen"]["worst"]
        if w["fraction"] is None:
            return "no true calls"
        pct = 100.0 * w["fraction"]
        txt = f"{pct:.1f} %" if pct < 99.95 or not w["exact"] else "100 % exact"
        if not fig["seen"]["all_exact"] and pct >= 99.95:
            txt = f"{pct:.2f} %"
        if w["n_over"]:
            txt += f", {w['n_over']} fn over"
        if "spans_seen" in fig:  # exact mode: the kernel's count above; the share that became spans here
            sw = fig["spans_seen"]["worst"]
            if sw["fraction"] is not None:
                spct = 100.0 * sw["fraction"]
                txt = f"counted {txt}; spans {'100 %' if sw['exact'] else f'{spct:.1f} %'}"
        return txt
    if "samples" in fig:
        s = fig["samples"]
        present = [p for p in s["functions_present"] if p]
        fp = f", {present[0]}" if present else ""
        return f"sampler: {statistics.median(s['per_run']):.0f} samples{fp}"
    return "–"


def _cpu_text(fig: dict, external: bool) -> str:
    if external:
        return _num(fig["tool_cpu_segment_s"], ".2f", False) + " s"
    return _num(fig["target_extra_cpu_s"], ".2f", False) + " s (in target)"


def _rss_text(fig: dict, external: bool) -> str:
    if external:
        return _num(fig["tool_peak_rss_mb"], ".0f", False) + " MB"
    return "+" + _num(fig["target_extra_peak_rss_mb"], ".0f", False) + " MB (in target)"


def _events_text(fig: dict) -> str:
    ev = fig.get("events_per_s")
    if not ev:
        return "–"
    rate = ev["median"]
    txt = f"{rate / 1e3:,.0f} k/s" if rate >= 1e3 else f"{rate:,.0f}/s"
    lost = fig.get("lost_events")
    if lost is not None:
        txt += ", no loss" if lost["max"] == 0 else f", lost {lost['median']:,.0f}"
    return txt


HEADER = ("| workload | alternative | wall overhead % | per call, ns (wall) | per call, ns (CPU) | true calls seen "
          "| attach, s | tracer CPU | tracer peak RSS | events/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def row(workload: str, alt_title: str, fig: dict, external: bool, baseline: bool) -> str:
    if fig["status"] != "ok":
        reason = fig["reason"] or fig["status"]
        return f"| {workload} | {alt_title} | {fig['status']}: {reason} | | | | | | | |"
    if baseline:
        return (f"| {workload} | {alt_title} | 0 (baseline; {_num(fig['wall_s'], '.3f')} s) | | | – | – | – | – | – |")
    cells = [workload, alt_title, _num(fig["overhead_pct"], "+.1f"), _num(fig["per_call_ns_wall"], ",.0f"),
             _num(fig["per_call_ns_cpu"], ",.0f"), _seen_text(fig),
             _num(fig["attach_s"], ".2f", False) if external else "in-process",
             _cpu_text(fig, external), _rss_text(fig, external), _events_text(fig)]
    return "| " + " | ".join(cells) + " |"
