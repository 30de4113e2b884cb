"""Invalidation propagation, HTTP feeds vs NATS JetStream (issue 27, deliverable 4's third figure).

    .venv/bin/python bench/events_bench.py                 # 200 writes per transport
    .venv/bin/python bench/events_bench.py --writes 500

The six services and three gateway instances run in this one process (the tests' helpers,
tests/shop.py), so both transports pay the same event loop; the JetStream run adds a
nats-server of its own (`-js`, a temporary store, a free port) and each service's relay.
For each write (a PATCH of a book's price at the catalog) it measures the time from the
PATCH's answer until the third instance has applied the event (its follower's cursor
reaches the write's seq), and prints p50/p99/max per transport, and the /events requests
the services answered (JetStream: none).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from backends import seed_sqlite
from shop import running_gateway, running_shop
from test_events_nats import OwnNats

from mock_services import SERVICES


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(seeded: Path, work: Path, writes: int, events_url: str | None) -> tuple[list[float], int]:
    options: dict[str, Any] = {"events_url": events_url} if events_url else {}
    async with running_shop(seeded, work, **options) as shop, contextlib.AsyncExitStack() as stack:
        apps = [(await stack.enter_async_context(running_gateway(shop, **options)))[1] for _ in range(3)]
        await shop.reset_stats()
        delays = []
        async with shop.client("catalog") as catalog:
            for n in range(writes):
                answer = await catalog.patch(f"/books/{n % 100 + 1}", json={"price": {"amount": f"{n % 90 + 10}.00",
                                                                                       "currency": "EUR"}})
                answer.raise_for_status()
                written = time.perf_counter()
                seq = int(answer.headers["x-feed-seq"])
                for app in apps:  # the third instance to apply it is the last one awaited
                    await asyncio.wait_for(app.state.gateway.feeds.reached("catalog", seq), 30)
                delays.append(time.perf_counter() - written)
        polls = 0
        for name in SERVICES:
            polls += sum(1 for r in await shop.stats(name) if r["route"] == "/events")
    return delays, polls


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "seeded").mkdir()
        seed_sqlite(root / "seeded")
        results = {"HTTP feeds": await run(root / "seeded", root / "http", args.writes, None)}
        server = OwnNats(root / "jetstream")
        server.start()
        try:
            results["JetStream"] = await run(root / "seeded", root / "nats", args.writes, server.url)
        finally:
            server.stop()
    print(f"invalidation propagation, write -> third of 3 instances ({args.writes} writes, one process)")
    print(f"{'transport':<12} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8} {'/events answered':>17}")
    for name, (delays, polls) in results.items():
        ms = [d * 1000 for d in delays]
        print(f"{name:<12} {percentile(ms, 50):8.2f} {percentile(ms, 99):8.2f} {max(ms):8.2f} "
              f"{statistics.mean(ms):8.2f} {polls:17d}")


if __name__ == "__main__":
    asyncio.run(main())
