"""Chaos run (issue 5): concurrent clients load the order page while one service's process
is killed and later restarted; everything runs as real processes on free 127.0.0.1 ports.

    .venv/bin/python bench/chaos.py                       # payments: killed at 10 s, back at 20 s, 30 s run
    .venv/bin/python bench/chaos.py --service catalog --clients 20 --duration 30 --kill-at 10 --restart-at 20

Reports: requests answered with a 5xx (goal 0); answers that are not a valid GraphQL
response (goal 0); the share of partial answers (extensions.complete = false) while the
service was down; the time from its restart until full answers came back; latency per
phase. Self-contained: it starts the six services (`python -m mock_services NAME ...
--admin`), then the gateway (`bookvault gateway`, configured through BOOKVAULT_* env vars),
and stops them all on exit, error or Ctrl-C. A JSON summary goes to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench._harness import BENCH_SECRET, STAFF  # noqa: E402

SERVICES = ("customers", "catalog", "inventory", "orders", "payments", "shipping")
ORDER_PAGE = (REPO / "schema" / "examples" / "order_page.graphql").read_text()
ORDER_IDS = range(1, 5001)  # the demo shop at scale 1
HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now (all held open while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


class Processes:
    """The six services and the gateway, each its own process in its own session."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        *ports, gateway_port = free_ports(len(SERVICES) + 1)
        self.urls = {name: f"http://{HOST}:{port}" for name, port in zip(SERVICES, ports, strict=True)}
        self.urls["gateway"] = f"http://{HOST}:{gateway_port}"
        data = str(workdir / "data")
        self.argv = {name: [sys.executable, "-m", "mock_services", name, "--host", HOST, "--port", str(port),
                            "--data-dir", data, "--admin"] for name, port in zip(SERVICES, ports, strict=True)}
        bookvault = Path(sys.executable).with_name("bookvault")
        self.argv["gateway"] = [str(bookvault if bookvault.exists() else REPO / ".venv" / "bin" / "bookvault"), "gateway"]
        self.env = {**os.environ, "BOOKVAULT_JWT_SECRET": BENCH_SECRET, **env, "BOOKVAULT_HOST": HOST, "BOOKVAULT_PORT": str(gateway_port),
                    "PYTHONUNBUFFERED": "1"}
        self.env.update({f"BOOKVAULT_{name.upper()}_URL": self.urls[name] for name in SERVICES})
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.running[name] = subprocess.Popen(self.argv[name], env=self.env, cwd=REPO, stdin=subprocess.DEVNULL,
                                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, names: list[str], timeout: float = 120.0) -> None:
        """Until each answers /healthz (a service seeds its database on first start)."""
        pending = list(names)
        async with httpx.AsyncClient(timeout=1.0) as client, asyncio.timeout(timeout):
            while pending:
                for name in list(pending):
                    if self.running[name].poll() is not None:
                        raise RuntimeError(f"{name} exited while starting; see {self.workdir / (name + '.log')}")
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get(f"{self.urls[name]}/healthz")).status_code == 200:
                            pending.remove(name)
                await asyncio.sleep(0.05)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.running.pop(name, None)
        if process and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        for name in ["gateway", *reversed(SERVICES)]:
            self.kill(name, signal.SIGTERM)


@dataclass
class Answer:
    sent: float  # seconds since the load started
    took: float
    status: int | None  # None: no HTTP answer at all (client timeout, connection error)
    valid: bool  # a GraphQL response: a JSON object with `data` and/or a list of `errors`
    partial: bool
    failed_services: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "CODE service" of each error


def judge(sent: float, took: float, response: httpx.Response | None) -> Answer:
    if response is None:
        return Answer(sent, took, None, False, False)
    try:
        body = response.json()
    except ValueError:
        return Answer(sent, took, response.status_code, False, False)
    valid = isinstance(body, dict) and ("data" in body or isinstance(body.get("errors"), list))
    ext = (body.get("extensions") or {}) if isinstance(body, dict) else {}
    errors = [f"{(e.get('extensions') or {}).get('code')} {(e.get('extensions') or {}).get('service')}"
              for e in (body.get("errors") or [] if valid else []) if isinstance(e, dict)]
    return Answer(sent, took, response.status_code, valid, ext.get("complete") is False,
                  list(ext.get("failedServices", [])), errors)


