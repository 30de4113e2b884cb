"""Partial results under failure (ARCHITECTURE.md, "Resilience"): timeouts and the request deadline, retries,
circuit breakers, error shapes, the whole-response flag, health and readiness."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from typing import Any

import httpx
import pytest

from gateway import Settings, UpstreamUnavailable
from gateway.config import ResilienceConfig
from gateway.resilience import Deadline, Resilience
from gateway.upstream import Upstream
from schema import SDL_PATH
from shop import (
    RawServer,
    as_customer,
    Shop,
    closed_port_url,
    gateway_for,
    http_answer,
    on_a_real_port,
    settings_for,
)

ORDER_PAGE = (SDL_PATH.parent / "examples" / "order_page.graphql").read_text()
ORDER_ID = "4850"  # shipped and paid: every service has something to say about it
SERVICES = ("customers", "catalog", "inventory", "orders", "payments", "shipping")
# Where on the order page each service's data sits ("*": every item).
FIELDS_OF = {
    "customers": [("order", "customer")],
    "catalog": [("order", "items", "*", "book")],
    "inventory": [("order", "items", "*", "book", "stock")],
    "orders": [("order",)],
    "payments": [("order", "payment")],
    "shipping": [("order", "shipment")],
}
NO_RETRIES = {"retries": 0}


def flags(body: dict[str, Any]) -> dict[str, Any]:
    """The response-level flags, without the trace id every response carries."""
    return {k: v for k, v in body.get("extensions", {}).items() if k != "traceId"}


class FakeClock:
    """The breakers' time, moved by the test instead of sleeping through a cool-down."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def order_page(client: httpx.AsyncClient, order_id: str = ORDER_ID, caller: str | None = None) -> dict[str, Any]:
    """The order page, as staff (as the staff member `caller`: requests of one caller share identical reads)."""
    headers = as_customer(None, staff=True, subject=caller) if caller else None
    response = await client.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": order_id}}, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def paths_of(service: str, data: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The concrete paths of `service`'s fields on a complete order page."""
    found = []
    for pattern in FIELDS_OF[service]:
        if "*" in pattern:
            star = pattern.index("*")
            found += [(*pattern[:star], i, *pattern[star + 1:]) for i in range(len(data["order"]["items"]))]
        else:
            found.append(pattern)
    return found


def with_nulls(data: dict[str, Any], paths: list[tuple[Any, ...]]) -> dict[str, Any]:
    result = copy.deepcopy(data)
    for path in paths:
        node = result
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = None
    return result


def failures(body: dict[str, Any]) -> list[tuple[tuple[Any, ...], str, str | None]]:
    """Each error as (path, code, service), sorted."""
    return sorted((tuple(e["path"]), e["extensions"]["code"], e["extensions"].get("service")) for e in body["errors"])


def statuses(calls: list[dict[str, Any]]) -> list[int]:
    return [c["status"] for c in calls]


@pytest.mark.parametrize("down", SERVICES)
async def test_order_page_renders_with_any_one_service_down(
    gateway: httpx.AsyncClient, shop: Shop, down: str
) -> None:
    """With one service's port closed, its fields are null with UPSTREAM_UNAVAILABLE at their paths; the rest is whole."""
    whole = await order_page(gateway)
    assert "errors" not in whole and not flags(whole)
    async with gateway_for(shop, urls={down: closed_port_url()}) as degraded:
        body = await order_page(degraded)
    paths = paths_of(down, whole["data"])
    assert body["data"] == with_nulls(whole["data"], paths)
    assert failures(body) == sorted((p, "UPSTREAM_UNAVAILABLE", down) for p in paths)
    assert flags(body) == {"complete": False, "failedServices": [down]}


async def test_a_slow_service_times_out_at_its_own_timeout(shop: Shop) -> None:
    """A service slower than its timeout gives UPSTREAM_TIMEOUT at its field, sent once, in about its timeout."""
    await shop.faults("payments", latencyMs=5000)
    async with gateway_for(shop, per_service={"payments": {"connect_timeout": 0.1, "read_timeout": 0.2}}) as client:
        started = time.monotonic()
        body = await order_page(client)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0  # the service would take 5 s; a wide margin for a loaded machine
    assert failures(body) == [(("order", "payment"), "UPSTREAM_TIMEOUT", "payments")]
    assert body["data"]["order"]["shipment"]["carrier"] and body["data"]["order"]["customer"]["name"]
    assert len((await shop.calls())["payments"]) == 1  # a timeout is not retried


