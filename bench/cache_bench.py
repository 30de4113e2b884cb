"""Entity cache benchmark: the order history with L1 only and with L1 + Redis, cold and warm.

    .venv/bin/python bench/cache_bench.py [--duration 10] [--latency-ms 20] [--customers 50]

Starts the six services (--admin, fresh temp data dir) and the gateway on free ports,
injects the same latency into every service, and runs schema/examples/order_history.graphql
for customers 1..N (default 50), each request as that customer
(a token of customer-<id>), so private types (customer, order, payment, shipment)
are cached per caller and public ones (book, author, stock) shared. Five configurations:

  L1 cold        a freshly started gateway, memory cache only: one sequential pass
  L1 warm        the same gateway after that full pass: a second sequential pass, then
                 N concurrent clients for --duration seconds
  L1+Redis cold  the gateway restarted with REDIS_URL and a namespace unique to this run
                 (empty): one sequential pass
  L1+Redis warm  as L1 warm
  L1+Redis restarted  the gateway restarted again: empty L1, warm Redis; one sequential pass

A cold cache can be measured only once, so a cold row has the latency of that one pass,
not a throughput. Per configuration: latency p50/p99, requests per second, upstream calls
per query (the services' /_admin/stats, but /events and /healthz), cache hit ratios from
the gateway's /metrics (`bookvault_cache_requests_total{level,result}`), and the gateway's
peak RSS (VmHWM). The cache TTLs are the gateway's own unless --ttl pins them all.

Prints tables, writes bench/results/cache.json, deletes the run's Redis keys, stops every
process (also on error or Ctrl-C). Exits 1 when a request failed or a check did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio

from _harness import (EXCLUDED_ROUTES, REPO, Stack, Tally, bearer, calls_per_query, clear_stats, cpu_seconds,
                      peak_rss_kib, post_graphql, set_faults, summary, ttl_env, upstream_calls)
from gateway.cache import FORMAT
from gateway.config import DEFAULT_PORTS
from schema import BINDINGS

RESULTS = Path(__file__).resolve().parent / "results" / "cache.json"
QUERY_FILE = REPO / "schema" / "examples" / "order_history.graphql"
CLIENT_TIMEOUT = 10.0
NEAR_ZERO = 0.05  # upstream calls per query that count as "none"
SERVICES = tuple(DEFAULT_PORTS)
ROUTE_ENTITY = {(b.service, b.path): b.entity for b in BINDINGS if b.policy is not None}
_CACHE_SERIES = re.compile(r"^bookvault_cache_requests_total\{([^}]*)\}\s+(\S+)\s*$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def caller(customer: int | str) -> dict[str, str]:
    return bearer(customer)


# -- measuring ---------------------------------------------------------------------------


async def cache_counts(client: httpx.AsyncClient, gateway_url: str) -> Counter[tuple[str, str, str]]:
    """The gateway's cache lookup counters, {(entity, level, result): count}."""
    response = await client.get(f"{gateway_url}/metrics")
    response.raise_for_status()
    counts: Counter[tuple[str, str, str]] = Counter()
    for labels, value in _CACHE_SERIES.findall(response.text):
        d = dict(_LABEL.findall(labels))
        counts[(d.get("entity", "?"), d.get("level", "?"), d.get("result", "?"))] += int(float(value))
    return counts


