"""Tracing (ARCHITECTURE.md, "Telemetry"): which service made a request slow, in one Jaeger trace.

A GraphQL request gets a server span (`TelemetryMiddleware`), an operation span
(`operation_span`, opened by the view) and one client span per upstream batch call
(`batch_span`, used by the loaders). Resolvers get none: a span per field would cost more
than the fields. Every upstream call sends W3C trace context (`outgoing`), so each
service's spans join the same trace.

Seam for the cache and resilience code: inside a batch call, `annotate(cache_hits=...,
cache_misses=..., stale_served=..., retries=..., breaker_state=...)` sets those facts on the
batch's span without any OpenTelemetry import. Pass running totals: the last value wins.

Nothing here is module-global: the tracer provider is an app's, made in its lifespan (or
given by a test); a request finds it through a context variable set by the middleware."""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode, SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import GatewayError
from .logs import request_log
from .metrics import Metrics

__all__ = [
    "Telemetry",
    "TelemetryMiddleware",
    "OperationSpan",
    "operation_span",
    "batch_span",
    "annotate",
    "outgoing",
    "tracer_provider_from_env",
    "TRACE_ID_HEADER",
]

TRACE_ID_HEADER = "x-trace-id"
DEFAULT_SERVICE_NAME = "bookvault-gateway"

# annotate()'s keywords and the span attributes they set; other keywords become "bookvault.<key>".
_ATTRIBUTES = {
    "cache_hits": "bookvault.cache.hits",
    "cache_misses": "bookvault.cache.misses",
    "stale_served": "bookvault.cache.stale_served",
    "retries": "bookvault.retries",
    "breaker_state": "bookvault.breaker.state",
    "http_status": "http.response.status_code",
    "error_type": "error.type",
    "shared_flight": "bookvault.single_flight.shared",
}


def tracer_provider_from_env() -> TracerProvider:
    """From the standard variables: OTLP/HTTP protobuf (what Jaeger ingests on :4318) to
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT. With neither, or
    OTEL_TRACES_EXPORTER=none, spans are not recorded (unless OTEL_TRACES_SAMPLER asks),
    yet every request still gets a trace id for its response and log line.
    OTEL_SDK_DISABLED=true makes no spans at all. The SDK reads that, the sampler,
    OTEL_RESOURCE_ATTRIBUTES and OTEL_BSP_* itself."""
    env = os.environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporting = bool(endpoint) and "otlp" in {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    # Recording spans nobody will read costs ~3% of a request's CPU; unsampled ones cost
    # next to nothing and still carry ids.
    sampler = None if exporting or env.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME})
    provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)  # the lifespan shuts it down
    if exporting:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporter reads the endpoint, headers, timeout and compression variables itself.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Telemetry:
    """One app's tracer and Prometheus series."""

    def __init__(self, services: Iterable[str], tracer_provider: trace.TracerProvider) -> None:
        self.tracer_provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("bookvault.gateway")
        self.metrics = Metrics(services)


@dataclass
class _Request:
    """What the request's log line and outcome metric need, gathered while it runs."""

    telemetry: Telemetry
    operation: str | None = None
    operation_type: str | None = None
    outcome: str | None = None
    upstream_calls: int = 0
    # The trace context last sent upstream, and the span it was made under: the calls of an
    # operation that is not sampled all go out under the request's own span.
    sent_under: trace.Span | None = None
    sent: dict[str, str] | None = None


@dataclass
class _Batch:
    span: trace.Span | None  # None: the operation is not sampled
    requests: int = 0


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("bookvault_request", default=None)
_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("bookvault_batch", default=None)


_FIELDS: dict[Any, frozenset[bytes]] = {}  # the headers each text-map propagator reads