async def test_the_deadline_cuts_calls_still_in_flight(shop: Shop) -> None:
    """Past the request's deadline, calls in flight are cancelled: UPSTREAM_TIMEOUT, and the answer comes in time."""
    await shop.faults("payments", hang=True)
    await shop.faults("shipping", latencyMs=5000)
    async with gateway_for(shop, resilience=ResilienceConfig(deadline=0.5)) as client:
        started = time.monotonic()
        body = await order_page(client)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0  # the calls would take 5 s or forever
    assert failures(body) == [(("order", "payment"), "UPSTREAM_TIMEOUT", "payments"),
                              (("order", "shipment"), "UPSTREAM_TIMEOUT", "shipping")]
    assert body["data"]["order"]["customer"]["name"] and body["data"]["order"]["items"][0]["book"]["title"]
    assert flags(body) == {"complete": False, "failedServices": ["payments", "shipping"]}


async def test_a_call_that_cannot_finish_in_time_is_not_started(shop: Shop) -> None:
    """When the order itself eats the budget, the level that needs its data is not called at all and times out
    (the payment and shipment too: they are read only once the order shows whose it is)."""
    await shop.faults("orders", latencyMs=300)
    async with gateway_for(shop, resilience=ResilienceConfig(deadline=0.6, min_call=0.35)) as client:
        body = await order_page(client)
    assert body["data"]["order"]["id"] == ORDER_ID
    codes = {(service, code) for _, code, service in failures(body)}
    assert codes == {(s, "UPSTREAM_TIMEOUT") for s in ("customers", "catalog", "payments", "shipping")}
    calls = await shop.calls()
    assert [name for name, reqs in calls.items() if reqs] == ["orders"]


async def test_a_read_timeout_holds_over_a_real_socket(shop: Shop) -> None:
    """Over a real socket, httpx's read timeout answers first: UPSTREAM_TIMEOUT well before the asyncio cap."""
    await shop.faults("payments", hang=True)
    async with on_a_real_port(shop.apps["payments"]) as url:
        slow = {"payments": {"connect_timeout": 5.0, "read_timeout": 0.2}}
        async with gateway_for(shop, urls={"payments": url}, per_service=slow) as client:
            started = time.monotonic()
            body = await order_page(client)
            elapsed = time.monotonic() - started
    assert elapsed < 2.0  # the asyncio cap would be connect + read = 5.2 s
    assert failures(body) == [(("order", "payment"), "UPSTREAM_TIMEOUT", "payments")]


PAYMENT_200 = json.dumps({"data": [{"id": 1, "orderId": int(ORDER_ID), "amount": {"amount": "1.00", "currency": "EUR"},
                                    "method": "card", "status": "CAPTURED", "version": 1}], "missing": []}).encode()
# kind: (faults on the real payments service | "cap" | None, a raw server to use instead, code, times sent)
MISBEHAVIOUR = {
    "malformed-json": ({"malformed": True}, None, "UPSTREAM_BAD_RESPONSE", 1),
    "html-error-page": (None, lambda: RawServer(http_answer("200 OK", "text/html", b"<html><h1>Bad gateway</h1></html>")),
                        "UPSTREAM_BAD_RESPONSE", 1),
    "body-over-the-cap": ("cap", None, "UPSTREAM_BAD_RESPONSE", 1),
    "storm-of-500s": ({"errorRate": 1, "errorStatus": 500}, None, "UPSTREAM_UNAVAILABLE", 1),  # 500: not retried
    "reset-mid-body": (None, lambda: RawServer(http_answer("200 OK", "application/json", PAYMENT_200[:40],
                                                           length=len(PAYMENT_200)), cut=True),
                       "UPSTREAM_UNAVAILABLE", 3),  # a dropped read is retried
    "hang": ({"hang": True}, None, "UPSTREAM_TIMEOUT", 1),
}


@pytest.mark.parametrize("kind", MISBEHAVIOUR)
async def test_upstream_misbehaviour_is_an_error_at_its_path_never_a_500(shop: Shop, kind: str) -> None:
    """Broken answers from payments become a typed error at order.payment; status 200, the rest of the page intact."""
    faults, make_raw, code, sent = MISBEHAVIOUR[kind]
    raw = make_raw() if make_raw else None
    settings: dict[str, Any] = {"retries": 2, "per_service": {"payments": {"connect_timeout": 0.1, "read_timeout": 0.3}}}
    if faults == "cap":
        settings["per_service"]["payments"]["max_body_bytes"] = 100
    elif faults:
        await shop.faults("payments", **faults)
    async with raw.serving() if raw else contextlib.nullcontext() as url:
        if url:
            settings["urls"] = {"payments": url}
        async with gateway_for(shop, **settings) as client:
            body = await order_page(client)
    assert failures(body) == [(("order", "payment"), code, "payments")]
    assert body["data"]["order"]["shipment"]["carrier"] and body["data"]["order"]["customer"]["name"]
    assert flags(body) == {"complete": False, "failedServices": ["payments"]}
    assert (len(raw.requests) if raw else len((await shop.calls())["payments"])) == sent


