"""Telemetry as an operator meets it: one trace per request from the GraphQL operation
down to each service's database, exported in the wire format Jaeger reads, /metrics that
move, and one JSON log line per request. Spans tell the truth: a read the cache answers is
an INTERNAL span, and only a request really sent is a CLIENT span."""

from __future__ import annotations

import asyncio
import time
import hashlib
import io
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id
from prometheus_client.parser import text_string_to_metric_families

from bookvault import create_app
from gateway import logs
from gateway.config import ResilienceConfig
from gateway.telemetry import Telemetry, TelemetryMiddleware, operation_span, stage
from otlp_receiver import OtlpReceiver
from shop import STAFF, Shop, gateway_client, running_gateway, running_shop, settings_for
from test_gateway import ORDER_HISTORY, ORDER_ID, ORDER_PAGE

# The order page's upstream calls: one per service, and one each for books, authors, stock.
ORDER_PAGE_CALLS = {("orders", "/orders"), ("customers", "/customers"), ("catalog", "/books"),  # authors come with the books
                    ("inventory", "/stock"), ("payments", "/payments"), ("shipping", "/shipments")}


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def recording(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
async def traced(shop: Shop, spans: InMemorySpanExporter) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway_client(shop, tracer_provider=recording(spans)) as client:
        yield client


async def order_page(client: httpx.AsyncClient, order_id: str = ORDER_ID, **headers: str) -> httpx.Response:
    response = await client.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": order_id}}, headers=headers)
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    return response


def of_kind(spans: Sequence[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def span_id(span: ReadableSpan) -> int | None:
    return span.context.span_id if span.context else None


def times(span: ReadableSpan) -> tuple[int, int]:
    assert span.start_time is not None and span.end_time is not None
    return span.start_time, span.end_time


def call_key(span: ReadableSpan) -> tuple[str, str]:
    return attrs(span)["peer.service"], attrs(span)["http.route"]


def read_key(span: ReadableSpan) -> tuple[str, str]:
    return attrs(span)["bookvault.service"], attrs(span)["bookvault.route"]


def reads(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """The batch reads' spans ("read catalog /books"): INTERNAL, whoever answered them."""
    return [s for s in of_kind(spans, SpanKind.INTERNAL) if s.name.startswith("read ")]


def operation_of(spans: Sequence[ReadableSpan]) -> ReadableSpan:
    """The operation's span: the server span's child."""
    (server,) = of_kind(spans, SpanKind.SERVER)
    (operation,) = children(spans, server)
    return operation


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if parent_id(s) == span_id(parent)]


async def test_order_page_trace_has_one_operation_span_and_one_read_span_with_its_call_per_batch(
    traced: httpx.AsyncClient, shop: Shop, spans: InMemorySpanExporter
) -> None:
    """A cold order page: server span, operation span, one read span per batch, and under each the CLIENT span of its call."""
    await order_page(traced)
    finished = spans.get_finished_spans()
    (server,) = of_kind(finished, SpanKind.SERVER)
    operation = operation_of(finished)
    batches = reads(finished)
    calls = of_kind(finished, SpanKind.CLIENT)
    stages = [s for s in finished if s.name.startswith("graphql.")]  # the operation's stages, once wired
    assert len(finished) == 2 + len(batches) + len(calls) + len(stages)  # nothing per field resolver
    assert server.name == "POST /graphql" and server.parent is None
    assert parent_id(operation) == server.context.span_id
    assert operation.name == "query OrderPage"
    assert attrs(operation) == {
        "graphql.operation.name": "OrderPage", "graphql.operation.type": "query", "bookvault.graphql.outcome": "complete",
        "graphql.document.hash": hashlib.sha256(ORDER_PAGE.encode()).hexdigest(),
        "bookvault.cost": 26, "bookvault.cost.calls": 7, "bookvault.cost.entities": 19,
    }
    assert sorted(read_key(s) for s in batches) == sorted(ORDER_PAGE_CALLS)
    assert all(parent_id(s) == operation.context.span_id for s in batches)
    received = {(name, c["route"]): c["ids"] for name, reqs in (await shop.calls()).items() for c in reqs}
    for read in batches:
        service, route = read_key(read)
        size = received[(service, route)]  # the ids the service was asked for
        assert read.name == f"read {service} {route}"
        assert attrs(read) == {
            "bookvault.service": service, "bookvault.route": route, "bookvault.batch.size": size,
            "bookvault.cache.hits": 0, "bookvault.cache.misses": size, "bookvault.retries": 0,
            "bookvault.cache.stale_served": 0,
        }, read.name
        (call,) = children(finished, read)
        assert call.kind is SpanKind.CLIENT and call.name == f"GET {route}"
        assert attrs(call) == {
            "peer.service": service, "http.request.method": "GET", "http.route": route,
            "server.address": service, "server.port": 80, "http.response.status_code": 200,
        }, call.name


async def test_a_read_served_from_cache_is_an_internal_span_and_no_client_span(
    traced: httpx.AsyncClient, shop: Shop, spans: InMemorySpanExporter
) -> None:
    """Read twice: the cold page's CLIENT spans are its requests, one under each read; the warm page has none."""
    await order_page(traced)
    cold = spans.get_finished_spans()
    sent = sum(len(requests) for requests in (await shop.calls()).values())
    calls = of_kind(cold, SpanKind.CLIENT)
    assert len(calls) == sent == len(ORDER_PAGE_CALLS)
    by_id = {s.context.span_id: s for s in cold}
    for call in calls:
        read = by_id[parent_id(call)]
        assert read.kind is SpanKind.INTERNAL and read_key(read) == call_key(call)
    spans.clear()
    await shop.reset_stats()

    await order_page(traced)
    warm = spans.get_finished_spans()
    assert await shop.calls() == {name: [] for name in shop.apps}  # the cache answered everything
    assert of_kind(warm, SpanKind.CLIENT) == []
    batches = reads(warm)
    # The authors came with the books; warm, they are a read of their own, from the cache too.
    assert sorted(read_key(s) for s in batches) == sorted(ORDER_PAGE_CALLS | {("catalog", "/authors")})
    for read in batches:
        size = attrs(read)["bookvault.batch.size"]
        assert (attrs(read)["bookvault.cache.hits"], attrs(read)["bookvault.cache.misses"]) == (size, 0)
        assert "peer.service" not in attrs(read) and children(warm, read) == []


async def test_concurrent_calls_are_siblings_and_concurrent_requests_separate_traces(
    traced: httpx.AsyncClient, shop: Shop, spans: InMemorySpanExporter
) -> None:
    """Two order pages at once: two traces, and in each the overlapping calls of one level are siblings."""
    for service in shop.apps:
        await shop.faults(service, latencyMs=30)
    responses = await asyncio.gather(order_page(traced, ORDER_ID), order_page(traced, "4849"))
    finished = spans.get_finished_spans()
    trace_ids = {r.headers["x-trace-id"] for r in responses}
    assert {format_trace_id(s.context.trace_id) for s in finished} == trace_ids and len(trace_ids) == 2
    for trace_id in trace_ids:
        mine = [s for s in finished if format_trace_id(s.context.trace_id) == trace_id]
        operation = operation_of(mine)
        calls = of_kind(mine, SpanKind.CLIENT)
        assert sorted(call_key(s) for s in calls) == sorted(ORDER_PAGE_CALLS)
        assert all(parent_id(s) == operation.context.span_id for s in reads(mine))
        assert {parent_id(s) for s in calls} == {s.context.span_id for s in reads(mine)}
        for keys in ({("payments", "/payments"), ("shipping", "/shipments"), ("customers", "/customers"),
                      ("catalog", "/books"), ("inventory", "/stock")},):
            level = [s for s in calls if call_key(s) in keys]  # one level (ARCHITECTURE.md, "Plan, then execute")
            assert all(times(a)[0] < times(b)[1] and times(b)[0] < times(a)[1]
                       for a, b in itertools.combinations(level, 2))


async def test_each_chunk_of_a_large_batch_gets_its_own_span(traced: httpx.AsyncClient, spans: InMemorySpanExporter) -> None:
    """250 books are three catalog calls, so three sibling read spans with their own batch sizes, each over its call."""
    ids = [str(i) for i in range(1, 251)]
    await traced.post("/graphql", json={"query": "query($ids: [ID!]!) { books(ids: $ids) { id } }", "variables": {"ids": ids}})
    finished = spans.get_finished_spans()
    operation = operation_of(finished)
    batches = reads(finished)
    assert sorted(attrs(s)["bookvault.batch.size"] for s in batches) == [50, 100, 100]
    assert all(parent_id(s) == operation.context.span_id for s in batches)
    assert all([c.kind for c in children(finished, s)] == [SpanKind.CLIENT] for s in batches)


async def test_a_failing_service_is_the_red_span(traced: httpx.AsyncClient, shop: Shop, spans: InMemorySpanExporter) -> None:
    """When payments answers 503, its read and each request sent are errors with the code and status; the others are fine."""
    await shop.faults("payments", errorRate=1.0, errorStatus=503, paths=["/payments"])
    body = (await traced.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": ORDER_ID}})).json()
    assert body["data"]["order"]["payment"] is None
    finished = spans.get_finished_spans()
    batches = {read_key(s): s for s in reads(finished)}
    failed = batches.pop(("payments", "/payments"))
    assert failed.status.status_code is StatusCode.ERROR and attrs(failed)["error.type"] == "UPSTREAM_UNAVAILABLE"
    attempts = children(finished, failed)  # the first request and its retries
    assert len(attempts) == len((await shop.calls())["payments"]) > 1
    for attempt in attempts:
        assert attempt.kind is SpanKind.CLIENT and attempt.status.status_code is StatusCode.ERROR
        assert attrs(attempt)["error.type"] == "503"  # HTTP semantic conventions: the status code
        assert attrs(attempt)["http.response.status_code"] == 503
    assert sorted(attrs(a).get("http.request.resend_count", 0) for a in attempts) == list(range(len(attempts)))
    others = [*batches.values(), *(c for c in of_kind(finished, SpanKind.CLIENT) if c not in attempts)]
    assert all(s.status.status_code is StatusCode.UNSET for s in others)
    assert attrs(operation_of(finished))["bookvault.graphql.outcome"] == "partial"


async def test_one_trace_runs_from_the_operation_to_each_services_database(
    seeded_dir: Path, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    """With the services traced too, each service's request span hangs under the gateway's call, its SQL under that."""
    async with running_shop(seeded_dir, tmp_path, tracer_provider=recording(spans)) as traced_shop:
        async with gateway_client(traced_shop, tracer_provider=recording(spans)) as client:
            await order_page(client)
    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1
    by_id = {s.context.span_id: s for s in finished}
    handled = [s for s in of_kind(finished, SpanKind.SERVER) if s.name != "POST /graphql"]
    assert sorted((call_key(by_id[parent_id(s)]), s.name) for s in handled) == sorted(
        (key, f"GET {key[1]}") for key in ORDER_PAGE_CALLS)
    queries = [s for s in of_kind(finished, SpanKind.CLIENT) if "db.query.text" in attrs(s)]
    for span in handled:
        service = attrs(by_id[parent_id(span)])["peer.service"]
        selects = [q for q in queries if parent_id(q) == span.context.span_id and attrs(q)["db.operation.name"] == "SELECT"]
        assert selects and all(attrs(q)["db.namespace"] == service for q in selects), span.name
    assert {parent_id(q) for q in queries} <= {s.context.span_id for s in handled}


async def test_services_receive_a_traceparent_with_the_gateways_trace_id(
    traced: httpx.AsyncClient, shop: Shop, spans: InMemorySpanExporter
) -> None:
    """Every service request carries W3C traceparent: the response's trace id, and the calling span as parent."""
    trace_id = (await order_page(traced)).headers["x-trace-id"]
    calls = {call_key(s): s for s in of_kind(spans.get_finished_spans(), SpanKind.CLIENT)}
    received = [(name, c["route"], c["traceparent"]) for name, reqs in (await shop.calls()).items() for c in reqs]
    assert len(received) == len(ORDER_PAGE_CALLS)
    for service, route, traceparent in received:
        version, trace, parent, flags = traceparent.split("-")
        assert (version, trace) == ("00", trace_id) and int(flags, 16) & 1  # sampled: the service records too
        assert parent == format_span_id(calls[(service, route)].context.span_id)


async def test_trace_id_is_in_the_response_header_and_extensions_and_continues_the_callers(
    traced: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    """A response names its trace in `x-trace-id` and `extensions.traceId`; a caller's traceparent is continued."""
    response = await order_page(traced)
    (server,) = of_kind(spans.get_finished_spans(), SpanKind.SERVER)
    assert response.headers["x-trace-id"] == response.json()["extensions"]["traceId"] == format_trace_id(server.context.trace_id)
    spans.clear()
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    continued = await order_page(traced, traceparent=f"00-{caller_trace}-{caller_span}-01")
    assert continued.headers["x-trace-id"] == continued.json()["extensions"]["traceId"] == caller_trace
    (server,) = of_kind(spans.get_finished_spans(), SpanKind.SERVER)
    assert server.parent is not None
    assert format_span_id(server.parent.span_id) == caller_span and server.parent.is_remote


def _attributes(span: Any) -> dict[str, Any]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


async def test_otlp_export_decodes_to_the_same_spans(shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configured only by OTEL_EXPORTER_OTLP_ENDPOINT, the gateway posts protobuf that decodes to the spans it made."""
    recorded = InMemorySpanExporter()
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        app = create_app(settings_for(shop), transports=shop.transports)
        async with app.router.lifespan_context(app):
            app.state.gateway.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(recorded))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                         headers=STAFF) as client:
                await order_page(client)
        # Leaving the lifespan flushed the batch processor: the export has been answered.
        assert {(e.path, e.content_type) for e in receiver.exports} == {("/v1/traces", "application/x-protobuf")}
        wire = receiver.spans()
    assert {resource["service.name"] for resource, _ in wire} == {"bookvault-gateway"}
    decoded = {(s.name, s.span_id.hex(), s.parent_span_id.hex(), s.trace_id.hex(), s.kind,
                json.dumps(_attributes(s), sort_keys=True)) for _, s in wire}
    made = {(s.name, format_span_id(s.context.span_id), format_span_id(s.parent.span_id) if s.parent else "",
             format_trace_id(s.context.trace_id), s.kind.value + 1,  # OTLP counts kinds from 1 (0 is unspecified)
             json.dumps(attrs(s), sort_keys=True)) for s in recorded.get_finished_spans()}
    # the server's, the operation's, its four stages (document, variables, cost, plan), per batch: its read and its call
    assert decoded == made and len(made) == 18


@pytest.mark.parametrize("env", [{}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}],
                         ids=["no-endpoint", "exporter-none"])
async def test_without_an_exporter_nothing_is_sent_yet_responses_carry_a_trace_id(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """No endpoint (or OTEL_TRACES_EXPORTER=none): no export is attempted, and the trace id still reaches the client."""
    exported: list[Any] = []
    monkeypatch.setattr(OTLPSpanExporter, "export", lambda self, batch: exported.append(batch))
    for name, value in env.items():  # conftest has cleared the OTEL_* variables
        monkeypatch.setenv(name, value)
    async with gateway_client(shop) as client:
        response = await order_page(client)
    assert len(response.headers["x-trace-id"]) == 32
    assert exported == []


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(series: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return series.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_expose_the_series_and_they_move_after_a_query(traced: httpx.AsyncClient) -> None:
    """/metrics is Prometheus text; an order history moves latency, batch size and request series."""
    before_response = await traced.get("/metrics")
    assert before_response.headers["content-type"].startswith("text/plain; version=")
    before = samples(before_response.text)
    for service in ("customers", "catalog", "inventory", "orders", "payments", "shipping"):
        assert value(before, "bookvault_upstream_breaker_state", service=service) == 0  # closed
        assert ("bookvault_upstream_retries_total", (("service", service),)) in before
    body = (await traced.post("/graphql", json={"query": ORDER_HISTORY, "variables": {"id": "7"}})).json()
    assert "errors" not in body
    after = samples((await traced.get("/metrics")).text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("bookvault_graphql_requests_total", outcome="complete") == 1
    assert moved("bookvault_graphql_request_duration_seconds_count") == 1
    assert moved("bookvault_upstream_latency_seconds_count", service="catalog", route="/books") == 1
    assert moved("bookvault_upstream_latency_seconds_count", service="orders", route="/orders") == 1  # the page
    assert moved("bookvault_upstream_batch_size_sum", service="payments", route="/payments") == 20
    # Buckets count up to and including their bound (`le`): the batch of 20 is in "20", not in "10".
    assert moved("bookvault_upstream_batch_size_bucket", service="payments", route="/payments", le="20.0") == 1
    assert moved("bookvault_upstream_batch_size_bucket", service="payments", route="/payments", le="10.0") == 0
    books = {item["book"]["title"] for n in body["data"]["customer"]["orders"]["nodes"] for item in n["items"]}
    assert moved("bookvault_upstream_batch_size_sum", service="catalog", route="/books") >= len(books)


async def test_cache_retries_stale_and_breaker_facts_land_on_the_read_span_and_in_metrics(
    shop: Shop, spans: InMemorySpanExporter
) -> None:
    """A read span tells cache hits and misses, retries and stale data served, its requests are CLIENT spans; /metrics counts them."""
    clock = WallClock()
    query = '{ books(ids: ["1", "2"]) { id } }'
    async with running_gateway(shop, tracer_provider=recording(spans), wall_clock=clock, service={"retries": 2},
                               resilience=ResilienceConfig(breaker_threshold=3),
                               cache_overrides={"book": (30.0, 600.0)}) as (client, _):
        for _ in range(2):
            assert "errors" not in (await client.post("/graphql", json={"query": query})).json()
        await shop.faults("catalog", errorRate=1.0, errorStatus=503, paths=["/books"])
        clock.now += 31  # past the TTL, within max-stale
        body = (await client.post("/graphql", json={"query": query})).json()
        assert len(body["extensions"]["stale"]) == 2
        series = samples((await client.get("/metrics")).text)
    finished = spans.get_finished_spans()
    first, cached, stale = [s for s in finished if s.name == "read catalog /books"]
    facts = ("bookvault.cache.hits", "bookvault.cache.misses", "bookvault.cache.stale_served", "bookvault.retries")
    assert [tuple(attrs(span)[f] for f in facts) for span in (first, cached, stale)] == [
        (0, 2, 0, 0), (2, 0, 0, 0), (0, 2, 2, 2)]
    assert all(s.kind is SpanKind.INTERNAL for s in (first, cached, stale))
    assert attrs(stale)["error.type"] == "UPSTREAM_UNAVAILABLE" and stale.status.status_code is StatusCode.ERROR
    assert attrs(stale)["bookvault.breaker.state"] == "open"  # three failed attempts in a row
    # Requests sent: one for the cold read, none for the cached one, three for the stale one.
    assert [[attrs(c)["http.response.status_code"] for c in children(finished, s)] for s in (first, cached, stale)] == [
        [200], [], [503, 503, 503]]
    assert value(series, "bookvault_cache_requests_total", entity="book", level="l1", result="hit") == 2
    assert value(series, "bookvault_cache_requests_total", entity="book", level="l1", result="expired") == 2
    assert value(series, "bookvault_cache_stale_served_total", entity="book") == 2
    assert value(series, "bookvault_upstream_retries_total", service="catalog") == 2
    assert value(series, "bookvault_upstream_breaker_state", service="catalog") == 2  # open


class WallClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_requests_are_counted_by_outcome(traced: httpx.AsyncClient, shop: Shop) -> None:
    """A whole answer is complete, data with errors is partial, no data is an error."""
    await order_page(traced)
    await traced.post("/graphql", json={"query": '{ books(ids: ["1", "999999"]) { id } }'})
    await traced.post("/graphql", json={"query": "{ book(id: 1) { title "})
    await traced.post("/graphql", content=b"{ book(id: 1) { title } }", headers={"content-type": "text/plain"})
    series = samples((await traced.get("/metrics")).text)
    counts = {o: value(series, "bookvault_graphql_requests_total", outcome=o) for o in ("complete", "partial", "error")}
    assert counts == {"complete": 1, "partial": 1, "error": 2}


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logs.configure(stream)
    yield stream
    logging.getLogger("bookvault").removeHandler(handler)


async def test_each_request_leaves_one_json_log_line_with_its_trace_id(
    traced: httpx.AsyncClient, log_lines: io.StringIO
) -> None:
    """One JSON line per request: trace id, operation, duration, upstream calls, outcome."""
    response = await order_page(traced)
    await traced.get("/metrics")  # scrapes are not requests worth a line
    (line,) = log_lines.getvalue().splitlines()
    record = json.loads(line)
    assert record["traceId"] == response.headers["x-trace-id"]
    assert {k: record[k] for k in ("logger", "operation", "operationType", "upstreamCalls", "outcome", "status")} == {
        "logger": "bookvault.requests", "operation": "OrderPage", "operationType": "query",
        "upstreamCalls": len(ORDER_PAGE_CALLS), "outcome": "complete", "status": 200}
    assert 0 < record["durationMs"] < 10_000


async def test_a_held_event_loop_shows_in_the_lag_histogram(traced: httpx.AsyncClient) -> None:
    """Something holding the event loop for 150 ms is seen by /metrics' loop-lag histogram; idle wake-ups are prompt."""
    before = samples((await traced.get("/metrics")).text)
    time.sleep(0.15)  # noqa: ASYNC251 - holding the loop is the point: the app runs on this loop
    await asyncio.sleep(0.05)  # the monitor wakes, late, and records it
    after = samples((await traced.get("/metrics")).text)

    def count(bucket: str) -> float:
        key = ("bookvault_event_loop_lag_seconds_bucket", (("le", bucket),))
        return after[key] - before.get(key, 0.0)

    assert count("+Inf") - count("0.1") >= 1  # one wake-up was over 100 ms late


def test_log_lines_carry_rfc3339_utc_times_with_milliseconds() -> None:
    """Each JSON line's time is the record's instant in UTC to the millisecond, as datetime writes it, across second boundaries."""
    formatter = logs.JsonFormatter()
    for created in (1_700_000_000.0, 1_700_000_000.9994, 1_700_000_000.9999996, 1_700_000_001.0005, 1_763_794_800.1229995):
        record = logging.LogRecord("bookvault.test", logging.INFO, __file__, 1, "hello", None, None)
        record.created = created
        line = json.loads(formatter.format(record))
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert line["time"] == expected and line["message"] == "hello" and line["level"] == "info"


async def test_a_write_is_a_client_span_under_the_operation(traced: httpx.AsyncClient, spans: InMemorySpanExporter) -> None:
    """A write has no read span: it is its request's CLIENT span, here refused (409), an error as HTTP clients count them."""
    body = (await traced.post("/graphql", json={"query": f'mutation {{ cancelOrder(id: "{ORDER_ID}") {{ id }} }}'})).json()
    assert body["errors"][0]["extensions"]["code"] == "NOT_CANCELLABLE"  # shipped
    finished = spans.get_finished_spans()
    (write,) = [s for s in of_kind(finished, SpanKind.CLIENT) if attrs(s)["http.request.method"] == "POST"]
    assert parent_id(write) == operation_of(finished).context.span_id
    assert write.name == "POST /orders/{id}/cancel" and call_key(write) == ("orders", "/orders/{id}/cancel")
    assert attrs(write)["http.response.status_code"] == 409 and attrs(write)["error.type"] == "409"
    assert write.status.status_code is StatusCode.ERROR


def staged_app(provider: TracerProvider) -> TelemetryMiddleware:
    """A bare ASGI app under the telemetry middleware that runs one stage inside an operation span."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with operation_span() as op, stage("graphql.document", cached=True):
            op.outcome = "complete"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    telemetry = Telemetry([], provider)
    return TelemetryMiddleware(app, lambda scope: telemetry)


async def test_a_stage_is_an_internal_child_span_only_when_recording(spans: InMemorySpanExporter) -> None:
    """stage() under a recording span makes an INTERNAL child with the name and facts; unsampled, no span at all."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=staged_app(recording(spans))), base_url="http://t") as client:
        await client.post("/graphql")
    finished = spans.get_finished_spans()
    (document,) = [s for s in finished if s.name == "graphql.document"]
    assert document.kind is SpanKind.INTERNAL and parent_id(document) == operation_of(finished).context.span_id
    assert attrs(document) == {"bookvault.document.cached": True}

    unsampled = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(unsampled))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=staged_app(provider)), base_url="http://t") as client:
        assert (await client.post("/graphql")).status_code == 204
    assert unsampled.get_finished_spans() == ()
    with stage("graphql.plan") as nothing:  # outside any request: nothing either
        assert nothing is None


async def test_a_cold_order_pages_stages_are_spans_before_its_first_call(
    traced: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    """The operation's document, cost and plan stages are spans under it, each over before the first request is sent."""
    await order_page(traced)
    finished = spans.get_finished_spans()
    operation = operation_of(finished)
    first_call = min(times(s)[0] for s in of_kind(finished, SpanKind.CLIENT))
    for name in ("graphql.document", "graphql.cost", "graphql.plan"):
        (span,) = [s for s in finished if s.name == name]
        assert span.kind is SpanKind.INTERNAL and parent_id(span) == operation.context.span_id, name
        assert times(span)[1] <= first_call, name
