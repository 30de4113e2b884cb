"""Process helpers for the benches: start the six services (with --admin, a fresh data dir)
and the gateway on free ports chosen at runtime, wait for /healthz, stop everything on
exit, error or Ctrl-C; the /_admin calls a bench makes (faults, stats); and what the
benches share for requests and their counts (Tally, post_graphql, upstream_calls, summary).

Ports are never the defaults and the caller's BOOKVAULT_*, REDIS_URL and OTEL_* variables
are not passed on (give them in `env`), so a bench does not collide with a running demo:

    with Stack() as stack:
        stack.gateway_url, stack.service_urls["catalog"], stack.pid("gateway")
        stack.kill("catalog")          # a chaos bench: one service gone, the rest serve
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from gateway.auth import mint
from gateway.config import DEFAULT_PORTS
from gateway.http1 import Client, ConnectionFailed, ProtocolViolation
from mock_services.runner import Child, _stop_all, _wait_ready, service_children

__all__ = ["Stack", "free_ports", "set_faults", "clear_stats", "fetch_stats", "peak_rss_kib", "cpu_seconds", "REPO",
           "EXCLUDED_ROUTES", "LoadClient", "Tally", "post_graphql", "percentile", "summary", "upstream_calls", "calls_per_query",
           "ttl_env"]

REPO = Path(__file__).resolve().parent.parent
SERVICES = tuple(DEFAULT_PORTS)
_NOT_INHERITED = ("BOOKVAULT_", "REDIS_URL", "OTEL_")  # customers, catalog, inventory, orders, payments, shipping
# Not the work of a query: the gateway's change-feed long polls, and readiness checks.
EXCLUDED_ROUTES = frozenset({"/events", "/healthz"})
# The benches' gateways verify HS256 tokens signed with this (README, "Callers").
BENCH_SECRET = "bookvault-bench-" + "0123456789abcdef" * 2


def bearer(customer: int | None = None, *, subject: str | None = None) -> dict[str, str]:
    """The Authorization header of customer `customer`, or of staff (every customer's data)."""
    subject = subject or (f"customer-{customer}" if customer is not None else "staff")
    scopes = [] if customer is not None else ["staff"]
    return {"authorization": f"Bearer {mint(BENCH_SECRET, subject, customer=customer, scopes=scopes)}"}


STAFF = bearer()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the kernel says are free now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, in KiB; None when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process has used so far; None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _bookvault_command() -> list[str]:
    script = Path(sys.executable).parent / "bookvault"
    if not script.exists():
        script = REPO / ".venv" / "bin" / "bookvault"
    return [str(script), "gateway"]


class Stack:
    """The six services and the gateway as child processes, each in its own session."""

    def __init__(self, *, scale: int = 1, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 ready_timeout: float = 90.0) -> None:
        self.scale = scale
        self.host = host
        self.ready_timeout = ready_timeout
        *service_ports, gateway_port = free_ports(len(SERVICES) + 1, host)
        self.service_urls = {name: f"http://{host}:{port}" for name, port in zip(SERVICES, service_ports)}
        self.gateway_url = f"http://{host}:{gateway_port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="bookvault-bench-"))
        # The caller's BOOKVAULT_*, REDIS_URL and OTEL_* settings are not inherited: a bench
        # states what it runs with (`env`), and never shares a demo's Redis or collector.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
        self.env = {**inherited, "BOOKVAULT_JWT_SECRET": BENCH_SECRET, **(env or {}), "BOOKVAULT_HOST": host, "BOOKVAULT_PORT": str(gateway_port),
                    "BOOKVAULT_DATA_DIR": str(self.workdir / "data")}
        for name, url in self.service_urls.items():
            self.env[f"BOOKVAULT_{name.upper()}_URL"] = url
        self.children = {c.name: c for c in service_children(self.service_urls, str(self.workdir / "data"), scale,
                                                               admin=True)}
        self.children["gateway"] = Child("gateway", _bookvault_command(), self.gateway_url)
        self.env_overrides: dict[str, dict[str, str]] = {}  # per child, on top of `env` (see restart)
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Stack:
        atexit.register(self.stop)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        for name in SERVICES:
            self.spawn(name)
        self.wait_ready(SERVICES)
        self.spawn("gateway")
        self.wait_ready(["gateway"])
        self.startup_seconds = time.monotonic() - started

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        child = self.children[name]
        with open(self.log_path(name), "ab") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the children.
            env = {**self.env, **self.env_overrides.get(name, {})}
            child.process = subprocess.Popen(child.argv, env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return child.process

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, names: Iterable[str], timeout: float | None = None) -> None:
        children = [self.children[n] for n in names]
        timeout = timeout or self.ready_timeout
        try:
            late = _wait_ready(children, timeout)
        except SystemExit as exc:  # a child exited while starting
            dead = next((c.name for c in children if c.process and c.process.poll() is not None), "")
            raise RuntimeError(f"{exc}:\n{self.log_tail(dead)}") from None
        if late:
            raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(late)}")

    def pid(self, name: str) -> int:
        process = self.children[name].process
        assert process is not None, f"{name} was not started"
        return process.pid

    def kill(self, name: str, hard: bool = False) -> None:
        """Stop one child: SIGTERM (SIGKILL after 5 s), or at once with `hard`."""
        child = self.children[name]
        if hard and child.process and child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        _stop_all([child])

    def restart(self, name: str, env: Mapping[str, str] | None = None) -> None:
        """Stop `name` and start it again (a fresh process: empty memory); with `env`, it
        runs from now on with those variables on top of the stack's (replacing earlier ones)."""
        self.kill(name)
        if env is not None:
            self.env_overrides[name] = dict(env)
        self.spawn(name)
        self.wait_ready([name])

    def stop(self) -> None:
        """Every child, then the temp dir; idempotent (also runs at exit)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            _stop_all(list(self.children.values()))
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            atexit.unregister(self.stop)


# -- /_admin on the services ---------------------------------------------------------


async def set_faults(client: httpx.AsyncClient, urls: Iterable[str], faults: dict[str, Any]) -> None:
    async def one(url: str) -> None:
        (await client.post(f"{url}/_admin/faults", json=faults)).raise_for_status()

    await asyncio.gather(*(one(u) for u in urls))


async def clear_stats(client: httpx.AsyncClient, urls: Iterable[str]) -> None:
    async def one(url: str) -> None:
        (await client.delete(f"{url}/_admin/stats")).raise_for_status()

    await asyncio.gather(*(one(u) for u in urls))


async def fetch_stats(client: httpx.AsyncClient, service_urls: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Each service's recorded requests ({route, ids, start, end, status, ...})."""

    async def one(url: str) -> list[dict[str, Any]]:
        response = await client.get(f"{url}/_admin/stats")
        response.raise_for_status()
        return list(response.json()["requests"])

    lists = await asyncio.gather(*(one(u) for u in service_urls.values()))
    return dict(zip(service_urls, lists))


