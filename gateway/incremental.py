"""Incremental delivery on the wire (ARCHITECTURE.md, "Incremental delivery"): the parts of a
deferred or streamed answer as HTTP ``multipart/mixed``, in the format Apollo Client 3+
(``Accept: multipart/mixed;deferSpec=20220824``) and GraphiQL (meros) read: the first part
``{"data", "hasNext": true}``, then ``{"incremental": [{"data" | "items", "path", "label"?,
"errors"?}], "hasNext"}``, the last with ``"hasNext": false`` and the closing delimiter.

Each part is written with the delimiter after it (RFC 2046 §5.1.1), so a client hands a part
on as soon as it arrives rather than when the next one starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from graphql import GraphQLError
from starlette.types import Receive, Send

from .execute import Part
from .resilience import partial_result

__all__ = ["MULTIPART", "accepts_multipart", "encode", "payloads", "send_multipart"]

MULTIPART = 'multipart/mixed; boundary="-"; deferSpec=20220824'
_HEAD = b"Content-Type: application/json; charset=utf-8\r\n\r\n"
_FORMATS = ("", "20220824")  # deferSpec values this format is


def accepts_multipart(accept: str | None) -> bool:
    """Whether the client reads multipart/mixed answers (without a deferSpec, or this one)."""
    for part in (accept or "").split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        if media not in ("multipart/mixed", "multipart/*"):
            continue
        found = dict(p.partition("=")[::2] for p in params)
        if found.get("q", "1").strip() not in ("0", "0.0", "0.00", "0.000") \
                and found.get("deferspec", "").strip('"') in _FORMATS:
            return True
    return False


def encode(payload: dict[str, Any], last: bool) -> bytes:
    """One part and the delimiter after it (the closing one after the last part)."""
    return _HEAD + orjson.dumps(payload) + (b"\r\n-----\r\n" if last else b"\r\n---\r\n")


async def send_multipart(send: Send, receive: Receive, headers: list[tuple[bytes, bytes]], first: dict[str, Any],
                         rest: AsyncIterator[dict[str, Any]]) -> None:
    """The multipart answer over ASGI, each part sent as soon as it is made. A client that
    goes away stops the answer: the reads only later parts need are cancelled."""
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        async with contextlib.aclosing(rest):
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            payload, body = first, b"\r\n---\r\n"
            while True:
                last = not payload["hasNext"]
                await send({"type": "http.response.body", "body": body + encode(payload, last), "more_body": not last})
                if last:
                    return
                following = asyncio.ensure_future(anext(rest))
                await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()  # the generator's own `finally` cancels its reads
                    await asyncio.wait({following})  # and it is closed before `aclosing` closes it
                    return
                payload, body = following.result(), b""
    finally:
        gone.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


Format = Callable[[list[GraphQLError]], list[dict[str, Any]]]


async def payloads(batches: AsyncIterator[tuple[list[Part], bool]], format_errors: Format,
                   initial_extensions: Callable[[Part, list[dict[str, Any]]], dict[str, Any]]
                   ) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of `batches` (execute_incremental's). The initial one's `extensions`
    are `initial_extensions(part, its formatted errors)` (the view's: traceId, cost...); each
    later payload has its own for what it carries: stale entries served, complete/failedServices."""
    first = True
    async with contextlib.aclosing(batches):
        async for parts, has_next in batches:
            if first:
                first, initial = False, parts[0]
                payload: dict[str, Any] = {"data": initial.data}
                errors = format_errors(initial.errors)
                if errors:
                    payload["errors"] = errors
                ext = initial_extensions(initial, errors)
            else:
                entries, stale, errors = [], [], []
                for part in parts:
                    entry: dict[str, Any] = {"items": part.items} if part.stream else {"data": part.data}
                    entry["path"] = part.path
                    if part.label is not None:
                        entry["label"] = part.label
                    if part.errors:
                        entry["errors"] = format_errors(part.errors)
                        errors.extend(entry["errors"])
                    entries.append(entry)
                    stale.extend(part.stale)
                payload = {"incremental": entries}
                ext = {"stale": stale} if stale else {}
                ext.update(partial_result(e.get("extensions", {}) for e in errors if "path" in e))
            if ext:
                payload["extensions"] = ext
            payload["hasNext"] = has_next
            yield payload
