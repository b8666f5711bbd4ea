"""The self-contained HTML report: cycle waterfall, scheduler bands, GPU track, step table.

The page carries its data as one JSON blob and a small inline script that draws ONE cycle at
a time as SVG. Drawing every cycle at once would put tens of thousands of elements in the
DOM for a long run and make the page slow to open; one cycle stays a few hundred elements
however long the run was, and the blob (names interned, times as integers) stays small.
Nothing is fetched from the network: the file opens from disk, offline.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from ..otlpjson import Span
from .cycles import Cycle, build_cycles, uncovered
from .stats import SpanStats, span_stats
from .verdict import ParityVerdict

ON_CPU = "ophamin.sched.on_cpu_ns"
RUN_QUEUE = "ophamin.sched.run_queue_ns"
BLOCKED = "ophamin.sched.blocked_ns"
SCHED_KEYS = (ON_CPU, RUN_QUEUE, BLOCKED)
GPU_SM = "ophamin.gpu.sm_util_pct"
GPU_UNAVAILABLE = "ophamin.gpu.unavailable"
# Per-span reasons the gpu enricher writes (tracer/correlate/gpu.py) when a span has no figure.
GPU_SPAN_REASONS = ("ophamin.gpu.process_util_unavailable", "ophamin.gpu.util_unavailable")

MAX_ATTR_CHARS = 300  # long attribute strings are cut in the page so one span cannot bloat it


def sched_of(s: Span) -> Optional[tuple]:
    """(on-CPU, run-queue, blocked) ns when the correlation stage wrote all three."""
    if not all(k in s.attributes for k in SCHED_KEYS):
        return None
    try:
        return tuple(int(s.attributes[k]) for k in SCHED_KEYS)
    except (TypeError, ValueError):
        return None


def gpu_of(s: Span) -> Optional[float]:
    v = s.attributes.get(GPU_SM)
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def gpu_unavailable_reason(spans: Sequence[Span]) -> str:
    for s in spans:
        reason = s.resource.get(GPU_UNAVAILABLE)
        if reason:
            return str(reason)
    for s in spans:
        for key in GPU_SPAN_REASONS:
            if s.attributes.get(key):
                return str(s.attributes[key])
    return f"no span carries {GPU_SM} (traced without GPU sampling, or no GPU samples overlapped a span)"


@dataclass(frozen=True)
class StepRow:
    """One line of the per-step table: duration statistics plus scheduler shares."""

    stats: SpanStats
    on_cpu_share: Optional[float]  # on-CPU ns / span ns over the spans that carry scheduler data
    run_queue_share: Optional[float]
    blocked_share: Optional[float]

    def to_dict(self) -> dict:
        return {**self.stats.to_dict(), "on_cpu_share": self.on_cpu_share,
                "run_queue_share": self.run_queue_share, "blocked_share": self.blocked_share}


def step_rows(spans: Sequence[Span]) -> List[StepRow]:
    sums: Dict[str, List[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for s in spans:
        sc = sched_of(s)
        if sc is None:
            continue
        acc = sums[s.name]
        acc[0] += sc[0]
        acc[1] += sc[1]
        acc[2] += sc[2]
        acc[3] += s.duration_ns
    rows = []
    for st in span_stats(spans):
        acc = sums.get(st.name)
        if acc and acc[3] > 0:
            rows.append(StepRow(st, acc[0] / acc[3], acc[1] / acc[3], acc[2] / acc[3]))
        else:
            rows.append(StepRow(st, None, None, None))
    return rows


def _short(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    if isinstance(v, str) and len(v) > MAX_ATTR_CHARS:
        return v[:MAX_ATTR_CHARS] + "…"
    if isinstance(v, (list, tuple)):
        return [_short(x) for x in v[:50]]
    if isinstance(v, dict):
        return {str(k): _short(x) for k, x in v.items()}
    return v


def report_data(spans: Sequence[Span], cycles: Sequence[Cycle], initial: int, source: str) -> dict:
    """The JSON blob the page's script draws from."""
    names: Dict[str, int] = {}

    def intern(n: str) -> int:
        return names.setdefault(n, len(names))

    out_cycles = []
    for c in cycles:
        t0 = min(s.start_ns for s in c.spans)
        t1 = max(s.end_ns for s in c.spans)
        rows = []
        for s, depth in zip(c.spans, c.depths):
            sc = sched_of(s)
            rows.append([
                s.span_id, intern(s.name), depth, s.start_ns - t0, max(0, s.duration_ns),
                s.thread_id, s.status_code, list(sc) if sc else 0, gpu_of(s),
                [[e.name, e.time_ns - t0, _short(e.attributes)] for e in s.events],
                _short(s.attributes),
            ])
        out_cycles.append({"label": c.label, "start_ns": t0, "dur": t1 - t0, "spans": rows})
    has_gpu = any(gpu_of(s) is not None for s in spans)
    return {
        "source": source,
        "names": list(names),
        "cycles": out_cycles,
        "initial": initial,
        "sched": any(sched_of(s) is not None for s in spans),
        "gpu": has_gpu,
        "gpu_reason": "" if has_gpu else gpu_unavailable_reason(spans),
    }