def _trace_id(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


class TelemetryMiddleware:
    """Pure ASGI, around the GraphQL endpoint: the server span (continuing a caller's W3C
    trace context), the trace id in a response header, the outcome and duration series,
    and one JSON log line per request. `telemetry_of` finds the app's `Telemetry`, which
    the lifespan makes after the routes exist."""

    def __init__(self, app: ASGIApp, telemetry_of: Callable[[Scope], Telemetry]) -> None:
        self.app = app
        self.telemetry_of = telemetry_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        telemetry = self.telemetry_of(scope)
        started = time.perf_counter()
        request = _Request(telemetry)
        status = 500  # what the client gets when the app raises before answering
        fields = _FIELDS.get(propagate.get_global_textmap())
        if fields is None:
            fields = _FIELDS[propagate.get_global_textmap()] = frozenset(f.encode() for f in propagate.get_global_textmap().fields)
        # Only the propagators' own headers (traceparent, tracestate, baggage by default).
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"] if key in fields}
        route = scope.get("route")
        path = getattr(route, "path", scope["path"])
        with telemetry.tracer.start_as_current_span(
            f"{scope['method']} {path}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "http.route": path, "url.path": scope["path"]},
        ) as span:
            trace_id = _trace_id(span)

            async def send_with_trace_id(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    if trace_id:
                        message = {**message, "headers": [*message.get("headers", ()), (TRACE_ID_HEADER.encode(), trace_id.encode())]}
                await send(message)

            token = _REQUEST.set(request)
            try:
                with telemetry.metrics.bound():
                    await self.app(scope, receive, send_with_trace_id)
            finally:
                _REQUEST.reset(token)
                seconds = time.perf_counter() - started
                outcome = request.outcome or ("error" if status >= 400 else None)
                span.set_attributes({"http.response.status_code": status, "bookvault.upstream.calls": request.upstream_calls})
                if status >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                if outcome:  # a GraphiQL page is no GraphQL request
                    telemetry.metrics.child(telemetry.metrics.requests, outcome).inc()
                    telemetry.metrics.duration.observe(seconds)
                request_log(traceId=trace_id, method=scope["method"], path=scope["path"], status=status,
                            operation=request.operation, operationType=request.operation_type, outcome=outcome,
                            durationMs=round(seconds * 1000, 2), upstreamCalls=request.upstream_calls)


class OperationSpan:
    """The span of one GraphQL operation, named like "query OrderPage" once the view knows
    the operation, with its name, type, outcome and the SHA-256 of its document (the id
    persisted queries use); the batch spans hang under it. The view fills it in:

        with operation_span() as op:
            op.named("OrderPage", "query", document_hash)
            ...
            op.outcome = "complete"
    """

    def __init__(self, span: trace.Span | None) -> None:
        self.span = span
        self.trace_id = _trace_id(span) if span is not None else None
        self.name: str | None = None
        self.type: str | None = None
        self.document_hash: str | None = None
        self.outcome: str | None = None
        self.cost: Any = None  # the operation's `Cost` (gateway/cost.py), once analysed

    def named(self, name: str | None, operation_type: str | None, document_hash: str | None) -> None:
        self.name, self.type, self.document_hash = name, operation_type, document_hash


@contextlib.contextmanager
def operation_span() -> Iterator[OperationSpan]:
    request = _REQUEST.get()
    if request is None:  # executed outside the middleware: nothing to report to
        yield OperationSpan(None)
        return
    parent = trace.get_current_span()
    # Not sampled: no child span (see `_client_span`); the server span's ids serve.
    opened = request.telemetry.tracer.start_as_current_span("graphql") if parent.is_recording() else contextlib.nullcontext(parent)
    with opened as span:
        op = OperationSpan(span)
        try:
            yield op
        finally:
            request.operation, request.operation_type = op.name, op.type
            request.outcome = op.outcome or "error"
            if span.is_recording():
                span.update_name(" ".join(filter(None, (op.type or "graphql", op.name))))
                attributes: dict[str, Any] = {"graphql.operation.name": op.name, "graphql.operation.type": op.type,
                                              "bookvault.graphql.outcome": request.outcome,
                                              "graphql.document.hash": op.document_hash}
                if op.cost is not None:
                    attributes.update({"bookvault.cost": op.cost.total, "bookvault.cost.calls": op.cost.calls,
                                       "bookvault.cost.entities": op.cost.entities})
                span.set_attributes({k: v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def batch_span(service: str, route: str, size: int | None = None, method: str = "GET") -> Iterator[None]:
    """The span of one upstream call of the loaders: a batch of `size` ids, or a page
    (`size` None), or a write (`method`). A `GatewayError` leaving it marks the span failed with its code."""
    request = _REQUEST.get()
    if request is None:
        yield
        return
    telemetry = request.telemetry
    metrics = telemetry.metrics
    if size is not None:
        metrics.child(metrics.batch_size, service, route).observe(size)
    started = time.perf_counter()
    with _client_span(telemetry, service, route, size, method) as span:
        batch = _Batch(span)
        token = _BATCH.set(batch)
        try:
            yield
        except GatewayError as exc:
            failed(exc)
            raise
        finally:
            _BATCH.reset(token)
            if batch.requests:  # answered from cache alone: no upstream latency to report
                metrics.child(metrics.upstream_latency, service, route).observe(time.perf_counter() - started)


def recording() -> bool:
    """Whether the current operation is traced: its batch calls get spans (`batch_span`)."""
    return trace.get_current_span().is_recording()


def observe_batches(service: str, route: str, sizes: Iterable[int]) -> None:
    """What `batch_span` observes of batches answered from memory without one (a warm read)."""
    if (request := _REQUEST.get()) is not None:
        metrics = request.telemetry.metrics
        histogram = metrics.child(metrics.batch_size, service, route)
        for size in sizes:
            histogram.observe(size)


def _client_span(telemetry: Telemetry, service: str, route: str, size: int | None,
                 method: str) -> contextlib.AbstractContextManager[trace.Span | None]:
    """The batch call's span; none under an operation that is not sampled (its children
    would not be recorded under the default parent-based sampler either), which saves a
    third of a cached query's CPU when no traces are exported."""
    if not recording():
        return contextlib.nullcontext()
    attributes: dict[str, Any] = {"peer.service": service, "http.request.method": method, "http.route": route,
                                  "bookvault.retries": 0}
    if size is not None:
        # Defaults for a loader without cache; the cache's annotate() replaces them.
        attributes.update({"bookvault.batch.size": size, "bookvault.cache.hits": 0, "bookvault.cache.misses": size,
                           "bookvault.cache.stale_served": 0})
    return telemetry.tracer.start_as_current_span(f"{service} {route}", kind=SpanKind.CLIENT, attributes=attributes)


def failed(exc: GatewayError) -> None:
    """Mark the current batch call failed with `exc`'s code, also when the loader goes on
    (serving stale data, or the error at each field's path) instead of raising."""
    batch, request = _BATCH.get(), _REQUEST.get()
    if batch is not None and request is not None:
        if batch.span is not None:
            batch.span.set_attribute("error.type", exc.code)
            batch.span.set_status(StatusCode.ERROR, str(exc))
        metrics = request.telemetry.metrics
        metrics.child(metrics.upstream_errors, exc.service or "", exc.code).inc()


def annotate(**facts: Any) -> None:
    """Set facts on the current batch call's span (see the module doc); no-op outside one."""
    batch = _BATCH.get()
    if batch is not None and batch.span is not None:
        batch.span.set_attributes({_ATTRIBUTES.get(key, f"bookvault.{key}"): value for key, value in facts.items()})


def outgoing(headers: dict[str, str]) -> None:
    """For every upstream call, before it is sent: trace context out, and the call counted."""
    current = _REQUEST.get()
    if current is None:
        propagate.inject(headers)  # W3C traceparent: the service's spans join this trace
    else:
        span = trace.get_current_span()
        if current.sent_under is not span:  # the same span, the same context: injected once
            current.sent, current.sent_under = {}, span
            propagate.inject(current.sent)
        headers.update(current.sent)  # type: ignore[arg-type]
        current.upstream_calls += 1
    if (batch := _BATCH.get()) is not None:
        batch.requests += 1
