"""`dashboard`: the web dashboard (Starlette + uvicorn).

    python main.py dashboard                       # http://127.0.0.1:8000/
    python main.py dashboard --host 0.0.0.0 --port 8080    # needs DASHBOARD_TOKEN

Bound off loopback it refuses to start without `DASHBOARD_TOKEN`: the dashboard can retry,
cancel and delete jobs, and shows their payloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from core.commands._common import add_connection_flag, positive_int
from core.settings import QueueConnection, Settings
from core.worker.options import ExitCode

HELP = {"dashboard": "serve the web dashboard: queues, jobs, workers, failed jobs, metrics"}

logger = logging.getLogger("topiq.dashboard")


def _port(text: str) -> int:
    port = positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1 to 65535, got {text!r}")
    return port


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add the flags of the command."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other than loopback needs "
        "DASHBOARD_TOKEN)",
    )
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    add_connection_flag(parser)


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Serve the dashboard until SIGTERM or SIGINT; returns the exit code."""
    from core.dashboard import create_app, is_loopback
    from core.dashboard.security import MIN_TOKEN_LENGTH

    token = settings.dashboard_token.get_secret_value()
    if not token and not is_loopback(args.host):
        print(
            f"topiq: refusing to serve the dashboard on {args.host} without a token: anyone "
            "who can reach it could retry, cancel and delete jobs and read their payloads. "
            "Set DASHBOARD_TOKEN, or bind to 127.0.0.1 (the default).",
            file=sys.stderr,
        )
        return ExitCode.ERROR
    if token and len(token) < MIN_TOKEN_LENGTH and not is_loopback(args.host):
        print(
            f"topiq: refusing to serve the dashboard on {args.host} with a DASHBOARD_TOKEN of "
            f"{len(token)} characters: off loopback it must have at least {MIN_TOKEN_LENGTH} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`).",
            file=sys.stderr,
        )
        return ExitCode.ERROR
    if args.connection is not None:
        try:
            chosen = QueueConnection(args.connection)
        except ValueError:
            known = ", ".join(c.value for c in QueueConnection)
            print(
                f"topiq: unknown queue connection {args.connection!r}: must be one of {known}",
                file=sys.stderr,
            )
            return ExitCode.USAGE
        # The default connection of every page (`?connection=` still picks another).
        settings = settings.model_copy(update={"queue_connection": chosen})
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,  # our logging, configured by the CLI
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    stops = (signal.SIGTERM, signal.SIGINT)
    for sig in stops:
        loop.add_signal_handler(sig, server.stop)
    try:
        serving = asyncio.create_task(server.serve(), name="dashboard-server")
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait((serving, listening), return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if server.started:
            where = f"[{args.host}]" if ":" in args.host else args.host
            login = "token required" if token else "no token: loopback only"
            print(f"dashboard on http://{where}:{args.port}/ ({login})", flush=True)
        await serving
        if not server.started:
            print(f"topiq: the dashboard cannot listen on {args.host}:{args.port}", file=sys.stderr)
            return ExitCode.ERROR
    finally:
        for sig in stops:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return ExitCode.OK


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by our signal handlers: uvicorn's own re-raise SIGTERM
    after shutting down, which would end the process with 143 instead of 0."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn's answer to a port it cannot bind (it logged why, and ran the app's
            # shutdown): out of a task, SystemExit would escape the event loop as a traceback.
            self.should_exit = True
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def stop(self) -> None:
        self.should_exit = True
