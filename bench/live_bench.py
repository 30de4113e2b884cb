"""Live updates under load (README, "Subscriptions"): N SSE subscribers (graphql-sse) on one
gateway, spread over `--orders` orders; each order is PATCHed through its transitions at
the orders service, one change at a time. Reports, from the PATCH sent to each message
received, p50/p99 per message and per change (to its last subscriber), the gateway's RSS
per subscriber (RSS with the subscribers minus before, / N) and its CPU per change.

    .venv/bin/python bench/live_bench.py [--subscribers 2000] [--orders 10]

The clients are raw asyncio sockets (a few KiB each), in this process; the services and
the gateway are child processes (bench/_harness.py).

Two more scenarios (issue 25), one customer token on 5 WebSockets x 100 `myOrdersUpdated`
with a wide selection (each subscription's first state is the customer's 20 latest orders:
10,000 messages), while a process of its own asks /healthz every 10 ms:

    .venv/bin/python bench/live_bench.py --scenario burst          # the clients read
    .venv/bin/python bench/live_bench.py --scenario never-reading  # the clients never read

Each reports the probe's latencies (p50/p99/max), the gateway's event-loop lag from
/metrics (wake-ups late by more than 50/100/250 ms), and: for `burst`, the time until every
first message arrived; for `never-reading`, the time until the gateway let the
subscriptions go (slow consumers), and its RSS before, at its peak and after.
`--deflate` offers permessage-deflate, as browsers do."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
from _harness import BENCH_SECRET, Stack, cpu_seconds, percentile, summary

from gateway.auth import mint

QUERY = "subscription($id: ID!) { orderUpdated(id: $id) { id status version customer { name } } }"
STEPS = ("PAID", "SHIPPED", "DELIVERED")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Subscriber:
    """One SSE stream on a raw socket: the time each `next` arrived, with its version."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.first = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self, host: str, port: int, order_id: int, token: str) -> None:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        body = json.dumps({"query": QUERY, "variables": {"id": str(order_id)}}).encode()
        writer.write(f"POST /graphql HTTP/1.1\r\nHost: {host}\r\naccept: text/event-stream\r\n"
                     f"content-type: application/json\r\nauthorization: Bearer {token}\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        await reader.readuntil(b"\r\n\r\n")
        while line := await reader.readline():
            if line.startswith(b"data: {"):
                payload = json.loads(line[6:])
                self.arrivals.append((time.perf_counter(), payload["data"]["orderUpdated"]["version"]))
                self.first.set()


async def placed_orders(client: httpx.AsyncClient, orders_url: str, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for start in range(1, 20_000, 100):
        page = (await client.get(f"{orders_url}/orders", params={"ids": ",".join(map(str, range(start, start + 100)))})).json()
        found += [o for o in page["data"] if o["status"] == "PLACED"]
        if len(found) >= count:
            return found[:count]
    raise SystemExit(f"only {len(found)} PLACED orders in the data")


async def bench(stack: Stack, subscribers: int, orders_count: int) -> dict[str, Any]:
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    pid = stack.pid("gateway")
    async with httpx.AsyncClient(timeout=30) as client:
        orders = await placed_orders(client, stack.service_urls["orders"], orders_count)
        before = rss_kib(pid)
        subs = [Subscriber() for _ in range(subscribers)]
        started = time.perf_counter()
        for n, sub in enumerate(subs):
            order = orders[n % len(orders)]
            sub.task = asyncio.create_task(sub.run(host, int(port), order["id"], mint(BENCH_SECRET, f"c{order['customerId']}",
                                                                                      customer=order["customerId"])))
            if n % 200 == 199:
                await asyncio.sleep(0.05)  # let the gateway accept in waves
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in subs)), 300)
        subscribe_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        after = rss_kib(pid)
        per_message, per_change = [], []
        cpu_before = cpu_seconds(pid) or 0.0
        changes = 0
        for status in STEPS:
            for i, order in enumerate(orders):
                group = subs[i::len(orders)]
                sent = time.perf_counter()
                answer = await client.patch(f"{stack.service_urls['orders']}/orders/{order['id']}", json={"status": status})
                version = answer.json()["version"]
                deadline = time.perf_counter() + 10
                while any(s.arrivals[-1][1] < version for s in group) and time.perf_counter() < deadline:
                    await asyncio.sleep(0.002)
                arrived = [next((t for t, v in s.arrivals if v == version), None) for s in group]
                got = [t - sent for t in arrived if t is not None]
                per_message += got
                per_change.append(max(got) if len(got) == len(group) else float("inf"))
                changes += 1
        cpu = (cpu_seconds(pid) or 0.0) - cpu_before
        for sub in subs:
            assert sub.task is not None
            sub.task.cancel()
    ms = 1000.0
    return {
        "subscribers": subscribers, "orders": len(orders), "changes": changes,
        "subscribe_all_s": round(subscribe_s, 2),
        "message_p50_ms": round(percentile(per_message, 50) * ms, 1),  # type: ignore[operator]
        "message_p99_ms": round(percentile(per_message, 99) * ms, 1),  # type: ignore[operator]
        "last_subscriber_p50_ms": round(percentile(per_change, 50) * ms, 1),  # type: ignore[operator]
        "last_subscriber_p99_ms": round(percentile(per_change, 99) * ms, 1),  # type: ignore[operator]
        "messages_missing": subscribers * len(STEPS) - len(per_message),
        "rss_before_mib": round(before / 1024, 1), "rss_after_mib": round(after / 1024, 1),
        "rss_per_subscriber_kib": round((after - before) / subscribers, 1),
        "cpu_ms_per_change": round(cpu / changes * ms, 1),
    }


