"""The hostile catalogue against a running gateway (uvicorn, real ports, the six services
behind it), while another client measures /healthz: each hostile request's status, code,
time and the upstream calls it caused, then /healthz latency (p50/p99/max) at rest and
under the hostile load (measured from a process of its own), and the gateway's event-loop lag.

    .venv/bin/python bench/hostile_bench.py [--seconds 10] [--clients 4]

With `--connections`, the connection attacks instead (issue 25), each held while a probe of
its own process asks /healthz on a fresh connection every 10 ms: silent connections,
half-sent heads, stalled and trickled bodies, bodies abandoned half-way, connections from
one address, an idle flood past the gateway's file-descriptor limit (`--nofile`, applied to
the gateway with prlimit), and event streams held by one caller. Each prints what the
attackers got (status lines, when the gateway closed), and the probe's p50/p99/max/failures.

    .venv/bin/python bench/hostile_bench.py --connections [--attack silent ...] [--hold 12]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _harness import STAFF, Stack, clear_stats, fetch_stats, summary  # noqa: E402
from test_engine import _fragment_bomb  # noqa: E402
from test_front_door import CATALOGUE, HEAVY  # noqa: E402

EXCLUDED = {"/events", "/_meta", "/healthz"}

# Beyond the tests' catalogue: the slowest document to validate that is within every limit
# (it is accepted and runs), and a GET mutation.
EXTRA: dict[str, tuple[dict[str, Any], int, str]] = {
    "heaviest-valid-document": ({"json": {"query": HEAVY}}, 200, "-"),
    # 1.2 KB, 30 fragments each spreading the next twice, no aliases: accepted, and it runs.
    "valid-fragment-bomb": ({"json": {"query": _fragment_bomb(30, alias=False)}}, 200, "-"),
    "get-mutation": ({"method": "GET", "params": {"query": "mutation { placeOrder { id } }"}}, 405,
                     "METHOD_NOT_ALLOWED"),
}


async def fire(client: httpx.AsyncClient, url: str, request: dict[str, Any], salt: int = 0) -> httpx.Response:
    request = dict(request)
    method = request.pop("method", "POST")
    if salt and "json" in request and isinstance(request["json"], dict) and "query" in request["json"]:
        # A new text each time: the document cache must not answer it (a worst case per request).
        # A comment, so the text keeps its size and tokens (a "1.2 KB" bomb stays 1.2 KB).
        request["json"] = {**request["json"], "query": f"{request['json']['query']}\n# {salt}"}
    if method == "GET":
        return await client.get(url, **request)
    return await client.post(url, **request)


async def catalogue_table(client: httpx.AsyncClient, url: str, stack: Stack) -> list[dict[str, Any]]:
    rows = []
    for name, (request, _, _) in {**CATALOGUE, **EXTRA}.items():
        await clear_stats(client, stack.service_urls.values())
        started = time.perf_counter()
        response = await fire(client, url, request)
        elapsed = (time.perf_counter() - started) * 1000
        try:
            errors = response.json().get("errors") or []
        except ValueError:
            errors = [{"extensions": {"code": "non-JSON answer"}}]
        await asyncio.sleep(0.05)  # the services record a request when it ends
        stats = await fetch_stats(client, stack.service_urls)
        calls = sum(1 for reqs in stats.values() for r in reqs if r["route"] not in EXCLUDED)
        rows.append({"request": name, "status": response.status_code,
                     "code": errors[0]["extensions"]["code"] if errors else "-", "upstreamCalls": calls,
                     "ms": round(elapsed, 1)})
    return rows


def probe(url: str, seconds: float, interval: float = 0.01, fresh: bool = False) -> dict[str, Any]:
    """/healthz latencies (ms), GET after GET for `seconds`, from a process of its own: on the
    hostile clients' event loop, their own work would be counted as the gateway's. `fresh`:
    each GET on a new connection (a new client: what an exhausted accept queue refuses), and
    failures counted rather than raised."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    limits = httpx.Limits(max_keepalive_connections=0) if fresh else httpx.Limits()
    with httpx.Client(timeout=5 if fresh else 10, limits=limits) as client:
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                client.get(url).raise_for_status()
            except httpx.HTTPError as exc:
                if not fresh:
                    raise
                failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            else:
                latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(interval)
    return {"latencies": latencies, "failures": failures}


