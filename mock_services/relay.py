"""The outbox relay (issue 27): with BOOKVAULT_EVENTS_URL=nats://..., each service publishes
its committed outbox events, in seq order, to one JetStream stream, so gateway instances
consume the broker instead of long-polling every service's `/events`.

Layout (README, "Deploying"; the gateway reads the same names in gateway/events.py): one
stream per deployment, `BOOKVAULT_EVENTS`, one subject per service,
`bookvault.events.<service>`; a message is one event as `/events` shows it (JSON, with its
`seq`). Exactly once per event: each message carries `Nats-Msg-Id: <service>:<seq>`, and
JetStream drops a message whose id it saw within the stream's duplicate window (ADR-3 of
nats-architecture-and-design; "Message Deduplication" in the JetStream docs). A relay
resumes after the last message of its subject in the stream (read back, not kept locally),
so a relay killed between a publish and its acknowledgement republishes at most that
batch, and the window, far longer than a restart, drops the repeats. Two processes of one
service on one database (PostgreSQL) publish the same ids: the stream keeps one of each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
import nats.js
import orjson
from nats.errors import Error as NatsError
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from .db import Database

__all__ = ["EVENTS_ENV", "STREAM", "Relay", "relaying", "subject_of"]

EVENTS_ENV = "BOOKVAULT_EVENTS_URL"
STREAM = "BOOKVAULT_EVENTS"
SUBJECT_PREFIX = "bookvault.events"
# Far longer than a relay's restart: a republished batch is dropped, not stored twice.
DUPLICATE_WINDOW_S = 600.0
TIMEOUT_S = 5.0  # every call to the broker (connect, publish, stream lookups)
BATCH = 500
log = logging.getLogger("bookvault.relay")


def subject_of(service: str) -> str:
    return f"{SUBJECT_PREFIX}.{service}"


class Relay:
    def __init__(self, service: str, db: Database, url: str, wait: float = 10.0) -> None:
        self.service = service
        self.db = db
        self.url = url
        self.wait = wait
        self.subject = subject_of(service)
        self.published = 0  # the last seq the stream acknowledged (tests, benches)

    async def run(self) -> None:
        """Publish forever; a broker that cannot be reached is retried with a back-off (the
        outbox keeps the events meanwhile: nothing is lost, only late)."""
        delay = 0.2
        while True:
            nc = None
            try:
                nc = await asyncio.wait_for(nats.connect(
                    self.url, connect_timeout=TIMEOUT_S, allow_reconnect=False, max_reconnect_attempts=0,
                    error_cb=_quiet, name=f"bookvault-relay-{self.service}"), 2 * TIMEOUT_S)
                js = nc.jetstream(timeout=TIMEOUT_S)
                await ensure_stream(js)
                after = await self._last_published(js)
                delay = 0.2
                await self._publish_from(js, after)
            except (NatsError, OSError, TimeoutError, ValueError) as exc:
                log.warning("%s: cannot publish change events to %s (retrying): %s", self.service, self.url, exc or type(exc).__name__)
            except Exception:  # the outbox unreadable a moment (its database): retried, never ends the relay
                log.exception("%s: the outbox relay failed (retrying)", self.service)
            finally:
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(nc.close(), TIMEOUT_S)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _last_published(self, js: nats.js.JetStreamContext) -> int:
        try:
            last = await js.get_last_msg(STREAM, self.subject)
        except NotFoundError:
            return 0
        seq = orjson.loads(last.data or b"{}").get("seq")
        return seq if isinstance(seq, int) else 0

    async def _publish_from(self, js: nats.js.JetStreamContext, after: int) -> None:
        while True:
            events, head = await self.db.events_after(after, BATCH, self.wait)
            if head < after:
                log.error("%s: the stream holds seq %d but the outbox only %d (a new database?): "
                          "nothing is published until the outbox passes it", self.service, after, head)
            for event in events:
                # One at a time, each acknowledged before the next: the stream's order is the
                # outbox's, and `after` never passes an event the stream did not take.
                await js.publish(self.subject, orjson.dumps(event), timeout=TIMEOUT_S, stream=STREAM,
                                 headers={"Nats-Msg-Id": f"{self.service}:{event['seq']}"})
                after = self.published = event["seq"]


async def _quiet(exc: Exception) -> None:
    """nats-py logs each connection error with a traceback; `run` says it once per attempt."""


async def ensure_stream(js: nats.js.JetStreamContext) -> None:
    """Create the deployment's stream, or use the one there (created by another service, or
    by an operator with other limits: theirs are kept)."""
    try:
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{SUBJECT_PREFIX}.>"], storage=StorageType.FILE,
                                         duplicate_window=DUPLICATE_WINDOW_S))
    except BadRequestError:  # "stream name already in use with a different configuration"
        await js.stream_info(STREAM)


@contextlib.asynccontextmanager
async def relaying(service: str, db: Database, url: str | None) -> AsyncIterator[Relay | None]:
    """Run the service's relay while the block runs (none without a broker URL)."""
    if not url:
        yield None
        return
    relay = Relay(service, db, url)
    task = asyncio.create_task(relay.run(), name=f"relay:{service}")
    try:
        yield relay
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
