"""The trace command's process side: one `--pid`, several, `--match REGEX [--follow]`, or a
launched command, all through one `TraceLoop` that shares the exporters.

A fleet of hosts runs one tracer per host (`--match ... --follow --otlp-endpoint URL`)
exporting to an OpenTelemetry Collector; the resource attributes (`host.name`,
`process.pid`, `container.id`) tell the processes apart downstream (docs/fleet.md).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from .discover.scan import ProcessMatcher
from .errors import TraceError
from .loop import FleetResult, TraceLoop, check_targets, stop_on_signals
from .session import TraceOptions
from .spec.adhoc import SpecRequest


def stderr_log(message: str) -> None:
    # Clear a live status line first so the message starts at column 0.
    sys.stderr.write(("\r\x1b[K" if sys.stderr.isatty() else "") + f"[ophamin-trace] {message}\n")
    sys.stderr.flush()


def trace_processes(pids: Sequence[int], request: SpecRequest, options: TraceOptions, *,
                    match: str | None = None, follow: bool = False, sched_auto: bool = False,
                    log: Callable[[str], None] | None = None, on_attached=None) -> FleetResult:
    """Trace `pids` (each must attach) and, with `match`, every matching Python process
    (one that fails to attach is reported, the others go on). Ends when every process has
    exited (unless following), on SIGINT/SIGTERM, or after the duration."""
    base = request.base()  # a bad spec or -f fails here, before anything attaches
    matcher = ProcessMatcher(match, retry_young=follow) if match is not None else None
    check_targets(pids)
    loop = TraceLoop(lambda pid: request.for_pid(pid, base), options, sched_auto=sched_auto, matcher=matcher,
                     follow=follow, log=log, on_attached=on_attached)
    try:
        with stop_on_signals(loop):
            for pid in pids:
                loop.attach(pid)
            if matcher is not None:
                loop.attach_matching()
                if not loop.live and not follow and not loop.stop_reason:
                    why = f" ({len(matcher.skipped)} matching processes are not a supported CPython)" \
                        if matcher.skipped else ""
                    fail = f" ({len(loop.failed)} failed to attach: {loop.failed[0]['reason']})" if loop.failed else ""
                    raise TraceError(f"no Python process matches --match {match!r}{why}{fail}")
                if not loop.live and log:
                    log(f"waiting for Python processes matching {match!r}")
            loop.run()
    finally:
        fleet = loop.close()
    return fleet


def format_fleet_footer(fleet: FleetResult) -> list[str]:
    """What the per-process tables do not say: who was left out, and where spans went."""
    lines = [f"\n{len(fleet.targets)} processes traced; stopped by: {fleet.stopped_by}"]
    for s in fleet.skipped:
        lines.append(f"skipped pid {s['pid']} ({s['command_line'][:60]}): {s['reason']}")
    for f in fleet.failed:
        lines.append(f"not traced pid {f['pid']} ({f['command_line'][:60]}): {f['reason']}")
    for name, info in fleet.exporters.items():
        lines.append(f"{name}: {info}")
    for w in fleet.warnings:
        lines.append(f"warning: {w}")
    return lines
