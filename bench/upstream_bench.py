"""CPU per upstream call, by HTTP client: the gateway's own (gateway/http1.py) against httpx's
and, when it is installed, aiohttp's, each sending the same GET (8 books) to a real catalog
service, 6 calls in flight, in interleaved rounds (A B C A B C ...). CPU is the bench
process's own (the service runs in its own process), divided by the calls made: what one
upstream call costs the gateway, parsing the JSON answer included (ARCHITECTURE.md,
"Upstream calls").

    .venv/bin/python bench/upstream_bench.py [--calls 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Stack  # noqa: E402
from gateway.http1 import Client  # noqa: E402

PATH = "/books?ids=1,2,3,4,5,6,7,8"
HEADERS = {"accept": "application/json", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-00"}
Call = Callable[[], Awaitable[Any]]


async def ours(base: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = Client(base, limit=10, cap=10_000_000, connect_timeout=5)

    async def call() -> Any:
        reply = await client.request("GET", PATH, HEADERS, None, 5)
        return orjson.loads(reply.body)

    return call, client.aclose


async def with_httpx(base: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    client = httpx.AsyncClient(base_url=base, timeout=5, limits=httpx.Limits(max_connections=10))

    async def call() -> Any:
        return orjson.loads((await client.get(PATH, headers=HEADERS)).content)

    return call, client.aclose


async def with_aiohttp(base: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    import aiohttp  # not a dependency of the gateway: measured only where it is installed

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10), cookie_jar=aiohttp.DummyCookieJar())
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=5)

    async def call() -> Any:
        async with session.get(base + PATH, headers=HEADERS, timeout=timeout) as response:
            return orjson.loads(await response.read())

    return call, session.close


async def measure(make: Callable[[str], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]], base: str,
                  calls: int, in_flight: int = 6) -> float:
    """CPU microseconds per call, after a warm-up that opens the connections."""
    call, close = await make(base)
    try:
        async def worker(start: int, count: int) -> None:
            for _ in range(start, count, in_flight):
                answer = await call()
                assert len(answer["data"]) == 8, answer

        await asyncio.gather(*(worker(k, 60) for k in range(in_flight)))
        started = time.process_time()
        await asyncio.gather(*(worker(k, calls) for k in range(in_flight)))
        return (time.process_time() - started) / calls * 1e6
    finally:
        await close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per client and round (default 3000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    args = parser.parse_args(argv)
    clients: dict[str, Any] = {"gateway/http1.py": ours, "httpx": with_httpx}
    try:
        import aiohttp  # noqa: F401
        clients["aiohttp"] = with_aiohttp
    except ImportError:
        print("aiohttp is not installed: measuring the gateway's client and httpx only")
    figures: dict[str, list[float]] = {name: [] for name in clients}
    with Stack(scale=1) as stack:
        base = stack.service_urls["catalog"]
        for _ in range(args.rounds):
            for name, make in clients.items():
                figures[name].append(uvloop.run(measure(make, base, args.calls)))
    mine = min(figures["gateway/http1.py"])
    print(f"CPU per GET of 8 books (6 in flight, best of {args.rounds} interleaved rounds of {args.calls}):")
    for name, values in figures.items():
        print(f"  {name:18} {min(values):6.0f} us  ({min(values) / mine:.2f}x the gateway's client)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