def _blob(obj: dict) -> str:
    # Inside <script>, "</" would end the element and "<!--" would open a comment: escape "<".
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


def _table(rows: Sequence[StepRow], has_sched: bool) -> str:
    head = ["step", "count", "median ms", "p10 ms", "p90 ms", "max ms"]
    if has_sched:
        head += ["on-CPU", "run-queue", "blocked"]
    out = ["<table id='steps'><thead><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in rows:
        st = r.stats
        cells = [f"<td class='name'>{html.escape(st.name)}</td>", f"<td>{st.count}</td>",
                 f"<td>{_ms(st.median_ns)}</td>", f"<td>{_ms(st.p10_ns)}</td>",
                 f"<td>{_ms(st.p90_ns)}</td>", f"<td>{_ms(st.max_ns)}</td>"]
        if has_sched:
            cells += [f"<td>{_pct(r.on_cpu_share)}</td>", f"<td>{_pct(r.run_queue_share)}</td>",
                      f"<td>{_pct(r.blocked_share)}</td>"]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _parity_html(v: Optional[ParityVerdict]) -> str:
    if v is None:
        return ""
    cls = "na" if not v.available else ("pass" if v.passed else "fail")
    detail = (f"<details><summary>parity table</summary><pre>{html.escape(v.detail)}</pre></details>"
              if v.detail else "")
    return (f"<section class='card parity {cls}' id='parity' data-verdict='{cls}'>"
            f"<h2>Parity</h2><p>{html.escape(v.summary)}</p>{detail}</section>")


def _meta_html(spans: Sequence[Span], cycles: Sequence[Cycle], source: str) -> str:
    res = spans[0].resource if spans else {}
    items = [("file", os.path.basename(source)), ("spans", str(len(spans))), ("cycles", str(len(cycles)))]
    left_out = uncovered(spans, cycles)
    if left_out:
        items.append(("outside any cycle", str(left_out)))
    for k in ("service.name", "process.pid", "process.runtime.name", "process.runtime.version", "host.name"):
        if k in res:
            items.append((k, str(res[k])))
    return " · ".join(f"<span><b>{html.escape(k)}</b> {html.escape(v)}</span>" for k, v in items)


def render_html(spans: Sequence[Span], source: str, initial_cycle: int = 0,
                parity: Optional[ParityVerdict] = None) -> str:
    """The whole report page as one string."""
    cycles = build_cycles(spans)
    data = report_data(spans, cycles, initial_cycle, source)
    rows = step_rows(spans)
    sched_note = ("" if data["sched"] else
                  "<p class='note' id='no-sched'>no scheduler data: spans carry no "
                  f"{ON_CPU} / {RUN_QUEUE} / {BLOCKED} (trace without kernel correlation)</p>")
    gpu_note = ("" if data["gpu"] else
                f"<p class='note' id='no-gpu'>GPU data unavailable: {html.escape(data['gpu_reason'])}</p>")
    page = _TEMPLATE
    for key, val in (
        ("__TITLE__", html.escape(os.path.basename(source))),
        ("__META__", _meta_html(spans, cycles, source)),
        ("__PARITY__", _parity_html(parity)),
        ("__NOTES__", sched_note + gpu_note),
        ("__TABLE__", _table(rows, data["sched"])),
        ("__CSS__", _CSS),
        ("__JS__", _JS),
        ("__DATA__", _blob(data)),  # last: the blob may contain any of the other markers
    ):
        page = page.replace(key, val)
    return page


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>ophamin-trace report — __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>__CSS__</style></head>
<body>
<header><h1>ophamin-trace report</h1><div class="meta">__META__</div></header>
<main>
__PARITY__
<section class="card" id="cycles"><h2>Cycle waterfall</h2>
<div class="controls">
<button id="prev" title="previous cycle (←)">◀</button>
<label>cycle <input id="cycle" type="number" min="0" value="0"></label><span id="ncyc"></span>
<button id="next" title="next cycle (→)">▶</button>
<select id="jump"><option value="">jump to…</option></select><span id="cycinfo"></span></div>
<div class="ovwrap"><canvas id="overview" height="44"></canvas></div>
<div id="legend"></div>
__NOTES__
<div id="wf"></div>
<pre id="detail">click a bar for its attributes and events</pre>
<div id="tip"></div>
</section>
<section class="card"><h2>Per-step timing (all cycles)</h2>__TABLE__</section>
</main>
<script id="data" type="application/json">__DATA__</script>
<script>__JS__</script>
</body></html>
"""

_CSS = """
:root{--fg:#1d2330;--muted:#667085;--grid:#e3e6ec;--on:#2e9e5b;--rq:#eea236;--blk:#a3abb9;--gpu:#7b4bd6}
*{box-sizing:border-box}
body{font:13px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:var(--fg);
background:#f4f5f8}
header{background:#1d2330;color:#fff;padding:10px 18px}
header h1{font-size:16px;margin:0 0 4px}
.meta{color:#c9cfdb;font-size:12px}.meta span{margin-right:6px}.meta b{color:#fff;font-weight:600}
main{padding:12px 18px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:10px 14px;margin-bottom:12px}
.card h2{font-size:14px;margin:0 0 8px}
.parity.pass{border-left:5px solid var(--on)}.parity.fail{border-left:5px solid #d64545}
.parity.na{border-left:5px solid var(--blk)}
.controls{display:flex;gap:6px;align-items:center;margin-bottom:6px}
.controls input{width:80px;padding:2px}.controls select{padding:2px;margin-left:8px}
#ncyc{color:var(--muted)}
#cycinfo{color:var(--muted);margin-left:8px}
.ovwrap{border:1px solid var(--grid);border-radius:4px;margin-bottom:6px}
#overview{display:block;width:100%;height:44px;cursor:pointer}
#legend{font-size:12px;color:var(--muted);margin:4px 0}
#legend i{display:inline-block;width:12px;height:8px;margin:0 4px 0 10px;vertical-align:middle}
.note{color:var(--muted);margin:4px 0;font-style:italic}
#wf svg{display:block}
#wf .bar{cursor:pointer}
#wf .bar:hover,#wf .bar.sel{stroke:#111;stroke-width:1.5}
#wf text{font-size:11px;fill:var(--fg)}
#wf .axis text{fill:var(--muted);font-size:10px}
#wf .dim{fill:var(--muted)}
#detail{background:#f7f8fa;border:1px solid var(--grid);padding:8px;max-height:260px;overflow:auto;
font-size:12px;white-space:pre-wrap}
#tip{position:absolute;display:none;background:#1d2330;color:#fff;padding:4px 8px;border-radius:4px;
font-size:12px;white-space:pre;pointer-events:none;max-width:600px;overflow:hidden}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 10px;border-bottom:1px solid var(--grid);text-align:right}
th{background:#f2f4f7;font-weight:600}td.name,th:first-child{text-align:left;font-family:ui-monospace,monospace}
"""

_JS = r"""
(function () {
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const LABEL = 330, DURW = 78, PAD = 10, BAR = 12, ROW = D.sched ? 22 : 17, AXIS = 20, GPUH = 34;
function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
}
function fmt(ns) {
  if (ns >= 1e9) return (ns / 1e9).toFixed(3) + " s";
  if (ns >= 1e6) return (ns / 1e6).toFixed(3) + " ms";
  if (ns >= 1e3) return (ns / 1e3).toFixed(1) + " µs";
  return ns + " ns";
}
function tick(ns, step) {
  // Axis labels: the unit of the step, only the decimals the step needs.
  const [div, unit] = step >= 1e9 ? [1e9, " s"] : step >= 1e6 ? [1e6, " ms"] :
    step >= 1e3 ? [1e3, " µs"] : [1, " ns"];
  const dec = Math.max(0, -Math.floor(Math.log10(step / div) + 1e-9));
  return (ns / div).toFixed(dec) + unit;
}
function color(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return "hsl(" + (h % 360) + ",55%,58%)";
}
function niceStep(range, n) {
  const raw = range / n, p = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
  return 10 * p;
}
let cur = -1;
const sel = $("cycle");
// A number box plus a short "jump to" list, not a <select> of every cycle: a list of ten
// thousand options costs the browser most of a second of layout on every cycle change.
sel.max = Math.max(0, D.cycles.length - 1);
$("ncyc").textContent = " of 0–" + Math.max(0, D.cycles.length - 1);
const byDur = D.cycles.map((c, i) => i).sort((a, b) => D.cycles[b].dur - D.cycles[a].dur);
const picks = byDur.slice(0, 10).map((i, k) => [i, "slowest #" + (k + 1)]);
if (byDur.length > 10) {
  picks.push([byDur[Math.floor(byDur.length / 2)], "median"]);
  picks.push([byDur[byDur.length - 1], "fastest"]);
}
for (const [i, why] of picks) {
  const o = document.createElement("option");
  o.value = i;
  o.textContent = why + ": #" + i + " " + D.cycles[i].label + " · " + fmt(D.cycles[i].dur);
  $("jump").appendChild(o);
}
$("legend").innerHTML = (D.sched ? "scheduler band under each bar:" +
  "<i style='background:var(--on)'></i>on-CPU" +
  "<i style='background:var(--rq)'></i>run-queue wait<i style='background:var(--blk)'></i>blocked" : "") +
  "<i style='background:#111;width:8px;height:8px;transform:rotate(45deg)'></i>span event" +
  (D.gpu ? "<i style='background:var(--gpu)'></i>GPU SM utilisation" : "");

function overview() {
  // A canvas, not SVG: a run of ten thousand cycles is ten thousand bars, which as DOM
  // elements would cost most of a second to lay out on every cycle change.
  const cv = $("overview"), W = cv.clientWidth || 1000, H = 44, n = D.cycles.length;
  const r = window.devicePixelRatio || 1;
  cv.width = W * r;
  cv.height = H * r;
  const g = cv.getContext("2d");
  g.scale(r, r);
  g.clearRect(0, 0, W, H);
  if (!n) return;
  const maxd = D.cycles.reduce((a, c) => Math.max(a, c.dur), 0) || 1, w = W / n;
  g.fillStyle = "#aab4c5";
  for (let i = 0; i < n; i++) {
    const h = Math.max(1, (D.cycles[i].dur / maxd) * (H - 4));
    g.fillRect(i * w, H - h, Math.max(1, w - (w > 3 ? 1 : 0)), h);
  }
  const h = Math.max(1, (D.cycles[cur].dur / maxd) * (H - 4));
  g.fillStyle = "#1d2330";
  g.fillRect(cur * w, H - h, Math.max(2, w - (w > 3 ? 1 : 0)), h);
}
function cycleAt(ev) {
  const box = $("overview").getBoundingClientRect(), n = D.cycles.length;
  return Math.min(n - 1, Math.max(0, Math.floor(((ev.clientX - box.left) / box.width) * n)));
}

function render(ci) {
  if (!D.cycles.length) { $("wf").innerHTML = "<p class='note'>no spans in this file</p>"; return; }
  ci = Math.max(0, Math.min(D.cycles.length - 1, ci));
  cur = ci;
  sel.value = ci;
  const c = D.cycles[ci], W = Math.max(700, $("wf").clientWidth || 1200), plot = W - LABEL - PAD;
  const sx = (ns) => LABEL + (c.dur > 0 ? (ns / c.dur) * plot : 0);
  const out = [], labels = [];
  let y = AXIS;
  const step = c.dur > 0 ? niceStep(c.dur, 8) : 1;
  const gpuRows = D.gpu ? c.spans.filter((s) => s[8] !== null) : [];
  const H = AXIS + (gpuRows.length ? GPUH + 6 : 0) + c.spans.length * ROW + 6;
  out.push("<g class='axis'>");
  for (let t = 0; t <= c.dur + 1; t += step) {
    const x = sx(t).toFixed(1);
    out.push("<line x1='" + x + "' x2='" + x + "' y1='" + (AXIS - 4) + "' y2='" + H +
      "' stroke='#e3e6ec'/><text x='" + x + "' y='" + (AXIS - 7) + "' text-anchor='middle'>" + tick(t, step) +
      "</text>");
  }
  out.push("</g>");
  if (gpuRows.length) {
    labels.push("<text x='4' y='" + (y + GPUH / 2 + 4) + "' font-weight='600'>GPU SM %</text>");
    out.push("<rect x='" + LABEL + "' y='" + y + "' width='" + plot + "' height='" + GPUH +
      "' fill='#f6f3fc'/>");
    for (const s of gpuRows) {
      const h = Math.max(1, (Math.min(100, s[8]) / 100) * (GPUH - 2)), x = sx(s[3]);
      out.push("<rect data-gpu-span='" + s[0] + "' x='" + x.toFixed(1) + "' y='" + (y + GPUH - h).toFixed(1) +
        "' width='" + Math.max(1, sx(s[3] + s[4]) - x).toFixed(1) + "' height='" + h.toFixed(1) +
        "' fill='var(--gpu)' fill-opacity='0.55'><title>" +
        esc(D.names[s[1]] + ": SM " + s[8].toFixed(1) + "%") +
        "</title></rect>");
    }
    y += GPUH + 6;
  }
  for (let i = 0; i < c.spans.length; i++) {
    const s = c.spans[i];
    const [id, ni, depth, off, dur, tid, st, sch, , evs] = s, name = D.names[ni];
    const x = sx(off), w = Math.max(1, sx(off + dur) - x);
    labels.push("<text x='" + (4 + depth * 12) + "' y='" + (y + BAR - 2) + "'>" + esc(name) + "</text>");
    out.push("<text class='dim' x='" + (LABEL - 8) + "' y='" + (y + BAR - 2) + "' text-anchor='end'>" +
      fmt(dur) + "</text>");
    out.push("<rect class='bar' data-span-id='" + esc(id) + "' data-i='" + i + "' x='" +
      x.toFixed(1) + "' y='" + y + "' width='" + w.toFixed(1) + "' height='" + BAR + "' rx='2' fill='" +
      color(name) + "'" + (st === 2 ? " stroke='#d64545' stroke-width='2'" : "") + "/>");
    if (sch && dur > 0) {
      let bx = x;
      [[sch[0], "var(--on)"], [sch[1], "var(--rq)"], [sch[2], "var(--blk)"]].forEach(([v, col]) => {
        const bw = Math.min(1, v / dur) * w;
        if (bw <= 0) return;
        out.push("<rect class='band' x='" + bx.toFixed(1) + "' y='" + (y + BAR + 1) + "' width='" +
          bw.toFixed(1) + "' height='4' fill='" + col + "'/>");
        bx += bw;
      });
    }
    for (let k = 0; k < evs.length; k++) {
      const e = evs[k], ex = sx(e[1]), ey = y + BAR / 2;
      out.push("<path class='evt' d='M" + ex.toFixed(1) + " " + (ey - 5) +
        "l4 5l-4 5l-4-5z' fill='#111' fill-opacity='0.8' data-i='" + i + "' data-e='" + k + "'/>");
    }
    y += ROW;
  }
  $("wf").innerHTML = "<svg xmlns='http://www.w3.org/2000/svg' width='" + W + "' height='" + H + "'>" +
    "<svg width='" + (LABEL - DURW) + "' height='" + H + "'>" + labels.join("") + "</svg>" +
    out.join("") + "</svg>";
  $("cycinfo").textContent = c.label + " · " + fmt(c.dur) + " · " + c.spans.length + " spans";
  overview();
  if (history.replaceState) history.replaceState(null, "", "#cycle=" + ci);
}

function detail(s) {
  const [id, ni, depth, off, dur, tid, st, sch, gpu, evs, attrs] = s;
  const lines = [D.names[ni] + "   span " + id, "duration " + fmt(dur) + ", starts +" + fmt(off) +
    " into the cycle" + (tid !== null ? ", thread " + tid : "") + (st === 2 ? ", status ERROR" : "")];
  if (sch) lines.push("on-CPU " + fmt(sch[0]) + ", run-queue " + fmt(sch[1]) + ", blocked " + fmt(sch[2]));
  if (gpu !== null) lines.push("GPU SM " + gpu.toFixed(1) + "%");
  lines.push("attributes:");
  for (const k of Object.keys(attrs)) lines.push("  " + k + " = " + JSON.stringify(attrs[k]));
  if (evs.length) lines.push("events:");
  for (const e of evs) lines.push("  +" + fmt(e[1]) + " " + e[0] + " " + JSON.stringify(e[2]));
  $("detail").textContent = lines.join("\n");
}

// One shared tooltip instead of a <title> per element: a cycle of thousands of spans
// stays a lighter DOM.
$("wf").addEventListener("mousemove", (ev) => {
  const t = ev.target.closest("[data-i]"), tip = $("tip");
  if (!t) { tip.style.display = "none"; return; }
  const s = D.cycles[cur].spans[+t.getAttribute("data-i")];
  let txt;
  if (t.hasAttribute("data-e")) {
    const e = s[9][+t.getAttribute("data-e")];
    txt = e[0] + " at +" + fmt(e[1]) + "\n" + JSON.stringify(e[2]);
  } else {
    txt = D.names[s[1]] + "\n" + fmt(s[4]) + " at +" + fmt(s[3]) + (s[5] !== null ? " · thread " + s[5] : "");
    if (s[7]) txt += "\non-CPU " + fmt(s[7][0]) + " · run-queue " + fmt(s[7][1]) + " · blocked " +
      fmt(s[7][2]);
    if (s[8] !== null) txt += "\nGPU SM " + s[8].toFixed(1) + "%";
  }
  tip.textContent = txt;
  tip.style.display = "block";
  tip.style.left = (ev.pageX + 12) + "px";
  tip.style.top = (ev.pageY + 12) + "px";
});
$("wf").addEventListener("mouseleave", () => { $("tip").style.display = "none"; });
$("wf").addEventListener("click", (ev) => {
  const t = ev.target.closest("[data-i]");
  if (!t) return;
  const i = t.getAttribute("data-i");
  document.querySelectorAll("#wf .bar.sel").forEach((x) => x.classList.remove("sel"));
  const b = document.querySelector("#wf .bar[data-i='" + i + "']");
  if (b) b.classList.add("sel");
  detail(D.cycles[cur].spans[+i]);
});
$("overview").addEventListener("click", (ev) => { if (D.cycles.length) render(cycleAt(ev)); });
$("overview").addEventListener("mousemove", (ev) => {
  if (!D.cycles.length) return;
  const c = D.cycles[cycleAt(ev)];
  $("overview").title = c.label + " · " + fmt(c.dur) + " (click to show)";
});
sel.addEventListener("change", () => render(+sel.value));
$("jump").addEventListener("change", () => {
  if ($("jump").value !== "") render(+$("jump").value);
  $("jump").value = "";
});
$("prev").addEventListener("click", () => render(cur - 1));
$("next").addEventListener("click", () => render(cur + 1));
document.addEventListener("keydown", (ev) => {
  if (ev.target === sel || ev.target === $("jump")) return;
  if (ev.key === "ArrowLeft") render(cur - 1);
  if (ev.key === "ArrowRight") render(cur + 1);
});
let timer = 0;
window.addEventListener("resize", () => { clearTimeout(timer); timer = setTimeout(() => render(cur), 100); });
const m = /cycle=(\d+)/.exec(location.hash);
render(m ? +m[1] : D.initial);
})();
"""
