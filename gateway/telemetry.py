"""Tracing (ARCHITECTURE.md, "Telemetry"): which service made a request slow, in one Jaeger trace.

A GraphQL request gets a server span (`TelemetryMiddleware`), an operation span
(`operation_span`, opened by the view), an INTERNAL span per stage of the operation
(`stage`: document, variables, cost, plan), an INTERNAL span per batch read of the loaders
(`batch_span`: "read catalog /books", whether the cache or the service answers it) and,
only for an HTTP request really sent, a CLIENT span (`sending`, in gateway/upstream.py):
beneath its read, or beneath the operation for a write. A read the cache answers is no call,
so it is no CLIENT span: a CLIENT span is "a request to some remote service" (OpenTelemetry
trace API, SpanKind). Resolvers get no span: a span per field would cost more than the
fields. Every request sent carries W3C trace context (`outgoing`), so each service's spans
join the same trace, under the CLIENT span that sent it.

Seam for the cache and resilience code: inside a batch read, `annotate(cache_hits=...,
cache_misses=..., stale_served=..., retries=..., breaker_state=...)` sets those facts on the
read's span without any OpenTelemetry import. Pass running totals: the last value wins.

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
from starlette.requests import ClientDisconnect
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
    "sending",
    "Sent",
    "stage",
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
    span: trace.Span | None  # the read's; None: the operation is not sampled, or a write
    route: str  # the URL's template, for the CLIENT spans of the requests it sends
    requests: int = 0  # requests sent so far (a retried read sends several)


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
            except ClientDisconnect:
                # The client hung up before its answer (mid-body): nothing to send, nothing wrong
                # here, so no 500 and no traceback; logged as nginx's 499 "client closed request".
                status = 499
            finally:
                _REQUEST.reset(token)
                seconds = time.perf_counter() - started
                outcome = request.outcome or ("error" if status >= 400 else None)
                span.set_attributes({"http.response.status_code": status, "bookvault.upstream.calls": request.upstream_calls})
                if status >= 500:
                    span.set_status(trace.StatusCode.ERROR)
                if outcome:  # a GraphiQL page is no GraphQL request
                    telemetry.metrics.child(telemetry.metrics.requests, outcome).inc()
                    if outcome != "subscription":  # a stream's life is not a request's latency
                        telemetry.metrics.duration.observe(seconds)
                request_log(traceId=trace_id, method=scope["method"], path=scope["path"], status=status,
                            operation=request.operation, operationType=request.operation_type, outcome=outcome,
                            durationMs=round(seconds * 1000, 2), upstreamCalls=request.upstream_calls)


class OperationSpan:
    """The span of one GraphQL operation, named like "query OrderPage" once the view knows
    the operation, with its name, type, outcome and the SHA-256 of its document (the id
    persisted queries use); the stage, read and write spans hang under it. The view fills it in:

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
    # Not sampled: no child span (see `_read_span`); the server span's ids serve.
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
    """One upstream read of the loaders (a batch of `size` ids, or a page: `size` None) or a
    write (`method`): its metrics, the facts `annotate` sets, and the route of the CLIENT
    spans of the requests it sends (`sending`). A read is an INTERNAL span whether or not
    the cache answers it (`_read_span`); a write has no span of its own: its request's
    CLIENT span is the write. A `GatewayError` leaving it marks the read failed with its code."""
    request = _REQUEST.get()
    if request is None:
        yield
        return
    telemetry = request.telemetry
    metrics = telemetry.metrics
    if size is not None:
        metrics.child(metrics.batch_size, service, route).observe(size)
    started = time.perf_counter()
    with _read_span(telemetry, service, route, size) if method == "GET" else _NO_SPAN as span:
        batch = _Batch(span, route)
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
    """Whether the current operation is traced: its reads get spans (`batch_span`)."""
    return trace.get_current_span().is_recording()


def observe_batches(service: str, route: str, sizes: Iterable[int]) -> None:
    """What `batch_span` observes of batches answered from memory without one (a warm read)."""
    if (request := _REQUEST.get()) is not None:
        metrics = request.telemetry.metrics
        histogram = metrics.child(metrics.batch_size, service, route)
        for size in sizes:
            histogram.observe(size)


# Shared and reusable (a nullcontext keeps no state): what the span helpers give an operation
# that is not sampled, so that they cost no span and no new object there.
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def _read_span(telemetry: Telemetry, service: str, route: str,
               size: int | None) -> contextlib.AbstractContextManager[trace.Span | None]:
    """The read's INTERNAL span, "read catalog /books": the gateway's own work (cache,
    single flight, retries), not a call; none under an operation that is not sampled (its
    children would not be recorded under the default parent-based sampler either), which
    saves a third of a cached query's CPU when no traces are exported."""
    if not recording():
        return _NO_SPAN
    # No peer.service here: that names the remote end of a CLIENT span (OpenTelemetry
    # semantic conventions, general attributes); the requests sent are the read's children.
    attributes: dict[str, Any] = {"bookvault.service": service, "bookvault.route": route, "bookvault.retries": 0}
    if size is not None:
        # Defaults for a loader without cache; the cache's annotate() replaces them.
        attributes.update({"bookvault.batch.size": size, "bookvault.cache.hits": 0, "bookvault.cache.misses": size,
                           "bookvault.cache.stale_served": 0})
    return telemetry.tracer.start_as_current_span(f"read {service} {route}", attributes=attributes)


