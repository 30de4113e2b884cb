"""Prometheus series for /metrics (ARCHITECTURE.md, "Telemetry"), one registry per app.

The cache and resilience code report through the module functions below
(`record_cache`, `record_stale`, `record_retry`). They act on the
`Metrics` bound to the current context: the request middleware binds its app's for each
request, so the functions need no plumbing, and two apps in one process (tests) never
mix their counts. Outside a request they do nothing."""

from __future__ import annotations

import bisect
import contextvars
import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

__all__ = [
    "Metrics",
    "CONTENT_TYPE",
    "BREAKER_STATES",
    "record_cache",
    "record_stale",
    "record_retry",
    "record_consistency",
    "LiveCollector",
    "ConnectionCollector",
]

# The breaker gauge's values: an alert on `> 0` catches every breaker that is not closed.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
OUTCOMES = ("complete", "partial", "error")
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200)


class _Plain:
    """A labelled counter or histogram kept as plain numbers and read when /metrics is
    scraped, for the series every request moves a dozen times (cache lookups, batch sizes):
    prometheus_client takes a lock per increment (about 1 us per update), and the
    gateway updates them from its event loop only. Same names, labels and buckets."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 buckets: tuple[float, ...] | None = None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.buckets = buckets
        self._children: dict[tuple[str, ...], _PlainChild] = {}
        if not self.labelnames:
            self._unlabelled = self.labels()

    def labels(self, *values: str) -> _PlainChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _PlainChild(self.buckets)
        return child

    def inc(self, amount: float = 1) -> None:
        self._unlabelled.inc(amount)

    def observe(self, value: float) -> None:
        self._unlabelled.observe(value)

    def collect(self) -> Iterator[Any]:
        if self.buckets is None:
            family: Any = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, child in self._children.items():
                family.add_metric(values, child.total)
        else:
            family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            bounds = [floatToGoString(b) for b in self.buckets] + ["+Inf"]
            for values, child in self._children.items():
                family.add_metric(values, list(zip(bounds, itertools.accumulate(child.counts))), child.total)
        yield family


class _PlainChild:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, buckets: tuple[float, ...] | None) -> None:
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1) if buckets is not None else []
        self.total = 0.0  # a counter's value, a histogram's sum

    def inc(self, amount: float = 1) -> None:
        self.total += amount

    def observe(self, value: float) -> None:
        self.total += value
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # type: ignore[arg-type]


class Metrics:
    """The gateway's series in their own registry."""

    def __init__(self, services: Iterable[str]) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)  # memory, CPU, GC: stateless, safe to share
        self.upstream_latency = Histogram(
            "bookvault_upstream_latency_seconds",
            "Time one upstream batch call took, retries included, by service and route",
            ["service", "route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.batch_size = _Plain(
            "bookvault_upstream_batch_size", "Ids in one batch load, by service and route",
            ["service", "route"], buckets=_BATCH_BUCKETS)
        self.upstream_errors = Counter(
            "bookvault_upstream_errors_total", "Upstream batch calls that failed, by service and error code",
            ["service", "code"], registry=registry)
        self.retries = Counter(
            "bookvault_upstream_retries_total", "Upstream requests sent again after a failure", ["service"],
            registry=registry)
        self.breaker = Gauge(
            "bookvault_upstream_breaker_state", "Circuit breaker per service: 0 closed, 1 half-open, 2 open",
            ["service"], registry=registry)
        self.cache = _Plain(
            "bookvault_cache_requests", "Entity cache lookups by entity type, level (l1, l2) and result (hit, expired, miss)",
            ["entity", "level", "result"])
        self.stale = Counter(
            "bookvault_cache_stale_served_total", "Entities served stale because their service failed",
            ["entity"], registry=registry)
        self.requests = _Plain(
            "bookvault_graphql_requests", "GraphQL requests by outcome: complete, partial (data and errors), error, subscription (an HTTP stream)",
            ["outcome"])
        self.consistency = Counter(
            "bookvault_consistency_checks_total",
            "Services a request's consistency token named beyond this instance's feed: `waited` (caught up), "
            "`bypassed` (read past the caches), `refuted` (beyond the service's own feed)",
            ["service", "outcome"], registry=registry)
        self.loop_lag = Histogram(
            "bookvault_event_loop_lag_seconds",
            "How late the event loop ran a 20 ms timer: how long something held the loop (or the process "
            "waited for a CPU); the front door's promise is that no request holds it for ~50 ms",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=registry)
        self.duration = _Plain(
            "bookvault_graphql_request_duration_seconds", "Time from request to response, per GraphQL request",
            buckets=_LATENCY_BUCKETS)
        for plain in (self.batch_size, self.cache, self.requests, self.duration):
            registry.register(plain)
        for service in services:  # per-service series exist from the start: a dashboard shows 0, not "no data"
            self.breaker.labels(service).set(0)  # a breaker starts closed
            self.retries.labels(service)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client checks and locks on
        every `labels()` call, and a request makes a dozen (label values are few and bounded)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    @contextmanager
    def bound(self) -> Iterator[None]:
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)