# -- GraphQL requests, upstream calls, statistics ---------------------------------------


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + sum(self.failures.values())

    def count(self, started: float, answered: float, problem: str | None) -> None:
        """One request, sent at `started` and answered at `answered` (perf_counter, taken before
        the answer is checked: checking is the client's time, not the gateway's); `problem`:
        why it failed."""
        self.latencies_ms.append((answered - started) * 1000)
        if problem is None:
            self.ok += 1
        else:
            self.failures[problem] += 1


def _failure(status: int, content: bytes, root: str) -> str | None:
    """None when the response is a clean answer; else why not (short, for counting)."""
    if status != 200:
        return f"HTTP {status}"
    try:
        body = orjson.loads(content)
    except ValueError:
        return "body is not JSON"
    if not isinstance(body, dict):
        return "body is not an object"
    errors = body.get("errors")
    if errors:
        first = errors[0] if isinstance(errors, list) and isinstance(errors[0], dict) else {}
        code = (first.get("extensions") or {}).get("code", "?")
        return f"errors: {code} at {first.get('path')}: {str(first.get('message', errors))[:80]}"
    if not isinstance(body.get("data"), dict) or body["data"].get(root) is None:
        return f"data.{root} is null"
    return None


async def post_graphql(client: httpx.AsyncClient, url: str, payload: dict[str, Any], root: str, tally: Tally,
                       headers: Mapping[str, str] | None = None) -> None:
    """POST one GraphQL request (as staff unless `headers` say who); its latency and outcome go
    to `tally` (`root`: the top-level field that must not be null)."""
    started = time.perf_counter()
    try:
        response = await client.post(url, json=payload, headers=STAFF if headers is None else headers)
        answered = time.perf_counter()
        problem = _failure(response.status_code, response.content, root)
    except httpx.HTTPError as exc:
        answered, problem = time.perf_counter(), f"{type(exc).__name__}"
    tally.count(started, answered, problem)


