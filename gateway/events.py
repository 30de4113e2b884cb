"""Change events through NATS JetStream (issue 27; README, "Deploying"): with
BOOKVAULT_EVENTS_URL, this instance reads each service's events from the stream its outbox
relay publishes to (mock_services/relay.py), not from the service's `/events` long-poll.

Everything past reading a page is FeedFollower's (gateway/feed.py): the per-service seq is
the cursor, kept in Redis as before; continuity is checked the same way (a hole is a gap:
the service's entries are dropped); a broker that cannot be reached is a feed that cannot be
read (entries distrusted, revalidated before being served); invalidation, the floor
broadcast, consistency tokens, readiness and subscriptions take their positions from it.

Consumers: per service, one ordered consumer of this instance's own (ephemeral, in memory,
no acknowledgements, flow control and idle heartbeats: JetStream's "ordered consumer",
ADR-17 of nats-architecture-and-design), filtered on the service's subject and started at the
stream sequence of the first event after the cursor (found by a binary search over the
stream with "next message by subject" lookups). Nothing is acknowledged because nothing
is redelivered: the position to resume from is the cursor, not the consumer's state, so a
consumer lost with a restarted broker is simply made again from the cursor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from .errors import UpstreamError
from .feed import FeedFollower

__all__ = ["STREAM", "StreamFollower", "subject_of"]

# The stream's layout, as the services' relays write it (mock_services/relay.py).
STREAM = "BOOKVAULT_EVENTS"
SUBJECT_PREFIX = "bookvault.events"
TIMEOUT_S = 5.0  # every call to the broker
PAGE = 500  # events applied as one page at most, as an /events page
_LOST = object()  # put in a service's queue: its consumer can no longer be trusted to deliver
log = logging.getLogger("bookvault.feed")


def subject_of(service: str) -> str:
    return f"{SUBJECT_PREFIX}.{service}"


@dataclass
class _Consumer:
    subscription: Any
    after: int  # the seq the next delivered event should follow
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class StreamFollower(FeedFollower):
    """A FeedFollower whose pages come from JetStream (the constructor's other arguments are
    FeedFollower's; its `upstream` is only used for what is not the feed)."""

    def __init__(self, url: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.url = url
        self._nc: Client | None = None
        self._connecting = asyncio.Lock()
        self._consumers: dict[str, _Consumer] = {}
        self._latest: dict[str, int] = {}

    async def stop(self) -> None:
        await super().stop()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), TIMEOUT_S)

    async def _connection(self, service: str) -> Client:
        async with self._connecting:
            if self._nc is None or self._nc.is_closed:
                try:
                    self._nc = await asyncio.wait_for(nats.connect(
                        self.url, connect_timeout=TIMEOUT_S, reconnect_time_wait=0.5, max_reconnect_attempts=-1,
                        disconnected_cb=self._disconnected, reconnected_cb=self._disconnected,
                        error_cb=self._error, name="bookvault-gateway"), 2 * TIMEOUT_S)
                except (NatsError, OSError, TimeoutError, ValueError) as exc:
                    raise UpstreamError(f"the event broker cannot be reached: {exc or type(exc).__name__}",
                                        service=service) from None
            if not self._nc.is_connected:
                raise UpstreamError("the event broker is not connected", service=service)
            return self._nc

    async def _disconnected(self) -> None:
        """The broker went away (or came back, maybe restarted without our consumers): each
        service's consumer is made again from its cursor, and its waiting read ends now, as a
        feed that could not be read (its entries distrusted meanwhile)."""
        consumers, self._consumers = self._consumers, {}
        for consumer in consumers.values():
            consumer.queue.put_nowait(_LOST)
            with contextlib.suppress(Exception):
                await consumer.subscription.unsubscribe()

    async def _error(self, exc: Exception) -> None:
        log.debug("event broker: %s", exc)

    async def _head(self, service: str) -> int:
        nc = await self._connection(service)
        try:
            return (await self._last(nc, service))[1]
        except (NatsError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot read the {service} events' head: {exc or type(exc).__name__}",
                                service=service) from None

    async def _last(self, nc: Client, service: str) -> tuple[int, int]:
        """(stream sequence, service seq) of the service's last event; (last stream sequence, 0) if none."""
        js = nc.jetstream(timeout=TIMEOUT_S)
        try:
            last = await js.get_last_msg(STREAM, subject_of(service))
        except NotFoundError:
            info = await js.stream_info(STREAM)
            return info.state.last_seq, 0
        return last.seq or 0, _seq_of(last.data)

    async def _start_at(self, nc: Client, service: str, after: int) -> int:
        """The stream sequence of the service's first event after seq `after`."""
        js = nc.jetstream(timeout=TIMEOUT_S)
        last_stream, last_seq = await self._last(nc, service)
        self._latest[service] = last_seq
        if after >= last_seq:
            return last_stream + 1
        low, high = (await js.stream_info(STREAM)).state.first_seq, last_stream
        while low < high:  # seqs grow with stream sequences: the first message whose seq > after
            mid = (low + high) // 2
            found = await js.get_msg(STREAM, seq=mid, subject=subject_of(service), next=True)
            if _seq_of(found.data) > after:
                high = mid
            else:
                low = (found.seq or mid) + 1
        return low

    async def _subscribe(self, service: str, after: int) -> _Consumer:
        old = self._consumers.pop(service, None)
        if old is not None:
            with contextlib.suppress(Exception):
                await old.subscription.unsubscribe()
        nc = await self._connection(service)
        start = await self._start_at(nc, service, after)
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            queue.put_nowait(msg.data)

        subscription = await nc.jetstream(timeout=TIMEOUT_S).subscribe(
            subject_of(service), stream=STREAM, cb=deliver, ordered_consumer=True, idle_heartbeat=5.0,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, config=ConsumerConfig(opt_start_seq=start))
        consumer = _Consumer(subscription, after, queue)
        self._consumers[service] = consumer
        return consumer

    async def _read(self, service: str, after: int, wait: float) -> tuple[list[dict[str, Any]], int, int]:
        consumer = self._consumers.get(service)
        try:
            if consumer is None or consumer.after != after:
                consumer = await self._subscribe(service, after)
        except (NatsError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot consume the {service} events: {exc or type(exc).__name__}",
                                service=service) from None
        try:
            items = [await asyncio.wait_for(consumer.queue.get(), wait)] if wait > 0 else []
        except TimeoutError:
            items = []
        while len(items) < PAGE and not consumer.queue.empty():
            items.append(consumer.queue.get_nowait())
        if any(item is _LOST for item in items):
            # Made again from the cursor on the next read; what was queued is delivered again.
            raise UpstreamError("the connection to the event broker was lost", service=service)
        events = [event for event in map(_event_of, items) if event is not None and event["seq"] > after]
        following = events[-1]["seq"] if events else after
        consumer.after = following
        self._latest[service] = max(self._latest.get(service, 0), following)
        return events, following, self._latest[service]


def _event_of(data: bytes) -> dict[str, Any] | None:
    """An event as `/events` shows it; a message outside that contract is left out (and
    the hole it leaves is a gap)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("seq"), int) else None


def _seq_of(data: bytes | None) -> int:
    event = _event_of(data or b"")
    return event["seq"] if event is not None else 0