async def test_reads_are_retried_and_then_succeed(shop: Shop) -> None:
    """Two 503s then a 200: the read is sent three times and the page is complete."""
    await shop.faults("payments", errorRate=1, errorStatus=503, count=2)
    async with gateway_for(shop, retries=2) as client:
        body = await order_page(client)
    assert "errors" not in body and body["data"]["order"]["payment"]["status"] == "CAPTURED"
    assert statuses((await shop.calls())["payments"]) == [503, 503, 200]


async def test_a_retry_waits_as_long_as_retry_after_asks(shop: Shop) -> None:
    """A 429 with Retry-After: 1 is retried after at least a second; one asking past the deadline is not retried."""
    async with shop.client("payments") as direct:
        payload = (await direct.get(f"/payments?orderIds={ORDER_ID}")).content
    limited = http_answer("429 Too Many Requests", "application/json", b"{}", {"retry-after": "1"})
    server = RawServer(limited, http_answer("200 OK", "application/json", payload))
    async with server.serving() as url, gateway_for(shop, urls={"payments": url}) as client:
        started = time.monotonic()
        body = await order_page(client)
        elapsed = time.monotonic() - started
    assert "errors" not in body and len(server.requests) == 2
    assert 1.0 <= elapsed < 1.0 + 1.5

    too_long = RawServer(http_answer("429 Too Many Requests", "application/json", b"{}", {"retry-after": "30"}))
    async with too_long.serving() as url, gateway_for(shop, urls={"payments": url}) as client:
        started = time.monotonic()
        body = await order_page(client)
    assert time.monotonic() - started < 5 and len(too_long.requests) == 1  # 30 s if it waited
    assert failures(body) == [(("order", "payment"), "UPSTREAM_UNAVAILABLE", "payments")]


async def test_retries_stay_within_the_deadline(shop: Shop) -> None:
    """A service failing slowly is retried only while the deadline leaves room; the answer is on time."""
    await shop.faults("payments", errorRate=1, errorStatus=503, latencyMs=300)
    config = ResilienceConfig(deadline=1.0, min_call=0.35, breaker_threshold=100)  # no third 300 ms call fits
    async with gateway_for(shop, retries=10, resilience=config) as client:
        started = time.monotonic()
        body = await order_page(client)
        elapsed = time.monotonic() - started
    assert elapsed < 2.0  # 11 calls of 300 ms would take 3.3 s
    assert failures(body) == [(("order", "payment"), "UPSTREAM_UNAVAILABLE", "payments")]
    assert 2 <= len((await shop.calls())["payments"]) <= 3  # 11 were allowed; 300 ms each cannot fit


async def test_the_retry_budget_caps_retries_across_requests(shop: Shop) -> None:
    """With one retry in the budget and none earned, the first request retries once and the next not at all."""
    await shop.faults("payments", errorRate=1, errorStatus=503)
    config = ResilienceConfig(retry_ratio=0, retry_burst=1, breaker_threshold=100)
    async with gateway_for(shop, retries=3, resilience=config) as client:
        await order_page(client)
        assert len((await shop.calls())["payments"]) == 2
        await shop.reset_stats()
        await order_page(client)
    assert len((await shop.calls())["payments"]) == 1