class LoadClient:
    """A load generator's keep-alive connections to one gateway, over the gateway's own HTTP/1.1
    client (gateway/http1.py): about a sixth of httpx's CPU per request (bench/upstream_bench.py).
    The bench client shares the machine's cores with the gateways and services it measures,
    so the less it takes, the less it bounds what they can serve (as wrk would, in Python)."""

    def __init__(self, url: str, connections: int, timeout: float) -> None:
        self._client = Client(url, limit=connections, cap=64 << 20, connect_timeout=timeout)
        self._timeout = timeout

    async def post_graphql(self, body: bytes, headers: Mapping[str, str], root: str, tally: Tally) -> None:
        """POST one request (`body`: its JSON, encoded once by the caller) to /graphql; like
        `post_graphql`, its latency and outcome go to `tally`."""
        started = time.perf_counter()
        try:
            reply = await self._client.request("POST", "/graphql", headers, body, self._timeout)
            answered = time.perf_counter()
            problem = _failure(reply.status, reply.body, root)
        except (ConnectionFailed, ProtocolViolation, TimeoutError) as exc:
            answered, problem = time.perf_counter(), f"{type(exc).__name__}"
        tally.count(started, answered, problem)

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(percentile(values, 50), 2), "p99_ms": round(percentile(values, 99), 2),
            "mean_ms": round(sum(values) / len(values), 2), "min_ms": round(min(values), 2),
            "max_ms": round(max(values), 2)}


async def upstream_calls(client: httpx.AsyncClient, stack: Stack, patience: float = 1.0) -> list[dict[str, Any]]:
    """The services' recorded calls but /events and /healthz, each with its service. A
    service records a call's end just after sending the answer, so a busy one may not have
    yet when the gateway has already answered us: asked again until all have ended."""
    deadline = time.monotonic() + patience
    while True:
        stats = await fetch_stats(client, stack.service_urls)
        calls = [{**r, "service": service} for service, records in stats.items() for r in records
                 if r.get("route") not in EXCLUDED_ROUTES]
        if all(c["end"] is not None for c in calls) or time.monotonic() > deadline:
            return [c if c["end"] is not None else {**c, "end": time.monotonic()} for c in calls]
        await asyncio.sleep(0.02)


def calls_per_query(calls: list[dict[str, Any]], n_queries: int) -> dict[str, Any]:
    per_service = Counter(c["service"] for c in calls)
    per_route, ids = Counter[str](), Counter[str]()
    for c in calls:
        per_route[f"{c['service']} {c['route']}"] += 1
        ids[f"{c['service']} {c['route']}"] += c["ids"]
    return {
        "queries": n_queries,
        "total": round(len(calls) / n_queries, 3) if n_queries else None,
        "per_service": {k: round(v / n_queries, 3) for k, v in sorted(per_service.items())},
        "per_route": {k: round(v / n_queries, 3) for k, v in sorted(per_route.items())},
        "non_200": sum(1 for c in calls if c.get("status") != 200),
        "ids_per_call": {k: round(ids[k] / v, 2) for k, v in sorted(per_route.items())},
    }


def ttl_env(seconds: float) -> dict[str, str]:
    """The variables that set every cached entity's TTL to `seconds` (0: never fresh, so
    each request fans out in full). Ignored by a gateway without an entity cache."""
    import schema.types
    from gateway import Binding

    entities = sorted({b.entity for b in vars(schema.types).values() if isinstance(b, Binding)})
    return {f"BOOKVAULT_CACHE_{e.upper()}_TTL": f"{seconds:g}" for e in entities}
