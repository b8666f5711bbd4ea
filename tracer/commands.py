"""The tracing commands: `trace` (the default), `probes` and `validate`. Each parses its
options and calls into the stages; nothing here knows how capture works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from .errors import TraceError
from .report.stats import format_table
from .spec import load_spec


def _print_result(res, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        for w in res.warnings:  # for the human at the terminal; the JSON has them too
            click.echo(f"warning: {w}", err=True)
        return
    click.echo(format_table(res.stats) if res.stats else "no spans completed")
    lo = res.losses
    c = res.counters
    drops = f"{c['dropped']:,}"
    if c.get("dropped"):
        drops += f" ({c.get('dropped_entries', 0):,} entries, {c.get('dropped_exits', 0):,} exits)"
    click.echo(f"\nprobe hits: {c['entry_hits']:,} entries, {c['exit_hits']:,} exits; "
               f"ring-buffer drops: {drops}; stopped by: {res.stopped_by}")
    for label, d in (("cut at attach (entered before the tracer)", lo.cut_at_attach),
                     ("cut at detach (still open)", lo.cut_at_detach),
                     ("events with no open span", lo.orphan_events)):
        if d:
            click.echo(f"{label}: " + ", ".join(f"{k} x{v}" for k, v in d.items()))
    if lo.unreadable_attributes:
        click.echo(f"attribute values not readable: {lo.unreadable_attributes}")
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    for name, info in res.exporters.items():
        click.echo(f"{name}: {info}")
    for name, summary in res.enrichers.items():
        reason = f": {summary['reason']}" if summary.get("reason") else ""
        click.echo(f"{name}: {summary.get('status', '?')}{reason}")


def _say_attached(capture) -> None:
    # One line on stderr once every probe is in and every thread is known: from here on,
    # nothing the target does is missed (scripts and tests wait for it).
    i = capture.interpreter
    click.echo(f"ophamin-trace: attached to PID {capture.pid} (CPython {i['version']}); "
               "stop with Ctrl-C or SIGTERM", err=True)


@click.command("trace", context_settings={"ignore_unknown_options": False})
@click.option("--pid", type=int, help="PID of a running Python process to attach to.")
@click.option("--spec", "spec_name", default="reference", show_default=True,
              help="Built-in spec (reference, kimera) or a TOML spec file.")
@click.option("--output", "-o", type=click.Path(), help="Write spans as OTLP-JSON lines (a new or regular file).")
@click.option("--otlp-endpoint", help="Send spans by OTLP/HTTP (JSON) to this collector URL. While it is "
              "unreachable, up to 50,000 spans wait; older ones are dropped and counted.")
@click.option("--duration", type=float, help="Stop after this many seconds.")
@click.option("--sched/--no-sched", default=False, show_default=True,
              help="Add scheduler and memory attributes to each span.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-status", is_flag=True, help="No live status line.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def trace_cmd(pid, spec_name, output, otlp_endpoint, duration, sched, as_json, no_status, command):
    """Attach to a Python process and turn the spec's functions into spans.

    \b
    Examples:
      sudo ophamin-trace --pid 4242 --spec reference --output spans.jsonl
      sudo ophamin-trace --pid 4242 --spec my.toml --otlp-endpoint http://127.0.0.1:4318
      sudo ophamin-trace --spec reference -o spans.jsonl -- python -m tracer.reference --cycles 10
    Stops on Ctrl-C, SIGTERM, --duration, or when the target exits; always detaches,
    flushes, and prints a per-span table (count, median, p10, p90, max).
    """
    from .session import launch, run_trace  # noqa: PLC0415

    if (pid is None) == (not command):
        raise click.UsageError("give either --pid PID or -- COMMAND ...")
    spec = load_spec(spec_name)
    if command:
        pid = launch(list(command))
    # keep_spans=False: spans stream to the exporters and the table is kept in fixed memory,
    # so a trace can run for days (tracer/report/running_stats.py).
    res = run_trace(pid, spec, output=output, otlp_endpoint=otlp_endpoint, duration=duration,
                    status=not no_status, with_sched=sched, keep_spans=False, on_attached=_say_attached)
    _print_result(res, as_json)


@click.command("probes")
@click.option("--pid", type=int, required=True, help="PID of a running Python process.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def probes_cmd(pid, as_json):
    """Show the interpreter found in a process and the probe plan for it.

    \b
    Examples:
      sudo ophamin-trace probes --pid 4242
      sudo ophamin-trace probes --pid 4242 --json | jq .plan.sites
    """
    from .access import require_own_process  # noqa: PLC0415
    from .discover.elf import open_image  # noqa: PLC0415
    from .discover.layout import layout_for  # noqa: PLC0415
    from .discover.process import find_interpreter  # noqa: PLC0415
    from .plan.probes import plan_for  # noqa: PLC0415

    require_own_process(pid)
    interp = find_interpreter(pid)
    image = open_image(interp.host_path)
    layout = layout_for(interp.host_path, interp.version, interp.build_id)
    plan = plan_for(image, interp.version)
    unavailable = list(plan.unavailable)
    unavailable.append("attribute access (self.x) in specs: not supported on any version")
    if interp.has_usdt:
        unavailable.append("USDT function__entry/return: present but fire only under settrace on 3.11 "
                           "(not used)")
    out = {"interpreter": interp.to_dict(), "layout_source": layout.source, "plan": plan.to_dict(),
           "unavailable": unavailable}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    i = out["interpreter"]
    click.echo(f"PID {pid}: CPython {i['version']} ({i['version_source']}), {i['image']}")
    click.echo(f"  build id {i['build_id']}, symbols: {i['symbols']}, DWARF: {i['dwarf']}, "
               f"load bias {i['bias']}")
    click.echo(f"  layout: {layout.source}; strategy: {plan.strategy}")
    for s in plan.sites:
        click.echo(f"  {s.role:6} {s.label:45} {s.vaddr:#x}  {s.instruction:32} "
                   f"{'emulated' if s.emulated else 'single-stepped'}")
        click.echo(f"         proof: {s.proof}")
    for u in unavailable:
        click.echo(f"  unavailable: {u}")


@click.command("validate")
@click.option("--cycles", default=30, show_default=True, help="Cycles of the reference substrate.")
@click.option("--cycle-ms", default=20, show_default=True, help="Target length of one cycle.")
@click.option("--python", "python", default=None, help="Interpreter to run the substrate (default: this one).")
@click.option("--out", "out_dir", default="validate-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--max-p99-us", default=50.0, show_default=True, help="Timing threshold after the offset fit.")
@click.option("--json", "as_json", is_flag=True)
def validate_cmd(cycles, cycle_ms, python, out_dir, max_p99_us, as_json):
    """Run the reference substrate with its in-process emitter, trace it, and check parity.

    \b
    Examples:
      sudo ophamin-trace validate --cycles 30
      sudo ophamin-trace validate --python /usr/bin/python3.11 --json
    Exit 0 when the eBPF spans match the emitter's within thresholds, 1 otherwise.
    """
    res = run_validate(cycles, cycle_ms, python or sys.executable, Path(out_dir), max_p99_us)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(res["parity_text"])
        click.echo("\nper_step_timing (ms): " + ", ".join(
            f"{k}: median {v['median_ms']:.3f} p10 {v['p10_ms']:.3f} p90 {v['p90_ms']:.3f}"
            for k, v in res["per_step_timing"].items()))
        click.echo(f"\nverdict: {'PASS' if res['passed'] else 'FAIL'}  (files in {out_dir})")
    sys.exit(0 if res["passed"] else 1)


def run_validate(cycles: int, cycle_ms: int, python: str, out: Path, max_p99_us: float,
                 with_sched: bool = False) -> dict:
    from .compare.parity import Thresholds, compare  # noqa: PLC0415
    from .otlpjson import read_spans  # noqa: PLC0415
    from .session import run_trace  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    hooks, ebpf = out / "hooks.jsonl", out / "ebpf.jsonl"
    for p in (hooks, ebpf):
        if p.exists():
            p.unlink()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), KIMERA_TELEMETRY_EMITTER_PATH=str(hooks))
    try:
        proc = subprocess.Popen(
            [python, "-m", "tracer.reference", "--cycles", str(cycles), "--cycle-ms", str(cycle_ms),
             "--wait-for-attach", "--out", str(out / "cycles.jsonl")],
            env=env, stdout=subprocess.PIPE, text=True)
    except OSError as e:
        raise TraceError(f"cannot run {python}: {e.strerror}") from None
    first = proc.stdout.readline()
    if not first:
        raise TraceError(f"the reference substrate did not start under {python}")
    res = run_trace(proc.pid, load_spec("reference"), output=str(ebpf), status=False, with_sched=with_sched,
                    on_attached=lambda _e: os.kill(proc.pid, signal.SIGUSR1))
    proc.wait()  # the emitter flushes its file at exit
    report = compare(read_spans(str(hooks)), read_spans(str(ebpf)), Thresholds(max_p99_us=max_p99_us))
    steps = {s.name: {"median_ms": s.median_ns / 1e6, "p10_ms": s.p10_ns / 1e6, "p90_ms": s.p90_ns / 1e6,
                      "count": s.count} for s in res.stats}
    return {"passed": report.passed and proc.returncode == 0, "parity": report.to_dict(),
            "parity_text": report.format(), "per_step_timing": steps, "trace": res.to_dict(),
            "hooks": str(hooks), "ebpf": str(ebpf), "python": python}