# -- issue 25: a burst of first states, and sockets that never read ----------------------

# Wide: the order's lines four times over (aliases), ~5 KiB a message, so the 2,000 first
# messages of one socket (~10 MiB) are more than the kernel's socket buffers hold.
ITEMS = ("items { quantity titleAtPurchase unitPrice { amount currency } book { title isbn publishedYear "
         "price { amount currency } author { name bio } } }")
WIDE = ("subscription { myOrdersUpdated { id status version placedAt total { amount currency } "
        + " ".join(f"l{n}: {ITEMS}" for n in range(4))
        + " customer { name email } payment { status } shipment { status } } }")
SOCKETS, PER_SOCKET, RECENT = 5, 100, 20


def probe(url: str, seconds: float, interval: float = 0.01) -> list[float]:
    """/healthz latencies (ms), one GET every `interval`, for `seconds`, from a process of its
    own: this process's clients would otherwise count as the gateway's lag."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        stop_at = time.monotonic() + seconds
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            client.get(url).raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(interval)
    return latencies


async def health(url: str, seconds: float) -> list[float]:
    process = await asyncio.create_subprocess_exec(sys.executable, __file__, "--probe", url, "--seconds", str(seconds),
                                                   stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), seconds + 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return json.loads(out)


async def metrics(client: httpx.AsyncClient, gateway: str) -> str:
    return (await client.get(f"{gateway}/metrics")).text


def lag_buckets(text: str) -> dict[str, float]:
    pattern = r'bookvault_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text)}


def lag_between(before: str, after: str) -> dict[str, int]:
    """Loop-lag wake-ups (the gateway's 20 ms timer) between two scrapes, and how many were late."""
    a, b = lag_buckets(before), lag_buckets(after)
    lag = {k: int(b[k] - a.get(k, 0)) for k in b}
    total = lag.get("+Inf", 0)
    return {"wakeups": total, "over50ms": total - lag.get("0.05", 0), "over100ms": total - lag.get("0.1", 0),
            "over250ms": total - lag.get("0.25", 0)}


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def frame(message: dict[str, Any]) -> bytes:
    """One masked text frame (RFC 6455 §5.2, zero mask key): what a client sends."""
    payload = json.dumps(message).encode()
    size = (bytes([0x80 | len(payload)]) if len(payload) < 126 else
            bytes([0x80 | 126]) + len(payload).to_bytes(2, "big") if len(payload) < 65536 else
            bytes([0x80 | 127]) + len(payload).to_bytes(8, "big"))
    return b"\x81" + size + b"\0\0\0\0" + payload


class RawWs:
    """A graphql-transport-ws client on a raw socket: subscribes at once, then reads (or not)."""

    def __init__(self, host: str, port: int, token: str, deflate: bool, rcvbuf: int = 0) -> None:
        self.host, self.port, self.token, self.deflate, self.rcvbuf = host, port, token, deflate, rcvbuf
        self.nexts = 0
        self.bytes = 0  # of the messages read
        self.close_code: int | None = None
        self.finished_at = 0.0  # perf_counter when it stopped reading
        self.inflate = zlib.decompressobj(-15)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, subscriptions: int, query: str) -> None:
        sock = socket.socket()
        if self.rcvbuf:  # a small receive window: the gateway's writes back up soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        extension = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.deflate else ""
        self.writer.write(f"GET /graphql HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: graphql-transport-ws\r\n{extension}\r\n"
                          .encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.deflate = b"permessage-deflate" in head.lower()
        self.writer.write(b"".join([frame({"type": "connection_init", "payload": {"Authorization": f"Bearer {self.token}"}}),
                                    *(frame({"id": str(n), "type": "subscribe", "payload": {"query": query}})
                                      for n in range(subscriptions))]))

    async def read(self, expected: int) -> None:
        """Frames until `expected` `next` messages or a close."""
        assert self.reader is not None
        try:
            while self.nexts < expected:
                head = await self.reader.readexactly(2)
                size = head[1] & 0x7F
                if size == 126:
                    size = int.from_bytes(await self.reader.readexactly(2), "big")
                elif size == 127:
                    size = int.from_bytes(await self.reader.readexactly(8), "big")
                payload = await self.reader.readexactly(size)
                self.bytes += size
                opcode = head[0] & 0x0F
                if opcode == 0x8:
                    self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    return
                if head[0] & 0x40:  # RSV1: a compressed message (RFC 7692 §7.2.2)
                    payload = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
                if opcode == 0x1 and b'"type":"next"' in payload[:64]:
                    self.nexts += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.finished_at = time.perf_counter()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


async def customer_with_orders(client: httpx.AsyncClient, orders_url: str) -> int:
    for customer in range(1, 500):
        page = (await client.get(f"{orders_url}/orders", params={"customerId": customer, "limit": RECENT})).json()
        if len(page["data"]) >= RECENT:
            return customer
    raise SystemExit(f"no customer with {RECENT} orders in the data")


async def first_states(stack: Stack, *, read: bool, seconds: float, deflate: bool, rcvbuf: int = 0) -> dict[str, Any]:
    """5 x 100 myOrdersUpdated (wide) on one token; the clients read all, or never read."""
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    pid = stack.pid("gateway")
    async with httpx.AsyncClient(timeout=30) as client:
        customer = await customer_with_orders(client, stack.service_urls["orders"])
        token = mint(BENCH_SECRET, f"c{customer}", customer=customer)
        # Warm: the document, its plan and the customer's orders are in the gateway's memory,
        # so what is measured is shaping and sending, not the services.
        warm = RawWs(host, int(port), token, deflate)
        await warm.open(1, WIDE)
        await asyncio.wait_for(warm.read(RECENT), 60)
        warm.close()
        await asyncio.sleep(1.0)
        before_text = await metrics(client, stack.gateway_url)
        rss_before = rss_kib(pid)
        probing = asyncio.create_task(health(f"{stack.gateway_url}/healthz", seconds))
        await asyncio.sleep(0.5)  # the probe is running
        clients = [RawWs(host, int(port), token, deflate, rcvbuf) for _ in range(SOCKETS)]
        started = time.perf_counter()
        await asyncio.gather(*(c.open(PER_SOCKET, WIDE) for c in clients))
        readers = [asyncio.create_task(c.read(PER_SOCKET * RECENT)) for c in clients] if read else []
        rss_peak, released_s = rss_before, None
        while not probing.done():
            await asyncio.sleep(0.1)
            rss_peak = max(rss_peak, rss_kib(pid))
            if not read and released_s is None and time.perf_counter() - started > 0.5:
                text = await metrics(client, stack.gateway_url)
                if gauge(text, "bookvault_live_subscriptions") == 0:
                    released_s = time.perf_counter() - started
        latencies = await probing
        all_read_s = None
        if read:
            await asyncio.wait_for(asyncio.gather(*readers), 120)
            all_read_s = max(c.finished_at for c in clients) - started
            for c in clients:
                assert c.nexts == PER_SOCKET * RECENT or c.close_code is not None, (c.nexts, c.close_code)
        after_text = await metrics(client, stack.gateway_url)
        rss_after = rss_kib(pid)
        for c in clients:
            c.close()
    result: dict[str, Any] = {
        "scenario": "burst" if read else "never-reading", "sockets": SOCKETS, "subscriptionsPerSocket": PER_SOCKET,
        "firstMessages": SOCKETS * PER_SOCKET * RECENT, "deflate": deflate, "rcvbuf": rcvbuf or "kernel default",
        "healthz_ms": summary(latencies), "loopLag": lag_between(before_text, after_text),
        "slowConsumers": gauge(after_text, "bookvault_live_slow_consumers_total") - gauge(
            before_text, "bookvault_live_slow_consumers_total"),
        "rss_mib": {"before": round(rss_before / 1024, 1), "peak": round(rss_peak / 1024, 1),
                    "after": round(rss_after / 1024, 1)},
    }
    if read:
        result["messagesRead"] = sum(c.nexts for c in clients)
        result["mibRead"] = round(sum(c.bytes for c in clients) / 2**20, 1)
        result["closeCodes"] = [c.close_code for c in clients]
        result["allFirstMessages_s"] = round(all_read_s or 0.0, 2)
    else:
        result["released_s"] = None if released_s is None else round(released_s, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("fanout", "burst", "never-reading"), default="fanout")
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=15.0, help="how long the probe runs (burst, never-reading)")
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate (burst, never-reading)")
    parser.add_argument("--rcvbuf", type=int, default=0, help="the clients' SO_RCVBUF in bytes (0: the kernel's)")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the /healthz prober's own process
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.seconds)))
        return
    if args.scenario == "fanout":
        # N streams from one address, a customer's 200 each: past the connection caps' defaults.
        with Stack(env={"BOOKVAULT_LIVE_MAX": str(args.subscribers + 100),
                        "BOOKVAULT_MAX_STREAMS_PER_CALLER": str(args.subscribers),
                        "BOOKVAULT_MAX_CONNECTIONS_PER_ADDRESS": "0"}) as stack:
            print(json.dumps(asyncio.run(bench(stack, args.subscribers, args.orders)), indent=2))
        return
    with Stack() as stack:
        print(json.dumps(asyncio.run(first_states(stack, read=args.scenario == "burst", seconds=args.seconds,
                                                  deflate=args.deflate, rcvbuf=args.rcvbuf)), indent=2))


if __name__ == "__main__":
    main()