async def test_writes_are_never_retried(shop: Shop) -> None:
    """A POST that gets a 503 is sent once (a GET under the same fault is sent three times); a healthy POST writes."""
    settings = settings_for(shop, retries=2)
    resilience = Resilience(settings.services, settings.resilience)
    retried: list[tuple[str, int]] = []
    resilience.on_retry.append(lambda service, attempt, error: retried.append((service, attempt)))
    upstream = Upstream(settings.services, shop.transports, resilience)
    order = {"customerId": 7, "items": [{"bookId": 12, "quantity": 1, "unitPrice": {"amount": "5.00", "currency": "EUR"},
                                         "titleAtPurchase": "Kept"}]}
    try:
        await shop.faults("orders", errorRate=1, errorStatus=503)
        with pytest.raises(UpstreamUnavailable) as failed:
            await upstream.request("orders", "POST", "/orders", json=order)
        assert failed.value.attempts == 1
        assert retried == []
        with pytest.raises(UpstreamUnavailable) as read:
            await upstream.get_json("orders", "/orders?ids=1")
        assert read.value.attempts == 3 and retried == [("orders", 1), ("orders", 2)]
        assert [c["method"] for c in (await shop.calls())["orders"]] == ["POST", "GET", "GET", "GET"]
        await shop.faults("orders")
        created = await upstream.request("orders", "POST", "/orders", json=order)
        assert created["customerId"] == 7
    finally:
        await upstream.aclose()


async def test_the_remaining_budget_reaches_the_services(shop: Shop) -> None:
    """Every call carries X-Request-Deadline-Ms with what is left of the request's budget, less at each level."""
    async with gateway_for(shop, resilience=ResilienceConfig(deadline=0.8)) as client:
        await order_page(client)
    calls = await shop.calls()
    budgets = {name: [int(c["deadlineMs"]) for c in reqs] for name, reqs in calls.items()}
    assert all(budgets.values()) and all(0 < b <= 800 for bs in budgets.values() for b in bs)
    assert max(budgets["payments"]) <= min(budgets["orders"])  # asked after the order came back


async def test_the_breaker_opens_after_consecutive_failures_and_fails_fast(shop: Shop, caplog: pytest.LogCaptureFixture) -> None:
    """Three 503s in a row open payments' breaker: the next page gets UPSTREAM_UNAVAILABLE without calling payments."""
    await shop.faults("payments", errorRate=1, errorStatus=503)
    config = ResilienceConfig(breaker_threshold=3, breaker_cooldown=5.0)
    with caplog.at_level(logging.WARNING, logger="bookvault.resilience"):
        async with gateway_for(shop, resilience=config, clock=FakeClock(), **NO_RETRIES) as client:
            for _ in range(3):
                await order_page(client)
            assert len((await shop.calls())["payments"]) == 3
            await shop.reset_stats()
            started = time.monotonic()
            body = await order_page(client)
            assert time.monotonic() - started < 2  # the call is not made at all (checked below)
            ready = (await client.get("/readyz")).json()
    assert failures(body) == [(("order", "payment"), "UPSTREAM_UNAVAILABLE", "payments")]
    assert (await shop.calls())["payments"] == []
    assert ready["services"]["payments"]["breaker"] == "open" and ready["services"]["orders"]["breaker"] == "closed"
    assert ["circuit breaker payments: closed -> open after 3 consecutive failures"] == [r.getMessage() for r in caplog.records]


async def test_half_open_sends_exactly_one_probe_then_closes(shop: Shop) -> None:
    """After the cool-down, of five concurrent pages only one reaches payments; it succeeds and the breaker closes."""
    clock = FakeClock()
    await shop.faults("payments", errorRate=1, errorStatus=503)
    config = ResilienceConfig(breaker_threshold=2, breaker_cooldown=5.0)
    async with gateway_for(shop, resilience=config, clock=clock, **NO_RETRIES) as client:
        for _ in range(2):
            await order_page(client)
        await shop.faults("payments", hang=True)  # the probe waits there until the faults are cleared
        await shop.reset_stats()
        clock.now += 4.9
        assert failures(await order_page(client))[0][1] == "UPSTREAM_UNAVAILABLE"  # still open
        clock.now += 0.2
        # Five callers (one caller's identical reads in flight would share the probe's call).
        pages = [asyncio.ensure_future(order_page(client, caller=f"staff-{i}")) for i in range(5)]
        pending = set(pages)
        async with asyncio.timeout(1.5):  # a second probe would hang here until its 2 s timeout
            while len(pending) > 1:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len((await shop.calls())["payments"]) == 1
        await shop.faults("payments")  # healthy again: the probe is answered
        (probe,) = pending
        assert (await probe)["data"]["order"]["payment"]["status"] == "CAPTURED"
        assert all(failures(p.result())[0][1] == "UPSTREAM_UNAVAILABLE" for p in pages if p is not probe)
        after = await order_page(client)
        ready = (await client.get("/readyz")).json()
    assert "errors" not in after and ready["services"]["payments"]["breaker"] == "closed"
    assert len((await shop.calls())["payments"]) == 2


