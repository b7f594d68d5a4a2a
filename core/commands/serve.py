"""`serve` (the default command, `python main.py`): run the MQTT app.

With no broker configured (`MQTT_HOST` and `MQTT_URL` unset) it starts the embedded broker on
127.0.0.1:`MQTT_EMBEDDED_PORT`, or on a free port (named in the log) when that one is taken.
`--worker` runs a worker in the same process, `--simulate N` adds simulated devices, `--demo`
is both plus a live status table, and a watch on the devices' status topics
(`devices/+/status`): each job outcome published there is logged, the table counts them and
checks that each device's outcomes come in the order the device numbered its reports; it also
shows how many reports the queue coalesced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable
from typing import Any

import orjson

from core.commands._common import positive_int, positive_seconds
from core.commands._endpoint import add_endpoint_flags
from core.errors import ConfigurationError
from core.mqtt import publisher
from core.mqtt.app import MqttApp
from core.mqtt.broker import EmbeddedBroker
from core.mqtt.client import PublishConnection
from core.mqtt.dashboard import Dashboard, JobCounts
from core.mqtt.endpoint import sync_handlers_running
from core.mqtt.errors import BrokerStartError, PublishError
from core.mqtt.message import IncomingMessage
from core.mqtt.options import ConnectionOptions
from core.mqtt.routing import Router
from core.mqtt.simulator import DeviceSimulator
from core.mqtt.stats import MqttStats
from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import QueueConnection, Settings
from core.worker.options import ExitCode, StopReason, WorkerOptions
from core.worker.worker import Worker, exit_code

HELP = {"serve": "run the MQTT app (the default command; --demo shows the whole flow)"}

logger = logging.getLogger("topiq.serve")

DEMO_DEVICES = 3
#: Where the demo app (app/routes.py) publishes the outcomes of the devices' state jobs.
DEMO_STATUS_TOPICS = "devices/+/status"


class StatusWatch:
    """What the demo shows of the IoT features: the job outcomes published on the devices'
    status topics (logged, counted, and checked to come in each device's order: a `result`
    with a `seq` never goes back for its device), and the queue's coalesced count."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.connection = PublishConnection(
            options.replace(client_id=f"{options.client_id}-status-watch")
        )
        self.outcomes = 0
        self.out_of_order = 0
        self.coalesced = 0
        self._last: dict[str, int] = {}

    async def start(self) -> None:
        try:
            await self.connection.listen(DEMO_STATUS_TOPICS, self.on_message)
        except PublishError as exc:
            logger.warning("the demo cannot watch %s: %s", DEMO_STATUS_TOPICS, exc)

    def on_message(self, message: IncomingMessage) -> None:
        try:
            outcome: Any = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(outcome, dict):
            return
        self.outcomes += 1
        result = outcome.get("result")
        seq = result.get("seq") if isinstance(result, dict) else None
        note = ""
        if isinstance(seq, int):
            device = message.topic
            last = self._last.get(device)
            if last is not None and seq <= last:
                self.out_of_order += 1
                note = f" OUT OF ORDER (after #{last})"
            elif last is not None and seq > last + 1:
                note = f" (#{last + 1}..#{seq - 1} coalesced into it)"
            self._last[device] = seq
        logger.info(
            "%s: job %s %s%s%s",
            message.topic,
            str(outcome.get("job", "?")).rpartition(":")[2],  # the class name
            outcome.get("status", "?"),
            f", state #{seq}" if seq is not None else "",
            note,
        )

    def rows(self) -> list[tuple[str, str, int]]:
        return [
            ("reports coalesced (queue)", "coalesced", self.coalesced),
            (f"outcomes on {DEMO_STATUS_TOPICS}", "status_outcomes", self.outcomes),
            ("outcomes out of device order", "out_of_order", self.out_of_order),
        ]

    async def close(self) -> None:
        await self.connection.close()


def configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Add `serve`'s flags."""
    parser.add_argument(
        "--app",
        default="app.routes",
        metavar="MODULE",
        help="module defining `router` (or MODULE:NAME for another name; default: app.routes)",
    )
    parser.add_argument(
        "--worker",
        action="store_true",
        help="also run a queue worker in this process (development)",
    )
    parser.add_argument(
        "--simulate", type=positive_int, default=0, metavar="N", help="start N simulated devices"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help=f"--worker --simulate {DEMO_DEVICES} and a live status table",
    )
    add_endpoint_flags(parser)
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="S",
        help="stop after S seconds (for scripts and CI)",
    )


def load_router(spec: str) -> Router:
    """The `Router` named by `module` or `module:attribute`.

    Raises:
        ConfigurationError: the module cannot be imported or has no router.
    """
    module_name, _, attribute = spec.partition(":")
    attribute = attribute or "router"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--app {spec}: cannot import {module_name}: {exc}") from exc
    router = getattr(module, attribute, None)
    if not isinstance(router, Router):
        raise ConfigurationError(
            f"--app {spec}: {module_name} has no Router named {attribute!r} "
            "(define `router = Router()` there)"
        )
    return router


async def run(name: str, args: argparse.Namespace, settings: Settings) -> int:
    """Run the app until SIGTERM/SIGINT or `--duration`; exit code 0 on a clean stop."""
    router = load_router(args.app)
    with_worker = args.worker or args.demo
    devices = args.simulate or (DEMO_DEVICES if args.demo else 0)
    options = ConnectionOptions.from_settings(settings)
    QueueManager(settings).driver()  # an unknown connection or missing library fails at start
    if not with_worker and settings.queue_connection is QueueConnection.MEMORY:
        logger.warning(
            "QUEUE_CONNECTION=memory without --worker: jobs dispatched here are never run"
        )
    async with contextlib.AsyncExitStack() as stack:
        if options.embedded:
            try:
                # Only the default port (1883, often a running Mosquitto's) may move: another
                # one was chosen on purpose, and devices are told it, so it is kept or the
                # start fails.
                default = Settings.model_fields["mqtt_embedded_port"].default
                chosen = settings.mqtt_embedded_port != default
                broker = await stack.enter_async_context(
                    EmbeddedBroker(options.host, options.port, fallback=not chosen)
                )
            except BrokerStartError as exc:
                print(f"topiq: {exc}", file=sys.stderr)
                return ExitCode.ERROR
            if broker.port != options.port:
                # Its own port was taken: everything in this process that connects follows it
                # (the app, the devices, and jobs that publish after the app has stopped).
                settings = settings.model_copy(update={"mqtt_embedded_port": broker.port})
                options = options.replace(port=broker.port)
        manager = await stack.enter_async_context(QueueManager(settings))
        stats = MqttStats(manager=manager)
        set_default_manager(manager)
        stack.callback(set_default_manager, None)
        # Closed before the broker stops, so it disconnects cleanly.
        stack.push_async_callback(publisher.close)
        workers: list[Worker] = []  # the one `_serve` starts with --worker, for the metrics
        if args.metrics_port is not None:
            from core.observe_http import app_endpoint

            await stack.enter_async_context(
                app_endpoint(
                    stats,
                    manager,
                    None,
                    args.metrics_host,
                    args.metrics_port,
                    worker=lambda: workers[0] if workers else None,
                )
            )
        code = await _serve(
            router, settings, options, stats, manager, with_worker, devices, args, workers
        )
    stuck = sync_handlers_running()
    if stuck:
        # A plain `def` handler outlived the grace period; a thread cannot be cancelled and the
        # interpreter would wait for it forever. Its message was not acknowledged: the broker
        # sends it again to the next app.
        logger.critical(
            "%d plain `def` handler(s) still running after the grace period; ending the "
            "process (exit code %d)",
            stuck,
            code,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)
    return code


