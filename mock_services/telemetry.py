"""A service's traces: a server span per request that continues the caller's W3C trace
context (the gateway's batch span), and a span per SQL statement beneath it, so one
Jaeger trace runs from the GraphQL operation down to each service's database work.

Exported over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set;
otherwise a service makes no spans at all. The service name is always the service's
own: `bookvault services` starts six processes with one environment."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["tracer_provider_from_env", "ServerSpans", "trace_queries"]

# Probes, long polls and limit look-ups would each be a trace of their own: noise in Jaeger.
UNTRACED = ("/healthz", "/events", "/_admin", "/_meta")


def tracer_provider_from_env(service: str) -> TracerProvider | None:
    env = os.environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporters = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if not endpoint or "otlp" not in exporters:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class ServerSpans:
    """Pure ASGI: one SERVER span per request, named by route ("GET /books/{id}")."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNTRACED):
            await self.app(scope, receive, send)
            return
        status = 500
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            f"{scope['method']} {scope['path']}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
        ) as span:
            try:
                await self.app(scope, receive, send_status)
            finally:
                route = getattr(scope.get("route"), "path", scope["path"])  # known once routed
                span.update_name(f"{scope['method']} {route}")
                span.set_attributes({"http.request.method": scope["method"], "http.route": route,
                                     "url.path": scope["path"], "http.response.status_code": status})
                if status >= 500:
                    span.set_status(StatusCode.ERROR)


def trace_queries(engine: Engine, tracer: trace.Tracer, database: str) -> None:
    """A CLIENT span per statement, under the current span: SQLAlchemy's async engine runs
    these hooks in a greenlet that shares the awaiting task's context variables, and SQLite's
    inline reads (mock_services/db.py) on the awaiting task itself."""

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not trace.get_current_span().get_span_context().is_valid:
            return  # work outside a traced request (feed polls, seeding) would be a trace of its own
        operation = statement.split(None, 1)[0].upper() if statement.strip() else "SQL"
        context._otel_span = tracer.start_span(f"{operation} {database}", kind=SpanKind.CLIENT, attributes={
            "db.system.name": conn.dialect.name, "db.namespace": database,
            "db.operation.name": operation, "db.query.text": statement})

    def after(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if (span := getattr(context, "_otel_span", None)) is not None:
            span.end()

    def failed(exception_context: Any) -> None:
        if (span := getattr(exception_context.execution_context, "_otel_span", None)) is not None:
            span.set_status(StatusCode.ERROR, type(exception_context.original_exception).__name__)
            span.end()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "handle_error", failed)
