"""The command line: `python main.py [command] [flags]`.

With no command it runs the MQTT app. Commands are named like Laravel's (`queue:work`,
`queue:failed`, `make:job`); the seed's `--queue-work` flag is `queue:work`. Each command lives
in its own module under `core.commands` with `HELP`, `configure(parser)` and
`async run(args, settings) -> int`.

The installed `topiq` command is the same program. Both read `.env` in the project directory:
`TOPIQ_HOME` when it is set (the program then runs there, so relative paths such as
`DB_SQLITE_PATH` mean what they mean for `python main.py` run in that directory), else the
current directory. A misspelt command or flag gets the command's usage and the close name.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import gc
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from core.errors import ConfigurationError
from core.worker.options import ExitCode

if TYPE_CHECKING:
    from core.settings import Settings

# The settings (pydantic), the logging set-up and the loop are imported by `main`, under
# `_collector_paused`: `import core.cli` (the installed `topiq` command's first step) stays
# cheap, and the start-up's imports all happen with the collector off.

__all__ = ["COMMANDS", "build_parser", "main"]

#: command name -> module under core.commands
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "queue:work": "work",
    "queue:stats": "stats",
    "queue:job": "jobs",
    "queue:cancel": "jobs",
    "queue:prune": "jobs",
    "queue:failed": "failed",
    "queue:failed:show": "failed",
    "queue:retry": "failed",
    "queue:forget": "failed",
    "queue:flush": "failed",
    "queue:prune-failed": "failed",
    "queue:clear": "stats",
    "queue:restart": "restart",
    "queue:pause": "pause",
    "queue:resume": "pause",
    "health": "health",
    "dashboard": "dashboard",
    "queue:migrate": "migrate",
    "queue:import-routemq": "import_routemq",
    "make:job": "make_job",
    "schedule:list": "schedule",
    "schedule:run": "schedule",
}


logger = logging.getLogger("topiq.settings")


def _prog() -> str:
    """How the user ran us: `topiq` (the installed command) or `python main.py`."""
    return "topiq" if Path(sys.argv[0]).name == "topiq" else "python main.py"


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"core.commands.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `only` that one.

    Each command's module is imported to add its flags; running one command imports only its
    own (a Redis worker never loads SQLAlchemy or the MQTT client), so processes start fast.
    """
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="Topiq: MQTT routes that dispatch jobs, and the workers that run them. "
        "With no command, runs the MQTT app (`serve`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # Whole flags only: `--max-job` must be told it is not `--max-jobs`, not taken as it.
        allow_abbrev=False,
    )
    parser.add_argument(
        "--env-file",
        default=None,
        help="settings file to read; it must exist (default: .env in TOPIQ_HOME or the "
        "current directory, if there is one; the environment wins)",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    details = []
    for name in COMMANDS if only is None else [only]:
        module = _module(name)
        helps: dict[str, str] = module.HELP
        command = sub.add_parser(
            name, help=helps[name], description=helps[name], allow_abbrev=False
        )
        module.configure(name, command)
        details.append(command.format_usage().replace("usage: ", "  ", 1).rstrip())
    parser.epilog = (
        "every command and its flags:\n"
        + "\n".join(details)
        + (
            f"\n\nthe seed's form `{parser.prog} --queue-work [flags]` is `queue:work [flags]`."
            f"\n`{parser.prog} COMMAND --help` explains each flag."
        )
    )
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """Put the command first (after global options); no command means `serve`.

    The seed runs workers with a flag (`python main.py --queue-work --queue emails`): that is
    `queue:work`.
    """
    position = _global_options_end(argv)
    rest = argv[position:]
    if "--queue-work" in rest:
        rest = ["queue:work", *(a for a in rest if a != "--queue-work")]
    elif not rest or (rest[0] not in COMMANDS and rest[0] not in ("-h", "--help")):
        rest = ["serve", *rest]
    return [*argv[:position], *rest]


def _global_options_end(argv: Sequence[str]) -> int:
    """Where the command starts: after `--env-file PATH` (or `--env-file=PATH`)."""
    position = 0
    while position < len(argv):
        if argv[position] == "--env-file":
            position += 2
        elif argv[position].startswith("--env-file="):
            position += 1
        else:
            break
    return min(position, len(argv))


#: Other queues' flags that Topiq spells differently and no close name would suggest:
#: flag -> (Topiq's flag, which the command must have; the hint). Masonite's `--driver`.
_RENAMED = {
    "--driver": (
        "--connection",
        "Topiq's connection is the driver: --connection redis, database or memory",
    ),
}


def _suggest(word: str, choices: Sequence[str]) -> str:
    """`; did you mean X?` for the closest of `choices`, a renamed flag's hint, or nothing."""
    if word in _RENAMED and _RENAMED[word][0] in choices:
        return f"; {_RENAMED[word][1]}"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def _unknown_command(word: str) -> int:
    """A word in the command's place that is not a command: the close one's usage, or the list."""
    close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    if close:
        sys.stderr.write(_subparser(build_parser(close[0]), close[0]).format_usage())
        print(f"topiq: unknown command {word!r}; did you mean {close[0]}?", file=sys.stderr)
    else:
        print(
            f"topiq: unknown command {word!r}; the commands are {', '.join(COMMANDS)} "
            f"(`{_prog()} --help` explains them)",
            file=sys.stderr,
        )
    return ExitCode.USAGE


def _unrecognised(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> int:
    """Flags the command does not have: its usage and, per flag, the close one."""
    sub = _subparser(parser, command)
    known = [flag for action in sub._actions for flag in action.option_strings]
    known += ["--env-file", *(["--queue-work"] if command == "serve" else [])]
    flags = [token.split("=", 1)[0] for token in extras if token.startswith("-")]
    if flags:
        what = "; ".join(f"unknown flag {flag}{_suggest(flag, known)}" for flag in flags)
    else:
        what = f"unexpected argument(s) {' '.join(extras)}"
    sys.stderr.write(sub.format_usage())
    print(
        f"topiq {command}: {what} (`{_prog()} {command} --help` lists its flags)",
        file=sys.stderr,
    )
    return ExitCode.USAGE


def _settings_file(given: str | None, *, process: bool) -> Path | None:
    """The settings file to read, after moving to `TOPIQ_HOME` if it is set.

    An explicit `--env-file` must exist (`/dev/null` reads none); the default `.env` is
    optional. Run as the installed `topiq` command (`process`), the project directory is put
    first on the import path, as `python main.py` has its own directory there, so `app.*` is
    the project's.

    Raises:
        ConfigurationError: `--env-file` or `TOPIQ_HOME` names nothing usable.
    """
    path: Path | None = None
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise ConfigurationError(f"--env-file {given}: no such file")
        if path.is_dir():
            raise ConfigurationError(f"--env-file {given}: a directory, not a settings file")
        path = path.absolute()  # before a move to TOPIQ_HOME
    from core.settings import project_home

    project = project_home()
    if project is not None:
        os.chdir(project)
    if process and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if path is None and Path(".env").is_file():
        path = Path(".env").absolute()
    return path


def settings_source(path: Path | None) -> str:
    """Which settings a start line says it read: the file, or the environment alone."""
    if path is not None:
        return str(path)
    return f"the environment and defaults (no .env in {os.getcwd()})"


def _start_line(args: argparse.Namespace, settings: Settings) -> None:
    """`serve`'s first line: where jobs go and which broker, without passwords."""
    from core.settings import QueueConnection, queue_location, redact_url

    connection = settings.queue_connection
    failed = settings.failed_connection_for[connection]
    if settings.mqtt_url:
        broker = redact_url(settings.mqtt_url)
    elif settings.mqtt_host:
        broker = f"{settings.mqtt_host}:{settings.mqtt_port}"
    else:
        broker = "the embedded broker"
    logging.getLogger("topiq.serve").info(
        "app starting: jobs go to the %s queue at %s%s; MQTT broker %s; settings from %s",
        connection.value,
        queue_location(settings, connection),
        ""
        if failed is connection or connection is QueueConnection.SYNC
        else f" (failed jobs: {failed.value} at {queue_location(settings, failed)})",
        broker,
        args.settings_from,
    )


def _env_file_first(raw: list[str]) -> list[str]:
    """`--env-file` is a global option; written after the command it means the same."""
    moved: list[str] = []
    rest: list[str] = []
    tokens = iter(raw)
    for token in tokens:
        if token == "--env-file":
            moved += [token, *[value for value in [next(tokens, None)] if value is not None]]
        elif token.startswith("--env-file="):
            moved.append(token)
        else:
            rest.append(token)
    return moved + rest


@contextlib.contextmanager
def _collector_paused(pause: bool) -> Iterator[None]:
    """Start-up with the garbage collector off (when `pause`, and it is on).

    A command's start-up makes some hundred thousand objects that live as long as the process
    (modules, classes, the settings) and next to no garbage, yet the collector walks them over
    and over while modules load: about a tenth of a worker's start to its first job. On the
    way out they are frozen (`gc.freeze`: set aside for good, so later full collections of a
    long-running worker skip them too) and the collector is back on, whatever happened.
    Only for the process's own command line: a caller of `main(argv)` (a test, a script) keeps
    its collector as it is.
    """
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the settings once, run the command; returns the exit code."""
    with _collector_paused(argv is None):
        started = _start(argv)
    if isinstance(started, int):
        return started
    module, command, args, settings = started
    from core.loop import run as run_loop

    try:
        code: int = run_loop(module.run(command, args, settings), settings.event_loop)
    except ConfigurationError as exc:
        print(f"topiq: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.OK
    return code


def _start(
    argv: Sequence[str] | None,
) -> int | tuple[ModuleType, str, argparse.Namespace, Settings]:
    """Everything before the command runs: parse, read the settings, set up logging, import
    the command (and what it says it will need, its `preload`). An exit code when the command
    line or the settings are wrong, else what `main` runs."""
    raw = _env_file_first(list(sys.argv[1:] if argv is None else argv))
    position = _global_options_end(raw)
    if position < len(raw) and not raw[position].startswith("-") and raw[position] not in COMMANDS:
        return _unknown_command(raw[position])
    args_list = _normalise(raw)
    # _normalise put the command first (after global options); `--help` alone has none.
    parser = build_parser(next((a for a in args_list if a in COMMANDS), None))
    args, extras = parser.parse_known_args(args_list)
    command: str = args.command
    if extras:
        return _unrecognised(parser, command, extras)
    from core.log import configure_logging
    from core.settings import Settings, settings_warnings

    try:
        installed = argv is None and _prog() == "topiq"
        args.settings_file = _settings_file(args.env_file, process=installed)
        settings = Settings.load(env_file=args.settings_file)
        args.settings_from = settings_source(args.settings_file)  # for the start lines
    except ConfigurationError as exc:
        print(f"topiq: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(settings)
    for line in settings_warnings(settings, args.settings_file):
        logger.warning("%s", line)
    if command == "serve":
        _start_line(args, settings)
    module = _module(command)
    preload = getattr(module, "preload", None)
    if preload is not None:
        preload(command, args, settings)
    return module, command, args, settings
