"""Consistency across two gateway instances (README, "Consistency across instances").

    .venv/bin/python bench/consistency.py                  # 20 s of mixed load
    .venv/bin/python bench/consistency.py --duration 30 --readers 12 --writes-per-s 20
    .venv/bin/python bench/consistency.py --no-channel     # floor raises by each instance's own feed only

Real processes (bench/_harness.py): the six services, two gateway instances sharing one
redis-server this bench starts on a free port (`--save '' --appendonly no`), the same
namespace and `BOOKVAULT_CONSISTENCY_SECRET`. Load: writers PATCH book prices at the catalog;
readers read those books (and, for mixed load, order pages) through a random instance per
request, half of them echoing the consistency token, half not.

Prints (and writes to bench/results/consistency.json):
- version regressions (a reader shown an older version of a book than it saw before), with
  and without the token, over how many reads;
- staleness after a write: from the PATCH's answer until a read started on each instance
  (without a token, every instance probed at once) shows the new version (p50/p99/max);
- the token check's cost: decoding and encoding (in process, per request) and the latency
  of warm requests with and without a token;
- how often an instance behind a token waited for its feed or read past its caches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import secrets
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import REPO, Stack, _bookvault_command, bearer, free_ports, percentile  # noqa: E402
from gateway.consistency import TOKEN_HEADER, Consistency  # noqa: E402
from mock_services.runner import Child  # noqa: E402

BOOK = "query($id: ID!) { book(id: $id) { id version } }"
ORDER_PAGE = (REPO / "schema" / "examples" / "order_page.graphql").read_text()
BOOKS = list(range(1, 41))


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    (port,) = free_ports(1)
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    for _ in range(500):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, timeout=2).stdout.strip() == b"PONG":
            return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.01)
    process.kill()
    raise RuntimeError("redis-server did not start")


def second_gateway(stack: Stack) -> str:
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    stack.children["gateway2"] = Child("gateway2", _bookvault_command(), url, tier=1)
    stack.env_overrides["gateway2"] = {"BOOKVAULT_PORT": str(port)}
    stack.spawn("gateway2")
    stack.wait_ready(["gateway2"])
    return url


async def version_of(client: httpx.AsyncClient, url: str, book: int, token: str | None) -> tuple[int | None, str | None]:
    response = await client.post(f"{url}/graphql", json={"query": BOOK, "variables": {"id": str(book)}},
                                 headers={TOKEN_HEADER: token} if token else {})
    try:
        return response.json()["data"]["book"]["version"], response.headers.get(TOKEN_HEADER)
    except (ValueError, KeyError, TypeError):
        return None, None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    redis, redis_url = start_redis()
    env = {"REDIS_URL": redis_url, "BOOKVAULT_CACHE_NAMESPACE": "bench-consistency",
           "BOOKVAULT_CONSISTENCY_SECRET": secrets.token_hex(16),
           "BOOKVAULT_FLOOR_CHANNEL": "0" if args.no_channel else "1"}
    try:
        with Stack(env=env) as stack:
            urls = [stack.gateway_url, second_gateway(stack)]
            return await load(stack, urls, args)
    finally:
        redis.terminate()
        redis.wait(5)


async def load(stack: Stack, urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=64)
    stop = asyncio.Event()
    written: dict[tuple[int, int], float] = {}
    staleness: list[float] = []
    stats = {True: {"reads": 0, "regressions": 0}, False: {"reads": 0, "regressions": 0}}
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        for url in urls:  # warm both instances and Redis
            for book in BOOKS:
                await version_of(client, url, book, None)

        async def first_new_read(url: str, book: int, version: int, at: float) -> float:
            # Reads one after another on one instance; the start of the first that shows the
            # write. A read's own latency under load is not staleness, but it bounds how
            # finely this can tell: a read that started just before the change arrived shows
            # the old version, and the next starts only when it is answered.
            while time.monotonic() - at < 10:
                started = time.monotonic()
                seen, _ = await version_of(client, url, book, None)
                if seen is not None and seen >= version:
                    return started
            return time.monotonic()

        async def probe(book: int, version: int, at: float) -> None:
            # Every instance probed at once (probing them in turn added one instance's read
            # latency to the other's figure); the staleness is the later instance's.
            firsts = await asyncio.gather(*(first_new_read(url, book, version, at) for url in urls))
            staleness.append((max(max(firsts), at) - at) * 1000)

        async def writer() -> None:
            rng = random.Random(1)
            probes = []
            async with httpx.AsyncClient(base_url=stack.service_urls["catalog"], timeout=10) as catalog:
                while not stop.is_set():
                    book = rng.choice(BOOKS)
                    response = await catalog.patch(f"/books/{book}", json={"title": f"t{rng.random():.6f}"})
                    at = time.monotonic()
                    version = response.json()["version"]
                    written[(book, version)] = at
                    probes.append(asyncio.create_task(probe(book, version, at)))
                    await asyncio.sleep(1 / args.writes_per_s)
            await asyncio.gather(*probes)

        async def reader(seed: int, echo: bool) -> None:
            rng = random.Random(seed)
            seen: dict[int, int] = {}
            token = None
            while not stop.is_set():
                url = rng.choice(urls)
                if rng.random() < 0.2:  # mixed load: an order page now and then
                    order = rng.randint(1, 5000)
                    await client.post(f"{url}/graphql", json={"query": ORDER_PAGE, "variables": {"id": str(order)}},
                                      headers=bearer(subject=f"bench-{seed}"))
                    continue
                book = rng.choice(BOOKS[:8])  # the hot books: most writes collide with reads
                version, answered = await version_of(client, url, book, token if echo else None)
                if version is None:
                    continue
                token = answered
                stats[echo]["reads"] += 1
                if version < seen.get(book, 0):
                    stats[echo]["regressions"] += 1
                seen[book] = max(seen.get(book, 0), version)

        tasks = [asyncio.create_task(reader(i, i % 2 == 0)) for i in range(args.readers)]
        writing = asyncio.create_task(writer())
        await asyncio.sleep(args.duration)
        stop.set()
        await asyncio.gather(*tasks)
        await writing

        # The token's cost, end to end: warm reads of one book, with and without a token.
        plain, tokened = [], []
        _, token = await version_of(client, urls[0], 1, None)
        for i in range(400):
            started = time.perf_counter()
            await version_of(client, urls[0], 1, token if i % 2 else None)
            (tokened if i % 2 else plain).append((time.perf_counter() - started) * 1000)
        checks: dict[str, float] = {}
        for url in urls:
            text = (await client.get(f"{url}/metrics")).text
            for outcome, value in re.findall(r'bookvault_consistency_checks_total\{outcome="(\w+)",service="\w+"\} ([\d.e+]+)', text):
                checks[outcome] = checks.get(outcome, 0) + float(value)
    codec = Consistency(["customers", "catalog", "inventory", "orders", "payments", "shipping"], "s", None)
    sample = codec.encode({"customers": 1200, "catalog": 48_000, "inventory": 9000, "orders": 310_000,
                           "payments": 5200, "shipping": 5100})
    per_call = timeit.timeit(lambda: codec.encode(codec.decode(sample)), number=20_000) / 20_000
    return {
        "duration_s": args.duration, "floor_channel": not args.no_channel, "writes": len(written),
        "reads_with_token": stats[True]["reads"], "regressions_with_token": stats[True]["regressions"],
        "reads_without_token": stats[False]["reads"], "regressions_without_token": stats[False]["regressions"],
        "staleness_ms": {"n": len(staleness), "p50": _r(percentile(staleness, 50)), "p99": _r(percentile(staleness, 99)),
                         "max": _r(max(staleness, default=None))},
        "token": {"example": sample, "chars": len(sample), "decode_encode_us": round(per_call * 1e6, 2),
                  "warm_read_p50_ms_without": _r(percentile(plain, 50)), "warm_read_p50_ms_with": _r(percentile(tokened, 50))},
        "behind_instance": {k: int(v) for k, v in checks.items()},
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--readers", type=int, default=10)
    parser.add_argument("--writes-per-s", type=float, default=10.0)
    parser.add_argument("--no-channel", action="store_true", help="BOOKVAULT_FLOOR_CHANNEL=0 on both instances")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"consistency{'-no-channel' if args.no_channel else ''}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
