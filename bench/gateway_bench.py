"""Gateway benchmark: latency against the critical path, throughput, upstream calls, memory.

    .venv/bin/python bench/gateway_bench.py [--duration 15] [--latency-ms 20] [--requests 200]

Starts the six services (--admin, fresh temp data dir) and the gateway on free ports,
injects the same latency into every service, then for the order page and the order
history (schema/examples/*.graphql):

- levels: one request at a time with the services' stats cleared; a call is one level
  deeper than the calls that were (more than half) done when it started. The critical path is
  levels x injected latency (order page 2 levels = 40 ms, order history 2 = 40 ms at 20 ms: the
  minimal critical path, one level per dependency between services' data; the catalog sends
  the books' authors with the books);
- p50/p99 of sequential requests over a deterministic set of ids, after a warm-up;
- requests per second with N concurrent clients (asyncio, one process; the queries go over
  `LoadClient`, the gateway's own light HTTP/1.1 client, so the client's CPU, on the same
  cores, adds as little as it can to the latencies and bounds the throughput least);
- upstream calls per query (all services' /_admin/stats entries but /events and /healthz);
- every response must be HTTP 200 with data and no "errors" (failures are counted).

The gateway's entity cache (when it has one) is kept cold by default: every entity's TTL
is set to 0, so each request fans out in full. `--cache` measures it as configured; the
levels are then reported, not enforced (cached entities skip calls).

Prints a table, writes bench/results/gateway.json, exits 1 when a request failed or a
query's levels differ from the expected ones (without --cache).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from _harness import (EXCLUDED_ROUTES, REPO, STAFF, LoadClient, Stack, Tally, calls_per_query, clear_stats, cpu_seconds,
                      peak_rss_kib, set_faults, summary, ttl_env, upstream_calls)
from mock_services.demo_data import shop

RESULTS = Path(__file__).resolve().parent / "results" / "gateway.json"
CLIENT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Query:
    name: str
    file: str
    root: str  # the top-level field that must not be null
    levels: int  # expected depth of the upstream call graph
    path: str  # the levels, for the report
    ids: list[str]
    text: str

    def variables(self, i: int) -> dict[str, Any]:
        return {"id": self.ids[i % len(self.ids)]}


_HEADERS = {"content-type": "application/json", **STAFF}


async def request(load: LoadClient, query: Query, i: int, tally: Tally) -> None:
    body = orjson.dumps({"query": query.text, "variables": query.variables(i)})
    await load.post_graphql(body, _HEADERS, query.root, tally)


def _spread(first: str, count: int, n: int, stride: int) -> list[str]:
    """`first`, then a deterministic walk over 1..count (stride coprime to count: distinct ids)."""
    while math.gcd(stride, count) != 1:
        stride += 1
    ids = [first] + [str(1 + (i * stride) % count) for i in range(1, n)]
    return list(dict.fromkeys(ids))


def queries(scale: int, n: int) -> list[Query]:
    data = shop(scale)
    text = lambda file: (REPO / "schema" / "examples" / file).read_text()  # noqa: E731
    return [
        Query("order_page", "order_page.graphql", "order", 2,
              "orders -> customers/catalog(books, their authors included)/inventory/payments/shipping",
              _spread("4850", len(data.orders), n, 997), text("order_page.graphql")),
        Query("order_history", "order_history.graphql", "customer", 2,
              "customers/orders(pages) -> catalog(books, their authors included)/payments/shipping",
              _spread("7", len(data.customers), n, 37), text("order_history.graphql")),
    ]


# -- upstream call graph ---------------------------------------------------------------


def levels(calls: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group one request's upstream calls into waves: a call is one level deeper than the
    deepest call that was past its midpoint when it started (monotonic clocks are
    system-wide). A dependent call starts after its parent's end, a sibling near its
    start; the midpoint, not the end, because a busy service records its `end` a few ms
    after the gateway already has the answer."""
    level: list[int] = []
    ordered = sorted(calls, key=lambda c: c["start"])
    for i, call in enumerate(ordered):
        before = [level[j] for j in range(i) if (ordered[j]["start"] + ordered[j]["end"]) / 2 <= call["start"]]
        level.append(1 + max(before, default=0))
    waves: list[list[dict[str, Any]]] = [[] for _ in range(max(level, default=0))]
    for call, lv in zip(ordered, level):
        waves[lv - 1].append(call)
    return waves