def hit_ratios(counts: Counter[tuple[str, str, str]], ids_fetched: Counter[str], with_redis: bool) -> dict[str, Any]:
    """Overall = (L1 hits + L2 hits) / lookups: the share of lookups answered fresh by some
    level (a result is `hit` when fresh, `expired` when found past its TTL, `miss`). L2 is
    asked for what L1 missed or held expired. Per level = that level's hits / its lookups.
    `fresh` = 1 - ids fetched upstream / lookups, a cross-check from the services' stats."""

    def sums(entity: str | None = None) -> dict[str, int]:
        out = Counter[str]()
        for (e, level, result), n in counts.items():
            if entity is None or e == entity:
                out[f"{level}_{result}"] += n
        return {f"{level}_{r}": out[f"{level}_{r}"] for level in ("l1", "l2") for r in ("hit", "expired", "miss")}

    def ratios(s: dict[str, int], fetched: int) -> dict[str, Any]:
        lookups = s["l1_hit"] + s["l1_expired"] + s["l1_miss"]
        l2_lookups = s["l2_hit"] + s["l2_expired"] + s["l2_miss"]
        share = lambda a, b: round(a / b, 4) if b else None  # noqa: E731
        return {**s, "lookups": lookups, "ids_fetched_upstream": fetched,
                "overall": share(s["l1_hit"] + s["l2_hit"], lookups), "l1": share(s["l1_hit"], lookups),
                "l2": share(s["l2_hit"], l2_lookups) if with_redis else None,
                "fresh": share(max(lookups - fetched, 0), lookups)}

    entities = sorted({e for e, _, _ in counts} | set(ids_fetched))
    return {**ratios(sums(), sum(ids_fetched.values())),
            "per_entity": {e: ratios(sums(e), ids_fetched[e]) for e in entities}}


def fetched_ids(calls: list[dict[str, Any]]) -> Counter[str]:
    """Ids asked of the services' batch routes, by the entity bound to the route."""
    out: Counter[str] = Counter()
    for c in calls:
        entity = ROUTE_ENTITY.get((c["service"], c["route"]))
        if entity is not None and c["ids"]:
            out[entity] += c["ids"]
    return out


async def measured(client: httpx.AsyncClient, stack: Stack, with_redis: bool,
                   work: Callable[[], Awaitable[Tally]]) -> dict[str, Any]:
    """Run `work` with the services' stats cleared and the cache counters read before and
    after: its latencies, upstream calls, cache ratios, and the gateway's peak RSS."""
    await clear_stats(client, stack.service_urls.values())
    before = await cache_counts(client, stack.gateway_url)
    gateway_cpu, client_cpu = cpu_seconds(stack.pid("gateway")), time.process_time()
    started = time.perf_counter()
    tally = await work()
    elapsed = time.perf_counter() - started
    gateway_cpu = None if gateway_cpu is None else (cpu_seconds(stack.pid("gateway")) or 0.0) - gateway_cpu
    client_cpu = time.process_time() - client_cpu
    n = max(tally.total, 1)
    calls = await upstream_calls(client, stack)
    counts = await cache_counts(client, stack.gateway_url)
    counts.subtract(before)
    await clear_stats(client, stack.service_urls.values())  # the services keep them in memory
    return {"tally": tally, "elapsed_s": elapsed, "rps": tally.total / elapsed if elapsed else 0.0,
            "calls": calls_per_query(calls, tally.total), "cache": hit_ratios(+counts, fetched_ids(calls), with_redis),
            "rss_kib": peak_rss_kib(stack.pid("gateway")),
            "cpu_ms_per_query": {"gateway": None if gateway_cpu is None else round(gateway_cpu * 1000 / n, 2),
                                 "bench_client": round(client_cpu * 1000 / n, 2)}}


def payload(text: str, customer: int) -> dict[str, Any]:
    return {"query": text, "variables": {"id": str(customer), "after": None}}


async def sequential(client: httpx.AsyncClient, stack: Stack, text: str, customers: list[int]) -> Tally:
    tally = Tally()
    for c in customers:
        await post_graphql(client, f"{stack.gateway_url}/graphql", payload(text, c), "customer", tally, caller(c))
    return tally


async def concurrent(stack: Stack, text: str, customers: list[int], duration: float, clients: int) -> Tally:
    """`clients` workers, each walking the customers from its own offset, for `duration` s."""
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits) as client:
        deadline = time.perf_counter() + duration

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                c = customers[i % len(customers)]
                await post_graphql(client, f"{stack.gateway_url}/graphql", payload(text, c), "customer", tally, caller(c))
                i += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return tally


# -- the run -------------------------------------------------------------------------------


