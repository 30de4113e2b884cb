"""Gateway workers (issue 27, deliverable 4, the workers part): requests per second of the
cold order history with 1 and with 2 gateway workers on one machine, and their ratio.

    .venv/bin/python bench/scale_bench.py [--duration 10] [--rounds 3] [--concurrency 32]

Starts the six services (fresh temp data dir) and `bookvault gateway` with every entity's
TTL at 0 (each request fans out in full: the cold case, where the gateway's CPU is the
bound), then alternates `BOOKVAULT_WORKERS=1` and `=2` for `--rounds` rounds each (one
interleaved run: a neighbour's load on a shared machine falls on both alike), a warm-up
before each round. Reports the median req/s of each and the ratio, the gateway's CPU
per query (its whole process tree: supervisor, workers, their document workers) and the
client's. Every response must be HTTP 200 with data and no errors.

The services and this load generator run on the same cores as the gateway: on a 2-core
machine, the second worker can only take what they leave, so the ratio stays well under
2 (the figure to expect from the gateway alone is with the services on other machines).
Hive Gateway `--fork 2` is not run here: bench/_hive.py starts Hive with a fixed command
line (no `--fork`), and bench/versus_hive.py is where it is compared.

Writes bench/results/scale.json; exits 1 if a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from _harness import REPO, STAFF, LoadClient, Stack, Tally, cpu_seconds, ttl_env

from mock_services.demo_data import shop

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
CLIENT_TIMEOUT = 10.0
WORKER_HEADER = "bookvault-worker"  # gateway/workers.py: the pid of the worker that answered /healthz
_HEADERS = {"content-type": "application/json", **STAFF}


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the kernel's children lists, /proc/<pid>/task/*/children)."""
    found, level = [pid], [pid]
    while level:
        nxt = []
        for p in level:
            try:
                tasks = os.listdir(f"/proc/{p}/task")
            except OSError:
                continue
            for t in tasks:
                try:
                    nxt += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
                except OSError:
                    continue
        found += nxt
        level = nxt
    return found


def tree_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in tree(pid))


async def workers_ready(url: str, count: int, timeout: float = 60.0) -> None:
    """Until `count` distinct worker pids have answered /healthz (connections opened at once)."""
    seen: set[str] = set()
    async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as client, \
            asyncio.timeout(timeout):
        while len(seen) < count:
            answers = await asyncio.gather(*(client.get(f"{url}/healthz") for _ in range(8)), return_exceptions=True)
            seen |= {a.headers.get(WORKER_HEADER, "alone") for a in answers if isinstance(a, httpx.Response)}


async def load(url: str, text: str, ids: list[str], duration: float, concurrency: int) -> Tally:
    tally = Tally()
    async with LoadClient(url, concurrency, CLIENT_TIMEOUT) as client:
        deadline = time.perf_counter() + duration

        async def one(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                body = orjson.dumps({"query": text, "variables": {"id": ids[i % len(ids)]}})
                await client.post_graphql(body, _HEADERS, "customer", tally)
                i += concurrency

        await asyncio.gather(*(one(k) for k in range(concurrency)))
    return tally


def round_(stack: Stack, workers: int, args: argparse.Namespace, text: str, ids: list[str]) -> dict[str, Any]:
    stack.restart("gateway", env={**ttl_env(0), "BOOKVAULT_WORKERS": str(workers)})
    asyncio.run(workers_ready(stack.gateway_url, workers))
    asyncio.run(load(stack.gateway_url, text, ids, args.warmup, args.concurrency))  # documents parsed, pools open
    pid = stack.pid("gateway")
    cpu_before, client_before, started = tree_cpu(pid), time.process_time(), time.perf_counter()
    tally = asyncio.run(load(stack.gateway_url, text, ids, args.duration, args.concurrency))
    elapsed = time.perf_counter() - started
    n = max(tally.total, 1)
    return {"workers": workers, "rps": round(tally.total / elapsed, 1), "ok": tally.ok,
            "failures": dict(tally.failures),
            "gateway_cpu_ms_per_query": round((tree_cpu(pid) - cpu_before) * 1000 / n, 2),
            "client_cpu_ms_per_query": round((time.process_time() - client_before) * 1000 / n, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured round (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each worker count, alternated (default 3)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent requests (default 32)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 120 and 0 <= args.warmup <= 60 and 1 <= args.rounds <= 20
            and 1 <= args.concurrency <= 200):
        parser.error("out of range: duration 0-120 s, warmup 0-60 s, rounds 1-20, concurrency 1-200")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    text = (REPO / "schema" / "examples" / "order_history.graphql").read_text()
    customers = len(shop(1).customers)
    ids = [str(1 + (i * 37) % customers) for i in range(200)]
    rounds: list[dict[str, Any]] = []
    try:
        with Stack(env=ttl_env(0)) as stack:
            for r in range(args.rounds):
                for workers in ((1, 2) if r % 2 == 0 else (2, 1)):  # ABBA: neither always goes first
                    result = round_(stack, workers, args, text, ids)
                    rounds.append(result)
                    print(f"round {r + 1}: {workers} worker(s)  {result['rps']:8.1f} req/s  "
                          f"gateway {result['gateway_cpu_ms_per_query']} ms CPU/query  "
                          f"failures {sum(result['failures'].values())}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    median = {w: statistics.median(r["rps"] for r in rounds if r["workers"] == w) for w in (1, 2)}
    ratio = median[2] / median[1] if median[1] else None
    print(f"\ncold order history, {args.concurrency} concurrent, {os.cpu_count()} cores "
          f"(affinity {len(os.sched_getaffinity(0))}), median of {args.rounds} interleaved rounds of {args.duration:g}s:")
    print(f"  1 worker   {median[1]:8.1f} req/s")
    print(f"  2 workers  {median[2]:8.1f} req/s")
    print(f"  ratio      {ratio:8.2f}x" if ratio else "  ratio      n/a")
    failed = sum(sum(r["failures"].values()) for r in rounds)
    out = {"query": "order_history (cold: every TTL 0)", "concurrency": args.concurrency, "duration_s": args.duration,
           "rounds": rounds, "median_rps": {str(k): v for k, v in median.items()},
           "ratio_2_to_1": None if ratio is None else round(ratio, 3),
           "environment": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                           "python": platform.python_version(), "machine": platform.machine()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results in {args.output}")
    if failed:
        print(f"NOT OK: {failed} requests failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