def describe_waves(waves: list[list[dict[str, Any]]]) -> list[str]:
    out = []
    for wave in waves:
        calls = Counter(f"{c['service']} {c['route']}" + (f"[{c['ids']}]" if c["ids"] else "") for c in wave)
        out.append(", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(calls.items())))
    return out


# -- phases --------------------------------------------------------------------------------


async def probe_levels(client: httpx.AsyncClient, load: LoadClient, stack: Stack, query: Query, probes: int, tally: Tally,
                       latency_ms: int, tries: int = 3) -> dict[str, Any]:
    """Single requests with the stats cleared before each: the call graph's levels, and
    where the time goes (injected latency, the services' own work, the gateway's).

    A process that waits for a CPU can start a call late, which adds a level; it can never
    start a dependent call early. So an id that shows more levels than expected is tried
    again (up to `tries` times) and its depth is the fewest levels seen."""
    observed, shapes, extra = [], [], []
    for i in range(probes):
        seen = []
        for _ in range(tries):
            await clear_stats(client, stack.service_urls.values())
            await request(load, query, i, tally)
            waves = levels(await upstream_calls(client, stack))
            total = tally.latencies_ms[-1]
            seen.append(len(waves))
            if len(waves) <= query.levels:
                break
        if len(seen) > 1:
            extra.append({"variables": query.variables(i), "levels_per_try": seen})
        upstream = sum(max(c["end"] for c in w) - min(c["start"] for c in w) for w in waves) * 1000
        observed.append(min(seen))
        shapes.append({"variables": query.variables(i), "levels": len(waves), "waves": describe_waves(waves),
                       "total_ms": round(total, 1), "injected_ms": len(waves) * latency_ms,
                       "services_ms": round(upstream - len(waves) * latency_ms, 1),
                       "gateway_ms": round(total - upstream, 1)})
    return {"expected": query.levels, "observed": observed, "ok": all(n == query.levels for n in observed),
            "retried": extra, "probes": shapes}


async def sequential(client: httpx.AsyncClient, load: LoadClient, stack: Stack, query: Query, n: int,
                     warmup: int) -> dict[str, Any]:
    warm = Tally()
    for i in range(warmup):
        await request(load, query, i, warm)
    await clear_stats(client, stack.service_urls.values())
    tally = Tally()
    for i in range(n):
        await request(load, query, i, tally)
    calls = await upstream_calls(client, stack)
    return {"tally": tally, "warmup": warm, "calls": calls_per_query(calls, tally.total)}


async def throughput(stack: Stack, query: Query, duration: float, concurrency: int) -> dict[str, Any]:
    tally = Tally()
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client, \
            LoadClient(stack.gateway_url, concurrency, CLIENT_TIMEOUT) as load:
        await clear_stats(client, stack.service_urls.values())

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                await request(load, query, i, tally)
                i += concurrency

        cpu_before = {name: cpu_seconds(stack.pid(name)) for name in stack.children}
        client_before, started = time.process_time(), time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        cpu = {name: _delta(cpu_before[name], cpu_seconds(stack.pid(name))) for name in stack.children}
        calls = await upstream_calls(client, stack)
        await clear_stats(client, stack.service_urls.values())  # the services keep them in memory
    n = max(tally.total, 1)
    services_cpu = sum(v for k, v in cpu.items() if k != "gateway" and v is not None)
    return {"tally": tally, "elapsed_s": elapsed, "rps": tally.total / elapsed if elapsed else 0.0,
            "calls": calls_per_query(calls, tally.total),
            "cpu_ms_per_query": {"gateway": _per(cpu.get("gateway"), n), "services": _per(services_cpu, n),
                                 "bench_client": _per(client_cpu, n)},
            "cpu_s": {**{k: None if v is None else round(v, 2) for k, v in cpu.items()}, "bench_client": round(client_cpu, 2)}}


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _per(seconds: float | None, n: int) -> float | None:
    return None if seconds is None else round(seconds * 1000 / n, 2)


async def run(stack: Stack, args: argparse.Namespace) -> dict[str, Any]:
    qs = queries(args.scale, max(args.requests, args.warmup, 1))
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client, LoadClient(stack.gateway_url, 1, CLIENT_TIMEOUT) as load:
        await set_faults(client, stack.service_urls.values(), {"latencyMs": args.latency_ms})
        for q in qs:
            print(f"  {q.name}: levels, {args.warmup} warm-up + {args.requests} sequential ...", flush=True)
            probe_tally = Tally()
            seq = await sequential(client, load, stack, q, args.requests, args.warmup)
            lv = await probe_levels(client, load, stack, q, args.probes, probe_tally, args.latency_ms)
            results[q.name] = {"query": q, "levels": lv, "sequential": seq, "probe_tally": probe_tally}
    for q in qs:
        print(f"  {q.name}: {args.concurrency} concurrent clients for {args.duration:g}s ...", flush=True)
        results[q.name]["throughput"] = await throughput(stack, q, args.duration, args.concurrency)
    return results


# -- report ------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict[str, Any], args: argparse.Namespace, stack: Stack, rss_kib: int | None) -> tuple[dict[str, Any], bool]:
    out: dict[str, Any] = {
        "config": {"latency_ms": args.latency_ms, "requests": args.requests, "warmup": args.warmup,
                   "duration_s": args.duration, "concurrency": args.concurrency, "scale": args.scale,
                   "level_probes": args.probes, "excluded_routes": sorted(EXCLUDED_ROUTES),
                   "gateway_cache": "as configured" if args.cache else "off (every entity's TTL 0)"},
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                        "startup_s": round(stack.startup_seconds, 2),
                        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "queries": {},
    }
    ok = True
    rows = []
    for name, r in results.items():
        q: Query = r["query"]
        seq, thr, lv = r["sequential"], r["throughput"], r["levels"]
        failures = seq["tally"].failures + seq["warmup"].failures + thr["tally"].failures + r["probe_tally"].failures
        total = seq["tally"].total + seq["warmup"].total + thr["tally"].total + r["probe_tally"].total
        ok = ok and not failures and (lv["ok"] or args.cache)
        critical = q.levels * args.latency_ms
        lat, under_load = summary(seq["tally"].latencies_ms), summary(thr["tally"].latencies_ms)
        out["queries"][name] = {
            "file": f"schema/examples/{q.file}",
            "distinct_ids": len(q.ids),
            "critical_path": {"levels": q.levels, "path": q.path, "ms": critical},
            "levels": lv,
            "sequential": {**lat, "overhead_p50_ms": round(lat["p50_ms"] - critical, 2) if lat["n"] else None},
            "throughput": {"concurrency": args.concurrency, "elapsed_s": round(thr["elapsed_s"], 2),
                           "requests": thr["tally"].total, "rps": round(thr["rps"], 1), **under_load,
                           "cpu_ms_per_query": thr["cpu_ms_per_query"], "cpu_s": thr["cpu_s"]},
            "upstream_calls_per_query": {"sequential": seq["calls"], "concurrent": thr["calls"]},
            "responses": {"total": total, "failed": sum(failures.values()), "failures": dict(failures.most_common(10))},
        }
        rows.append((name, f"{max(lv['observed'], default=0)}/{q.levels}{'' if lv['ok'] else ' !'}", f"{critical}",
                     _fmt(lat.get("p50_ms")), _fmt(lat.get("p99_ms")),
                     _fmt(lat["p50_ms"] - critical if lat["n"] else None, 1),
                     _fmt(thr["rps"]), _fmt(under_load.get("p50_ms")), _fmt(under_load.get("p99_ms")),
                     _fmt(seq["calls"]["total"], 2), f"{sum(failures.values())}/{total}"))
    out["gateway"] = {"pid": stack.pid("gateway"), "peak_rss_kib": rss_kib,
                      "peak_rss_mib": round(rss_kib / 1024, 1) if rss_kib else None}
    out["ok"] = ok

    head = ("query", "levels", "crit ms", "p50 ms", "p99 ms", "p50-crit", "rps", "p50@N", "p99@N", "calls/q", "failed")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print()
    print(f"BookVault gateway bench: {args.latency_ms} ms injected on every service, scale {args.scale}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, gateway cache {out['config']['gateway_cache']}")
    print(f"sequential: {args.requests} requests after {args.warmup} warm-up; "
          f"throughput (rps, p50@N, p99@N): N={args.concurrency} concurrent clients for {args.duration:g}s")
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print()
    for name, q in out["queries"].items():
        calls = q["upstream_calls_per_query"]
        per = "  ".join(f"{s} {v:g}" for s, v in calls["sequential"]["per_service"].items())
        print(f"{name} upstream calls/query: {per}  = {calls['sequential']['total']:g}"
              f"  (under load: {calls['concurrent']['total']:g})")
        probe = q["levels"]["probes"][0]
        print(f"{name} critical path, expected {q['critical_path']['levels']} levels: {q['critical_path']['path']}")
        print(f"{name} observed levels {q['levels']['observed']} (request {probe['variables']}):")
        for i, wave in enumerate(probe["waves"], 1):
            print(f"    L{i}: {wave}")
        for retry in q["levels"]["retried"]:
            print(f"    (request {retry['variables']} was tried again: levels {retry['levels_per_try']})")
        split = {k: _median([p[k] for p in q["levels"]["probes"]]) for k in ("total_ms", "injected_ms", "services_ms", "gateway_ms")}
        print(f"{name} time split (median of {len(q['levels']['probes'])} single requests): {split['total_ms']:.1f} ms = "
              f"injected {split['injected_ms']:.0f} + services' own {split['services_ms']:.1f} + gateway {split['gateway_ms']:.1f}")
        cpu = q["throughput"]["cpu_ms_per_query"]
        print(f"{name} CPU per query under load: gateway {_fmt(cpu['gateway'])} ms, six services {_fmt(cpu['services'])} ms, "
              f"bench client {_fmt(cpu['bench_client'])} ms")
        for reason, count in q["responses"]["failures"].items():
            print(f"  FAILED x{count}: {reason}")
    print(f"gateway peak RSS (VmHWM, pid {stack.pid('gateway')}): "
          f"{out['gateway']['peak_rss_mib'] if rss_kib else 'unknown'} MiB")
    return out, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each throughput run (default 15)")
    parser.add_argument("--latency-ms", type=int, default=20, help="latency injected into every service (default 20)")
    parser.add_argument("--requests", type=int, default=200, help="sequential requests per query (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per query (default 20)")
    parser.add_argument("--concurrency", type=int, default=10, help="concurrent clients (default 10)")
    parser.add_argument("--probes", type=int, default=3, help="single requests whose call graph is checked (default 3)")
    parser.add_argument("--scale", type=int, default=1, help="demo data size of the services (default 1)")
    parser.add_argument("--cache", action="store_true",
                        help="leave the gateway's entity cache as configured (default: every TTL 0, so each request "
                             "fans out in full as the critical path assumes; levels are then not enforced)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS.relative_to(REPO)})")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 120 and 0 <= args.latency_ms <= 5000 and 1 <= args.requests <= 10_000
            and 0 <= args.warmup <= 1000 and 1 <= args.concurrency <= 200 and 1 <= args.probes <= 50):
        parser.error("out of range: duration 0-120 s, latency 0-5000 ms, requests 1-10000, warmup 0-1000, "
                     "concurrency 1-200, probes 1-50")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    try:
        with Stack(scale=args.scale, env=None if args.cache else ttl_env(0)) as stack:
            print(f"services and gateway ready in {stack.startup_seconds:.1f}s (gateway {stack.gateway_url}, "
                  f"pid {stack.pid('gateway')})", flush=True)
            results = asyncio.run(run(stack, args))
            rss = peak_rss_kib(stack.pid("gateway"))
            out, ok = report(results, args, stack, rss)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    out["environment"]["total_s"] = round(time.monotonic() - started, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"total {out['environment']['total_s']}s; results in {args.output}")
    if not ok:
        print("NOT OK: failed requests or unexpected levels (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