async def wait_redis_ready(stack: Stack, client: httpx.AsyncClient, url: str, namespace: str,
                           timeout: float = 15.0) -> None:
    """The gateway reports Redis "ok" in /readyz and every change-feed cursor is in Redis.
    Until the cursors are there, a gateway whose namespace has none may still drop the
    namespace's entries (entries no cursor vouches for), so a pass starts after that."""
    keys = [f"{namespace}:{FORMAT}:feed:{s}" for s in SERVICES]
    deadline = time.monotonic() + timeout
    r = redis.asyncio.Redis.from_url(url, socket_timeout=2)
    try:
        while True:
            ready = (await client.get(f"{stack.gateway_url}/readyz")).json()
            redis_ok = ready.get("caches", {}).get("redis", {}).get("status") == "ok"
            if redis_ok and await r.exists(*keys) == len(keys):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not using Redis after {timeout:g}s (readyz: {ready})")
            await asyncio.sleep(0.05)
    finally:
        await r.aclose()


async def run(stack: Stack, args: argparse.Namespace, namespace: str | None) -> dict[str, Any]:
    text = QUERY_FILE.read_text()
    customers = list(range(1, args.customers + 1))
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
        await set_faults(client, stack.service_urls.values(), {"latencyMs": args.latency_ms})

        async def cold_and_warm(prefix: str, with_redis: bool) -> None:
            print(f"  {prefix}: cold pass over {len(customers)} customers ...", flush=True)
            results[f"{prefix} cold"] = {"first_pass": await measured(
                client, stack, with_redis, lambda: sequential(client, stack, text, customers))}
            print(f"  {prefix}: warm pass, then {args.concurrency} clients for {args.duration:g}s ...", flush=True)
            second = await measured(client, stack, with_redis, lambda: sequential(client, stack, text, customers))
            load = await measured(client, stack, with_redis,
                                  lambda: concurrent(stack, text, customers, args.duration, args.concurrency))
            results[f"{prefix} warm"] = {"second_pass": second, "concurrent": load}

        await cold_and_warm("L1", with_redis=False)
        # Private data is per caller: a caller never seen before misses what customer 1's
        # own requests cached, then hits it on its second request; public data it shares.
        other = bearer(subject="someone-else")
        probes = {}
        for name in ("first", "second"):
            probes[name] = await measured(client, stack, False, lambda: _one(client, stack, text, 1, other))
        results["L1 warm"]["other_caller"] = probes

        if namespace is None:
            return results
        redis_env = {"REDIS_URL": args.redis_url, "BOOKVAULT_CACHE_NAMESPACE": namespace}
        print(f"  restarting the gateway with Redis (namespace {namespace}) ...", flush=True)
        await asyncio.to_thread(stack.restart, "gateway", redis_env)
        await wait_redis_ready(stack, client, args.redis_url, namespace)
        await cold_and_warm("L1+Redis", with_redis=True)
        print("  restarting the gateway (empty L1, warm Redis): one pass ...", flush=True)
        await asyncio.to_thread(stack.restart, "gateway")
        await wait_redis_ready(stack, client, args.redis_url, namespace)
        results["L1+Redis restarted"] = {"first_pass": await measured(
            client, stack, True, lambda: sequential(client, stack, text, customers))}
    return results


async def _one(client: httpx.AsyncClient, stack: Stack, text: str, customer: int, headers: dict[str, str]) -> Tally:
    tally = Tally()
    await post_graphql(client, f"{stack.gateway_url}/graphql", payload(text, customer), "customer", tally, headers)
    return tally


def redis_reachable(url: str) -> str | None:
    """None when Redis answers; else why not."""
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as r:
            r.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def drop_namespace(url: str, namespace: str) -> int:
    """Delete the run's keys; how many there were."""
    removed = 0
    with redis.Redis.from_url(url, socket_timeout=5) as r:
        batch: list[bytes] = []
        for key in r.scan_iter(match=f"{namespace}:*", count=500):
            batch.append(key)
            if len(batch) == 500:
                removed += r.unlink(*batch)
                batch = []
        if batch:
            removed += r.unlink(*batch)
    return removed


