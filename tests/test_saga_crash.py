"""A crash of the orders process after any checkout step: on restart the saga is resumed to
a final state, and the same key then answers it: one order, one hold, one capture. On
SQLite and PostgreSQL (`--database`), the orders service a real process killed mid-saga."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from saga_shop import assert_consistent, checkout_body, reader

STEPS = ("order", "reserve", "pay", "ship", "confirm", "complete")


@contextlib.asynccontextmanager
async def orders_process(database: str, port: int, urls: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    env = os.environ | {f"BOOKVAULT_{name.upper()}_URL": url for name, url in urls.items()} | {
        "BOOKVAULT_SAGA_BACKOFF_S": "0.01"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mock_services", "orders", "--port", str(port), "--database", database, "--admin",
        env=env, stdout=asyncio.subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(timeout=1) as client, asyncio.timeout(30):
            while True:  # uvicorn in another process offers nothing to await but its socket
                assert process.returncode is None, "orders exited while starting"
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.mark.parametrize("step", STEPS)
async def test_crash_after_a_step_recovers_on_restart(step, live_service, databases, unused_ports):
    """Killed right after `step`: the restarted process finishes the saga alone; the key answers PAID; all consistent."""
    urls = {name: await live_service(name, admin=True) for name in ("catalog", "inventory", "payments", "shipping")}
    inventory = httpx.AsyncClient(base_url=urls["inventory"], timeout=5)
    payments = httpx.AsyncClient(base_url=urls["payments"], timeout=5)
    (await inventory.patch("/stock/11", json={"available": 5})).raise_for_status()
    port, database = unused_ports(1)[0], await databases.url("orders")
    orders = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)
    key, body = {"Idempotency-Key": f"crash-{step}"}, checkout_body([(11, 2)])
    async with orders_process(database, port, urls) as process:
        seq = (await orders.get("/events")).json()["latest"]
        (await orders.post("/_admin/faults", json={"crashAfterStep": step})).raise_for_status()
        with pytest.raises(httpx.TransportError):
            await orders.post("/checkouts", json=body, headers=key)
        assert await asyncio.wait_for(process.wait(), 10) == 70
    async with orders_process(database, port, urls):
        # No request needed: the restarted process resumes the saga and the order settles.
        created = (await orders.get("/events", params={"after": seq, "wait": "10"})).json()["events"][0]
        assert created["type"] == "order.created"
        events: list[dict] = []
        while not any(e["type"] == "order.updated" for e in events):
            page = (await orders.get("/events", params={"after": created["seq"], "wait": "10"})).json()
            assert page["events"], "the saga did not settle after the restart"
            events += page["events"]
        assert (await orders.get(f"/orders/{created['id']}")).json()["status"] == "PAID"
        again = await orders.post("/checkouts", json=body, headers=key)
        async with httpx.AsyncClient(base_url=urls["shipping"], timeout=5) as shipping:
            clients = {"orders": orders, "payments": payments, "inventory": inventory, "shipping": shipping}
            await assert_consistent(reader(clients), created["id"], again.json()["id"])
    assert (again.status_code, again.json()["status"], again.json()["orderId"]) == (201, "COMPLETED", created["id"])
    assert (await inventory.get("/stock/11")).json()["available"] == 3
    paid = (await payments.get("/payments", params={"orderIds": str(created["id"])})).json()["data"]
    assert [p["status"] for p in paid] == ["CAPTURED"]
    reservation = (await inventory.get(f"/reservations/{again.json()['reservationId']}")).json()
    assert (reservation["status"], reservation["orderId"]) == ("CONFIRMED", created["id"])
    for client in (inventory, payments, orders):
        await client.aclose()
