"""The command line: `python main.py [command] [flags]`.

With no command it runs the MQTT app. Commands are named like Laravel's (`queue:work`,
`queue:failed`, `make:job`); the seed's `--queue-work` flag is `queue:work`. Each command lives
in its own module under `core.commands` with `HELP`, `configure(parser)` and
`async run(args, settings) -> int`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from core.errors import ConfigurationError
from core.log import configure_logging
from core.settings import Settings
from core.worker.options import ExitCode

__all__ = ["COMMANDS", "build_parser", "main"]

#: command name -> module under core.commands
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "queue:work": "work",
    "queue:stats": "stats",
    "queue:failed": "failed",
    "queue:failed:show": "failed",
    "queue:retry": "failed",
    "queue:forget": "failed",
    "queue:flush": "failed",
    "queue:prune-failed": "failed",
    "queue:clear": "stats",
    "queue:restart": "restart",
    "queue:migrate": "migrate",
    "make:job": "make_job",
}


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"core.commands.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `only` that one.

    Each command's module is imported to add its flags; running one command imports only its
    own (a Redis worker never loads SQLAlchemy or the MQTT client), so processes start fast.
    """
    parser = argparse.ArgumentParser(
        prog="python main.py",
        description="Topiq: MQTT routes that dispatch jobs, and the workers that run them. "
        "With no command, runs the MQTT app (`serve`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--env-file", default=".env", help="settings file to read (default: .env; environment wins)"
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    details = []
    for name in COMMANDS if only is None else [only]:
        module = _module(name)
        helps: dict[str, str] = module.HELP
        command = sub.add_parser(name, help=helps[name], description=helps[name])
        module.configure(name, command)
        details.append(command.format_usage().replace("usage: ", "  ", 1).rstrip())
    parser.epilog = (
        "every command and its flags:\n"
        + "\n".join(details)
        + (
            "\n\nthe seed's form `python main.py --queue-work [flags]` is `queue:work [flags]`."
            "\n`python main.py COMMAND --help` explains each flag."
        )
    )
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """Put the command first (after global options); no command means `serve`.

    The seed runs workers with a flag (`python main.py --queue-work --queue emails`): that is
    `queue:work`.
    """
    position = 0
    while position < len(argv) and argv[position] == "--env-file":
        position += 2
    rest = argv[position:]
    if "--queue-work" in rest:
        rest = ["queue:work", *(a for a in rest if a != "--queue-work")]
    elif not rest or (rest[0] not in COMMANDS and rest[0] not in ("-h", "--help")):
        rest = ["serve", *rest]
    return [*argv[:position], *rest]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the settings once, run the command; returns the exit code."""
    args_list = _normalise(list(sys.argv[1:] if argv is None else argv))
    # _normalise put the command first (after global options); `--help` alone has none.
    parser = build_parser(next((a for a in args_list if a in COMMANDS), None))
    args = parser.parse_args(args_list)
    command: str = args.command
    try:
        settings = Settings.load(env_file=args.env_file)
    except ConfigurationError as exc:
        print(f"topiq: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(settings)
    module = _module(command)
    try:
        code: int = asyncio.run(module.run(command, args, settings))
    except ConfigurationError as exc:
        print(f"topiq: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.OK
    return code
