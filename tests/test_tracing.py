"""OpenTelemetry traces (issue #15 point 4, core/tracing.py): one trace from an MQTT message on
the real Mosquitto through dispatch to the job's run (memory and Redis), the tries of a retried
job in the trace of its dispatch, a payload whose "trace" lies running untraced and unharmed,
the context crossing into a real worker process, and nothing at all (no payload key, no import)
in a process that configured no tracer provider or cannot import OpenTelemetry.

The global tracer provider can be set once per process: this module sets one for the whole
pytest session, whose sampler records only while a test of this module holds the `spans`
fixture (other tests then get non-recording spans: no payload key, nothing exported).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

pytest.importorskip("opentelemetry.sdk.trace", reason="the `otel` extra is not installed")

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

from core import tracing
from core.mqtt import MqttApp, Router
from core.queue.drivers.base import OutgoingJob
from core.queue.payload import encode
from core.queue.queue_manager import QueueManager, chain
from core.worker.options import WorkerOptions
from core.worker.worker import Worker
from tests.conftest import ROOT, Backend, _backend, docs_example, guide_section
from tests.mqtt.conftest import Broker, mosquitto_pub, running
from tests.processes import WorkerProcess, wait_until
from tests.servers import private_mosquitto
from tests.tracing_jobs import FailsFirst, Traced, span_line

pytestmark = pytest.mark.timeout(90)

#: A device's context, as it would send it in its MQTT 5 user properties.
DEVICE_TRACE = "0af7651916cd43dd8448eb211c80319c"
DEVICE_SPAN = "b7ad6b7169203331"
DEVICE_PARENT = f"00-{DEVICE_TRACE}-{DEVICE_SPAN}-01"


class _Switch(Sampler):
    """Records every span while `on`, none otherwise; keeps the parent's tracestate."""

    on = False

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(
            Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP,
            attributes,
            parent.trace_state if parent.is_valid else None,
        )

    def get_description(self) -> str:
        return "tests.test_tracing switch"


SWITCH = _Switch()
EXPORTER = InMemorySpanExporter()
_PROVIDER: list[TracerProvider] = []


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans this test records (the session's provider, installed on first use)."""
    if not _PROVIDER:
        current = trace.get_tracer_provider()
        if not isinstance(current, trace.ProxyTracerProvider):
            pytest.skip(f"another tracer provider is set in this process: {current!r}")
        provider = TracerProvider(sampler=SWITCH)
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
        _PROVIDER.append(provider)
    assert tracing.tracer() is not None
    EXPORTER.clear()
    SWITCH.on = True
    try:
        yield EXPORTER
    finally:
        SWITCH.on = False
        EXPORTER.clear()


def hexid(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.startswith(prefix)]


async def until_spans(
    exporter: InMemorySpanExporter, prefix: str, count: int = 1, timeout: float = 20
) -> list[ReadableSpan]:
    """The finished spans named `prefix...`, once there are `count` of them. Spans end in this
    process's event loop with nothing to await on: checked every 10 ms, bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(found := named(exporter, prefix)) < count:
        assert loop.time() < deadline, (
            f"{count} span(s) {prefix!r} not seen within {timeout}s; finished: "
            f"{[s.name for s in exporter.get_finished_spans()]}"
        )
        await asyncio.sleep(0.01)
    return found


@asynccontextmanager
async def worker(manager: QueueManager, queue: str) -> AsyncIterator[Worker]:
    """A worker on `queue` in this process until the block ends."""
    running_worker = Worker(
        manager, WorkerOptions(queues=(queue,), sleep=0.05, grace=5, handle_signals=False)
    )
    task = asyncio.create_task(running_worker.run())
    try:
        yield running_worker
    finally:
        running_worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def broker() -> Broker:
    """The session's own Mosquitto (tests/servers.py)."""
    server = private_mosquitto()
    if server is None:
        pytest.skip("mosquitto is not installed; `scripts/services up` installs it")
    return Broker("127.0.0.1", server.port)


@pytest.fixture(params=["memory", "redis"])
def queue_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request.param, request, tmp_path)


# -- off: nothing written, nothing imported ---------------------------------------------------

