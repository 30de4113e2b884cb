"""BookVault Gateway against Hive Gateway (+ GraphQL Mesh) over the same six services.

    .venv/bin/python bench/versus_hive.py [--duration 5] [--rounds 4] [--latency-ms 0] [--quick] [--json FILE]

Installs Hive Gateway and GraphQL Mesh at the versions pinned in bench/versus_hive/
(`npm ci` from the committed lock file, npm registry only) when node_modules is missing;
starts the six services (scale 1, --admin) and two BookVault gateways, "cache off" (every
entity TTL 0) and "warm" (default TTLs, measured after a warm-up pass over the same
requests); composes a supergraph from the services' /openapi.json with mesh-compose
(bench/_hive.py, bench/versus_hive/mesh.config.ts) and starts Hive Gateway on it.

1. Same data: every request the race sends is asked of all three gateways (of BookVault
   warm twice, the second answered from its cache); the answers, normalised (Hive's field
   names and types mapped to BookVault's), must be equal.
2. The race, per query (order page, one customer's order history) and per request mix
   ("one": the same request every time; "many": a different order / customer per
   request, cycling over --ids of them): rounds of --duration seconds, interleaved
   BookVault off, Hive, BookVault warm, BookVault off, Hive ..., --concurrency keep-alive
   connections from one asyncio client, the gateway's own HTTP/1.1 client (LoadClient in
   bench/_harness.py: light, as the client shares the cores). Hive has no entity cache: its
   figures serve both BookVault rows.

Per gateway and case: upstream calls per request (the services' /_admin/stats, but /events
and /healthz), requests per second, p50/p99 latency, gateway CPU ms per request (/proc CPU
time of the gateway's PID over the measured rounds), peak RSS (VmHWM), the bench client's
own CPU per request (it must not be what limits one gateway more than the other), and the
ratios BookVault/Hive. Every request sends a token (`authorization: Bearer ...`) of the
customer whose data it reads: BookVault caches private data per caller, never for
anonymous ones (README, "The versioned cache"); Hive ignores it.

Exits 1 when the gateways' data differ or a request failed, 2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from _harness import (EXCLUDED_ROUTES, REPO, LoadClient, Stack, Tally, bearer, clear_stats, cpu_seconds, free_ports, peak_rss_kib,
                      percentile, post_graphql, set_faults, ttl_env, upstream_calls)
from _hive import HiveGateway, compose_supergraph, ensure_installed, installed_versions
from mock_services.demo_data import shop
from mock_services.runner import Child

CLIENT_TIMEOUT = 10.0
CLIENT_BUSY = 0.8  # share of one core: above it, the bench client may be what limits a gateway
BV_OFF, BV_WARM, HIVE = "bookvault off", "bookvault warm", "hive"
CACHED = "bookvault warm, asked again"

# The queries as each gateway spells them. BookVault's order page is schema/examples'; the
# Hive side selects the same data under Mesh's names, plus `authorId`: without it, a book
# reached through a link gets `author: null` and /authors is never called.
BV_HISTORY = """query OrderHistory($id: ID!) {
  customer(id: $id) { name orders(first: 20) { totalCount nodes {
    id items { quantity book { title author { name } } } payment { status } shipment { status } } } }
}"""
HIVE_HISTORY = """query OrderHistory($id: String!) {
  customer(id: $id) { name orders(limit: 20) { totalCount data {
    id items { quantity book { title authorId author { name } } } payment { status } shipment { status } } } }
}"""
HIVE_ORDER_PAGE = """query OrderPage($id: String!) {
  order(id: $id) {
    id status placedAt total { amount currency }
    customer { id name email tier }
    items { quantity unitPrice { amount currency } titleAtPurchase
            book { id title price { amount currency } authorId author { name } stock { available warehouse } } }
    payment { status method amount { amount currency } }
    shipment { carrier trackingNumber status estimatedDelivery }
  }
}"""


@dataclass(frozen=True)
class Query:
    name: str
    root: str
    bookvault: str
    hive: str
    one: str  # the id of the "one" mix (the README's example)
    many: list[str]
    customer_of: dict[str, int]  # id -> the customer whose data it is (the caller)

    def request(self, i: str, side: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The payload and headers asking `side` for id `i`, as the customer it belongs to."""
        text = self.hive if side == HIVE else self.bookvault
        return {"query": text, "variables": {"id": i}}, bearer(self.customer_of[i])

    def payloads(self, mix: str, side: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
        return [self.request(i, side) for i in ([self.one] if mix == "one" else self.many)]


def _walk(first: int, count: int, n: int, stride: int) -> list[str]:
    """`first`, then a deterministic walk over 1..count (stride coprime to count): n distinct ids."""
    while math.gcd(stride, count) != 1:
        stride += 1
    ids = [str(first)] + [str(1 + (i * stride) % count) for i in range(1, count + 1)]
    return list(dict.fromkeys(ids))[:n]


def queries(scale: int, n: int) -> list[Query]:
    data = shop(scale)
    order_customer = {str(o["id"]): o["customer_id"] for o in data.orders}
    orders = _walk(4850, len(data.orders), n, 997)
    customers = _walk(7, len(data.customers), n, 37)
    return [
        Query("order_page", "order", (REPO / "schema" / "examples" / "order_page.graphql").read_text(),
              HIVE_ORDER_PAGE, "4850", orders, {o: order_customer[o] for o in orders}),
        Query("order_history", "customer", BV_HISTORY, HIVE_HISTORY, "7", customers, {c: int(c) for c in customers}),
    ]


# -- same data? -------------------------------------------------------------------------------


def _instant(value: str) -> str:
    """Both gateways' date-times as one UTC instant (BookVault `...+00:00`, Mesh `....000Z`)."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(dt.timezone.utc).isoformat()


def normalise(value: Any, side: str) -> Any:
    """An answer in one vocabulary: Mesh's `orders.data` is BookVault's `orders.nodes`, its
    integer ids are BookVault's ID strings, the link key `authorId` the Hive query adds is
    dropped; BookVault's `stock.inStock` (derived, `available > 0`) is checked, then dropped."""
    if isinstance(value, list):
        return [normalise(v, side) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if side == HIVE and key == "authorId":
            continue
        if key == "inStock" and side != HIVE:
            if item != ((value.get("available") or 0) > 0):
                out["inStock (not available > 0)"] = item
            continue
        name = "nodes" if side == HIVE and key == "data" else key
        if key == "id" and item is not None:
            item = str(item)
        elif key in ("placedAt", "estimatedDelivery") and isinstance(item, str):
            item = _instant(item)
        out[name] = normalise(item, side)
    return out


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                side, value = ("the first", a[key]) if key in a else ("the second", b[key])
                found.append(f"{path}.{key}: only in {side}: {str(value)[:300]}")
            else:
                found += differences(a[key], b[key], f"{path}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]


async def fetch(client: httpx.AsyncClient, url: str, payload: dict[str, Any], headers: dict[str, str]) -> Any:
    """The `data` of one answer; an answer with errors (or none) is a difference in itself."""
    response = await client.post(f"{url}/graphql", json=payload, headers=headers)
    body = response.json() if response.headers.get("content-type", "").startswith("application/") else None
    if response.status_code != 200 or not isinstance(body, dict) or body.get("errors"):
        errors = body.get("errors") if isinstance(body, dict) else response.text[:200]
        return {"<failed>": f"HTTP {response.status_code}: {str(errors)[:300]}"}
    return body.get("data")


async def same_data(urls: dict[str, str], qs: list[Query], concurrency: int) -> dict[str, Any]:
    """Every request of the race, asked of each gateway, and of BookVault warm a second time
    (then answered from its cache); each BookVault answer against Hive's."""
    limit = asyncio.Semaphore(concurrency)
    report: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
        for q in qs:
            ids = list(dict.fromkeys([q.one, *q.many]))

            async def one(i: str, q: Query = q) -> list[str]:
                async with limit:
                    answers = {side: normalise(await fetch(client, url, *q.request(i, side)), side)
                               for side, url in urls.items()}
                    answers[CACHED] = normalise(await fetch(client, urls[BV_WARM], *q.request(i, BV_WARM)), BV_WARM)
                return [f"{q.name} {i}: {side} vs hive{d}" for side in (BV_OFF, BV_WARM, CACHED)
                        for d in differences(answers[side], answers[HIVE])]

            found = [d for ds in await asyncio.gather(*(one(i) for i in ids)) for d in ds]
            report[q.name] = {"requests_compared": len(ids), "differences": len(found), "examples": found[:10]}
    return report


# -- the race ---------------------------------------------------------------------------------


@dataclass
class Runs:
    """One gateway's measured rounds of one case."""
    tally: Tally = field(default_factory=Tally)
    elapsed_s: float = 0.0
    gateway_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    services_cpu_s: float = 0.0  # the six services' processes, while this gateway was measured
    calls: int = 0
    round_rps: list[float] = field(default_factory=list)
    client_busiest: float = 0.0  # the highest share of one core the client used in a round
    calls_per_route: dict[str, int] = field(default_factory=dict)


async def load(url: str, payloads: list[tuple[dict[str, Any], dict[str, str]]], root: str, duration: float,
               concurrency: int, tally: Tally) -> None:
    """`concurrency` connections, each sending its next request as soon as the last is answered
    (bench/_harness.py's LoadClient: light, so the client bounds neither gateway)."""
    requests = [(orjson.dumps(payload), {"content-type": "application/json", **headers}) for payload, headers in payloads]
    async with LoadClient(url, concurrency, CLIENT_TIMEOUT) as client:
        deadline = time.perf_counter() + duration

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                body, headers = requests[i % len(requests)]
                await client.post_graphql(body, headers, root, tally)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def warm_up(url: str, payloads: list[tuple[dict[str, Any], dict[str, str]]], root: str, concurrency: int) -> None:
    """One pass over the requests (not measured): what a warm cache has seen."""
    tally, limit = Tally(), asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
        async def one(payload: dict[str, Any], headers: dict[str, str]) -> None:
            async with limit:
                await post_graphql(client, f"{url}/graphql", payload, root, tally, headers)

        await asyncio.gather(*(one(p, h) for p, h in payloads))


async def measure_round(stack: Stack, url: str, pid: int, payloads: list[tuple[dict[str, Any], dict[str, str]]],
                        root: str, args: argparse.Namespace, runs: Runs) -> None:
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as admin:
        await clear_stats(admin, stack.service_urls.values())
        before_n = runs.tally.total
        services = [stack.pid(name) for name in stack.service_urls]
        services_before = sum(cpu_seconds(p) or 0.0 for p in services)
        cpu_before, client_before, started = cpu_seconds(pid), time.process_time(), time.perf_counter()
        await load(url, payloads, root, args.duration, args.concurrency, runs.tally)
        elapsed, cpu_after = time.perf_counter() - started, cpu_seconds(pid)
        runs.services_cpu_s += sum(cpu_seconds(p) or 0.0 for p in services) - services_before
        client_cpu = time.process_time() - client_before
        calls = await upstream_calls(admin, stack)
        await clear_stats(admin, stack.service_urls.values())  # the services keep them in memory
    n = runs.tally.total - before_n
    runs.elapsed_s += elapsed
    runs.gateway_cpu_s += (cpu_after or 0.0) - (cpu_before or 0.0)
    runs.client_cpu_s += client_cpu
    runs.client_busiest = max(runs.client_busiest, client_cpu / elapsed if elapsed else 0.0)
    runs.calls += len(calls)
    for c in calls:
        key = f"{c['service']} {c['route']}"
        runs.calls_per_route[key] = runs.calls_per_route.get(key, 0) + 1
    runs.round_rps.append(n / elapsed if elapsed else 0.0)


async def race(stack: Stack, hive: HiveGateway, qs: list[Query], args: argparse.Namespace) -> dict[str, Any]:
    gateways = {BV_OFF: (stack.children["bookvault_off"].url, stack.pid("bookvault_off")),
                BV_WARM: (stack.gateway_url, stack.pid("gateway")), HIVE: (hive.url, hive.pid)}
    # Each round: BookVault off, Hive, BookVault warm; so off and warm each alternate with
    # Hive (A B A B), and all three see the same stretch of the machine's load.
    order = (BV_OFF, HIVE, BV_WARM)
    results: dict[str, Any] = {}
    for q in qs:
        for mix in ("one", "many"):
            case = f"{q.name} {mix}"
            runs = {name: Runs() for name in gateways}
            payloads = {name: q.payloads(mix, name) for name in gateways}
            print(f"  {case}: {args.rounds} rounds of {args.duration:g}s per gateway ...", flush=True)
            for _ in range(args.rounds):
                for name in order:
                    url, pid = gateways[name]
                    if name == BV_WARM:
                        await warm_up(url, payloads[name], q.root, args.concurrency)
                    await measure_round(stack, url, pid, payloads[name], q.root, args, runs[name])
            results[case] = {"query": q, "mix": mix, "runs": runs,
                             "rss_kib": {name: peak_rss_kib(pid) for name, (_, pid) in gateways.items()}}
    return results


# -- report -------------------------------------------------------------------------------------


def _figures(r: Runs) -> dict[str, Any]:
    t = r.tally
    n = max(t.total, 1)
    return {"requests": t.total, "failed": sum(t.failures.values()), "failures": dict(t.failures.most_common(5)),
            "elapsed_s": round(r.elapsed_s, 2), "rps": round(t.total / r.elapsed_s, 1) if r.elapsed_s else None,
            "rps_per_round": [round(x, 1) for x in r.round_rps],
            "p50_ms": round(percentile(t.latencies_ms, 50) or 0, 2), "p99_ms": round(percentile(t.latencies_ms, 99) or 0, 2),
            "upstream_calls_per_request": round(r.calls / n, 3),
            "upstream_calls_per_route": {k: round(v / n, 3) for k, v in sorted(r.calls_per_route.items())},
            "gateway_cpu_ms_per_request": round(r.gateway_cpu_s * 1000 / n, 2),
            "client_cpu_ms_per_request": round(r.client_cpu_s * 1000 / n, 2),
            "services_cpu_ms_per_request": round(r.services_cpu_s * 1000 / n, 2),
            "client_busiest_round": round(r.client_busiest, 2)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict[str, Any], checks: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": {"duration_s": args.duration, "rounds": args.rounds, "concurrency": args.concurrency,
                   "latency_ms": args.latency_ms, "ids": args.ids, "scale": 1, "excluded_routes": sorted(EXCLUDED_ROUTES),
                   "bookvault_off": "every entity TTL 0", "bookvault_warm": "default TTLs, a warm-up pass before each round",
                   "order": "per round: bookvault off, hive, bookvault warm"},
        "environment": env, "same_data": checks, "cases": {}}
    head = ("case", "gateway", "calls/req", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "RSS MiB", "client ms/req",
            "services ms/req")
    rows: list[tuple[str, ...]] = []
    for case, res in results.items():
        figs = {name: _figures(r) for name, r in res["runs"].items()}
        rss = {name: round(v / 1024, 1) if v else None for name, v in res["rss_kib"].items()}
        for name in figs:
            figs[name]["peak_rss_mib"] = rss[name]
        ratios = {}
        for name in (BV_OFF, BV_WARM):
            a, h = figs[name], figs[HIVE]
            ratios[f"{name} / hive"] = {k: _ratio(a[k], h[k]) for k in (
                "upstream_calls_per_request", "rps", "p50_ms", "p99_ms", "gateway_cpu_ms_per_request", "peak_rss_mib")}
        out["cases"][case] = {"gateways": figs, "ratios": ratios,
                              "ids": 1 if res["mix"] == "one" else len(res["query"].many)}
        label = f"{case} ({res['query'].one})" if res["mix"] == "one" else f"{case} ({len(res['query'].many)} ids)"
        for i, name in enumerate((BV_OFF, BV_WARM, HIVE)):
            f = figs[name]
            spread = f"{min(f['rps_per_round']):.0f}-{max(f['rps_per_round']):.0f}" if f["rps_per_round"] else ""
            rows.append((label if i == 0 else "", name, _fmt(f["upstream_calls_per_request"], 2),
                         f"{_fmt(f['rps'])} ({spread})", _fmt(f["p50_ms"]), _fmt(f["p99_ms"]),
                         _fmt(f["gateway_cpu_ms_per_request"], 2), _fmt(f["peak_rss_mib"]),
                         _fmt(f["client_cpu_ms_per_request"], 2), _fmt(f["services_cpu_ms_per_request"], 2)))
        for name, rt in ratios.items():
            rows.append(("", f"{name.split()[1]}/hive", _fmt(rt["upstream_calls_per_request"], 2), _fmt(rt["rps"], 2),
                         _fmt(rt["p50_ms"], 2), _fmt(rt["p99_ms"], 2), _fmt(rt["gateway_cpu_ms_per_request"], 2),
                         _fmt(rt["peak_rss_mib"], 2), "", ""))
    diffs = sum(c["differences"] for c in checks.values())
    failed = sum(g["failed"] for c in out["cases"].values() for g in c["gateways"].values())
    busy = [f"{case} {name}" for case, c in out["cases"].items() for name, g in c["gateways"].items()
            if g["client_busiest_round"] > CLIENT_BUSY]
    out.update({"differences": diffs, "failed_requests": failed, "client_busy": busy, "ok": diffs == 0 and failed == 0})

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print()
    print(f"BookVault vs Hive Gateway {env['versions'].get('@graphql-hive/gateway')} (Mesh compose "
          f"{env['versions'].get('@graphql-mesh/compose-cli')}, Node {env['versions'].get('node')}): "
          f"{args.latency_ms} ms injected per service, {args.concurrency} connections, {args.rounds} rounds x "
          f"{args.duration:g}s per gateway and case, interleaved; {os.cpu_count()} CPUs shared by everything")
    print("req/s: over all rounds (slowest-fastest round); CPU ms/req: the gateway process's CPU time / requests; "
          "RSS: peak (VmHWM) so far; client ms/req: the bench client's own CPU; services ms/req: the six services' CPU "
          "(the same machine's: with the cache off they bound both gateways' req/s); x/hive: BookVault / Hive")
    print(line(head))
    print(line(tuple("-" * w for w in widths)))
    for row in rows:
        print(line(row))
    print()
    for name, c in checks.items():
        print(f"same data, {name}: {c['requests_compared']} requests x 3 gateways (BookVault warm twice), "
              f"{c['differences']} differences")
        for example in c["examples"]:
            print(f"    {example}")
    for case, c in out["cases"].items():
        for name, g in c["gateways"].items():
            for reason, count in g["failures"].items():
                print(f"  FAILED x{count} in {case} / {name}: {reason}")
    if busy:
        print(f"note: the bench client used more than {CLIENT_BUSY:.0%} of a core in a round of: {', '.join(busy)} "
              "(it may have limited those rows)")
    return out


# -- main ------------------------------------------------------------------------------------------


def add_bookvault_off(stack: Stack) -> None:
    """A second BookVault gateway beside the Stack's: every entity TTL 0, so each request
    fans out in full (cache off)."""
    port = free_ports(1, stack.host)[0]
    gateway = stack.children["gateway"]
    stack.children["bookvault_off"] = Child("bookvault_off", gateway.argv, f"http://{stack.host}:{port}")
    stack.env_overrides["bookvault_off"] = {"BOOKVAULT_PORT": str(port), **ttl_env(0)}
    stack.spawn("bookvault_off")
    stack.wait_ready(["bookvault_off"])


async def run(stack: Stack, hive: HiveGateway, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    qs = queries(1, args.ids)
    if args.latency_ms:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
            await set_faults(client, stack.service_urls.values(), {"latencyMs": args.latency_ms})
    urls = {BV_OFF: stack.children["bookvault_off"].url, BV_WARM: stack.gateway_url, HIVE: hive.url}
    print(f"  same data: {sum(len(q.many) for q in qs)} requests x 3 gateways ...", flush=True)
    checks = await same_data(urls, qs, concurrency=2)  # about the data, not speed: gently
    return await race(stack, hive, qs, args), checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per round (default 5)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per gateway and case (default 4)")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent connections (default 10)")
    parser.add_argument("--latency-ms", type=int, default=0, help="latency injected into every service (default 0)")
    parser.add_argument("--ids", type=int, default=100, help="orders / customers the 'many' mix cycles over (default 100)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 1.5 s, 20 ids")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.ids = min(args.duration, 1.5), min(args.rounds, 2), min(args.ids, 20)
    if not (0 < args.duration <= 120 and 1 <= args.rounds <= 20 and 1 <= args.concurrency <= 200
            and 0 <= args.latency_ms <= 5000 and 1 <= args.ids <= 200):
        parser.error("out of range: duration 0-120 s, rounds 1-20, concurrency 1-200, latency 0-5000 ms, ids 1-200")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bookvault-versus-hive-"))
    hive: HiveGateway | None = None
    try:
        if ensure_installed(workdir / "npm.log"):
            print("installed Hive Gateway and GraphQL Mesh (npm ci) into bench/versus_hive/node_modules", flush=True)
        with Stack(scale=1) as stack:
            add_bookvault_off(stack)
            print(f"services and BookVault gateways ready in {time.monotonic() - started:.1f}s", flush=True)
            supergraph = compose_supergraph(stack.service_urls, workdir, workdir / "compose.log")
            hive = HiveGateway(supergraph, free_ports(1)[0], workdir / "hive.log")
            hive.start()
            print(f"Hive Gateway ready on a supergraph of the six services (pid {hive.pid})", flush=True)
            results, checks = asyncio.run(run(stack, hive, args))
    except KeyboardInterrupt:
        shutil.rmtree(workdir, ignore_errors=True)
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except (RuntimeError, httpx.HTTPError, OSError) as exc:  # HiveError is a RuntimeError
        print(f"bench failed: {type(exc).__name__}: {exc} (logs in {workdir})", file=sys.stderr)
        return 2
    finally:
        if hive is not None:
            hive.stop()
    env = {"versions": installed_versions(), "python": platform.python_version(), "platform": platform.platform(),
           "cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    out = report(results, checks, args, env)
    out["environment"]["total_s"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results in {args.json}")
    print(f"total {out['environment']['total_s']}s")
    if out["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs of npm, mesh-compose and Hive Gateway in {workdir}", file=sys.stderr)
    if out["differences"]:
        print(f"NOT OK: {out['differences']} differences between the gateways' data (see above)", file=sys.stderr)
    if out["failed_requests"]:
        print(f"NOT OK: {out['failed_requests']} failed requests (see above)", file=sys.stderr)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