class Sent:
    """What `sending` gives the code that sends: where the answer's status goes."""

    __slots__ = ("_span", "status")

    def __init__(self, span: trace.Span | None) -> None:
        self._span = span
        self.status = 0  # none yet

    def answered(self, status: int) -> None:
        if self._span is not None:
            self.status = status
            self._span.set_attribute("http.response.status_code", status)


_NOT_TRACED = contextlib.nullcontext(Sent(None))  # shared: with no span, `answered` changes nothing


def sending(service: str, method: str, url: str,
            server: tuple[str, int] | None = None) -> contextlib.AbstractContextManager[Sent]:
    """Around one HTTP request really sent to `service` (`server`: its host and port): its
    CLIENT span, current while it is sent so that `outgoing` names it as the service's
    parent. One per request, so each attempt of a retried read is one, as the HTTP
    semantic conventions ask (`http.request.resend_count`); none when the operation is not
    traced."""
    if not recording() or (request := _REQUEST.get()) is None:
        return _NOT_TRACED
    return _client_span(request.telemetry, service, method, url, server)


@contextlib.contextmanager
def _client_span(telemetry: Telemetry, service: str, method: str, url: str,
                 server: tuple[str, int] | None) -> Iterator[Sent]:
    batch = _BATCH.get()
    route = batch.route if batch is not None else url.partition("?")[0]
    attributes: dict[str, Any] = {"peer.service": service, "http.request.method": method, "http.route": route}
    if server is not None:
        attributes["server.address"], attributes["server.port"] = server
    if batch is not None and batch.requests:
        attributes["http.request.resend_count"] = batch.requests  # this read's earlier requests
    # Named "{method} {route}" (HTTP semantic conventions, span name); the gateway's errors
    # are set as they are, no exception event: the code says what happened.
    with telemetry.tracer.start_as_current_span(f"{method} {route}", kind=SpanKind.CLIENT, attributes=attributes,
                                                record_exception=False, set_status_on_exception=False) as span:
        sent = Sent(span)
        try:
            yield sent
        except BaseException as exc:
            # HTTP semantic conventions: a 4xx is an error of a CLIENT span too, and its
            # error.type is the status code; without an error status, the gateway's code
            # (a timeout, a body outside the contract), or the exception's class (the
            # attempt's deadline cancels the request).
            if sent.status >= 400:
                error_type = str(sent.status)
            else:
                error_type = exc.code if isinstance(exc, GatewayError) else type(exc).__qualname__
            span.set_attribute("error.type", error_type)
            span.set_status(StatusCode.ERROR, str(exc))
            raise


def stage(name: str, **facts: Any) -> contextlib.AbstractContextManager[None]:
    """An INTERNAL span, child of the current span, around one stage of the operation:
    `with stage("graphql.plan"):`. `facts` become attributes named by the stage's last
    part: `stage("graphql.document", cached=True)` sets `bookvault.document.cached`.
    When the current span is not recording, nothing: no span, the shared nullcontext."""
    if not recording() or (request := _REQUEST.get()) is None:
        return _NO_SPAN
    prefix = f"bookvault.{name.rpartition('.')[2]}."
    return _stage_span(request.telemetry, name, {prefix + key: value for key, value in facts.items()})


@contextlib.contextmanager
def _stage_span(telemetry: Telemetry, name: str, attributes: dict[str, Any]) -> Iterator[None]:
    with telemetry.tracer.start_as_current_span(name, attributes=attributes):
        yield


def failed(exc: GatewayError) -> None:
    """Mark the current read failed with `exc`'s code, also when the loader goes on
    (serving stale data, or the error at each field's path) instead of raising; count it."""
    batch, request = _BATCH.get(), _REQUEST.get()
    if batch is not None and request is not None:
        if batch.span is not None:
            batch.span.set_attribute("error.type", exc.code)
            batch.span.set_status(StatusCode.ERROR, str(exc))
        metrics = request.telemetry.metrics
        metrics.child(metrics.upstream_errors, exc.service or "", exc.code).inc()


def annotate(**facts: Any) -> None:
    """Set facts on the current read's span (see the module doc); no-op outside one."""
    batch = _BATCH.get()
    if batch is not None and batch.span is not None:
        batch.span.set_attributes({_ATTRIBUTES.get(key, f"bookvault.{key}"): value for key, value in facts.items()})


def outgoing(headers: dict[str, str]) -> None:
    """For every upstream request, as it is sent: trace context out (naming its CLIENT span,
    when traced, as the parent), and the request counted."""
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
