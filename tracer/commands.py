"""The tracing commands: `trace` (the default), `probes` and `validate`. Each parses its
options and calls into the stages; nothing here knows how capture works."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import click

from .errors import TraceError
from .report.stats import format_calls_table, format_table, step_timing_ms
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
    if res.mode == "sampled":
        click.echo(f"\nsamples of the target: {c['samples']:,} on CPU, {c['switch_outs']:,} switches out "
                   f"({c['walks']:,} stacks walked, {c['truncated']:,} deeper than the walk); "
                   f"ring-buffer drops: {drops}; stopped by: {res.stopped_by}")
    else:
        click.echo(f"\nprobe hits: {c['entry_hits']:,} entries, {c['exit_hits']:,} exits; "
                   f"ring-buffer drops: {drops}; stopped by: {res.stopped_by}")
    calls = res.calls.get("functions") if res.calls.get("status") == "ok" else None
    if calls is not None:
        n = sum(f["calls"] for f in calls)
        spans = sum(s.count for s in res.stats)
        click.echo(f"calls ended, counted in the kernel: {n:,} (completed spans: {spans:,})")
        if c.get("dropped"):
            click.echo("spans were dropped: every call, as the kernel counted and timed it:\n"
                       + format_calls_table(calls))
    unseen = c.get("stack_overflow", 0) + c.get("eval_returns_lost", 0)
    if unseen:
        click.echo(f"exits the kernel could not pair: {unseen:,} (frames nested deeper than the per-thread "
                   "stacks; their spans show as cut at detach)")
    for label, d in (("cut at attach (entered before the tracer)", lo.cut_at_attach),
                     ("cut at detach (still open)", lo.cut_at_detach),
                     ("events with no open span", lo.orphan_events),
                     ("calls left unpaired by ring-buffer drops", lo.unpaired)):
        if d:
            click.echo(f"{label}: " + ", ".join(f"{k} x{v}" for k, v in d.items()))
    if lo.unreadable_attributes:
        click.echo(f"attribute values not readable: {lo.unreadable_attributes}")
    sched = {k[len("sched_"):]: v for k, v in c.items() if k.startswith("sched_")}
    if sched:
        click.echo("scheduler programs: " + ", ".join(f"{k} {v:,}" for k, v in sched.items()))
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    for name, info in res.exporters.items():
        click.echo(f"{name}: {info}")
    for name, summary in res.enrichers.items():
        click.echo(_enricher_line(name, summary))


def _enricher_line(name: str, summary: dict) -> str:
    reason = f": {summary['reason']}" if summary.get("reason") else ""
    return f"{name}: {summary.get('status', '?')}{reason}"


@click.command("trace", context_settings={"ignore_unknown_options": False})
@click.option("--pid", type=int, multiple=True, help="PID of a running Python process (repeatable).")
@click.option("--match", metavar="REGEX",
              help="Trace every Python process whose command line matches (re.search).")
@click.option("--follow", is_flag=True, help="With --match: also attach to matching processes started later.")
@click.option("--spec", "spec_name", default=None,
              help="Built-in spec (reference, kimera) or a TOML spec file [default: reference, "
                   "unless -f or --module is given].")
@click.option("-f", "--function", "functions", multiple=True, metavar="MODULE:QUALNAME[=SPAN]",
              help="Trace this function as a span (repeatable; added to --spec if both are given).")
@click.option("--module", "modules", multiple=True, metavar="PREFIX",
              help="Trace every function defined in this module or package (repeatable).")
@click.option("--output", "-o", type=click.Path(), help="Write spans as OTLP-JSON lines (a new or regular file).")
@click.option("--otlp-endpoint", help="Send spans by OTLP/HTTP (JSON) to this collector URL. While it is "
              "unreachable, up to 50,000 spans wait; older ones are dropped and counted.")
@click.option("--duration", type=float, help="Stop after this many seconds.")
@click.option("--sched/--no-sched", default=False, show_default=True,
              help="Add scheduler and memory attributes to each span.")
@click.option("--gpu/--no-gpu", default=True, show_default=True,
              help="Add NVML GPU utilisation and memory to each span; without a GPU one line says why.")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False),
              help="With --sched: write the per-cycle resource profile (JSON) here.")
@click.option("--mode", type=click.Choice(["exact", "sampled"]), default="exact", show_default=True,
              help="exact: every call, by probes in the interpreter; sampled: stack samples at a fixed, "
                   "small cost (spans estimated, boundary uncertainty stated).")
@click.option("--hz", type=click.IntRange(1, 20_000), default=None,
              help="With --mode sampled: samples per second per CPU (default 999).")
@click.option("--calls-log", type=click.Path(dir_okay=False),
              help="Append the kernel's count of every call of each spec function (exact even when spans "
                   "are dropped) as JSON lines, every --calls-interval seconds and at detach.")
@click.option("--calls-interval", type=click.FloatRange(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between lines of --calls-log.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--no-status", is_flag=True, help="No live status line.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def trace_cmd(pid, match, follow, spec_name, functions, modules, output, otlp_endpoint, duration, sched, gpu,
              profile_path, mode, hz, calls_log, calls_interval, as_json, no_status, command):
    """Attach to Python processes and turn the spec's functions into spans.

    \b
    Examples:
      sudo ophamin-trace --pid 4242 --spec reference --output spans.jsonl
      sudo ophamin-trace --pid 4242 -f app.jobs:Worker.run=job.run -f app.db:query
      sudo ophamin-trace --pid 4242 --module app.jobs -o spans.jsonl
      sudo ophamin-trace --match 'gunicorn.*app:' --follow -f app.views:index --otlp-endpoint http://127.0.0.1:4318
      sudo ophamin-trace --spec reference -o spans.jsonl -- python -m tracer.reference --cycles 10
      sudo ophamin-trace --pid 4242 --sched --profile profile.json -o spans.jsonl
      sudo ophamin-trace --pid 4242 --mode sampled --hz 499 -o spans.jsonl
    Stops on Ctrl-C, SIGTERM, --duration, or when the targets exit (with --follow: only on
    the first three); always detaches, flushes, and prints a per-span table per process
    (count, median, p10, p90, max).
    """
    from .discover.launch import launch  # noqa: PLC0415
    from .fleet import format_fleet_footer, stderr_log, trace_processes  # noqa: PLC0415
    from .session import TraceOptions  # noqa: PLC0415
    from .spec.adhoc import SpecRequest  # noqa: PLC0415

    if command and (pid or match):
        raise click.UsageError("give --pid/--match or -- COMMAND ..., not both")
    if not pid and not command and match is None:
        raise click.UsageError("give --pid PID, --match REGEX or -- COMMAND ...")
    if follow and match is None:
        raise click.UsageError("--follow needs --match REGEX")
    if profile_path and not sched:
        raise click.UsageError("--profile needs --sched (the profile is measured by the scheduler programs)")
    if hz is not None and mode != "sampled":
        raise click.UsageError("--hz needs --mode sampled")
    if sched and mode == "sampled":
        raise click.UsageError("--sched needs --mode exact (sampled spans carry their time off CPU already)")
    if calls_log and mode == "sampled":
        raise click.UsageError("--calls-log needs --mode exact (sampled mode sees no call's start or end)")
    request = SpecRequest(spec_name, tuple(functions), tuple(modules))
    request.base()  # a bad spec or -f is reported before a command is launched
    pids = list(pid)
    # Launch mode: the command is held stopped, its interpreter mapped, until the probes are in.
    launched = launch(list(command)) if command else None
    if launched is not None:
        pids = [launched.pid]
    many = len(pids) > 1 or match is not None
    # Spans stream to the exporters and the table is kept in fixed memory, so a trace can run
    # for days (tracer/report/running_stats.py); only --profile needs the spans themselves.
    opts = TraceOptions(output=output, otlp_endpoint=otlp_endpoint, duration=duration, status=not no_status,
                        with_sched=sched, enrichers=("gpu",) if gpu else (), keep_spans=bool(profile_path),
                        mode=mode, calls_log=calls_log, calls_interval=calls_interval, **({"hz": hz} if hz else {}))
    try:
        fleet = trace_processes(pids, request, opts, match=match, follow=follow, log=stderr_log,
                                on_attached=(lambda _c: launched.resume()) if launched else None)
    except BaseException:
        if launched is not None and launched.stopped:
            launched.kill()  # never leave a held child behind
        raise
    if profile_path:
        from .correlate.profile import write_profile  # noqa: PLC0415

        write_profile(fleet.spans, profile_path)
    if not many:
        _print_result(dataclasses.replace(fleet.targets[0], exporters=fleet.exporters), as_json)
        if launched is not None and launched.popen.poll() is not None and not as_json:
            click.echo(f"command exited with status {launched.popen.returncode}")
        return
    if as_json:
        click.echo(json.dumps(fleet.to_dict(), indent=2))
        return
    for res in fleet.targets:
        cmd = res.resource.get("process.command_line", "")
        click.echo(f"\n== pid {res.pid} (CPython {res.interpreter.get('version', '?')}) {cmd[:80]}")
        _print_result(res, False)
    for line in format_fleet_footer(fleet):
        click.echo(line)


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
    plan = plan_for(image, interp.version, layout)
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
        click.echo(f"         reads: {s.registers}")
        click.echo(f"         proof: {s.proof}")
    for u in unavailable:
        click.echo(f"  unavailable: {u}")


@click.command("validate")
@click.option("--cycles", default=30, show_default=True, help="Cycles of the reference substrate.")
@click.option("--cycle-ms", default=20, show_default=True, help="Target length of one cycle.")
@click.option("--python", "python", default=None, help="Interpreter to run the substrate (default: this one).")
@click.option("--out", "out_dir", default="validate-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--max-p99-us", default=50.0, show_default=True, help="Timing threshold after the offset fit.")
@click.option("--gpu/--no-gpu", default=False, show_default=True,
              help="Run the substrate's GPU step (where a GPU and CuPy or PyTorch exist) and add GPU data to spans.")
@click.option("--sched/--no-sched", default=False, show_default=True,
              help="Add scheduler and memory attributes; write the per-cycle profile.json.")
@click.option("--mode", type=click.Choice(["exact", "sampled"]), default="exact", show_default=True,
              help="sampled: check that every step of >= 20 ms is found and its total time is within 5%.")
@click.option("--hz", type=click.IntRange(1, 20_000), default=None, help="With --mode sampled: samples/s per CPU.")
@click.option("--json", "as_json", is_flag=True)
def validate_cmd(cycles, cycle_ms, python, out_dir, max_p99_us, gpu, sched, mode, hz, as_json):
    """Run the reference substrate with its in-process emitter, trace it, and check parity.

    \b
    Examples:
      sudo ophamin-trace validate --cycles 30
      sudo ophamin-trace validate --python /usr/bin/python3.11 --json
      sudo ophamin-trace validate --sched --cycles 10 --cycle-ms 200
      sudo ophamin-trace validate --mode sampled --cycles 6 --cycle-ms 2500
    Exit 0 when the eBPF spans match the emitter's within thresholds, 1 otherwise.
    """
    if sched and mode == "sampled":
        raise click.UsageError("--sched needs --mode exact")
    res = run_validate(cycles, cycle_ms, python or sys.executable, Path(out_dir), max_p99_us, with_sched=sched,
                       gpu=gpu, mode=mode, hz=hz)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(res["parity_text"])
        click.echo("\nper_step_timing (ms): " + ", ".join(
            f"{k}: median {v['median_ms']:.3f} p10 {v['p10_ms']:.3f} p90 {v['p90_ms']:.3f}"
            for k, v in res["per_step_timing"].items()))
        for name, summary in res["trace"]["enrichers"].items():
            click.echo(_enricher_line(name, summary))
        if "profile" in res:
            click.echo(f"per-cycle profile: {res['profile']}")
        click.echo(f"\nverdict: {'PASS' if res['passed'] else 'FAIL'}  (files in {out_dir})")
    sys.exit(0 if res["passed"] else 1)


def run_validate(cycles: int, cycle_ms: int, python: str, out: Path, max_p99_us: float,
                 with_sched: bool = False, gpu: bool = False, mode: str = "exact", hz: int | None = None) -> dict:
    """Run the reference substrate with its emitter on, trace it, compare the two views.
    `mode="sampled"` compares stack-sampled spans (tracer/compare/sampled.py) instead."""
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
             "--wait-for-attach", "--out", str(out / "cycles.jsonl"), *(["--gpu"] if gpu else [])],
            env=env, stdout=subprocess.PIPE, text=True)
    except OSError as e:
        raise TraceError(f"cannot run {python}: {e.strerror}") from None
    try:
        if not proc.stdout.readline():
            raise TraceError(f"the reference substrate did not start under {python}")
        res = run_trace(proc.pid, load_spec("reference"), output=str(ebpf), status=False, with_sched=with_sched,
                        enrichers=("gpu",) if gpu else (),
                        on_attached=lambda _e: os.kill(proc.pid, signal.SIGUSR1), mode=mode,
                        **({"hz": hz} if hz else {}))
    except BaseException:
        proc.kill()  # it waits for the attach signal: never leave it behind
        proc.wait()
        raise
    proc.wait()  # the emitter flushes its file at exit
    if mode == "sampled":
        from .compare.sampled import compare_sampled  # noqa: PLC0415

        report = compare_sampled(read_spans(str(hooks)), read_spans(str(ebpf)))
    else:
        report = compare(read_spans(str(hooks)), read_spans(str(ebpf)), Thresholds(max_p99_us=max_p99_us))
    steps = step_timing_ms(res.stats)
    out_d = {"passed": report.passed and proc.returncode == 0, "parity": report.to_dict(),
             "parity_text": report.format(), "per_step_timing": steps, "trace": res.to_dict(),
             "hooks": str(hooks), "ebpf": str(ebpf), "python": python, "mode": mode}
    if with_sched:
        from .correlate.profile import write_profile  # noqa: PLC0415

        write_profile(res.spans, str(out / "profile.json"))
        out_d["profile"] = str(out / "profile.json")
    return out_d
