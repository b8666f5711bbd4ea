"""Reports: the HTML waterfall rendered in a real headless Chromium, the Chrome trace schema,
and drift on real runs of the reference substrate."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.otlpjson import Span, SpanEvent, dumps_line, read_spans
from tracer.report.chrome import chrome_trace
from tracer.report.cycles import build_cycles
from tracer.report.drift import drift, holm_adjust, mann_whitney_u

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".cache" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REFERENCE_PY = ROOT / ".cache" / "targets" / "pyenv-3.12.1" / "bin" / "python"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# ---- span data ------------------------------------------------------------------------

def _reference_run(path: Path, cycles: int, seed: int = 7) -> bool:
    """Run the reference substrate with the OpenTelemetry emitter writing to `path`."""
    if not (ROOT / "tracer" / "reference").is_dir() or not REFERENCE_PY.exists():
        return False
    env = dict(os.environ, PYTHONPATH=str(ROOT), KIMERA_TELEMETRY_EMITTER_PATH=str(path))
    proc = subprocess.run([str(REFERENCE_PY), "-m", "tracer.reference", "--cycles", str(cycles),
                           "--seed", str(seed)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return path.exists() and path.stat().st_size > 0


STEPS = ("takwin.step1_screen", "takwin.step2_encode", "takwin.step3_step4_traverse", "takwin.step6_vault")


def synthetic_spans(cycles: int, seed: int, scale: float = 1.0) -> list[Span]:
    """Takwin-shaped spans with lognormal (right-skewed) step durations."""
    rnd = random.Random(seed)
    res = {"process.pid": 4242, "service.name": "synthetic"}
    out = []
    t = 1_700_000_000_000_000_000
    for c in range(cycles):
        trace = f"{rnd.getrandbits(128):032x}"
        root_id = f"{rnd.getrandbits(64):016x}"
        start = t
        kids = []
        for i, name in enumerate(STEPS):
            dur = int(rnd.lognormvariate(math.log(200_000 * (i + 1) * scale), 0.3))
            ev = (SpanEvent("gwf.screen", t + dur // 2, {"verdict": "pass"}),) if i == 0 else ()
            kids.append(Span(trace, f"{rnd.getrandbits(64):016x}", root_id, name, t, t + dur,
                             {"thread.id": 4242}, ev, resource=res, scope="synthetic"))
            t += dur + 10_000
        out.append(Span(trace, root_id, "", "takwin.cycle", start, t, {"thread.id": 4242, "cycle.index": c},
                        resource=res, scope="synthetic"))
        out.extend(kids)
        t += 1_000_000
    return out


def write_spans(path: Path, spans: list[Span]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for s in spans:
            f.write(dumps_line([s], s.resource, s.scope))
    return path


@pytest.fixture(scope="module")
def real_spans(tmp_path_factory) -> Path:
    """40 cycles of the reference substrate's own OpenTelemetry spans (synthetic if it is absent)."""
    path = tmp_path_factory.mktemp("ref") / "hooks.jsonl"
    if not _reference_run(path, 40):
        write_spans(path, synthetic_spans(40, seed=1))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from tracer.cli import main; main()", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


# ---- headless Chromium ----------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (scripts/_setup.sh installs Debian's chromium)")
        pytest.skip("chromium is not installed: apt-get install chromium")
    return CHROMIUM


def _chromium(binary: str, tmp: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                          capture_output=True, text=True, timeout=90)


