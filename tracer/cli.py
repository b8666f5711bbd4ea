"""The command line. Thin: parse, call into the stages, print, map errors to exit codes."""

from __future__ import annotations

import sys
from importlib import import_module

import click

from . import __version__
from .errors import TraceError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="ophamin-trace")
def cli() -> None:
    """Trace a running CPython process from outside with eBPF.

    \b
    Examples:
      sudo ophamin-trace --pid 4242 --spec reference --output spans.jsonl
      sudo ophamin-trace --spec reference -- python -m tracer.reference --cycles 10
      sudo ophamin-trace doctor
      sudo ophamin-trace probes --pid 4242
    """


# Subcommands live beside the stage they drive; each entry is (module, click command name).
# ---- subcommands ----------------------------------------------------------------------
COMMANDS: tuple[tuple[str, str], ...] = (
    (".doctor", "doctor"),
    (".commands", "trace_cmd"), (".commands", "probes_cmd"), (".commands", "validate_cmd"),
    (".report.cli", "report"), (".report.cli", "drift_cmd"),
    (".compare.command", "parity"),
    (".correlate.profile", "profile_command"),
)

for _mod, _attr in COMMANDS:
    cli.add_command(getattr(import_module(_mod, __package__), _attr))


# ---- entry point ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """`ophamin-trace [trace options]` traces; `ophamin-trace SUBCOMMAND ...` runs one."""
    args = list(sys.argv[1:] if argv is None else argv)
    first = args[0] if args else "--help"
    if first not in cli.commands and first not in ("--help", "-h", "--version") and "trace" in cli.commands:
        args = ["trace", *args]
    try:
        # standalone_mode=False returns ctx.exit(n)'s code instead of raising: honour it.
        rc = cli.main(args=args, prog_name="ophamin-trace", standalone_mode=False)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except TraceError as e:
        click.echo(f"ophamin-trace: error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("ophamin-trace: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
