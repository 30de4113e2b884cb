"""Idempotent writes under an `Idempotency-Key` header (IETF draft
draft-ietf-httpapi-idempotency-key-header): the first answer to a key is stored in the
same transaction as the effect it describes, so a repeat replays it (same status, same
body) and never has a second effect; the key sent again with another request is a 422."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request

from .context import context
from .db import now_iso
from .errors import BadRequest, Conflict, Unprocessable, error_body
from .patterns import IDEMPOTENCY_KEY
from .responses import JSONResponse

__all__ = ["Outcome", "add_idempotency_keys", "fingerprint", "idempotency_key", "idempotent", "IDEMPOTENCY_HEADER"]

IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Repeat the request with the same key to get the first answer again, with no second effect",
    "schema": IDEMPOTENCY_KEY.schema(),
}


@dataclass
class Outcome:
    """What an effect answers: a status and a body; errors that are results (402 declined,
    409 out of stock) are outcomes too, stored and replayed like a success."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, code: str, message: str, details: Any = None) -> Outcome:
        return cls(status, error_body(code, message, details))


def add_idempotency_keys(metadata: MetaData) -> Table:
    return Table(
        "idempotency_keys", metadata,
        Column("key", String, primary_key=True), Column("fingerprint", String, nullable=False),
        Column("status", Integer, nullable=False), Column("body", JSON, nullable=False),
        Column("headers", JSON, nullable=False), Column("created_at", String, nullable=False),
    )


def idempotency_key(request: Request, *, required: bool = False) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        if required:
            raise BadRequest("this request needs an Idempotency-Key header", code="IDEMPOTENCY_KEY_REQUIRED")
        return None
    if not IDEMPOTENCY_KEY.matches(key):
        raise BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters", code="BAD_IDEMPOTENCY_KEY")
    return key


def fingerprint(method: str, path: str, payload: Any) -> str:
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _answer(outcome: Outcome, replayed: bool) -> JSONResponse:
    headers = dict(outcome.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


async def idempotent(
    request: Request, payload: Any, effect: Callable[[AsyncConnection], Awaitable[Outcome]]
) -> JSONResponse:
    """Run `effect` in one write transaction with the key's record (when a key was sent)."""
    key = idempotency_key(request)
    db = context(request).db
    keys: Table = db.metadata.tables["idempotency_keys"]
    stamp = fingerprint(request.method, request.url.path, payload)
    for attempt in range(2):
        try:
            async with db.write() as conn:
                if key is not None:
                    prior = (await conn.execute(select(keys).where(keys.c.key == key))).first()
                    if prior is not None:
                        if prior.fingerprint != stamp:
                            raise Unprocessable("this Idempotency-Key was used with another request",
                                                code="IDEMPOTENCY_KEY_REUSED")
                        return _answer(Outcome(prior.status, prior.body, prior.headers), replayed=True)
                outcome = await effect(conn)
                if key is not None:
                    await conn.execute(insert(keys).values(
                        key=key, fingerprint=stamp, status=outcome.status, body=outcome.body,
                        headers=outcome.headers, created_at=now_iso(),
                    ))
            return _answer(outcome, replayed=False)
        except IntegrityError as exc:
            # Another process committed the same key first (the write lock is per process):
            # this transaction rolled back whole; the second pass replays the winner's answer.
            if attempt:
                raise Conflict("the request conflicted with a concurrent one; send it again") from exc
    raise AssertionError("unreachable")
