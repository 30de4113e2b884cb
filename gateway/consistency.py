"""Consistency tokens (README, "Consistency across instances"): time never goes backwards for
a client, whichever gateway instance answers it.

Every GraphQL response carries a token (header `BookVault-Consistency`, and the same as an
HttpOnly cookie for browsers) naming, per service, the change-feed position the answer
reflects: the highest `X-Feed-Seq` of the data it served (mock_services/position.py; a
cached entry keeps the one it was fetched with), never less than the token the request
brought. Not the instance's own feed cursor: data fetched straight from a service can be
newer than the cursor, and a client that saw it must not be shown the older version by an
instance whose cursor is past the cursor but not past that data.

A request that brings a token back is never answered with anything older: for each service
it reads, an instance whose feed follower has not applied that position yet waits for it
(bounded by the request's deadline and `BOOKVAULT_CONSISTENCY_WAIT_MS`), and if it cannot in
time, reads that service past its caches. A token is checked, never trusted: a wrong MAC,
another deployment's service list or a malformed value makes it ignored (never an error),
and a position beyond what the service itself says its feed holds (its own `X-Feed-Seq`,
read past the caches) is dropped.

Format (version 1), base64url without padding of:
    0x01 | one unsigned LEB128 varint per service, in the order of the sorted service
    names (0: nothing asked) | the first 12 bytes of HMAC-SHA256(key, names, the bytes before)
The key is derived from `BOOKVAULT_CONSISTENCY_SECRET`; without it, from the deployment's
configuration (namespace and service URLs), which every instance shares but which is no
secret: set one in production (a forged token can only make an instance wait or bypass
its caches, never serve wrong data).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from http.cookies import CookieError, SimpleCookie

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from .feed import FeedFollower
from .metrics import record_consistency
from .resilience import Deadline

__all__ = ["Consistency", "Session", "TOKEN_HEADER", "TOKEN_COOKIE", "merge_write"]

log = logging.getLogger("bookvault.consistency")
TOKEN_HEADER = "BookVault-Consistency"
TOKEN_COOKIE = "bv_consistency"
_VERSION = 1
_MAC_BYTES = 12
_MAX_TOKEN_CHARS = 256  # a longer value is not ours; not even decoded
_TOKEN_HEADER_KEY = TOKEN_HEADER.lower().encode()
_MEMO = 4096  # tokens remembered each way; past it, forgotten all at once
_MIN_LEFT = 0.05  # seconds of the deadline kept for the reads themselves after a wait


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varints(data: bytes, count: int) -> list[int] | None:
    values, shift, value, i = [], 0, 0, 0
    while len(values) < count:
        if i >= len(data) or shift > 63:
            return None
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value, shift = 0, 0
    return values if i == len(data) else None


class Consistency:
    """The deployment's token codec, and catching up with a token (one per app)."""

    def __init__(self, services: Iterable[str], secret: str, feeds: FeedFollower | None,
                 max_wait: float = 0.5) -> None:
        self.services = sorted(services)
        self._names = ",".join(self.services).encode()
        self._key = hashlib.sha256(b"bookvault-consistency\0" + secret.encode()).digest()
        self.feeds = feeds
        self.max_wait = max_wait
        # Services a token named beyond this instance's feed, by what was done about it.
        self.counts = {"current": 0, "waited": 0, "bypassed": 0, "refuted": 0, "ignored": 0}
        self._made: dict[tuple[int, ...], tuple[str, bytes]] = {}  # positions -> token, Set-Cookie
        self._read: dict[str, dict[str, int]] = {}  # valid tokens -> positions
        self._cookies: dict[str, str | None] = {}  # Cookie headers -> the token in each

    # -- the token -----------------------------------------------------------------------

    def encode(self, positions: Mapping[str, int]) -> str:
        return self._stamp(tuple(max(0, positions.get(s, 0)) for s in self.services))[0]

    def _stamp(self, values: tuple[int, ...]) -> tuple[str, bytes]:
        """The token of `values` and its Set-Cookie header value; the feeds' positions move
        seldom, so most answers carry a token made before (no MAC computed again)."""
        made = self._made.get(values)
        if made is None:
            body = bytes([_VERSION]) + b"".join(_varint(v) for v in values)
            token = base64.urlsafe_b64encode(body + self._mac(body)).rstrip(b"=").decode()
            # Browsers send it back by themselves; scripts cannot read it (RFC 6265bis:
            # HttpOnly, SameSite=Lax). Path=/graphql: no other route of the gateway needs it.
            cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; Path=/graphql; SameSite=lax".encode()
            if len(self._made) >= _MEMO:
                self._made.clear()
            made = self._made[values] = (token, cookie)
        return made

    def decode(self, token: str | None) -> dict[str, int]:
        """The positions a token names; {} for anything not a valid token of this deployment."""
        if not token:
            return {}
        known = self._read.get(token)
        if known is not None:
            return dict(known)
        try:
            if len(token) > _MAX_TOKEN_CHARS:
                raise ValueError("too long")
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
            if not body or body[0] != _VERSION or not hmac.compare_digest(mac, self._mac(body)):
                raise ValueError("not ours")
            values = _varints(body[1:], len(self.services))
            if values is None:
                raise ValueError("malformed")
        except (ValueError, binascii.Error):
            self.counts["ignored"] += 1
            return {}
        positions = {s: v for s, v in zip(self.services, values, strict=True) if v > 0}
        if len(self._read) >= _MEMO:
            self._read.clear()
        self._read[token] = positions
        return dict(positions)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, self._names + b"\0" + body, hashlib.sha256).digest()[:_MAC_BYTES]

    # -- a request -----------------------------------------------------------------------

    def session(self, request: HTTPConnection, deadline: Deadline | None = None) -> Session:
        """The request's token (header first, else the cookie), checked."""
        headers = request.headers
        raw = headers.get(TOKEN_HEADER)
        if raw is None and (cookies := headers.get("cookie")) is not None:
            raw = self._cookie(cookies)
        session = Session(self, self.decode(raw), deadline)
        request.state.consistency = session
        return session

    def _cookie(self, header: str) -> str | None:
        """The token in a Cookie header; a client sends the same header request after
        request, so it is parsed once."""
        if header in self._cookies:
            return self._cookies[header]
        try:
            morsel = SimpleCookie(header).get(TOKEN_COOKIE)
        except CookieError:
            morsel = None
        if len(self._cookies) >= _MEMO:
            self._cookies.clear()
        raw = self._cookies[header] = morsel.value if morsel is not None else None
        return raw

    def stamp(self, request: Request, response: Response) -> None:
        """The token of what the answer reflected, on the response (header and cookie)."""
        session: Session | None = getattr(request.state, "consistency", None)
        if session is None:
            return
        token, cookie = self._stamp(session.values())
        response.raw_headers += [(_TOKEN_HEADER_KEY, token.encode()), (b"set-cookie", cookie)]

    def current(self, service: str, seq: int) -> bool:
        """Whether this instance has applied `service`'s feed up to `seq` already (counted)."""
        if self.feeds is not None and self.feeds.cursors.get(service, -1) >= seq:
            self.counts["current"] += 1
            return True
        return False

    async def catch_up(self, service: str, seq: int, deadline: Deadline | None) -> bool:
        """Wait until this instance has applied `service`'s feed up to `seq`; False when it
        has, True when it could not in time (read the service past the caches)."""
        if self.current(service, seq):
            return False
        feeds = self.feeds
        budget = self.max_wait if deadline is None else min(self.max_wait, deadline.remaining() - _MIN_LEFT)
        if feeds is not None and budget > 0:
            try:
                await asyncio.wait_for(feeds.reached(service, seq), budget)
            except TimeoutError:
                pass
            else:
                self.counts["waited"] += 1
                record_consistency(service, "waited")
                return False
        self.counts["bypassed"] += 1
        record_consistency(service, "bypassed")
        return True


