"""Checkout bench: the orders service's saga, called directly (no gateway).

    .venv/bin/python bench/checkout_bench.py [--backend sqlite|postgresql|both] [--checkouts 300] [--clients 10]
    .venv/bin/python bench/checkout_bench.py --through-gateway [--backend ...]

(a) checkouts per second and p50/p99 of POST /checkouts with `--clients` concurrent clients,
    five service processes (catalog, inventory, payments, shipping, orders) on free ports;
(b) recovery: the same load, the orders process SIGKILLed halfway, restarted at once;
    the time from its restart (answering /healthz) until every saga it had started is settled.

`--through-gateway`: (a) only, but each checkout is the gateway's `placeOrder` mutation
(POST /graphql; the customers service and `bookvault gateway` started too, no Redis, the
default 2 s request deadline, or `--deadline-ms`): checkouts per second, p50/p99, and outcomes (PAID,
PENDING when the saga outlasts the deadline, or an error code).

SQLite data lives in a temp dir; PostgreSQL databases (127.0.0.1:5432, user postgres) are
created with unique names for the run and dropped at its end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import BENCH_SECRET, REPO, bearer, free_ports, summary  # noqa: E402

NAMES = ("catalog", "inventory", "payments", "shipping", "orders")
ADDRESS = {"name": "Ada", "street": "Keizersgracht 1", "city": "Amsterdam", "postalCode": "1015", "country": "NL"}
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


PLACE_ORDER = """mutation($input: PlaceOrderInput!, $key: String!) {
  placeOrder(input: $input, idempotencyKey: $key) { status reason order { id status } } }"""
GQL_ADDRESS = {"name": "Ada", "street": "Keizersgracht 1", "city": "Amsterdam", "postalCode": "1015", "country": "NL"}


class Services:
    def __init__(self, backend: str, data_dir: Path, names: tuple[str, ...] = NAMES) -> None:
        self.backend, self.data_dir, self.names = backend, data_dir, names
        self.ports = dict(zip(names, free_ports(len(names))))
        self.urls = {n: f"http://127.0.0.1:{p}" for n, p in self.ports.items()}
        self.databases: dict[str, str] = {}
        self.gateway_env: dict[str, str] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    async def create_databases(self) -> None:
        if self.backend != "postgresql":
            return
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            for name in (n for n in self.names if n != "gateway"):
                db = f"bv_bench_{uuid.uuid4().hex[:8]}_{name}"
                await conn.execute(f'CREATE DATABASE "{db}"')
                self.databases[name] = db
        finally:
            await conn.close()

    async def drop_databases(self) -> None:
        if not self.databases:
            return
        conn = await asyncpg.connect(PG_ADMIN)
        try:
            for db in self.databases.values():
                await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        finally:
            await conn.close()

    def start(self, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BOOKVAULT_", "REDIS_URL", "OTEL_"))}
        env["BOOKVAULT_JWT_SECRET"] = BENCH_SECRET
        env |= {f"BOOKVAULT_{n.upper()}_URL": u for n, u in self.urls.items() if n != "gateway"}
        if name == "gateway":
            argv = [str(Path(sys.executable).parent / "bookvault"), "gateway"]
            env |= {"BOOKVAULT_HOST": "127.0.0.1", "BOOKVAULT_PORT": str(self.ports[name]), **self.gateway_env}
        else:
            argv = [sys.executable, "-m", "mock_services", name, "--port", str(self.ports[name]),
                    "--data-dir", str(self.data_dir)]
        if name in self.databases:
            argv += ["--database", f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.databases[name]}"]
        self.processes[name] = subprocess.Popen(argv, cwd=REPO, env=env)

    async def ready(self, names: tuple[str, ...]) -> None:
        async with httpx.AsyncClient(timeout=1) as client:
            for name in names:
                while True:
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"{self.urls[name]}/healthz")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)

    def stop(self) -> None:
        # The gateway (started last) first and alone, as compose does: it would only log the
        # services going away; then the services together.
        gateway = self.processes.get("gateway")
        rest = [p for n, p in self.processes.items() if n != "gateway"]
        for group in ([gateway] if gateway else [], rest):
            for process in group:
                if process.poll() is None:
                    process.terminate()
            for process in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)

    async def unsettled(self) -> int:
        query = "SELECT count(*) FROM order_saga WHERE status IN ('RUNNING', 'COMPENSATING')"
        if self.backend == "postgresql":
            conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{self.databases['orders']}")
            try:
                return int(await conn.fetchval(query))
            finally:
                await conn.close()
        with contextlib.closing(sqlite3.connect(self.data_dir / "orders.db")) as conn:
            return int(conn.execute(query).fetchone()[0])


@contextlib.asynccontextmanager
async def running(backend: str, gateway: bool = False, deadline_ms: int | None = None) -> AsyncIterator[Services]:
    names = (*NAMES, "customers", "gateway") if gateway else NAMES
    with tempfile.TemporaryDirectory(prefix="bookvault-checkout-") as tmp:
        services = Services(backend, Path(tmp), names)
        if deadline_ms:  # the request deadline, and the orders read timeout that bounds one call
            services.gateway_env = {"BOOKVAULT_DEADLINE_MS": str(deadline_ms),
                                    "BOOKVAULT_ORDERS_READ_TIMEOUT": str(deadline_ms / 1000)}
        await services.create_databases()
        try:
            for name in names:
                if name != "gateway":
                    services.start(name)
            await services.ready(tuple(n for n in names if n != "gateway"))
            if gateway:
                services.start("gateway")
                await services.ready(("gateway",))
            async with httpx.AsyncClient(timeout=10) as client:  # plenty of stock on books 1-50
                for book in range(1, 51):
                    (await client.patch(f"{services.urls['inventory']}/stock/{book}", json={"available": 100_000}))
            yield services
        finally:
            services.stop()
            await services.drop_databases()


async def load(url: str, n: int, clients: int, run: str) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    queue = list(range(n))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            body = {"customerId": i % 200 + 1, "items": [{"bookId": i % 50 + 1, "quantity": 1}],
                    "shippingAddress": ADDRESS, "paymentMethod": "card"}
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/checkouts", json=body, headers={"Idempotency-Key": f"{run}-{i}"})
                outcome = r.json().get("status", str(r.status_code)) if r.status_code < 500 else str(r.status_code)
            except httpx.TransportError:
                outcome = "transport-error"
            latencies.append((time.perf_counter() - start) * 1000)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return latencies, outcomes


async def load_gateway(url: str, n: int, clients: int, run: str) -> tuple[list[float], dict[str, int]]:
    """`n` placeOrder mutations through the gateway, `clients` at a time; outcomes by status or error code."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    examples: dict[str, str] = {}  # an error code's first message
    queue = list(range(n))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            i = queue.pop()
            customer = i % 200 + 1
            variables = {"key": f"{run}-{i}", "input": {
                "items": [{"bookId": str(i % 50 + 1), "quantity": 1}], "shippingAddress": GQL_ADDRESS,
                "paymentMethod": "card"}}
            headers = bearer(customer)
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/graphql", json={"query": PLACE_ORDER, "variables": variables},
                                      headers=headers)
                body = r.json()
                result = (body.get("data") or {}).get("placeOrder")
                outcome = result["status"] if result else body["errors"][0]["extensions"].get("code", str(r.status_code))
                if not result:
                    examples.setdefault(outcome, body["errors"][0]["message"])
            except (httpx.TransportError, ValueError, KeyError, TypeError):
                outcome = "transport-or-protocol-error"
            latencies.append((time.perf_counter() - start) * 1000)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    if examples:
        outcomes["errors"] = examples  # type: ignore[assignment]
    return latencies, outcomes


