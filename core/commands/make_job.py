"""`make:job Name`: write a new job class from a template, like Masonite's `craft job`.

    python main.py make:job SendWelcomeEmail
    -> app/jobs/send_welcome_email_job.py with class SendWelcomeEmailJob

The template is `core/templates/job.py.tmpl`; an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import re
from importlib import resources
from pathlib import Path
from string import Template

from core.commands._common import CommandFailed, add_json_flag, guarded, queue_name, say
from core.settings import Settings

HELP = {"make:job": "create app/jobs/<name>_job.py with a new Job class"}

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\Z")
# A word boundary inside a CamelCase name: before an upper-case letter that follows a lower-case
# letter or digit, and before the last capital of an acronym (HTTPRequest -> HTTP_Request).
_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of `make:job`."""
    parser.add_argument("name", help="the job's name, e.g. SendWelcomeEmail or send_welcome_email")
    parser.add_argument(
        "--queue", type=queue_name, default="default", help="the job's queue (default: default)"
    )
    parser.add_argument(
        "--directory",
        type=Path,
        default=Path("app/jobs"),
        help="where to write it (default: app/jobs, relative to the project directory)",
    )
    add_json_flag(parser)


def names(name: str) -> tuple[str, str]:
    """The class and module names for `name`: `send_email` -> `SendEmailJob`, `send_email_job`.

    Raises:
        CommandFailed: `name` cannot be a Python class name.
    """
    if not _NAME.match(name):
        raise CommandFailed(
            f"invalid job name {name!r}: use letters, digits and underscores, "
            "starting with a letter (e.g. SendWelcomeEmail)"
        )
    if "_" in name or name.islower():
        name = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
    class_name = name if name.endswith("Job") else f"{name}Job"
    module = _BOUNDARY.sub("_", class_name).lower()
    return class_name, module


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Write the job file; refuses to overwrite one that exists. Returns the exit code."""
    return await guarded(_make(args))


async def _make(args: argparse.Namespace) -> int:
    class_name, module = names(args.name)
    path = args.directory / f"{module}.py"
    if path.exists():
        raise CommandFailed(f"{path} already exists; not overwriting it")
    template = resources.files("core").joinpath("templates/job.py.tmpl").read_text("utf-8")
    source = Template(template).substitute(class_name=class_name, queue=args.queue)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "x": fail rather than overwrite a file created since the check above.
    try:
        with path.open("x", encoding="utf-8") as out:
            out.write(source)
    except FileExistsError:
        raise CommandFailed(f"{path} already exists; not overwriting it") from None
    say(
        args,
        f"Created {path} (class {class_name}). Dispatch it with "
        f"`await dispatch({class_name}(...))`.",
        {"path": str(path), "class": class_name, "module": module},
    )
    return 0