async def _serve(
    router: Router,
    settings: Settings,
    options: ConnectionOptions,
    stats: MqttStats,
    manager: QueueManager,
    with_worker: bool,
    devices: int,
    args: argparse.Namespace,
    workers: list[Worker],
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    app = MqttApp(router, settings, options=options, stats=stats)
    app_task = asyncio.create_task(app.run(), name="topiq-mqtt-app")

    worker: Worker | None = None
    worker_task: asyncio.Task[StopReason] | None = None
    if with_worker:
        worker = Worker(
            manager,
            WorkerOptions(
                queues=(settings.queue_default,),
                concurrency=settings.worker_concurrency,
                sleep=settings.worker_sleep,
                grace=settings.worker_grace,
                handle_signals=False,  # ours (below) stop the app and the worker together
            ),
        )
        workers.append(worker)
        worker_task = asyncio.create_task(worker.run(), name="topiq-worker")

    simulator: DeviceSimulator | None = None
    simulator_task: asyncio.Task[None] | None = None
    if devices:
        simulator = DeviceSimulator(options, devices)

    dashboard: Dashboard | None = None
    dashboard_task: asyncio.Task[None] | None = None
    watch: StatusWatch | None = None
    if args.demo and worker is not None:
        counts = worker.counts
        watch = StatusWatch(options)
        demo_watch = watch

        async def tally() -> JobCounts:
            [queue] = await manager.stats(settings.queue_default)
            demo_watch.coalesced = queue.coalesced
            return JobCounts(done=counts.done, retried=counts.retried, failed=counts.failed)

        dashboard = Dashboard(
            stats,
            tally,
            sent=(lambda: simulator.sent) if simulator else None,
            extra=watch.rows,
        )
        dashboard_task = asyncio.create_task(dashboard.run(), name="topiq-dashboard")

    def on_signal() -> None:
        if stop.is_set() and worker is not None:
            worker.stop()  # a second signal: skip the worker's grace period
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    timed_out = asyncio.Event()

    def on_duration() -> None:
        timed_out.set()
        stop.set()

    timer = loop.call_later(args.duration, on_duration) if args.duration else None
    try:
        if simulator is not None:
            # Devices start once the app listens, so the first readings are not missed.
            await _first(app.wait_ready(), stop.wait())
            if watch is not None and not stop.is_set():
                await _first(watch.start(), stop.wait())
            if not stop.is_set():
                simulator_task = asyncio.create_task(simulator.run(), name="topiq-simulator")
        await _first(stop.wait(), app_task, *([worker_task] if worker_task else []))
    finally:
        if timer is not None:
            timer.cancel()
        logger.info("stopping")
        if simulator is not None and simulator_task is not None:
            simulator.stop()
            await asyncio.gather(simulator_task, return_exceptions=True)
        app.stop()
        await asyncio.gather(app_task, return_exceptions=True)
        if worker is not None and worker_task is not None:
            worker.stop(StopReason.MAX_TIME if timed_out.is_set() else StopReason.SIGNAL)
            await asyncio.gather(worker_task, return_exceptions=True)
        if dashboard is not None and dashboard_task is not None:
            dashboard.stop()
            await asyncio.gather(dashboard_task, return_exceptions=True)
        if watch is not None:
            await watch.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    for what, task in (("the MQTT app", app_task), ("the worker", worker_task)):
        error = None if task is None or task.cancelled() else task.exception()
        if error is not None:
            logger.error("%s stopped on an error", what, exc_info=error)
            return ExitCode.ERROR
    if worker is not None and worker_task is not None and not worker_task.cancelled():
        # A job that would not stop was given up: exit as `queue:work` does (code 4, and at
        # once if that job still runs) so that supervisord starts a fresh process.
        return exit_code(worker, worker_task.result())
    return ExitCode.OK


async def _first(*waitables: Awaitable[object]) -> None:
    """Return when the first of several coroutines or tasks finishes; cancel the coroutines."""
    futures: list[asyncio.Future[object]] = []
    owned: list[asyncio.Future[object]] = []
    for waitable in waitables:
        if isinstance(waitable, asyncio.Future):
            futures.append(waitable)
        else:
            started = asyncio.ensure_future(waitable)
            owned.append(started)
            futures.append(started)
    try:
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in owned:
            future.cancel()
