"""Admin: every fault knob is visible to a client; stats record each request; off by default."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest


@pytest.fixture
async def admin_catalog(service) -> httpx.AsyncClient:
    return await service("catalog", admin=True)


async def _durations(client, count: int, path: str = "/books/1") -> list[float]:
    """Server-side durations (stats end - start) of `count` GETs of path."""
    await client.delete("/_admin/stats")
    for _ in range(count):
        assert (await client.get(path)).status_code == 200
    records = (await client.get("/_admin/stats")).json()["requests"]
    assert len(records) == count
    return [r["end"] - r["start"] for r in records]


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/_admin/faults"), ("POST", "/_admin/faults"), ("DELETE", "/_admin/faults"),
    ("GET", "/_admin/stats"), ("DELETE", "/_admin/stats"),
])
async def test_admin_routes_are_404_without_admin(catalog, error_of, method, path):
    """A service started without admin has no /_admin routes, and faults cannot be set."""
    response = await catalog.request(method, path, json={"errorRate": 1} if method == "POST" else None)
    assert error_of(response) == (404, "NOT_FOUND")
    assert (await catalog.get("/books/1")).status_code == 200


async def test_latency_fault_delays_each_response(admin_catalog):
    """latencyMs=500 makes each request take at least 500 ms, by the client's clock and the stats."""
    assert (await admin_catalog.post("/_admin/faults", json={"latencyMs": 500})).json()["latencyMs"] == 500
    started = time.monotonic()
    assert (await admin_catalog.get("/books/1")).status_code == 200
    assert time.monotonic() - started >= 0.5
    assert min(await _durations(admin_catalog, 2)) >= 0.5

    assert (await admin_catalog.delete("/_admin/faults")).status_code == 204
    assert max(await _durations(admin_catalog, 2)) < 0.5  # a loaded machine's margin, still under the fault


async def test_jitter_fault_spreads_latency_up_to_jitter(admin_catalog):
    """jitterMs=300 adds a random 0-300 ms: durations differ and none goes far past 300 ms."""
    await admin_catalog.post("/_admin/faults", json={"jitterMs": 300})
    # A route that reads no database: the bound is the jitter's, not a busy database's.
    durations = await _durations(admin_catalog, 10, "/_meta")
    assert max(durations) < 0.3 + 0.2
    assert max(durations) - min(durations) > 0.02, durations


async def test_error_rate_one_answers_the_chosen_status_and_writes_nothing(admin_catalog, error_of):
    """errorRate=1 with errorStatus=503 answers every request 503 with the error body; a PATCH is not applied."""
    await admin_catalog.post("/_admin/faults", json={"errorRate": 1, "errorStatus": 503})
    for _ in range(3):
        assert error_of(await admin_catalog.get("/books/1")) == (503, "INJECTED_FAULT")
    assert error_of(await admin_catalog.patch("/books/1", json={"title": "Lost"})) == (503, "INJECTED_FAULT")
    statuses = [r["status"] for r in (await admin_catalog.get("/_admin/stats")).json()["requests"]]
    assert statuses == [503] * 4

    await admin_catalog.delete("/_admin/faults")
    book = (await admin_catalog.get("/books/1")).json()
    assert (book["version"], book["title"]) != (2, "Lost")
    assert (await admin_catalog.get("/events")).json()["latest"] == 0


async def test_error_rate_half_fails_some_requests_and_not_others(admin_catalog):
    """errorRate=0.5 fails a share of requests: of 40, some fail and some succeed."""
    await admin_catalog.post("/_admin/faults", json={"errorRate": 0.5})
    statuses = [(await admin_catalog.get("/books/1")).status_code for _ in range(40)]
    assert set(statuses) == {200, 500}


async def test_malformed_fault_sends_a_body_that_is_not_json(admin_catalog):
    """malformed=true answers 200 with a JSON content type but a truncated document."""
    await admin_catalog.post("/_admin/faults", json={"malformed": True})
    response = await admin_catalog.get("/books?ids=1,2")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_paths_filter_limits_faults_to_matching_paths(admin_catalog):
    """With paths=["/books"], books fail while authors and the change feed keep working."""
    await admin_catalog.post("/_admin/faults", json={"errorRate": 1, "paths": ["/books"]})
    assert (await admin_catalog.get("/books/1")).status_code == 500
    assert (await admin_catalog.get("/books?ids=1")).status_code == 500
    assert (await admin_catalog.get("/authors/1")).status_code == 200
    assert (await admin_catalog.get("/events")).status_code == 200