async def client_loop(gateway: str, started: float, stop_at: float, answers: list[Answer], seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=gateway, timeout=10.0) as client:
        while (now := time.monotonic()) < stop_at:
            order_id = str(rng.choice(ORDER_IDS))
            response = None
            with contextlib.suppress(httpx.HTTPError):
                response = await client.post("/graphql", json={"query": ORDER_PAGE, "variables": {"id": order_id}},
                                             headers=STAFF)
            answers.append(judge(now - started, time.monotonic() - now, response))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def phase(answers: list[Answer], start: float, end: float) -> dict[str, Any]:
    """The requests sent and answered between `start` and `end` (not those across a boundary)."""
    inside = [a for a in answers if start <= a.sent and a.sent + a.took < end]
    took = [a.took * 1000 for a in inside]
    return {
        "requests": len(inside),
        "partial_share": round(sum(a.partial for a in inside) / len(inside), 4) if inside else None,
        "p50_ms": round(percentile(took, 50), 1) if took else None,
        "p99_ms": round(percentile(took, 99), 1) if took else None,
        "max_ms": round(max(took), 1) if took else None,
        "errors": dict(Counter(e for a in inside for e in a.errors).most_common()),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bookvault-chaos-"))
    procs = Processes(workdir, {"BOOKVAULT_DEADLINE_MS": str(args.deadline_ms)})
    try:
        for name in SERVICES:
            procs.spawn(name)
        await procs.ready(list(SERVICES))
        procs.spawn("gateway")
        await procs.ready(["gateway"])
        print(f"stack up in {workdir}; {args.clients} clients for {args.duration}s, "
              f"{args.service} killed at {args.kill_at}s and restarted at {args.restart_at}s", flush=True)

        answers: list[Answer] = []
        started = time.monotonic()
        stop_at = started + args.duration
        clients = [asyncio.create_task(client_loop(procs.urls["gateway"], started, stop_at, answers, seed))
                   for seed in range(args.clients)]
        events: dict[str, float] = {}
        await asyncio.sleep(max(0.0, started + args.kill_at - time.monotonic()))
        procs.kill(args.service)
        events["killed"] = time.monotonic() - started
        await asyncio.sleep(max(0.0, started + args.restart_at - time.monotonic()))
        events["restarted"] = time.monotonic() - started
        procs.spawn(args.service)
        await procs.ready([args.service])
        events["service_healthy"] = time.monotonic() - started
        await asyncio.gather(*clients)
        async with httpx.AsyncClient(timeout=2.0) as client:
            readyz = (await client.get(f"{procs.urls['gateway']}/readyz")).json()
        gateway_log = (workdir / "gateway.log").read_text(errors="replace").splitlines()
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    killed, restarted = events["killed"], events["restarted"]
    after = [a for a in answers if a.sent >= restarted]
    first_full = min((a.sent + a.took for a in after if not a.partial), default=None)
    last_partial = max((a.sent + a.took for a in after if a.partial), default=None)
    return {
        "service": args.service,
        "clients": args.clients,
        "duration_s": args.duration,
        "deadline_ms": args.deadline_ms,
        "events_s": {k: round(v, 3) for k, v in events.items()},
        "requests": len(answers),
        "throughput_rps": round(len(answers) / args.duration, 1),
        "http_5xx": sum(1 for a in answers if a.status is not None and a.status >= 500),
        "no_http_answer": sum(1 for a in answers if a.status is None),
        "invalid_graphql": sum(1 for a in answers if not a.valid),
        "partial_share_while_down": phase(answers, killed, restarted)["partial_share"],
        "failed_services_while_down": sorted({s for a in answers if killed <= a.sent and a.sent + a.took < restarted
                                              for s in a.failed_services}),
        "recovery_s": {
            # from the restart command to the first answer (sent after it) with nothing missing
            "first_full_answer": round(first_full - restarted, 3) if first_full is not None else None,
            # from the restart command to the end of the last partial answer (only full ones after it)
            "last_partial_answer": round(last_partial - restarted, 3) if last_partial is not None else 0.0,
            "service_process_healthy": round(events["service_healthy"] - restarted, 3),
        },
        "phases": {
            "before_kill": phase(answers, 0, killed),
            "while_down": phase(answers, killed, restarted),
            "after_restart": phase(answers, restarted, args.duration + 60),
        },
        "breaker_log": [line for line in gateway_log if "circuit breaker" in line],
        "readyz_at_end": readyz,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--service", default="payments", choices=SERVICES)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--kill-at", type=float, default=10.0)
    parser.add_argument("--restart-at", type=float, default=20.0)
    parser.add_argument("--deadline-ms", type=int, default=2000)
    parser.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    args = parser.parse_args(argv)
    if not 0 < args.kill_at < args.restart_at < args.duration:
        parser.error("need 0 < --kill-at < --restart-at < --duration")
    report = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("readyz_at_end",)}, indent=2))
    print(f"written to {args.out}")
    ok = report["http_5xx"] == 0 and report["invalid_graphql"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