def dump_dom(binary: str, tmp: Path, url: str) -> str:
    # --enable-logging copies the page's console to stderr: a script error fails the test.
    proc = _chromium(binary, tmp, url, "--virtual-time-budget=2000", "--enable-logging=stderr", "--v=0",
                     "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr, proc.stderr[-2000:]
    assert "<svg" in proc.stdout, "the page's script drew nothing"
    return proc.stdout


def screenshot(binary: str, tmp: Path, url: str, name: str) -> Path:
    shot = tmp / name
    proc = _chromium(binary, tmp, url, "--window-size=1400,900", f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return shot


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def elements(dom: str) -> list[tuple[str, dict]]:
    p = Elements()
    p.feed(dom)
    return p.elements


def cycle_span_ids(spans: list[Span], ordinal: int) -> set[str]:
    """Independently of the report code: descendants of the ordinal-th takwin.cycle by start."""
    roots = sorted((s for s in spans if s.name == "takwin.cycle"), key=lambda s: s.start_ns)
    root = roots[ordinal]
    ids, frontier = {root.span_id}, [root.span_id]
    while frontier:
        pid = frontier.pop()
        for s in spans:
            if s.parent_span_id == pid and s.trace_id == root.trace_id and s.span_id not in ids:
                ids.add(s.span_id)
                frontier.append(s.span_id)
    return ids


# ---- HTML report ----------------------------------------------------------------------

def test_html_report_one_bar_per_span_of_chosen_cycle(real_spans, chromium, tmp_path):
    proc = run_cli("report", str(real_spans), "--out", str(tmp_path), "--cycle", "3")
    assert proc.returncode == 0, proc.stderr
    page = Path(proc.stdout.strip().splitlines()[-1])
    assert page.exists() and page.parent == tmp_path
    text = page.read_text()
    # Self-contained: nothing to fetch (the only URL is the SVG namespace, which is a name).
    assert "<link" not in text and " src=" not in text
    assert text.replace("http://www.w3.org/2000/svg", "").count("://") == 0

    spans = read_spans(str(real_spans))
    want = cycle_span_ids(spans, 3)
    assert len(want) >= 5
    dom = dump_dom(chromium, tmp_path, page.as_uri())
    bars = [a for tag, a in elements(dom) if "data-span-id" in a]
    assert all("bar" in a.get("class", "") for a in bars)
    assert len(bars) == len(want)
    assert {a["data-span-id"] for a in bars} == want
    # Span events are drawn as markers: one per event of the cycle's spans.
    n_events = sum(len(s.events) for s in spans if s.span_id in want)
    assert sum(1 for _, a in elements(dom) if a.get("class") == "evt") == n_events
    # The emitter's spans carry no scheduler or GPU data: the page says so.
    assert "no scheduler data" in dom and "GPU data unavailable" in dom
    assert not [a for _, a in elements(dom) if a.get("class") == "band"]

    shot = screenshot(chromium, tmp_path, page.as_uri(), "report-waterfall.png")
    assert shot.stat().st_size > 20_000  # a blank 1400x900 page compresses to a few kB


def test_html_cycle_selector_via_url_hash(real_spans, chromium, tmp_path):
    proc = run_cli("report", str(real_spans), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    page = Path(proc.stdout.strip().splitlines()[-1])
    spans = read_spans(str(real_spans))
    dom = dump_dom(chromium, tmp_path, page.as_uri() + "#cycle=7")
    ids = {a["data-span-id"] for _, a in elements(dom) if "data-span-id" in a}
    assert ids == cycle_span_ids(spans, 7)
    # The selector: a number box bounded by the cycle count, and a short "jump to" list of
    # the slowest ten, the median and the fastest cycle (plus its placeholder).
    box = next(a for tag, a in elements(dom) if tag == "input" and a.get("id") == "cycle")
    assert box["max"] == "39"
    options = [a for tag, a in elements(dom) if tag == "option"]
    assert len(options) == 1 + 10 + 2


def enriched(spans: list[Span], gpu: bool) -> list[Span]:
    """The attributes the correlation stages write, derived from each span's own duration."""
    out = []
    for i, s in enumerate(spans):
        d = s.duration_ns
        on = d * (i % 5 + 3) // 10
        rq = (d - on) // 4
        attrs = dict(s.attributes, **{"ophamin.sched.on_cpu_ns": on, "ophamin.sched.run_queue_ns": rq,
                                      "ophamin.sched.blocked_ns": d - on - rq})
        if gpu and s.name != "takwin.cycle":
            attrs["ophamin.gpu.sm_util_pct"] = float(10 * (i % 9))
        res = (s.resource if gpu else
               dict(s.resource, **{"ophamin.gpu.unavailable": "no NVIDIA driver loaded"}))
        out.append(replace(s, attributes=attrs, resource=res))
    return out


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "no-gpu"])
def test_html_scheduler_bands_and_gpu_track(real_spans, chromium, tmp_path, gpu):
    spans = enriched(read_spans(str(real_spans)), gpu)
    src = write_spans(tmp_path / "rich.jsonl", spans)
    proc = run_cli("report", str(src), "--out", str(tmp_path), "--cycle", "1")
    assert proc.returncode == 0, proc.stderr
    page = Path(proc.stdout.strip().splitlines()[-1])
    dom = dump_dom(chromium, tmp_path, page.as_uri())
    els = elements(dom)
    want = cycle_span_ids(spans, 1)
    assert {a["data-span-id"] for _, a in els if "data-span-id" in a} == want
    # Up to three band segments per span: on-CPU, run-queue, blocked (zero-width ones are skipped).
    bands = [a for _, a in els if a.get("class") == "band"]
    nonzero = sum(sum(1 for k in ("ophamin.sched.on_cpu_ns", "ophamin.sched.run_queue_ns",
                                  "ophamin.sched.blocked_ns") if s.attributes[k] > 0)
                  for s in spans if s.span_id in want and s.duration_ns > 0)
    assert len(bands) == nonzero
    assert "no scheduler data" not in dom
    gpu_bars = {a["data-gpu-span"] for _, a in els if "data-gpu-span" in a}
    if gpu:
        assert gpu_bars == {s.span_id for s in spans if s.span_id in want and s.name != "takwin.cycle"}
        assert "GPU data unavailable" not in dom
    else:
        assert not gpu_bars
        assert "GPU data unavailable: no NVIDIA driver loaded" in dom
    # The per-step table carries the on-CPU share when scheduler data is present.
    assert "on-CPU" in dom
    screenshot(chromium, tmp_path, page.as_uri(), f"report-sched-{'gpu' if gpu else 'nogpu'}.png")


def _parity_section(page: Path) -> dict:
    return next(a for _, a in elements(page.read_text()) if a.get("id") == "parity")


def test_html_parity_verdict(real_spans, tmp_path):
    spans = read_spans(str(real_spans))
    same = run_cli("report", str(real_spans), "--hooks", str(real_spans), "--out", str(tmp_path))
    assert same.returncode == 0, same.stderr
    page = Path(same.stdout.strip().splitlines()[-1])
    assert _parity_section(page)["data-verdict"] == "pass"
    assert "parity PASS" in page.read_text()
    # The "eBPF" side lost one step span: parity must fail and the page must say so.
    dropped = next(s for s in spans if s.name != "takwin.cycle")
    ebpf = write_spans(tmp_path / "ebpf.jsonl", [s for s in spans if s is not dropped])
    proc = run_cli("report", str(ebpf), "--hooks", str(real_spans), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    page = Path(proc.stdout.strip().splitlines()[-1])
    assert _parity_section(page)["data-verdict"] == "fail"
    assert "parity FAIL" in page.read_text() and dropped.name in page.read_text()


def test_generic_trace_each_root_is_a_cycle():
    res = {"process.pid": 1}
    t = 1_000_000_000
    spans = [
        Span("a" * 32, "1" * 16, "", "handler", t, t + 100, resource=res),
        Span("a" * 32, "2" * 16, "1" * 16, "db", t + 10, t + 50, resource=res),
        Span("a" * 32, "3" * 16, "2" * 16, "fetch", t + 20, t + 40, resource=res),
        Span("b" * 32, "4" * 16, "", "handler", t + 200, t + 300, resource=res),
        # Parent missing from the file: an orphan stands as its own cycle.
        Span("b" * 32, "5" * 16, "9" * 16, "late", t + 150, t + 160, resource=res),
    ]
    cycles = build_cycles(spans)
    assert [c.root.span_id for c in cycles] == ["1" * 16, "5" * 16, "4" * 16]
    assert [s.name for s in cycles[0].spans] == ["handler", "db", "fetch"]
    assert cycles[0].depths == (0, 1, 2)


def test_report_errors_are_one_line(tmp_path, real_spans):
    proc = run_cli("report", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("report", str(real_spans), "--out", str(tmp_path), "--cycle", "999")
    assert proc.returncode == 2 and "out of range" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"resourceSpans": [}\n')
    proc = run_cli("report", str(bad), "--out", str(tmp_path))
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr and "Traceback" not in proc.stderr


# ---- Chrome trace ---------------------------------------------------------------------

def check_chrome_trace(doc: dict) -> None:
    """Schema of the Trace Event format as Perfetto's importer reads it."""
    assert isinstance(doc["traceEvents"], list) and doc["traceEvents"]
    last: dict[tuple[int, int], float] = {}
    stacks: dict[tuple[int, int], list[float]] = {}
    for ev in doc["traceEvents"]:
        for key in ("name", "ph", "ts", "pid", "tid"):
            assert key in ev, f"{key} missing in {ev}"
        assert isinstance(ev["name"], str) and isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0
        assert ev["ph"] in ("X", "i", "M")
        if ev["ph"] == "M":
            assert ev["name"] in ("process_name", "thread_name") and isinstance(ev["args"]["name"], str)
            continue
        key = (ev["pid"], ev["tid"])
        assert ev["ts"] >= last.get(key, 0.0), f"timestamps go backwards on {key} at {ev}"
        last[key] = ev["ts"]
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0
            # Complete events on one thread must nest (Perfetto draws them as a flame stack).
            stack = stacks.setdefault(key, [])
            while stack and stack[-1] <= ev["ts"]:
                stack.pop()
            end = round(ev["ts"] + ev["dur"], 3)
            assert not stack or end <= stack[-1] + 1e-3, f"{ev['name']} overlaps its parent"
            stack.append(end)
        else:
            assert ev["s"] == "t"


def test_chrome_trace_schema(real_spans, tmp_path):
    proc = run_cli("report", str(real_spans), "--out", str(tmp_path), "--format", "chrome")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.name.endswith(".trace.json")
    doc = json.loads(path.read_text())
    check_chrome_trace(doc)
    spans = read_spans(str(real_spans))
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(spans)
    assert sum(1 for e in doc["traceEvents"] if e["ph"] == "i") == sum(len(s.events) for s in spans)
    # Times are exact: relative µs with ns decimals plus the recorded epoch give back each span.
    epoch = doc["otherData"]["epoch_ns"]
    by_id = {s.span_id: s for s in spans}
    for e in xs:
        s = by_id[e["args"]["span_id"]]
        assert round(e["ts"] * 1000) + epoch == s.start_ns
        assert round(e["dur"] * 1000) == s.duration_ns
        assert e["pid"] == s.resource["process.pid"] and e["tid"] == s.thread_id
    named = {(e["pid"], e["tid"]) for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert named == {(e["pid"], e["tid"]) for e in xs}


def test_chrome_trace_without_pid_or_thread_says_so():
    s = Span("a" * 32, "1" * 16, "", "work", 5_000, 9_000)
    doc = chrome_trace([s])
    check_chrome_trace(doc)
    names = {e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    assert "process (no process.pid)" in names and "no thread.id" in names


# ---- drift ----------------------------------------------------------------------------

def split_cycles(spans: list[Span]) -> tuple[list[Span], list[Span]]:
    """Even and odd cycles of one run: two samples of one distribution, interleaved in time so a
    change of machine load during the test hits both alike."""
    halves: tuple[list[Span], list[Span]] = ([], [])
    for c in build_cycles(spans):
        halves[c.ordinal % 2].extend(c.spans)
    return halves


def slowed(spans: list[Span], name: str, factor: float) -> list[Span]:
    """`name` spans made `factor` times longer; their parents grow by the same amount."""
    extra = {}
    out = []
    for s in spans:
        if s.name == name:
            add = int(s.duration_ns * (factor - 1))
            extra[(s.trace_id, s.parent_span_id)] = extra.get((s.trace_id, s.parent_span_id), 0) + add
            s = replace(s, end_ns=s.end_ns + add)
        out.append(s)
    return [replace(s, end_ns=s.end_ns + extra.get((s.trace_id, s.span_id), 0)) for s in out]


def test_drift_flags_injected_regression(real_spans, tmp_path):
    base, new = split_cycles(read_spans(str(real_spans)))
    steps = [st for st in {s.name for s in base} if st != "takwin.cycle"]
    # The slowest step: tripling it also moves the cycle by far more than --min-effect.
    victim = max(steps, key=lambda n: statistics.median(s.duration_ns for s in base if s.name == n))
    b = write_spans(tmp_path / "base.jsonl", base)
    n = write_spans(tmp_path / "new.jsonl", slowed(new, victim, 3.0))
    proc = run_cli("drift", str(b), str(n), "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert victim in doc["regressions"]
    assert set(doc["regressions"]) <= {victim, "takwin.cycle"}
    row = next(r for r in doc["rows"] if r["name"] == victim)
    assert 1.5 < row["median_change"] < 2.5 and row["mann_whitney"]["p_value"] < 0.01
    table = run_cli("drift", str(b), str(n))
    assert table.returncode == 1 and "!! regression" in table.stdout and victim in table.stdout


def test_drift_same_run_halves_not_flagged(real_spans, tmp_path):
    base, new = split_cycles(read_spans(str(real_spans)))
    b = write_spans(tmp_path / "base.jsonl", base)
    n = write_spans(tmp_path / "new.jsonl", new)
    proc = run_cli("drift", str(b), str(n))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 regression(s)" in proc.stdout


def test_drift_same_distribution_false_positive_rate():
    # 200 pairs of runs drawn from one skewed distribution, five span names each. Holm's
    # adjustment bounds the chance of any false flag per pair by alpha = 1% (per-name tests
    # alone would allow about 5 names x 1%), so about 2 of 200 at most are expected.
    flagged = sum(bool(drift(synthetic_spans(30, seed=2 * k), synthetic_spans(30, seed=2 * k + 1))
                       .regressions) for k in range(200))
    assert flagged <= 4
    # And a real ×3 slowdown from the same family is caught every time.
    caught = sum(bool(drift(synthetic_spans(30, seed=2 * k), synthetic_spans(30, seed=2 * k + 1, scale=3.0))
                      .regressions) for k in range(20))
    assert caught == 20


def test_mann_whitney_known_value():
    # Completely separated samples of 3: U = 0, z = (4.5 - 0.5) / sqrt(5.25), two-sided p = 0.0809.
    r = mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert r.u == 0 and r.p_value == pytest.approx(0.080856, abs=1e-5)
    # All values tied: no evidence either way.
    assert mann_whitney_u([5, 5], [5, 5, 5]).p_value == 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=30),
       st.lists(st.integers(0, 20), min_size=1, max_size=30))
def test_mann_whitney_u_is_pair_count(a, b):
    # U from tie-averaged ranks equals the direct count of pairs a > b (ties counting half).
    pairs = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
    r = mann_whitney_u(a, b)
    assert r.u == pytest.approx(pairs)
    assert 0.0 <= r.p_value <= 1.0
    swapped = mann_whitney_u(b, a)
    assert swapped.p_value == pytest.approx(r.p_value)


def test_holm_adjust():
    # Textbook example: p = 0.01, 0.04, 0.03 over 3 tests -> 0.03, 0.06, 0.06.
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_drift_cli_errors(tmp_path, real_spans):
    proc = run_cli("drift", str(real_spans), str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 2 and "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("drift", str(real_spans), str(real_spans), "--alpha", "2")
    assert proc.returncode == 2 and "--alpha" in proc.stderr