async def test_a_failed_probe_opens_the_breaker_again(shop: Shop) -> None:
    """A probe that fails re-opens the breaker for another cool-down: the next page makes no call."""
    clock = FakeClock()
    await shop.faults("payments", errorRate=1, errorStatus=503)
    config = ResilienceConfig(breaker_threshold=1, breaker_cooldown=5.0)
    async with gateway_for(shop, resilience=config, clock=clock, **NO_RETRIES) as client:
        await order_page(client)
        clock.now += 5.0
        await shop.reset_stats()
        await order_page(client)  # the probe
        await order_page(client)  # open again
    assert statuses((await shop.calls())["payments"]) == [503]


async def test_internal_errors_are_masked(shop: Shop, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours becomes a generic 'Internal error' at its path; the details go to the log only."""
    decode = Upstream._decode

    def buggy(reply: Any, service: str) -> Any:
        if service == "payments":
            raise RuntimeError("secret detail: db password hunter2")
        return decode(reply, service)

    monkeypatch.setattr(Upstream, "_decode", staticmethod(buggy))
    with caplog.at_level(logging.ERROR, logger="bookvault.gateway"):
        async with gateway_for(shop) as client:
            response = await client.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": ORDER_ID}})
    body = response.json()
    assert response.status_code == 200 and "hunter2" not in response.text
    assert failures(body) == [(("order", "payment"), "INTERNAL_SERVER_ERROR", None)]
    assert body["errors"][0]["message"] == "Internal error"
    assert flags(body) == {"complete": False, "failedServices": []}
    assert any("hunter2" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


async def test_not_found_is_not_a_partial_response(gateway: httpx.AsyncClient) -> None:
    """An id that does not exist is an answer, not a failure: no completeness flag."""
    body = (await gateway.post("/graphql", json={"query": "{ book(id: 999999) { title } }"})).json()
    assert body["data"] == {"book": None} and not flags(body)
    assert failures(body) == [(("book",), "NOT_FOUND", "catalog")]


async def test_healthz_and_readyz_report_the_process_and_the_breakers(shop: Shop) -> None:
    """/healthz is always ok; /readyz lists breakers and caches, and answers 503 only once every breaker is open."""
    config = ResilienceConfig(breaker_threshold=1, breaker_cooldown=60.0)
    async with gateway_for(shop, resilience=config, clock=FakeClock(), **NO_RETRIES) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {
            "status": "ready",
            "services": {name: {"breaker": "closed", "failures": 0} for name in SERVICES},
            "caches": {"memory": {"status": "ok"}},
        }
        for name in ("inventory", "payments", "shipping"):
            await shop.faults(name, errorRate=1, errorStatus=503)
        await order_page(client)
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert {n for n, s in ready.json()["services"].items() if s["breaker"] == "open"} == {
            "inventory", "payments", "shipping"}
        for name in ("customers", "catalog", "orders"):
            await shop.faults(name, errorRate=1, errorStatus=503)
        await client.post("/graphql", json={"query": "{ order(id: 1) { id } customer(id: 1) { id } book(id: 1) { id } }"})
        not_ready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "unavailable"
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_settings_read_the_resilience_variables() -> None:
    """BOOKVAULT_DEADLINE_MS, _RETRIES, BREAKER_* and the retry budget come from the environment."""
    settings = Settings.from_env({
        "BOOKVAULT_DEADLINE_MS": "1500", "BOOKVAULT_PAYMENTS_RETRIES": "0", "BOOKVAULT_BREAKER_THRESHOLD": "7",
        "BOOKVAULT_BREAKER_COOLDOWN_MS": "250", "BOOKVAULT_RETRY_BUDGET_RATIO": "0",
    })
    assert (settings.resilience.deadline, settings.resilience.breaker_threshold) == (1.5, 7)
    assert (settings.resilience.breaker_cooldown, settings.resilience.retry_ratio) == (0.25, 0.0)
    assert (settings.services["payments"].retries, settings.services["orders"].retries) == (0, 2)
    with pytest.raises(ValueError, match="BOOKVAULT_DEADLINE_MS"):
        Settings.from_env({"BOOKVAULT_DEADLINE_MS": "0"})


def test_a_caller_may_ask_for_a_shorter_deadline() -> None:
    """A client's own X-Request-Deadline-Ms shortens the budget, never lengthens it."""
    assert Deadline.for_request(2.0, "500").remaining() <= 0.5
    assert 1.9 < Deadline.for_request(2.0, "9000").remaining() <= 2.0
    assert 1.9 < Deadline.for_request(2.0, "soon").remaining() <= 2.0
