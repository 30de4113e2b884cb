"""What tracing costs: order-history throughput with tracing on against tracing off.

    .venv/bin/python bench/tracing_bench.py [--window 2] [--rounds 12] [--concurrency 8]

The six services run as their own processes (untraced, on free ports, real HTTP over
loopback), seeded on first start. Three gateways run side by side in this process, each
configured only through the OTEL_* variables, as in production:

  disabled  OTEL_SDK_DISABLED=true: no spans at all (the floor)
  off       no endpoint (the default): nothing recorded or exported, trace ids still made
  on        OTEL_EXPORTER_OTLP_ENDPOINT set to a local OTLP/HTTP receiver: every span exported

Each round gives every gateway one short window of load (in rotated order), driven in
process through httpx's ASGI transport so the client costs little; an "on" window ends by
flushing its exporter, so the export's cost is charged to it, not to the next window.
Many short interleaved windows spread the machine's other load evenly over the modes.
Throughput depends on what else the machine runs; CPU time per request is steadier."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the OTLP receiver the tests use

from otlp_receiver import OtlpReceiver  # noqa: E402

from bookvault import create_app  # noqa: E402
from gateway import Settings  # noqa: E402
from gateway.auth import mint  # noqa: E402
from gateway.config import DEFAULT_PORTS, JwtConfig, ServiceConfig  # noqa: E402
from mock_services.runner import _wait_ready, service_children  # noqa: E402

QUERY = (ROOT / "schema" / "examples" / "order_history.graphql").read_text()
SECRET = "bookvault-bench-" + "0123456789abcdef" * 2  # tokens are verified (README, "Callers")
CUSTOMERS = range(1, 201)  # rotated, so the services read different rows
MODES = ["off", "on", "disabled"]
OTEL = ("OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def services(data_dir: str) -> Any:
    urls = {name: f"http://127.0.0.1:{free_port()}" for name in DEFAULT_PORTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # the services stay untraced
    children = service_children(urls, data_dir, scale=1, admin=False)
    try:
        for child in children:
            child.process = subprocess.Popen(child.argv, env=env, stdout=subprocess.DEVNULL)
        late = _wait_ready(children, timeout=120)
        if late:
            raise SystemExit(f"services not ready: {late}")
        yield urls
    finally:
        for child in children:
            if child.process:
                child.process.terminate()
        for child in children:
            if child.process:
                child.process.wait(10)


@contextlib.asynccontextmanager
async def gateway(urls: dict[str, str], mode: str, endpoint: str) -> Any:
    """A started gateway whose tracing is configured by the environment for `mode`."""
    for key in OTEL:
        os.environ.pop(key, None)
    if mode == "disabled":
        os.environ["OTEL_SDK_DISABLED"] = "true"
    elif mode == "on":
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    settings = Settings(services={name: ServiceConfig(name=name, url=url) for name, url in urls.items()},
                        jwt=JwtConfig(secret=SECRET))
    app = create_app(settings)
    async with app.router.lifespan_context(app):  # reads OTEL_* now
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30,
                                     headers={"authorization": f"Bearer {mint(SECRET, 'staff', scopes=['staff'])}"}) as client:
            yield app, client


async def one(client: httpx.AsyncClient, customer: int) -> None:
    response = await client.post("/graphql", json={"query": QUERY, "variables": {"id": str(customer)}})
    body = response.json()
    if response.status_code != 200 or "errors" in body:
        raise RuntimeError(f"bad answer: {response.status_code} {str(body)[:300]}")


async def window(app: Any, client: httpx.AsyncClient, seconds: float, concurrency: int, first: int) -> dict[str, float]:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        i = first + offset
        while time.perf_counter() < stop:
            await one(client, CUSTOMERS[i % len(CUSTOMERS)])
            done += 1
            i += concurrency

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    app.state.gateway.telemetry.tracer_provider.force_flush()  # the export, charged to this window
    return {"requests": done, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


async def run(urls: dict[str, str], endpoint: str, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    windows: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    async with contextlib.AsyncExitStack() as stack:
        gateways = {mode: await stack.enter_async_context(gateway(urls, mode, endpoint)) for mode in MODES}
        for app, client in gateways.values():  # warm-up: connections, the parser's cache
            await asyncio.gather(*(one(client, c) for c in CUSTOMERS[: args.concurrency]))
        for round_ in range(args.rounds):
            for mode in MODES[round_ % 3:] + MODES[: round_ % 3]:
                app, client = gateways[mode]
                result = await window(app, client, args.window, args.concurrency, first=round_ * 37)
                windows[mode].append(result)
            print(f"round {round_ + 1:2}: " + "  ".join(
                f"{mode} {w[-1]['requests'] / w[-1]['wall']:5.1f} req/s {1000 * w[-1]['cpu'] / w[-1]['requests']:5.1f} ms CPU"
                for mode, w in windows.items()), flush=True)
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=2.0, help="seconds of load per mode and round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--data-dir", help="the services' data (default: a temporary directory)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bookvault-bench-"))
        urls = stack.enter_context(services(data_dir))
        receiver = stack.enter_context(OtlpReceiver())
        windows = asyncio.run(run(urls, receiver.endpoint, args))
        exported = len(receiver.spans())

    def total(mode: str, key: str) -> float:
        return sum(w[key] for w in windows[mode])

    rps = {mode: total(mode, "requests") / total(mode, "wall") for mode in MODES}
    cpu = {mode: 1000 * total(mode, "cpu") / total(mode, "requests") for mode in MODES}
    paired = sorted((on["requests"] / on["wall"]) / (off["requests"] / off["wall"])
                    for on, off in zip(windows["on"], windows["off"], strict=True))
    report = {
        "query": "schema/examples/order_history.graphql, 20 orders with books, authors, payments, shipments",
        "window_s": args.window, "rounds": args.rounds, "concurrency": args.concurrency,
        "requests_per_s": {mode: round(v, 1) for mode, v in rps.items()},
        "cpu_ms_per_request": {mode: round(v, 2) for mode, v in cpu.items()},
        "throughput_ratio_on_vs_off": round(rps["on"] / rps["off"], 3),
        "throughput_ratio_on_vs_off_per_round": {"min": round(paired[0], 3), "median": round(statistics.median(paired), 3),
                                                 "max": round(paired[-1], 3)},
        "throughput_ratio_off_vs_disabled": round(rps["off"] / rps["disabled"], 3),
        "cpu_ratio_on_vs_off": round(cpu["on"] / cpu["off"], 3),
        # Warm-up requests are exported too; each order history is about 20 spans (stages, reads and the calls sent).
        "spans_exported_per_request_on": round(exported / (total("on", "requests") + args.concurrency), 2),
    }
    print(json.dumps(report, indent=2))
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "tracing.json").write_text(json.dumps({"report": report, "windows": windows}, indent=2))


if __name__ == "__main__":
    main()
