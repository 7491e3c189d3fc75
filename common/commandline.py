"""How the command lines end: expected failures as one line, never a traceback.

Usage errors (bad option values) exit 2; other expected failures (a missing file, a port in
use) exit 1 or their own code. Both print `<prog>: error: <what> <why>` on stderr.
"""

from __future__ import annotations

import sys

import click


def run(command: click.Command, prog_name: str, args: list[str] | None = None) -> None:
    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"{prog_name}: error: {exc.format_message()} (see '{prog_name} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"{prog_name}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:  # Ctrl+C before the program took over its signals
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