class Session:
    """One request's token: the positions it asks for, and those of what it was answered with."""

    def __init__(self, consistency: Consistency, asked: dict[str, int], deadline: Deadline | None) -> None:
        self.consistency = consistency
        self.asked = asked
        self.deadline = deadline
        self.seen: dict[str, int] = {}
        self._caught_up: dict[str, asyncio.Future[bool]] = {}

    def want(self, service: str) -> int:
        """The position the token asks of `service` (0: none)."""
        return self.asked.get(service, 0)

    def asks(self, service: str) -> bool:
        """Whether the token names a position of `service` (most name none: no wait to settle)."""
        return service in self.asked

    async def settle(self, service: str) -> bool:
        """Before reading `service`: True when its caches must be bypassed for this request."""
        seq = self.asked.get(service, 0)
        if seq <= 0:
            return False
        waiting = self._caught_up.get(service)
        if waiting is None:  # once per service and request, whatever the number of reads
            waiting = self._caught_up[service] = asyncio.ensure_future(
                self.consistency.catch_up(service, seq, self.deadline))
        return await asyncio.shield(waiting)

    def ready(self, service: str) -> bool:
        """Whether `service` can be read from the caches now, without an await: the token
        asks nothing of it, or this instance has applied its feed up to what it asks (what
        `settle` finds first, so it is not asked again for this request)."""
        seq = self.asked.get(service, 0)
        if seq <= 0:
            return True
        waiting = self._caught_up.get(service)
        if waiting is not None:
            return waiting.done() and not waiting.cancelled() and waiting.exception() is None and not waiting.result()
        if not self.consistency.current(service, seq):
            return False
        waiting = self._caught_up[service] = asyncio.get_running_loop().create_future()
        waiting.set_result(False)
        return True

    def saw(self, service: str, seq: int) -> None:
        """The answer reflects `service`'s feed up to `seq`."""
        if seq > self.seen.get(service, 0):
            self.seen[service] = seq

    def refute(self, service: str, head: int) -> None:
        """`service` says its feed ends at `head`, below what the token asked: the token's
        position is not one it ever wrote (a forged token, a service reset); it is dropped."""
        if 0 <= head < self.asked.get(service, 0):
            log.info("a consistency token named %s seq %d beyond its feed (%d); dropped", service,
                     self.asked[service], head)
            self.consistency.counts["refuted"] += 1
            record_consistency(service, "refuted")
            del self.asked[service]

    def values(self) -> tuple[int, ...]:
        """The positions of the answer's token, in the codec's order of services."""
        asked, seen = self.asked, self.seen
        return tuple(max(0, asked.get(s, 0), seen.get(s, 0)) for s in self.consistency.services)


def merge_write(session: Session | None, service: str, seq: int) -> None:
    """Read-your-writes: after a write through the gateway (a mutation), the seq of the
    write's own event (or the service's `X-Feed-Seq` on the write's answer, which is at
    least that) goes into the response's token, so the client's next read, on any
    instance, reflects the write."""
    if session is not None:
        session.saw(service, seq)