async def bench_gateway(backend: str, checkouts: int, clients: int, deadline_ms: int | None = None) -> dict[str, object]:
    async with running(backend, gateway=True, deadline_ms=deadline_ms) as services:
        url = services.urls["gateway"]
        await load_gateway(url, 20, clients, "warmup")
        start = time.perf_counter()
        latencies, outcomes = await load_gateway(url, checkouts, clients, "run")
        elapsed = time.perf_counter() - start
        return {"backend": backend, "through": "gateway placeOrder", "deadline_ms": deadline_ms or 2000,
                "checkouts": checkouts, "clients": clients,
                "checkouts_per_s": round(checkouts / elapsed, 1), **summary(latencies), "outcomes": outcomes}


async def bench(backend: str, checkouts: int, clients: int) -> dict[str, object]:
    async with running(backend) as services:
        url = services.urls["orders"]
        await load(url, 20, clients, "warmup")
        start = time.perf_counter()
        latencies, outcomes = await load(url, checkouts, clients, "run")
        elapsed = time.perf_counter() - start
        result: dict[str, object] = {"backend": backend, "checkouts": checkouts, "clients": clients,
                                     "checkouts_per_s": round(checkouts / elapsed, 1), **summary(latencies),
                                     "outcomes": outcomes}
        # Recovery: kill the orders process under load, restart it, time until all settle.
        loader = asyncio.create_task(load(url, checkouts, clients, "crash"))
        await asyncio.sleep(elapsed / 2)
        services.processes["orders"].send_signal(signal.SIGKILL)
        services.processes["orders"].wait()
        await loader
        unsettled_at_kill = await services.unsettled()
        services.start("orders")
        await services.ready(("orders",))
        restarted = time.perf_counter()
        while await services.unsettled():
            await asyncio.sleep(0.02)
        result["recovery"] = {"unsettled_at_kill": unsettled_at_kill,
                              "settled_after_restart_s": round(time.perf_counter() - restarted, 3)}
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--checkouts", type=int, default=300)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--through-gateway", action="store_true",
                        help="placeOrder through the gateway instead of POST /checkouts (no crash recovery part)")
    parser.add_argument("--deadline-ms", type=int, default=None,
                        help="with --through-gateway: the gateway's request deadline (default 2000) and orders read timeout")
    args = parser.parse_args()
    for backend in ("sqlite", "postgresql") if args.backend == "both" else (args.backend,):
        if args.through_gateway:
            result = asyncio.run(bench_gateway(backend, args.checkouts, args.clients, args.deadline_ms))
        else:
            result = asyncio.run(bench(backend, args.checkouts, args.clients))
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
