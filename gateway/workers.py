"""The worker side of `bookvault gateway --workers N` (README, "Workers"; issue 27). The
supervisor (bookvault/workers.py) binds the listening socket once and starts N processes
that inherit it: the kernel hands each new connection to whichever worker accepts first,
and a connection waiting in the backlog is never lost with a worker, since the socket
outlives every worker (SO_REUSEPORT would give each worker its own queue, reset with it).

Each worker is a whole gateway: its own memory cache, document worker, feed followers and
registry of series. /metrics, answered by whichever worker the scrape lands on, is every
worker's: each worker also answers its own exposition on a Unix socket in a directory the
supervisor made, and the worker answering a scrape reads its peers' and labels every
sample with `worker="<index>"` (a replaced worker keeps its index: its counters restart
as one series' reset, which `rate()` handles, where a sum over workers would drop).
prometheus-client's multiprocess mode was not used: it keeps only Counter, Gauge and
Histogram files, and the gateway's series read at scrape time (gateway/metrics.py's
`_Plain`, `LiveCollector`, `ConnectionCollector`) would be lost.

The variables below are set by the supervisor for its workers only; they are no settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["COUNT_ENV", "DIR_ENV", "FD_ENV", "INDEX_ENV", "WORKER_HEADER", "Worker", "worker_headers"]

log = logging.getLogger("bookvault.workers")
FD_ENV = "BOOKVAULT_WORKER_FD"  # the inherited listening socket's descriptor
INDEX_ENV = "BOOKVAULT_WORKER_INDEX"  # 0 .. N-1, kept by a replacement
COUNT_ENV = "BOOKVAULT_WORKER_COUNT"
DIR_ENV = "BOOKVAULT_WORKER_DIR"  # where each worker's metrics socket is
WORKER_HEADER = "bookvault-worker"  # on /healthz: the pid of the worker that answered
PEER_TIMEOUT = 0.5  # seconds to read one peer's exposition; past it, that worker is `up 0`
_MAX_EXPOSITION = 16 * 1024 * 1024


def worker_headers() -> dict[str, str]:
    """/healthz's header naming the answering worker's pid, under a supervisor only: which
    process answered is otherwise invisible on a shared port."""
    return {WORKER_HEADER: str(os.getpid())} if INDEX_ENV in os.environ else {}


class Worker:
    """This process's place among the supervisor's workers (`current()`: None when the
    gateway runs alone)."""

    def __init__(self, fd: int, index: int, count: int, directory: Path) -> None:
        self.fd, self.index, self.count, self.directory = fd, index, count, directory
        self.server: asyncio.AbstractServer | None = None

    @classmethod
    def current(cls, env: dict[str, str] | None = None) -> Worker | None:
        env = dict(os.environ) if env is None else env
        if FD_ENV not in env:
            return None
        return cls(int(env[FD_ENV]), int(env[INDEX_ENV]), int(env[COUNT_ENV]), Path(env[DIR_ENV]))

    def listener(self) -> socket.socket:
        """The supervisor's listening socket (its family read from the descriptor)."""
        sock = socket.socket(fileno=self.fd)
        sock.setblocking(False)
        return sock

    def path(self, index: int) -> Path:
        return self.directory / f"{index}.sock"

    async def start(self, exposition: Callable[[], bytes]) -> None:
        """Answer this worker's own exposition to whoever connects to its socket."""
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                writer.write(exposition())
                await writer.drain()
            except Exception:  # a peer that went away mid-read: nothing to tell
                log.debug("metrics socket write failed", exc_info=True)
            finally:
                writer.close()

        path = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the socket of the worker this one replaces
        self.server = await asyncio.start_unix_server(answer, path=str(path))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _read(self, index: int) -> bytes | None:
        try:
            async with asyncio.timeout(PEER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(self.path(index)))
                try:
                    return await reader.read(_MAX_EXPOSITION)
                finally:
                    writer.close()
        except (OSError, TimeoutError):  # starting, being replaced, or stuck: shown as up 0
            return None

    async def exposition(self, own: bytes) -> bytes:
        """Every worker's series, each sample labelled with its worker, plus
        `bookvault_worker_up` per worker (0: its series could not be read for this scrape)."""
        texts = await asyncio.gather(*(self._read(i) for i in range(self.count) if i != self.index))
        peers = [i for i in range(self.count) if i != self.index]
        readings = {self.index: own} | dict(zip(peers, texts, strict=True))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(readings))
        return generate_latest(registry)


class _Merged:
    """One family per metric name, with the samples of every worker read."""

    def __init__(self, readings: dict[int, bytes | None]) -> None:
        self.readings = readings

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        up = GaugeMetricFamily("bookvault_worker_up", "1 for each gateway worker whose series this scrape read, "
                               "0 for one that did not answer (starting, replaced or stuck)", labels=["worker"])
        for index, text in sorted(self.readings.items()):
            up.add_metric([str(index)], 0 if text is None else 1)
            if text is None:
                continue
            for family in text_string_to_metric_families(text.decode()):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                worker = str(index)
                merged.samples += [Sample(s.name, {**s.labels, "worker": worker}, s.value, s.timestamp, s.exemplar)
                                   for s in family.samples]
        yield from families.values()
        yield up
