"""A clean stop: Ctrl-C on `bookvault demo` stops the gateway, then the services, with no
traceback; a change-feed long-poll ends as soon as its client goes or its service stops."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
from process_tree import stack_env, start

from gateway.auth import mint
from mock_services import SERVICES

STOP_BOUND_S = 8.0  # well under the 10 s a feed long-poll would otherwise hold a process


async def test_ctrl_c_on_the_demo_stops_everything_quickly_without_a_traceback(data_dir, unused_ports):
    """SIGINT on `bookvault demo` (gateway following every feed) exits 0 within the bound, every port closed, stderr free of tracebacks and feed errors."""
    ports = unused_ports(len(SERVICES) + 1)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in zip(SERVICES, ports)}
    gateway = f"http://127.0.0.1:{ports[-1]}"
    env = stack_env(ports[:-1], ports[-1], BOOKVAULT_FEED_WAIT_S="10")
    # `start` ends the demo and every child, and reaps it within a bound, even when an
    # assertion fails here: orphans holding the pipes would otherwise hang the whole run.
    async with start("demo", data_dir, ports, env=env, stderr=asyncio.subprocess.PIPE) as stack:
        process = stack.process
        assert process.stderr is not None
        await stack.ready()
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{gateway}/healthz")).status_code == 200
            for _ in range(200):  # once every feed has its cursor, all six are long-polling
                feeds = (await client.get(f"{gateway}/readyz")).json().get("feeds", {})
                if len(feeds) == len(SERVICES) and all(f["status"] == "ok" for f in feeds.values()):
                    break
                await asyncio.sleep(0.05)
            assert len(feeds) == len(SERVICES) and all(f["status"] == "ok" for f in feeds.values()), feeds
            # The demo made its token secret; `bookvault token --staff` would sign with it.
            staff = mint((data_dir / "jwt-secret").read_text().strip(), "staff", scopes=["staff"])
            query = {"query": 'query { order(id: 4850) { status customer { name } } }'}
            answer = await client.post(f"{gateway}/graphql", json=query, headers={"authorization": f"Bearer {staff}"})
            assert answer.json()["data"]["order"]["status"]

        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), STOP_BOUND_S + 5) == 0
        took = time.monotonic() - started
        stderr = (await asyncio.wait_for(process.stderr.read(), 5)).decode()
    assert took < STOP_BOUND_S
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr[-3000:]
    assert "change feed" not in stderr, stderr[-3000:]  # the gateway went first: no feed lost its service
    async with httpx.AsyncClient(timeout=1) as client:
        for url in [*urls.values(), gateway]:
            try:
                await client.get(f"{url}/healthz")
            except httpx.ConnectError:
                continue
            raise AssertionError(f"{url} still answers after the demo stopped")


async def test_a_feed_long_poll_ends_when_its_client_goes(live_service):
    """A /events long-poll whose client disconnects ends at once on the service, not after its wait (its /_admin/stats end time)."""
    url = await live_service("catalog", admin=True)
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        latest = (await client.get("/events", params={"after": 0, "limit": 1})).json()["latest"]
        poll = asyncio.create_task(client.get("/events", params={"after": latest, "wait": 10}))
        for _ in range(200):  # until the service has the long-poll in hand
            stats = (await client.get("/_admin/stats")).json()["requests"]
            if any(r["route"] == "/events" and r["end"] is None for r in stats):
                break
            await asyncio.sleep(0.01)
        poll.cancel()  # the client goes away: httpx closes the connection
        left = time.monotonic()
        for _ in range(300):
            polls = [r for r in (await client.get("/_admin/stats")).json()["requests"] if r["route"] == "/events"]
            if polls[-1]["end"] is not None:
                break
            await asyncio.sleep(0.01)
    assert polls[-1]["end"] is not None and polls[-1]["end"] - left < 2.0
