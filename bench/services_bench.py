"""Services bench: how long `bookvault services` takes to start, and how fast a batch read is.

    .venv/bin/python bench/services_bench.py [--runs 3] [--requests 300]

(a) start-up at scale 1: from launching `bookvault services` until all six answer /healthz,
    with a fresh data dir (the services seed their databases) and with an existing one;
(b) latency of GET /books?ids=<100 ids> against one real uvicorn process (catalog),
    sequential requests on one keep-alive connection, after a warm-up.

Ports are free ones chosen at run time, never the defaults, and data lives in a temp dir.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVICES = ("customers", "catalog", "inventory", "orders", "payments", "shipping")
BOOKVAULT = Path(sys.executable).with_name("bookvault")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:  # all held open while choosing, so the ports differ
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_healthy(urls: list[str], process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    with httpx.Client(timeout=1) as client:
        while pending:
            if process.poll() is not None:
                raise SystemExit(f"{process.args} exited with status {process.returncode} while starting")
            if time.monotonic() > deadline:
                raise SystemExit(f"not healthy after {timeout:.0f}s: {pending}")
            for url in list(pending):
                try:
                    if client.get(f"{url}/healthz").status_code == 200:
                        pending.remove(url)
                except httpx.TransportError:
                    pass
            time.sleep(0.01)


def stop(process: subprocess.Popen[bytes], sig: int) -> None:
    process.send_signal(sig)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def startup_seconds(data_dir: Path) -> float:
    """One start of `bookvault services` on data_dir: seconds until all six are healthy."""
    urls = {name: f"http://127.0.0.1:{port}" for name, port in zip(SERVICES, free_ports(len(SERVICES)))}
    env = os.environ | {f"BOOKVAULT_{name.upper()}_URL": url for name, url in urls.items()}
    started = time.monotonic()
    process = subprocess.Popen([str(BOOKVAULT), "services", "--scale", "1", "--data-dir", str(data_dir)],
                               env=env, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(list(urls.values()), process)
        return time.monotonic() - started
    finally:
        stop(process, signal.SIGINT)  # the supervisor stops its six children


def batch_latencies(data_dir: Path, requests: int) -> list[float]:
    """Seconds per GET /books?ids=<100 distinct ids> on a catalog process of its own."""
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "mock_services", "catalog", "--port", str(port),
                                "--data-dir", str(data_dir), "--scale", "1"], stdout=subprocess.DEVNULL)
    rng = random.Random(1)
    batches = [",".join(map(str, rng.sample(range(1, 2001), 100))) for _ in range(requests)]
    try:
        wait_healthy([url], process)
        with httpx.Client(base_url=url, timeout=10) as client:
            for ids in batches[:20]:  # warm-up: connection, SQLite page cache
                client.get("/books", params={"ids": ids})
            latencies = []
            for ids in batches:
                started = time.perf_counter()
                response = client.get("/books", params={"ids": ids})
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200 and len(response.json()["data"]) == 100
        return latencies
    finally:
        stop(process, signal.SIGTERM)


def _row(label: str, seconds: list[float]) -> str:
    runs = ", ".join(f"{s:.2f}" for s in seconds)
    return f"  {label:<22} median {statistics.median(seconds):.2f} s   (runs: {runs})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="start-ups of each kind (default 3)")
    parser.add_argument("--requests", type=int, default=300, help="timed batch reads (default 300)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bookvault-services-bench-"))
    try:
        fresh = []
        for _ in range(args.runs):
            shutil.rmtree(work / "data", ignore_errors=True)
            fresh.append(startup_seconds(work / "data"))
        existing = [startup_seconds(work / "data") for _ in range(args.runs)]
        latencies = batch_latencies(work / "data", args.requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(f"bookvault services, scale 1, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print("(a) start-up until all six answer /healthz")
    print(_row("fresh data dir", fresh))
    print(_row("existing data dir", existing))
    print(f"(b) GET /books?ids=<100 ids> on one uvicorn process, {len(latencies)} sequential requests")
    print(f"  p50 {cuts[49] * 1000:.1f} ms   p99 {cuts[98] * 1000:.1f} ms   "
          f"(min {min(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
