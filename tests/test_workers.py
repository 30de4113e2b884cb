"""`bookvault gateway --workers 2` (README, "Workers"; issue 27) as a subprocess over the
services on real ports: one port, two supervised gateway processes, told apart by the
`bookvault-worker` header of /healthz (each answer's pid)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from ports import free_port
from process_tree import Proc, alive, descendants, end, listening
from prometheus_client.parser import text_string_to_metric_families
from shop import TEST_SECRET, Shop, on_a_real_port
from test_subscriptions import ORDER, next_event, order_of, patch, sse, token

from gateway.config import Settings
from gateway.consistency import TOKEN_HEADER, Consistency
from gateway.workers import WORKER_HEADER

START_BOUND_S = 60.0
BOOK = "query($id: ID!) { book(id: $id) { title } }"
STAFF_ORDER = "query($id: ID!) { order(id: $id) { status } }"


@dataclass
class Workers:
    process: asyncio.subprocess.Process
    url: str
    env: dict[str, str]
    port: int
    output: bytearray  # the supervisor's and workers' stderr so far (one JSON line per request)


def fresh() -> httpx.AsyncClient:
    """A client whose every request opens a connection of its own (the kernel picks the worker)."""
    return httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0))


async def pid_of(client: httpx.AsyncClient, url: str) -> int:
    answer = await client.get(f"{url}/healthz")
    assert answer.status_code == 200
    return int(answer.headers[WORKER_HEADER])


async def pids_seen(url: str, want: int, exclude: frozenset[int] = frozenset()) -> set[int]:
    """Worker pids answering /healthz on fresh connections (outside `exclude`), until `want` are seen."""
    seen: set[int] = set()
    async with fresh() as client, asyncio.timeout(START_BOUND_S):
        while len(seen - exclude) < want:
            with contextlib.suppress(httpx.TransportError):
                seen |= set(await asyncio.gather(*(pid_of(client, url) for _ in range(8))))
    return seen - exclude


@contextlib.asynccontextmanager
async def workers(shop: Shop, count: int = 2) -> AsyncIterator[Workers]:
    """`bookvault gateway --workers count` over `shop`'s services, ready (every worker answers);
    the supervisor and every descendant killed and reaped on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(on_a_real_port(app)) for name, app in shop.apps.items()}
        port = free_port()
        env = os.environ | {f"BOOKVAULT_{n.upper()}_URL": u for n, u in urls.items()} | {
            "BOOKVAULT_PORT": str(port), "BOOKVAULT_JWT_SECRET": TEST_SECRET, "BOOKVAULT_FEED_WAIT_S": "1"}
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("bookvault")), "gateway", "--workers", str(count), env=env,
            start_new_session=True, stderr=asyncio.subprocess.PIPE)
        known: list[Proc] = []
        output = bytearray()

        async def drain() -> None:  # a full pipe would stop every worker at its next log line
            assert process.stderr is not None
            while chunk := await process.stderr.read(65536):
                output.extend(chunk)
        draining = asyncio.create_task(drain())
        try:
            url = f"http://127.0.0.1:{port}"
            await pids_seen(url, count)
            known = descendants(process.pid)
            yield Workers(process, url, env, port, output)
        finally:
            await end(process, known)
            draining.cancel()


