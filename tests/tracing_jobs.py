"""Jobs of tests/test_tracing.py.

A worker subprocess started with `TOPIQ_TEST_TRACE_FILE` set installs, when it imports this
module (to load its first job, before the try starts), a tracer provider that appends each
finished span to that file as one JSON line: the test reads the worker's spans from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from core.job import Job


class Traced(Job):
    """Returns its value."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    async def handle(self) -> Any:
        return self.value


class FailsFirst(Job):
    """Fails its first `fails` tries, then returns the try it succeeded on."""

    max_tries = 3
    retry_after = 0

    def __init__(self, fails: int = 1) -> None:
        self.fails = fails

    async def handle(self) -> int:
        if self.attempts <= self.fails:
            raise ValueError(f"failing try {self.attempts} on purpose")
        return self.attempts


def span_line(span: Any) -> dict[str, Any]:
    """What the tests read of a finished SDK span."""
    parent = span.parent
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": None if parent is None else f"{parent.span_id:016x}",
        "tracestate": span.context.trace_state.to_header(),
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


def _install_file_exporter(path: str) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:
                    out.write(json.dumps(span_line(span)) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)


if os.environ.get("TOPIQ_TEST_TRACE_FILE"):
    _install_file_exporter(os.environ["TOPIQ_TEST_TRACE_FILE"])