_CURRENT: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar("bookvault_metrics", default=None)


def record_cache(entity: str, level: str, result: str, count: int = 1) -> None:
    """`count` lookups of `entity` at `level` ("l1" or "l2") with `result` "hit" (fresh),
    "expired" (found past its TTL, so revalidated) or "miss"."""
    if count and (m := _CURRENT.get()) is not None:
        m.child(m.cache, entity, level, result).inc(count)


def record_stale(entity: str, count: int = 1) -> None:
    """`count` entities served from cache past their TTL because the service failed."""
    if (m := _CURRENT.get()) is not None:
        m.child(m.stale, entity).inc(count)


def record_retry(service: str) -> None:
    """One more attempt of a request to `service` after a failed one."""
    if (m := _CURRENT.get()) is not None:
        m.child(m.retries, service).inc()


def record_consistency(service: str, outcome: str) -> None:
    """A consistency token named a feed position of `service` this instance had not applied:
    `outcome` is "waited", "bypassed" or "refuted"."""
    if (m := _CURRENT.get()) is not None:
        m.child(m.consistency, service, outcome).inc()


class LiveCollector:
    """The live hub's counts, read when /metrics is scraped (README, "Subscriptions"); the
    hub keeps plain integers, so a message costs no series update."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Any]:
        hub = self.hub
        yield GaugeMetricFamily("bookvault_live_subscriptions", "Subscriptions this instance holds", value=hub.count)
        yield CounterMetricFamily("bookvault_live_messages", "Messages queued to subscribers", value=hub.sent)
        yield CounterMetricFamily("bookvault_live_slow_consumers", "Subscriptions dropped because their client "
                                  "did not read (WebSocket 4008)", value=hub.dropped)
        yield CounterMetricFamily("bookvault_live_rounds", "Rounds of changes read and fanned out", value=hub.rounds)
        yield CounterMetricFamily("bookvault_live_expired", "Subscriptions ended because their caller's token "
                                  "expired (WebSocket 4403, SSE UNAUTHENTICATED)", value=hub.expired)
        yield CounterMetricFamily("bookvault_live_pings_dropped", "Client pings left unanswered: past "
                                  "BOOKVAULT_LIVE_PING_RATE", value=hub.pings_dropped)


class ConnectionCollector:
    """The connection bounds' counts (gateway/connections.py), read when /metrics is scraped;
    the server keeps plain integers, so a connection costs no series update."""

    def __init__(self, connections: Any) -> None:
        self.connections = connections

    def collect(self) -> Iterator[Any]:
        c = self.connections
        yield GaugeMetricFamily("bookvault_connections_open", "Client connections this instance holds, "
                                "WebSockets included", value=c.open)
        yield GaugeMetricFamily("bookvault_connections_idle", "Of those, connections with no request in "
                                "progress (the first closed when the cap is reached)", value=len(c.idle))
        yield GaugeMetricFamily("bookvault_connections_limit", "The instance's connection cap "
                                "(BOOKVAULT_MAX_CONNECTIONS, lowered to fit the file-descriptor limit)", value=c.limit)
        yield GaugeMetricFamily("bookvault_streams_open", "WebSockets and event streams open", value=c.streams_open)
        refused = CounterMetricFamily(
            "bookvault_connections_refused", "Connections closed or requests refused by a connection bound, by "
            "reason: head_timeout, body_timeout, head_too_large, idle_evicted (closed to make room at the cap), "
            "instance_limit and address_limit (503), stream_limit", labels=["reason"])
        for reason, count in c.refused.items():
            refused.add_metric([reason], count)
        yield refused