async def query(client: httpx.AsyncClient, url: str, text: str, bearer: str, token: str | None = None,
                **variables: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {bearer}"} | ({TOKEN_HEADER: token} if token else {})
    return await client.post(f"{url}/graphql", json={"query": text, "variables": variables}, headers=headers)


def counted(text: str, name: str, outcome: str) -> dict[str, float]:
    """`name`'s samples with `outcome`, by worker label."""
    return {s.labels.get("worker", ""): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name and s.labels.get("outcome") == outcome}


async def test_two_workers_on_one_port_answer_concurrent_requests_and_metrics_count_them_all(shop: Shop) -> None:
    """Two worker pids answer on one port; 40 concurrent queries all succeed, and /metrics, from either worker, counts all 40 by worker."""
    async with workers(shop) as running:
        pids = await pids_seen(running.url, 2)
        assert len(pids) == 2 and all(p in {d.pid for d in descendants(running.process.pid)} for p in pids)
        staff = token(staff=True)
        async with fresh() as client:
            answers = await asyncio.gather(*(query(client, running.url, BOOK, staff, id=str(i + 1)) for i in range(40)))
            assert all(a.status_code == 200 and a.json()["data"]["book"]["title"] for a in answers)
            for _ in range(4):  # whichever worker each scrape reaches
                text = (await client.get(f"{running.url}/metrics")).text
                complete = counted(text, "bookvault_graphql_requests_total", "complete")
                assert set(complete) == {"0", "1"} and sum(complete.values()) == 40, complete
                assert "bookvault_worker_up{worker=\"0\"} 1.0" in text and "bookvault_worker_up{worker=\"1\"} 1.0" in text


async def test_a_consistency_token_from_one_worker_is_honoured_by_the_other(shop: Shop) -> None:
    """A token naming an orders position, read from worker A, sent with a catalog-only query to worker B: B's token keeps that position (B verified A's MAC)."""
    order = await order_of(shop, "PLACED")
    await patch(shop, order["id"], "PAID")  # moves the orders feed past 0
    staff = token(staff=True)
    async with workers(shop) as running:
        codec = Consistency(Settings.from_env(running.env).services, Settings.from_env(running.env).token_secret(), None)
        one = httpx.Limits(max_connections=1)  # one kept-alive connection: one worker per client
        clients: list[httpx.AsyncClient] = []
        by_pid: dict[int, httpx.AsyncClient] = {}
        try:
            async with asyncio.timeout(START_BOUND_S):
                while len(by_pid) < 2:  # connections opened at once, so that both workers accept some
                    batch = [httpx.AsyncClient(timeout=10, limits=one) for _ in range(8)]
                    clients += batch
                    by_pid |= dict(zip(await asyncio.gather(*(pid_of(c, running.url) for c in batch)), batch))
            first, second = list(by_pid.values())[:2]
            read = await query(first, running.url, STAFF_ORDER, staff, id=str(order["id"]))
            assert read.json()["data"]["order"]["status"] == "PAID"
            asked = codec.decode(read.headers[TOKEN_HEADER])
            assert asked.get("orders", 0) > 0, asked
            answer = await query(second, running.url, BOOK, staff, read.headers[TOKEN_HEADER], id="1")
            assert answer.json()["data"]["book"]["title"]
            assert codec.decode(answer.headers[TOKEN_HEADER]).get("orders", 0) >= asked["orders"]
        finally:
            for client in clients:
                await client.aclose()


async def test_a_killed_worker_loses_no_request_that_was_not_in_flight_and_is_replaced(shop: Shop) -> None:
    """SIGKILL on one worker under load: every query sent after its death succeeds, at most those in flight fail, and a new pid answers in its place."""
    staff = token(staff=True)
    async with workers(shop) as running:
        victim, survivor = sorted(await pids_seen(running.url, 2))
        loop = asyncio.get_running_loop()
        died = loop.create_future()
        pidfd = os.pidfd_open(victim)  # readable once the process has ended: an event, not a poll

        def ended() -> None:
            if not died.done():
                died.set_result(loop.time())
        loop.add_reader(pidfd, ended)
        results: list[tuple[float, bool]] = []  # (when sent, succeeded)

        async def load(client: httpx.AsyncClient) -> None:
            while not died.done() or sum(1 for sent, _ in results if sent > died.result()) < 80:
                sent = loop.time()
                try:
                    ok = (await query(client, running.url, BOOK, staff, id="2")).json()["data"]["book"] is not None
                except httpx.TransportError:
                    ok = False
                results.append((sent, ok))
        try:
            async with fresh() as client:
                tasks = [asyncio.create_task(load(client)) for _ in range(4)]
                while len(results) < 20:  # both workers under load
                    await asyncio.sleep(0.01)
                os.kill(victim, signal.SIGKILL)
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        after = [ok for sent, ok in results if sent > died.result()]
        lost = [ok for sent, ok in results if sent <= died.result() and not ok]
        assert len(after) >= 80 and all(after), f"{after.count(False)} queries sent after the worker died failed"
        assert len(lost) <= 4  # at most one in flight per client
        replacement = await pids_seen(running.url, 1, exclude=frozenset({victim, survivor}))
        assert replacement and victim not in await pids_seen(running.url, 2)


async def test_sigterm_drains_every_worker_and_exits_0_with_no_child_left(shop: Shop) -> None:
    """SIGTERM on the supervisor: an SSE subscription is completed, the supervisor exits 0, no worker or document process is left and the port is closed."""
    order = await order_of(shop, "PLACED")
    bearer = token(order["customerId"])
    async with workers(shop) as running:
        procs = descendants(running.process.pid)
        assert len(procs) >= 4  # two workers, each with its document worker
        async with sse(running.url, ORDER, bearer, id=str(order["id"])) as events:
            await next_event(events)
            running.process.send_signal(signal.SIGTERM)
            assert (await next_event(events))[0] == "complete"
        code = await asyncio.wait_for(running.process.wait(), 15)
        stderr = running.output.decode(errors="replace")
        assert code == 0, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        assert not [p.pid for p in procs if alive(p)]
        assert listening([running.port]) == []


async def test_a_bad_worker_count_is_refused_with_its_reason_and_starts_nothing() -> None:
    """`--workers 0` and BOOKVAULT_WORKERS=many exit 2 naming the fault, no traceback, nothing listening; `auto` is the cores this process may use."""
    command = str(Path(sys.executable).with_name("bookvault"))
    port = free_port()
    env = os.environ | {"BOOKVAULT_PORT": str(port)}
    for argv, extra, says in ((["--workers", "0"], {}, "a whole number from 1 or `auto`"),
                              ([], {"BOOKVAULT_WORKERS": "many"}, "BOOKVAULT_WORKERS must be")):
        process = await asyncio.create_subprocess_exec(command, "gateway", *argv, env=env | extra,
                                                       stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
        finally:
            await end(process, [])
        assert process.returncode == 2 and says in stderr.decode() and "Traceback" not in stderr.decode()
        assert listening([port]) == []
    assert Settings.from_env({"BOOKVAULT_WORKERS": "auto"}).workers == len(os.sched_getaffinity(0))