# -- report ------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(head), line(tuple("-" * w for w in widths)), *(line(row) for row in rows)]


def _phase_json(p: dict[str, Any]) -> dict[str, Any]:
    t: Tally = p["tally"]
    return {"requests": t.total, "failed": sum(t.failures.values()), "failures": dict(t.failures.most_common(10)),
            "elapsed_s": round(p["elapsed_s"], 2), "rps": round(p["rps"], 1),
            "latency": {**summary(t.latencies_ms), "first_ms": round(t.latencies_ms[0], 2) if t.latencies_ms else None,
                        "slowest_ms": [round(x, 1) for x in sorted(t.latencies_ms)[-3:][::-1]]},
            "cpu_ms_per_query": p["cpu_ms_per_query"],
            "upstream_calls_per_query": p["calls"], "cache": p["cache"],
            "gateway_peak_rss_mib": round(p["rss_kib"] / 1024, 1) if p["rss_kib"] else None}


def checks(out: dict[str, Any]) -> list[tuple[bool, str]]:
    c = out["configurations"]
    per = lambda cfg, phase: c[cfg][phase]["upstream_calls_per_query"]["per_service"]  # noqa: E731
    found: list[tuple[bool, str]] = []
    if "L1 warm" in c:
        warm = per("L1 warm", "concurrent")
        public = warm.get("catalog", 0) + warm.get("inventory", 0)
        found.append((public <= NEAR_ZERO, f"L1 warm: catalog+inventory calls/query {public:g} (expected ~0)"))
        found.append((warm.get("customers", 0) <= NEAR_ZERO,
                      f"L1 warm: customers calls/query {warm.get('customers', 0):g} (expected ~0: cached per caller)"))
        first, second = (c["L1 warm"]["other_caller"][k]["upstream_calls_per_query"]["per_service"]
                         for k in ("first", "second"))
        found.append((first.get("customers", 0) >= 1 and first.get("catalog", 0) == 0,
                      f"another caller, first request: customers {first.get('customers', 0):g}, payments "
                      f"{first.get('payments', 0):g}, shipping {first.get('shipping', 0):g}, catalog "
                      f"{first.get('catalog', 0):g} calls (expected: private misses, public hits)"))
        found.append((second.get("customers", 0) == 0 and second.get("payments", 0) == 0,
                      f"another caller, second request: customers {second.get('customers', 0):g}, payments "
                      f"{second.get('payments', 0):g} calls (expected 0: now cached for that caller)"))
    if "L1+Redis cold" in c:
        l2 = c["L1+Redis cold"]["first_pass"]["cache"]["l2_hit"]
        found.append((l2 == 0, f"L1+Redis cold: {l2} L2 hits (expected 0: a new, empty namespace)"))
    if "L1+Redis restarted" in c:
        restarted = c["L1+Redis restarted"]["first_pass"]
        catalog = restarted["upstream_calls_per_query"]["per_service"].get("catalog", 0)
        found.append((catalog <= NEAR_ZERO, f"L1+Redis restarted: catalog calls/query {catalog:g} (expected ~0: from L2)"))
        found.append((restarted["cache"]["l2_hit"] > 0, f"L1+Redis restarted: {restarted['cache']['l2_hit']} L2 hits"))
    return found