async def health(url: str, seconds: float, fresh: bool = False) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, "--probe", url, "--seconds", str(seconds),
                                                   *(["--fresh"] if fresh else []), stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    return dict(json.loads(out))


async def hostile_load(url: str, seconds: float, clients: int, only: list[str] | None = None) -> int:
    requests = [r for name, (r, _, _) in {**CATALOGUE, **EXTRA}.items() if not only or name in only]
    deadline = time.monotonic() + seconds
    sent = 0

    async def one_client(index: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(timeout=30) as client:
            count = 0
            while time.monotonic() < deadline:
                for request in requests:
                    # A text no client has sent before (issue 25: the clients used to send the
                    # same texts, so all but the first sight of each were cached).
                    count += 1
                    await fire(client, url, request, index + 1 + clients * count)
                    sent += 1

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    return sent


async def loop_lag(client: httpx.AsyncClient, gateway: str) -> dict[str, float]:
    """The gateway's event-loop lag histogram (cumulative counts by bucket `le`) from /metrics."""
    text = (await client.get(f"{gateway}/metrics")).text
    pattern = r'bookvault_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)'
    return {match.group(1): float(match.group(2)) for match in re.finditer(pattern, text)}


async def main(seconds: float, clients: int, only: list[str] | None = None) -> None:
    with Stack() as stack:
        url, health_url = f"{stack.gateway_url}/graphql", f"{stack.gateway_url}/healthz"
        async with httpx.AsyncClient(timeout=30) as client:
            rows = await catalogue_table(client, url, stack)
        print(f"{'request':34} {'status':>6} {'code':26} {'calls':>5} {'ms':>8}")
        for row in rows:
            print(f"{row['request']:34} {row['status']:>6} {row['code']:26} {row['upstreamCalls']:>5} {row['ms']:>8}")

        at_rest = (await health(health_url, min(5.0, seconds / 2)))["latencies"]
        async with httpx.AsyncClient(timeout=10) as client:
            before = await loop_lag(client, stack.gateway_url)
        probing = asyncio.create_task(health(health_url, seconds))
        sent = await hostile_load(url, seconds, clients, only)
        loaded = (await probing)["latencies"]
        async with httpx.AsyncClient(timeout=10) as client:
            after = await loop_lag(client, stack.gateway_url)
        lag = {bucket: int(after[bucket] - before.get(bucket, 0)) for bucket in after}
        total = lag.get("+Inf", 0)
        print(json.dumps({"healthzAtRest": summary(at_rest), "healthzUnderHostileLoad": summary(loaded),
                          "hostileRequests": sent, "hostileClients": clients, "seconds": seconds,
                          # the gateway's own view: 20 ms timer wake-ups, and how many were late by more than
                          # 50 ms / 100 ms (something held the loop, or the process waited for a CPU)
                          "loopLagUnderHostileLoad": {"wakeups": total, "over50ms": total - lag.get("0.05", 0),
                                                      "over100ms": total - lag.get("0.1", 0),
                                                      "over250ms": total - lag.get("0.25", 0)}}, indent=2))


# -- connection attacks (issue 25) -----------------------------------------------------

HEAD = "POST /graphql HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
PER_SOURCE = 200  # attacking connections per loopback source address: under the per-address cap
STREAM = {"query": "subscription { orderUpdated(id: 1) { id status } }"}


def _source(index: int, per_source: int = PER_SOURCE, first: int = 2) -> str:
    """A loopback address (127.0.0.2 on) for connection `index`: every 127/8 address is this host."""
    n = first + index // per_source
    return f"127.0.{n // 256}.{n % 256}"


async def _open(host: str, port: int, count: int, source: Any = _source) -> list[tuple[Any, Any]]:
    """`count` connections, each from `source(i)`, opened 200 at a time (what a flood does)."""
    opened: list[tuple[Any, Any]] = []
    for start in range(0, count, 200):
        batch = await asyncio.gather(*(asyncio.open_connection(host, port, local_addr=(source(i), 0))
                                       for i in range(start, min(count, start + 200))), return_exceptions=True)
        opened += [c for c in batch if not isinstance(c, BaseException)]
    return opened


def _answer(received: bytes) -> str:
    """The status line the gateway sent ("" none), and the first error code in what followed."""
    line = received.split(b"\r\n", 1)[0].decode("latin-1")
    code = re.search(rb'"code":"([A-Z_]+)"', received)
    return f"{line} {code.group(1).decode()}" if code else line


async def _until_closed(reader: asyncio.StreamReader, started: float, hold: float) -> tuple[str, float | None]:
    """What the gateway answered (`_answer`), and the seconds until it closed the connection
    (None: still open when the attack ends, `hold` seconds after `started`)."""
    received = b""
    try:
        async with asyncio.timeout(max(0.0, started + hold - time.monotonic())):
            while chunk := await reader.read(65536):
                received += chunk[:4096] if len(received) < 65536 else b""
    except TimeoutError:
        return _answer(received), None
    except OSError:
        pass
    return _answer(received), time.monotonic() - started


def _outcomes(results: list[tuple[str, float | None]]) -> dict[str, Any]:
    answers: dict[str, int] = {}
    for line, closed in results:
        key = line or ("no answer, closed" if closed is not None else "no answer, still open")
        answers[key] = answers.get(key, 0) + 1
    closes = sorted(c for _, c in results if c is not None)
    return {"connections": len(results), "answers": answers,
            "closedAfterS": {"p50": round(closes[len(closes) // 2], 2), "max": round(closes[-1], 2)} if closes else None}


async def _hold(connections: list[tuple[Any, Any]], hold: float, send: bytes = b"",
                trickle: bytes = b"") -> dict[str, Any]:
    """Each connection sends `send`, then `trickle` one byte per 250 ms, until the gateway
    closes it or `hold` seconds pass."""
    started = time.monotonic()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[str, float | None]:
        dripping = None
        if send:
            writer.write(send)
        if trickle:
            async def drip() -> None:
                for byte in trickle:
                    await asyncio.sleep(0.25)
                    writer.write(bytes([byte]))
            dripping = asyncio.create_task(drip())
        try:
            return await _until_closed(reader, started, hold)
        finally:
            if dripping is not None:
                dripping.cancel()
            writer.transport.abort()

    return _outcomes(await asyncio.gather(*(one(r, w) for r, w in connections)))


async def attack_silent(host: str, port: int, hold: float, _: Stack) -> dict[str, Any]:
    """1,000 connections that never send a byte."""
    return await _hold(await _open(host, port, 1000), hold)


async def attack_half_head(host: str, port: int, hold: float, _: Stack) -> dict[str, Any]:
    """1,000 connections that send part of a request head, then nothing."""
    return await _hold(await _open(host, port, 1000), hold, send=HEAD[:60].encode())


async def attack_stalled_body(host: str, port: int, hold: float, _: Stack) -> dict[str, Any]:
    """50 requests declaring a 1,000-byte body that send 36 bytes of it, then nothing."""
    return await _hold(await _open(host, port, 50), hold, send=HEAD.encode() + b'{"query": "{ books(ids: [1]) { id } ')


async def attack_trickled_body(host: str, port: int, hold: float, _: Stack) -> dict[str, Any]:
    """20 requests whose 1,000-byte body comes one byte every 250 ms."""
    return await _hold(await _open(host, port, 20), hold, send=HEAD.encode(), trickle=b" " * 1000)


async def attack_one_address(host: str, port: int, hold: float, _: Stack) -> dict[str, Any]:
    """1,000 connections from one address, each asking /healthz and keeping the connection."""
    connections = await _open(host, port, 1000, source=lambda i: "127.0.0.250")
    return await _hold(connections, hold, send=b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")


async def attack_idle_flood(host: str, port: int, hold: float, _: Stack, count: int = 5000) -> dict[str, Any]:
    """`count` silent connections from 25 addresses: past the gateway's file-descriptor limit
    when it runs with `--nofile 4096` (the default here)."""
    return await _hold(await _open(host, port, count), hold)


async def attack_abandoned_bodies(host: str, port: int, hold: float, stack: Stack) -> dict[str, Any]:
    """200 requests that send 100 bytes of a 1,000-byte body and hang up; what the gateway logged."""
    log = stack.log_path("gateway")
    offset = log.stat().st_size
    for start in range(0, 200, 20):
        for _, writer in await _open(host, port, 20):
            writer.write(HEAD.encode() + b" " * 100)
            await writer.drain()
            writer.close()
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # what the gateway logs about them, written
    text = log.read_bytes()[offset:].decode(errors="replace")
    return {"requests": 200, "tracebacks": text.count("Traceback"), "linesWithStatus500": text.count('"status":500'),
            "logLines": text.count("\n")}


async def attack_streams(host: str, port: int, hold: float, _: Stack) -> dict[str, Any]:
    """48 event streams (SSE subscriptions) of one caller."""
    body = json.dumps(STREAM).encode()
    request = (f"POST /graphql HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\naccept: text/event-stream"
               f"\r\nauthorization: {STAFF['authorization']}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    return await _hold(await _open(host, port, 48), hold, send=request)


ATTACKS = {"silent": attack_silent, "half-head": attack_half_head, "stalled-body": attack_stalled_body,
           "trickled-body": attack_trickled_body, "abandoned-bodies": attack_abandoned_bodies,
           "one-address": attack_one_address, "streams": attack_streams, "idle-flood": attack_idle_flood}


async def connection_attacks(names: list[str], hold: float, nofile: int, env: dict[str, str]) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attackers' own sockets
    stack = Stack(env=env)
    # The gateway's file descriptors, soft and hard: what an idle flood runs it out of.
    stack.children["gateway"].argv = ["prlimit", f"--nofile={nofile}:{nofile}", *stack.children["gateway"].argv]
    with stack:
        host, port = stack.gateway_url.removeprefix("http://").split(":")
        health_url = f"{stack.gateway_url}/healthz"
        print(json.dumps({"gatewayNofile": nofile, "env": env, "holdS": hold}))
        for name in names:
            async with httpx.AsyncClient(timeout=10) as client:
                before = await loop_lag(client, stack.gateway_url)
            probing = asyncio.create_task(health(health_url, hold, fresh=True))
            await asyncio.sleep(0.5)  # the probe's process is up
            result = await ATTACKS[name](host, int(port), hold, stack)
            probed = await probing
            async with httpx.AsyncClient(timeout=10) as client:
                after = await loop_lag(client, stack.gateway_url)
            lag = {bucket: int(after[bucket] - before.get(bucket, 0)) for bucket in after}
            print(json.dumps({"attack": name, **result, "healthz": summary(probed["latencies"]),
                              "healthzFailures": probed["failures"],
                              "loopLag": {"wakeups": lag.get("+Inf", 0),
                                          "over50ms": lag.get("+Inf", 0) - lag.get("0.05", 0),
                                          "over100ms": lag.get("+Inf", 0) - lag.get("0.1", 0)}}))
            await asyncio.sleep(1.0)  # the gateway lets go of what the attack left
        with contextlib.suppress(OSError):
            print(json.dumps({"gatewayLog": stack.log_tail("gateway", 5)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", action="append", help="a catalogue entry to send (repeatable; default: all)")
    parser.add_argument("--connections", action="store_true", help="the connection attacks instead (issue 25)")
    parser.add_argument("--attack", action="append", choices=sorted(ATTACKS), help="one attack (repeatable; default: all)")
    parser.add_argument("--hold", type=float, default=12.0, help="seconds each attack lasts")
    parser.add_argument("--nofile", type=int, default=4096, help="the gateway's file-descriptor limit (prlimit)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a setting of the gateway")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the /healthz prober's own process
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.seconds, fresh=args.fresh)))
    elif args.connections:
        asyncio.run(connection_attacks(args.attack or list(ATTACKS), args.hold, args.nofile,
                                       dict(item.split("=", 1) for item in args.env)))
    else:
        asyncio.run(main(args.seconds, args.clients, args.only))
