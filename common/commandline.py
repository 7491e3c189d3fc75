"""How the command lines end: expected failures as one line, never a traceback.

Usage errors (bad option values) exit 2; other expected failures (a missing file, a port in
use) exit 1 or their own code. Both print `<prog>: error: <what> <why>` on stderr, or, when the
command line or environment asks for `--log-format=json`, one JSON log line with level "error".
"""

from __future__ import annotations

import os
import sys
import time

import click
import orjson

from .timefmt import rfc3339


def _wants_json(args: list[str], env_name: str | None) -> bool:
    fmt = os.environ.get(env_name, "") if env_name else ""
    for i, arg in enumerate(args):
        if arg.startswith("--log-format="):
            fmt = arg.partition("=")[2]
        elif arg == "--log-format" and i + 1 < len(args):
            fmt = args[i + 1]
    return fmt == "json"


def _error(prog_name: str, message: str, as_json: bool) -> None:
    if as_json:
        line = {"time": rfc3339(time.time(), 3), "level": "error", "component": prog_name, "worker": None, "logger": prog_name, "message": message}
        click.echo(orjson.dumps(line).decode(), err=True)
    else:
        click.echo(f"{prog_name}: error: {message}", err=True)


def run(command: click.Command, prog_name: str, args: list[str] | None = None, log_format_env: str | None = None) -> None:
    as_json = _wants_json(sys.argv[1:] if args is None else args, log_format_env)
    try:
        code = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        _error(prog_name, f"{exc.format_message()} (see '{prog_name} --help')", as_json)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _error(prog_name, exc.format_message(), as_json)
        sys.exit(exc.exit_code)
    except click.Abort:  # Ctrl+C before the program took over its signals
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