def report(results: dict[str, Any], args: argparse.Namespace, stack_info: dict[str, Any]) -> dict[str, Any]:
    policies = {b.entity: {"ttl_s": args.ttl if args.ttl is not None else b.policy.ttl, "private": b.policy.private}
                for b in BINDINGS if b.policy is not None}
    out: dict[str, Any] = {
        "config": {"query": str(QUERY_FILE.relative_to(REPO)), "customers": f"1..{args.customers}",
                   "identity": "authorization: Bearer <token of customer-<customerId>>", "latency_ms": args.latency_ms,
                   "duration_s": args.duration, "concurrency": args.concurrency, "cache_policies": policies,
                   "excluded_routes": sorted(EXCLUDED_ROUTES), "redis_url": args.redis_url if stack_info["namespace"] else None,
                   "redis_namespace": stack_info["namespace"]},
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], **stack_info["environment"]},
        "hit_ratio_formula": hit_ratios.__doc__.replace("\n   ", "").strip(),
        "configurations": {},
    }
    for name, r in results.items():
        out["configurations"][name] = {k: ({p: _phase_json(v) for p, v in r[k].items()} if k == "other_caller"
                                           else _phase_json(r[k])) for k in r}

    main_rows, call_rows = [], []
    for name, r in out["configurations"].items():
        first = r.get("first_pass") or r["second_pass"]
        source = r.get("concurrent") or r["first_pass"]  # calls and ratios: the warm load, or the one cold pass
        load = r.get("concurrent")
        cache = source["cache"]
        what = "1st pass (seq)" if "first_pass" in r else f"{args.concurrency} clients {args.duration:g}s"
        main_rows.append((name, what, _fmt(first["latency"].get("p50_ms")), _fmt(first["latency"].get("p99_ms")),
                          _fmt(load["rps"]) if load else "-",
                          _fmt(load["latency"].get("p50_ms")) if load else "-",
                          _fmt(load["latency"].get("p99_ms")) if load else "-",
                          _fmt(source["upstream_calls_per_query"]["total"], 2),
                          _pct(cache["overall"]), _pct(cache["l1"]), _pct(cache["l2"]), _pct(cache["fresh"]),
                          _fmt(source["cpu_ms_per_query"]["gateway"]), _fmt(source["gateway_peak_rss_mib"])))
        per = source["upstream_calls_per_query"]["per_service"]
        call_rows.append((name, *(_fmt(per.get(s, 0.0), 2) for s in SERVICES),
                          _fmt(source["upstream_calls_per_query"]["total"], 2)))
    failed = sum(p["failed"] for r in out["configurations"].values() for k, p in r.items() if k != "other_caller")
    failed += sum(p["failed"] for r in out["configurations"].values() for p in r.get("other_caller", {}).values())
    total = sum(p["requests"] for r in out["configurations"].values() for k, p in r.items() if k != "other_caller")
    out["checks"] = [{"ok": ok, "what": what} for ok, what in checks(out)]
    out["failed_requests"] = failed
    out["ok"] = failed == 0 and all(c["ok"] for c in out["checks"])

    print()
    print(f"BookVault cache bench: order history for customers 1..{args.customers}, each as its own caller; "
          f"{args.latency_ms} ms injected on every service; {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print("TTLs (s): " + ", ".join(f"{e} {p['ttl_s']:g}{' (per caller)' if p['private'] else ''}"
                                   for e, p in policies.items()))
    print(f"seq p50/p99: a sequential pass of {args.customers} requests (cold/restarted rows: the first one, warm rows: "
          "the second; nearest rank, so with 50 requests p99 is the slowest); "
          f"rps, p50/p99@N: {args.concurrency} concurrent clients for {args.duration:g}s; calls/q, hit ratios, RSS: "
          "the concurrent run for warm rows, the first pass otherwise; CPU ms/q: the gateway's CPU time per query")
    head = ("configuration", "measured", "seq p50", "seq p99", "rps@N", "p50@N", "p99@N", "calls/q",
            "hit %", "L1 %", "L2 %", "fresh %", "CPU ms/q", "RSS MiB")
    for line in _table(head, main_rows):
        print(line)
    print()
    print("upstream calls per query, by service (orders' page call is never cached: 1/query is the floor)")
    for line in _table(("configuration", *SERVICES, "total"), call_rows):
        print(line)
    print()
    print("hit % = (L1 hits + L2 hits) / lookups: lookups answered fresh by some cache level, from")
    print("        bookvault_cache_requests_total{level,result}; result is hit (fresh), expired (found past its TTL) or miss")
    print("L1 %  = L1 hits / L1 lookups;  L2 % = L2 hits / L2 lookups (L2 is asked for what L1 missed or held expired)")
    print("fresh % = 1 - ids fetched from the services' batch routes / lookups: the same share, seen from the services")
    for name, r in out["configurations"].items():
        source = r.get("concurrent") or r["first_pass"]
        ents = source["cache"]["per_entity"]
        print(f"  {name} per entity (hit/fresh %): " + ", ".join(
            f"{e} {_pct(v['overall'])}/{_pct(v['fresh'])}" for e, v in ents.items() if v["lookups"]))
    if "L1 warm" in out["configurations"]:
        probes = out["configurations"]["L1 warm"]["other_caller"]
        for k, p in probes.items():
            per = p["upstream_calls_per_query"]["per_service"]
            print(f"another caller asks for customer 1 ({k} request) on the warm L1 gateway: upstream "
                  + ", ".join(f"{s} {v:g}" for s, v in per.items()))
    print()
    for c in out["checks"]:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['what']}")
    for name, r in out["configurations"].items():
        for phase, p in r.items():
            for reason, count in (p.get("failures") or {}).items():
                print(f"  FAILED x{count} in {name} / {phase}: {reason}")
    print(f"requests: {total} measured, {failed} failed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each concurrent run (default 10)")
    parser.add_argument("--latency-ms", type=int, default=20, help="latency injected into every service (default 20)")
    parser.add_argument("--customers", type=int, default=50, help="customers 1..N, one caller each (default 50)")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent clients (default 10)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="the Redis for the L1+Redis rows (default redis://127.0.0.1:6379/0); keys go to a "
                             "namespace unique to the run, deleted at the end")
    parser.add_argument("--no-redis", action="store_true", help="only the L1 rows")
    parser.add_argument("--ttl", type=float, default=None,
                        help="pin every entity's TTL to this many seconds (default: the gateway's own TTLs)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 120 and 0 <= args.latency_ms <= 5000 and 1 <= args.customers <= 200
            and 1 <= args.concurrency <= 200 and (args.ttl is None or args.ttl >= 0)):
        parser.error("out of range: duration 0-120 s, latency 0-5000 ms, customers 1-200, concurrency 1-200, ttl >= 0")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    namespace = None
    if not args.no_redis:
        problem = redis_reachable(args.redis_url)
        if problem:
            print(f"Redis at {args.redis_url} not reachable ({problem}): only the L1 rows (or give --redis-url)",
                  file=sys.stderr)
        else:
            namespace = f"bvbench-{os.getpid()}-{secrets.token_hex(4)}"
    env = ttl_env(args.ttl) if args.ttl is not None else {}
    info: dict[str, Any] = {"namespace": namespace, "environment": {}}
    try:
        with Stack(env=env) as stack:
            print(f"services and gateway ready in {stack.startup_seconds:.1f}s (gateway {stack.gateway_url})", flush=True)
            info["environment"]["startup_s"] = round(stack.startup_seconds, 2)
            try:
                results = asyncio.run(run(stack, args, namespace))
            finally:
                log = stack.log_tail("gateway", lines=1_000_000)
                info["environment"]["redis_fallback_warnings"] = log.count("redis unavailable")
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except (RuntimeError, httpx.HTTPError, redis.RedisError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        # After the gateway has stopped: it writes its feed cursors until then.
        if namespace is not None:
            try:
                info["redis_keys_deleted"] = drop_namespace(args.redis_url, namespace)
            except redis.RedisError as exc:
                print(f"could not delete the Redis keys {namespace}:* ({exc})", file=sys.stderr)
    out = report(results, args, info)
    out["environment"]["total_s"] = round(time.monotonic() - started, 1)
    out["redis_keys_deleted"] = info.get("redis_keys_deleted")
    if info["environment"].get("redis_fallback_warnings"):
        print(f"note: the gateway logged 'redis unavailable' {info['environment']['redis_fallback_warnings']} times "
              "(a Redis call over its timeout: those lookups fell back to L1 and the services)")
    if namespace is not None:
        print(f"Redis namespace {namespace}: {out['redis_keys_deleted']} keys deleted")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"total {out['environment']['total_s']}s; results in {args.output}")
    if not out["ok"]:
        print("NOT OK: failed requests or a check that did not hold (see above)", file=sys.stderr)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