@pytest.mark.parametrize("faults", [
    {"latencyMs": -1}, {"errorRate": 1.5}, {"errorStatus": 200}, {"hang": "yes"}, {"latency": 10}, [],
])
async def test_invalid_faults_are_refused_and_change_nothing(admin_catalog, error_of, faults):
    """A bad faults body is a 400 and the faults in force stay as they were."""
    await admin_catalog.post("/_admin/faults", json={"latencyMs": 1})
    before = (await admin_catalog.get("/_admin/faults")).json()
    assert error_of(await admin_catalog.post("/_admin/faults", json=faults)) == (400, "BAD_REQUEST")
    assert (await admin_catalog.get("/_admin/faults")).json() == before


async def test_hang_holds_requests_until_client_timeout_or_faults_cleared(live_service):
    """hang=true: a client times out; a request hung when the faults are cleared is then served."""
    url = await live_service("catalog", admin=True)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await client.post("/_admin/faults", json={"hang": True, "malformed": True})
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/books/1", timeout=0.5)
        assert time.monotonic() - started < 2

        await client.delete("/_admin/stats")
        hung = asyncio.create_task(client.get("/books/2"))
        for _ in range(200):  # until the server holds the request
            if (await client.get("/_admin/stats")).json()["requests"]:
                break
            await asyncio.sleep(0.01)
        assert not hung.done()
        assert (await client.delete("/_admin/faults")).status_code == 204
        response = await asyncio.wait_for(hung, 5)
        # Released under the faults now in force (none), so the body is whole JSON.
        assert response.status_code == 200
        assert response.json()["id"] == 2


async def test_stats_record_each_request_with_route_ids_times_and_status(admin_catalog):
    """Stats list every non-admin request: route template, distinct ids, monotonic start <= end, status."""
    started = time.monotonic()
    await admin_catalog.get("/books/1")
    await admin_catalog.get("/books", params={"ids": "1,2,2,999999"})
    await admin_catalog.get("/authors/5", headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
    await admin_catalog.get("/events", params={"after": 0})
    await admin_catalog.patch("/books/2", json={"title": "Counted"})
    await admin_catalog.get("/books/999999")
    await admin_catalog.get("/books/x")
    await admin_catalog.get("/nowhere")
    await admin_catalog.get("/_admin/faults")  # admin requests are not recorded
    finished = time.monotonic()

    records = (await admin_catalog.get("/_admin/stats")).json()["requests"]
    assert [(r["method"], r["route"], r["ids"], r["status"]) for r in records] == [
        ("GET", "/books/{id}", 1, 200),
        ("GET", "/books", 3, 200),
        ("GET", "/authors/{id}", 1, 200),
        ("GET", "/events", 0, 200),
        ("PATCH", "/books/{id}", 1, 200),
        ("GET", "/books/{id}", 1, 404),
        ("GET", "/books/{id}", 1, 400),
        ("GET", "/nowhere", 0, 404),
    ]
    assert records[0]["path"] == "/books/1"
    assert records[2]["traceparent"].startswith("00-aaaa")
    for before, after in zip(records, records[1:]):
        assert before["end"] <= after["start"]
    assert all(started <= r["start"] <= r["end"] <= finished for r in records)

    assert (await admin_catalog.delete("/_admin/stats")).status_code == 204
    assert (await admin_catalog.get("/_admin/stats")).json() == {"requests": []}


async def test_stats_record_a_server_error_as_500(service, databases, error_of):
    """A request that fails inside the service is recorded with status 500, and its body has no trace."""
    client = await service("catalog", admin=True, raise_app_exceptions=False)
    await databases.execute("catalog", "ALTER TABLE books RENAME TO gone")  # break the service's own database
    assert error_of(await client.get("/books/1")) == (500, "INTERNAL")
    assert [(r["route"], r["status"]) for r in (await client.get("/_admin/stats")).json()["requests"]] == [
        ("/books/{id}", 500)
    ]