_PROBE = """
import asyncio, json, sys
{prelude}
from core.queue.queue_manager import QueueManager
from core.settings import Settings
from tests.tracing_jobs import Traced

def settings(connection):
    return Settings.load(
        env_file=None, queue_connection=connection, queue_allowed_modules=("tests.",)
    )

async def main():
    async with QueueManager(settings("memory")) as qm:
        await qm.push(Traced(1), queue="probe")
        [job] = await (await qm.connection()).reserve(["probe"], 1, 30)
    async with QueueManager(settings("sync")) as qm:  # dispatched and run inline
        result = await (await qm.push(Traced(7))).result(5)
    loaded = sorted(m for m, v in sys.modules.items() if m.startswith("opentelemetry") and v)
    print(json.dumps({{"keys": sorted(json.loads(job.payload)), "result": result,
                      "loaded": loaded}}))

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "prelude",
    [
        "",  # installed, never configured
        # not importable: what a process without the `otel` extra sees
        "sys.modules['opentelemetry'] = None\n"
        "try:\n    import opentelemetry.trace\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('opentelemetry is still importable')",
    ],
    ids=["no-provider", "not-importable"],
)
def test_without_a_tracer_provider_no_payload_key_and_opentelemetry_is_never_imported(
    prelude: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "TOPIQ_TEST_TR"))}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(prelude=prelude)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "trace" not in seen["keys"] and "data" in seen["keys"]
    assert seen["result"] == 7
    assert seen["loaded"] == []


async def test_a_dispatch_whose_span_is_not_recorded_writes_no_trace_key(
    spans: InMemorySpanExporter,
) -> None:
    async with QueueManager(_backend_settings("memory")) as qm:
        SWITCH.on = False  # a provider is set, but its sampler drops the span
        await qm.push(Traced(1), queue="unsampled")
        SWITCH.on = True
        await qm.push(Traced(2), queue="unsampled")
        jobs = await (await qm.connection()).reserve(["unsampled"], 2, 30)
    envelopes = {orjson.loads(j.payload)["data"]["value"]: orjson.loads(j.payload) for j in jobs}
    assert "trace" not in envelopes[1]
    [dispatch] = named(spans, "dispatch ")
    ctx = dispatch.context
    assert envelopes[2]["trace"] == {
        "traceparent": f"00-{hexid(ctx.trace_id, 32)}-{hexid(ctx.span_id, 16)}-"
        f"{int(ctx.trace_flags):02x}"
    }


def _backend_settings(connection: str, **extra: Any) -> Any:
    from tests.conftest import make_settings

    return make_settings(queue_connection=connection, mqtt_spool_max=0, **extra)


# -- one trace from the MQTT message to the run -----------------------------------------------


@pytest.mark.mqtt
async def test_one_trace_from_the_mqtt_message_through_dispatch_to_the_run(
    spans: InMemorySpanExporter, broker: Broker, queue_backend: Backend
) -> None:
    prefix = f"topiq-test/{uuid.uuid4().hex[:12]}"
    queue = f"traced-{uuid.uuid4().hex[:8]}"
    pattern = f"{prefix}/devices/{{device_id}}/readings"
    dispatched: asyncio.Queue[str] = asyncio.Queue()
    settings = broker.settings(
        mqtt_spool_max=0, queue_connection=queue_backend.connection, **queue_backend.overrides
    )
    async with QueueManager(settings) as qm:
        router = Router()

        @router.on(pattern)
        async def reading(device_id: str, payload: Any) -> None:
            handle = await qm.push(Traced({"device": device_id, "value": payload}), queue=queue)
            dispatched.put_nowait(handle.id)

        async with worker(qm, queue), running(MqttApp(router, settings, manager=qm)):
            await mosquitto_pub(
                broker,
                f"{prefix}/devices/d-7/readings",
                "21.5",
                extra=[
                    *("-V", "mqttv5", "-D", "publish", "user-property", "traceparent"),
                    *(DEVICE_PARENT, "-D", "publish", "user-property", "tracestate", "dev=1"),
                ],
            )
            job_id = await asyncio.wait_for(dispatched.get(), 20)
            assert await qm.job(job_id, queue=queue).result(timeout=20) == {
                "device": "d-7",
                "value": 21.5,
            }
            [receive] = await until_spans(spans, "mqtt receive ")
            [dispatch] = named(spans, "dispatch ")
            [run] = named(spans, "run ")

    assert receive.name == f"mqtt receive {prefix}/devices/+/readings"
    assert dispatch.name == "dispatch Traced" and run.name == "run Traced"
    kinds = [s.kind for s in (receive, dispatch, run)]
    assert kinds == [trace.SpanKind.CONSUMER, trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER]
    # One trace, the device's; each span the child of the one before.
    assert {hexid(s.context.trace_id, 32) for s in (receive, dispatch, run)} == {DEVICE_TRACE}
    assert receive.parent is not None and hexid(receive.parent.span_id, 16) == DEVICE_SPAN
    assert receive.parent.is_remote
    assert dispatch.parent is not None and dispatch.parent.span_id == receive.context.span_id
    assert run.parent is not None and run.parent.span_id == dispatch.context.span_id
    assert run.parent.is_remote  # it came through the payload
    assert run.context.trace_state.to_header() == "dev=1"  # tracestate travels too
    assert dict(receive.attributes or {}) == {
        "messaging.system": "mqtt",
        "messaging.operation.type": "process",
        "messaging.operation.name": "receive",
        "messaging.destination.name": f"{prefix}/devices/d-7/readings",
        "messaging.destination.template": f"{prefix}/devices/+/readings",
        "messaging.message.body.size": 4,
        "topiq.mqtt.qos": 1,
    }
    expected = {
        "messaging.system": "topiq",
        "messaging.destination.name": queue,
        "messaging.message.id": job_id,
        "topiq.queue": queue,
        "topiq.job.id": job_id,
        "topiq.job.class": "tests.tracing_jobs:Traced",
    }
    assert dict(dispatch.attributes or {}) == {
        **expected,
        "messaging.operation.type": "send",
        "messaging.operation.name": "dispatch",
    }
    assert dict(run.attributes or {}) == {
        **expected,
        "messaging.operation.type": "process",
        "messaging.operation.name": "run",
        "topiq.attempt": 1,
    }
    assert run.status.status_code is trace.StatusCode.UNSET


@pytest.mark.mqtt
async def test_a_message_without_a_trace_context_starts_a_trace_and_a_failed_handler_marks_it(
    spans: InMemorySpanExporter, broker: Broker
) -> None:
    prefix = f"topiq-test/{uuid.uuid4().hex[:12]}"
    handled: asyncio.Queue[str] = asyncio.Queue()
    settings = broker.settings(mqtt_spool_max=0, mqtt_handler_retries=0)
    router = Router()

    @router.on(f"{prefix}/cmd/{{name}}")
    async def command(name: str) -> None:
        handled.put_nowait(name)
        if name == "bad":
            raise RuntimeError("the handler fails on purpose")

    async with QueueManager(settings) as qm, running(MqttApp(router, settings, manager=qm)):
        await mosquitto_pub(broker, f"{prefix}/cmd/bad", "x")
        await mosquitto_pub(broker, f"{prefix}/cmd/good", "x")
        found = await until_spans(spans, "mqtt receive ", 2)
    by_topic = {dict(s.attributes or {})["messaging.destination.name"]: s for s in found}
    bad, good = by_topic[f"{prefix}/cmd/bad"], by_topic[f"{prefix}/cmd/good"]
    assert bad.parent is None and good.parent is None
    assert bad.context.trace_id != good.context.trace_id
    assert bad.status.status_code is trace.StatusCode.ERROR
    assert "RuntimeError" in (bad.status.description or "")
    assert [e.name for e in bad.events] == ["exception"]
    assert good.status.status_code is trace.StatusCode.UNSET


# -- retries ----------------------------------------------------------------------------------


async def test_the_tries_of_a_retried_job_stay_in_the_trace_of_its_dispatch(
    spans: InMemorySpanExporter,
) -> None:
    queue = f"retried-{uuid.uuid4().hex[:8]}"
    async with QueueManager(_backend_settings("memory")) as qm, worker(qm, queue):
        handle = await qm.push(FailsFirst(fails=2), queue=queue)
        assert await handle.result(timeout=20) == 3
        runs = await until_spans(spans, "run FailsFirst", 3)
    [dispatch] = named(spans, "dispatch ")
    runs.sort(key=lambda s: dict(s.attributes or {})["topiq.attempt"])
    assert [dict(s.attributes or {})["topiq.attempt"] for s in runs] == [1, 2, 3]
    assert {s.context.trace_id for s in runs} == {dispatch.context.trace_id}
    assert all(s.parent is not None and s.parent.span_id == dispatch.context.span_id for s in runs)
    assert len({s.context.span_id for s in runs}) == 3  # a span per try
    assert [s.status.status_code for s in runs] == [
        trace.StatusCode.ERROR,
        trace.StatusCode.ERROR,
        trace.StatusCode.UNSET,
    ]
    assert dict(runs[0].attributes or {})["error.type"] == "ValueError"
    assert "failing try 1" in (runs[0].status.description or "")


async def test_bulk_dispatch_is_one_span_and_every_job_runs_under_it(
    spans: InMemorySpanExporter,
) -> None:
    queue = f"bulk-{uuid.uuid4().hex[:8]}"
    async with QueueManager(_backend_settings("memory")) as qm, worker(qm, queue):
        handles = await qm.bulk([Traced(n) for n in range(3)], queue=queue)
        assert [await h.result(timeout=20) for h in handles] == [0, 1, 2]
        runs = await until_spans(spans, "run Traced", 3)
    [dispatch] = named(spans, "dispatch ")
    assert dispatch.name == "dispatch Traced"
    assert dict(dispatch.attributes or {}) == {
        "messaging.system": "topiq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "dispatch",
        "messaging.destination.name": queue,
        "topiq.queue": queue,
        "messaging.batch.message_count": 3,
    }
    assert {s.parent.span_id for s in runs if s.parent} == {dispatch.context.span_id}


async def test_a_bulk_of_several_classes_and_a_workflow_name_their_dispatch_spans(
    spans: InMemorySpanExporter,
) -> None:
    async with QueueManager(_backend_settings("memory")) as qm:
        await qm.bulk([Traced(1), FailsFirst(0)], queue="mixed-a")
        await qm.push_workflow(chain(Traced(2), Traced(3)))
        jobs = await (await qm.connection()).reserve(["mixed-a", "default"], 10, 30)
    mixed, workflow = sorted(named(spans, "dispatch "), key=lambda s: s.start_time or 0)
    assert (mixed.name, workflow.name) == ("dispatch jobs", "dispatch chain")
    parents = {orjson.loads(j.payload)["trace"]["traceparent"].split("-")[2] for j in jobs}
    assert parents == {hexid(s.context.span_id, 16) for s in (mixed, workflow)}


# -- a payload whose "trace" lies -------------------------------------------------------------

_VALID = f"00-{'ab' * 16}-{'cd' * 8}-01"
LIES: list[Any] = [
    "garbage",
    42,
    None,
    [_VALID],
    {},
    {"traceparent": "not a traceparent"},
    {"traceparent": 5},
    {"traceparent": f"00-{'0' * 32}-{'0' * 16}-01"},  # all-zero ids are invalid
    {"traceparent": _VALID + "-" + "x" * 100_000},  # huge
    {"traceparent": _VALID, "tracestate": 7},
    {"traceparent": _VALID, "tracestate": "k=v," * 10_000},
    {f"k{n}": _VALID for n in range(10_000)},
]


@pytest.mark.parametrize("lie", LIES, ids=range(len(LIES)))
def test_parent_context_ignores_what_is_not_a_w3c_carrier(
    spans: InMemorySpanExporter, lie: Any
) -> None:
    assert tracing.parent_context(lie) is None


def test_parent_context_reads_a_w3c_carrier_and_skips_unknown_keys(
    spans: InMemorySpanExporter,
) -> None:
    context = tracing.parent_context({"traceparent": _VALID, "later": "x", "tracestate": "a=1"})
    assert context is not None
    remote = trace.get_current_span(context).get_span_context()
    assert (hexid(remote.trace_id, 32), hexid(remote.span_id, 16)) == ("ab" * 16, "cd" * 8)
    assert remote.trace_state.to_header() == "a=1"


async def test_a_job_whose_payload_trace_lies_runs_untraced_and_succeeds(
    spans: InMemorySpanExporter,
) -> None:
    queue = f"lies-{uuid.uuid4().hex[:8]}"
    async with QueueManager(_backend_settings("memory")) as qm:
        outgoing = []
        for n, lie in enumerate(LIES):
            envelope = orjson.loads(
                encode(Traced(n), job_id=f"lie-{n}", queue=queue, max_bytes=10**7)
            )
            envelope["trace"] = lie
            outgoing.append(
                OutgoingJob(
                    f"lie-{n}", queue, orjson.dumps(envelope), job="tests.tracing_jobs:Traced"
                )
            )
        await (await qm.connection()).push(outgoing)
        async with worker(qm, queue):
            results = [await qm.job(o.id, queue=queue).result(timeout=20) for o in outgoing]
            runs = await until_spans(spans, "run Traced", len(LIES))
    assert results == list(range(len(LIES)))
    assert {dict(s.attributes or {})["topiq.job.id"] for s in runs} == {o.id for o in outgoing}
    for span in runs:
        assert span.parent is None, dict(span.attributes or {})  # a trace of its own
        assert hexid(span.context.trace_id, 32) != "ab" * 16
        assert span.status.status_code is trace.StatusCode.UNSET
    assert len({s.context.trace_id for s in runs}) == len(LIES)


# -- across a worker process ------------------------------------------------------------------


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend("redis", request, tmp_path)


async def test_the_trace_crosses_into_a_real_worker_process(
    spans: InMemorySpanExporter, redis_backend: Backend, tmp_path: Path
) -> None:
    backend = redis_backend
    queue = f"cross-{uuid.uuid4().hex[:8]}"
    span_file = tmp_path / "worker-spans.jsonl"
    # The dispatch continues a caller's trace, with a tracestate: both must reach the worker.
    caller = tracing.parent_context({"traceparent": DEVICE_PARENT, "tracestate": "caller=1"})
    assert caller is not None
    async with QueueManager(backend.settings()) as qm:
        token = otel_context.attach(caller)
        try:
            handle = await qm.push(FailsFirst(fails=1), queue=queue)
        finally:
            otel_context.detach(token)
    [dispatch] = named(spans, "dispatch ")
    env = {**backend.env(), "TOPIQ_TEST_TRACE_FILE": str(span_file)}

    def lines() -> list[dict[str, Any]]:
        if not span_file.exists():
            return []
        return [json.loads(line) for line in span_file.read_text().splitlines() if line]

    process = WorkerProcess(["--queue", queue], env, tmp_path / "worker.log")
    try:
        async with QueueManager(backend.settings()) as qm:
            assert await qm.job(handle.id, queue=queue).result(timeout=30) == 2
        wait_until(lambda: len(lines()) >= 2, 10, "the worker's two run spans")
    finally:
        process.stop()
    assert process.proc.returncode == 0, process.output
    runs = sorted(lines(), key=lambda s: s["attributes"]["topiq.attempt"])
    assert [s["name"] for s in runs] == ["run FailsFirst", "run FailsFirst"]
    assert {s["pid"] for s in runs} == {process.proc.pid} != {os.getpid()}
    assert {s["trace_id"] for s in runs} == {DEVICE_TRACE}
    assert {s["parent_id"] for s in runs} == {hexid(dispatch.context.span_id, 16)}
    assert {s["tracestate"] for s in runs} == {"caller=1"}
    assert runs[0]["attributes"]["topiq.job.id"] == handle.id
    assert [s["attributes"]["topiq.attempt"] for s in runs] == [1, 2]
    assert span_line(dispatch)["parent_id"] == DEVICE_SPAN


# -- the guide --------------------------------------------------------------------------------


def test_the_guide_names_the_spans_the_extra_and_the_example() -> None:
    text = guide_section("observing.md", "tracing")
    for needed in (
        "pip install -e '.[otel]'",
        "mqtt receive <topic filter>",
        "dispatch <Class>",
        "run <Class>",
        '"trace"',
        "traceparent",
        "docs/examples/observing_tracing.py",
        "app/hooks.py",
    ):
        assert needed in text, needed


def test_the_guides_example_exports_the_dispatch_and_run_spans_to_the_console() -> None:
    assert callable(docs_example("observing_tracing").install)  # it loads as a user's module
    code = (
        "import asyncio, importlib.util\n"
        "path = 'docs/examples/observing_tracing.py'\n"
        "spec = importlib.util.spec_from_file_location('ex', path)\n"
        "ex = importlib.util.module_from_spec(spec); spec.loader.exec_module(ex)\n"
        "provider = ex.install()\n"
        "from core.queue.queue_manager import QueueManager\n"
        "from core.settings import Settings\n"
        "from tests.tracing_jobs import Traced\n"
        "async def main():\n"
        "    settings = Settings.load(env_file=None, queue_connection='sync',\n"
        "                             queue_allowed_modules=('tests.',))\n"
        "    async with QueueManager(settings) as qm:\n"
        "        assert await (await qm.push(Traced(3))).result(5) == 3\n"
        "asyncio.run(main())\n"
        "provider.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "TOPIQ_TEST_TR"))}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert '"name": "dispatch Traced"' in done.stdout
    assert '"name": "run Traced"' in done.stdout
    assert '"service.name": "topiq"' in done.stdout
