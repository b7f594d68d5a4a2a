"""Traces (docs/observing.md, "Traces (OpenTelemetry)"): set a tracer provider once per process.

In a project, call `install()` from app/hooks.py, which the worker, the MQTT app and the
manager import on start, so every process exports its spans. This one prints them to stdout;
for a collector, pass `OTLPSpanExporter(endpoint="http://collector:4317")` from the
`opentelemetry-exporter-otlp` package instead.
"""

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter


def install(exporter: SpanExporter | None = None, service: str = "topiq") -> TracerProvider:
    """Export this process's spans (to the console unless told otherwise); call it once."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter or ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)  # the global provider: set once per process
    return provider
