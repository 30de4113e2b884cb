"""Persisted queries (README, "Persisted queries"): Apollo's automatic persisted queries and
trusted documents.

APQ (the protocol of Apollo Client's `createPersistedQueryLink`): a client sends
``extensions.persistedQuery = {"version": 1, "sha256Hash": <hex>}`` without the query; an
unknown hash is answered with the error code PERSISTED_QUERY_NOT_FOUND (HTTP 200, so the
client retries with the query), the hash and the query together are checked (the hash must
be the query's SHA-256) and registered. The store is an in-memory LRU and, with
`REDIS_URL`, Redis, shared by every instance: each Redis call has a short timeout and a
failure leaves Redis alone for a while, answering from memory meanwhile.

Trusted documents: with a manifest (Apollo's persisted-query manifest, or Relay's
``{id: body}`` map), only its operations run, named by id or sent with an identical body;
nothing is registered."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

__all__ = ["QueryStore", "TrustedDocuments", "PersistedQueryError", "manifest", "sha256", "HASH"]

log = logging.getLogger("bookvault.persisted")
HASH = re.compile(r"[0-9a-f]{64}")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class PersistedQueryError(Exception):
    """A persisted-query request that cannot run: an HTTP status, a code, a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class QueryStore:
    """Query texts by SHA-256: memory (bounded, least recently used out) before Redis."""

    def __init__(self, max_entries: int = 10_000, redis_url: str | None = None, *, namespace: str = "bv",
                 timeout: float = 0.05, rest: float = 1.0, ttl: float = 86_400.0) -> None:
        self.max_entries = max_entries
        self._memory: OrderedDict[str, str] = OrderedDict()
        self._redis = aioredis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                        decode_responses=True) if redis_url else None
        self.prefix = f"{namespace}:apq:"
        self.timeout, self.rest, self.ttl = timeout, rest, ttl
        self._resting_until = 0.0
        self.fallbacks = 0

    async def get(self, digest: str) -> str | None:
        text = self._memory.get(digest)
        if text is not None:
            self._memory.move_to_end(digest)
            return text
        text = await self._call("get", self.prefix + digest)
        # Another instance registered it; a text that is not the hash's is not trusted.
        if isinstance(text, str) and sha256(text) == digest:
            self._remember(digest, text)
            return text
        return None

    async def put(self, digest: str, text: str) -> None:
        self._remember(digest, text)
        await self._call("set", self.prefix + digest, text, ex=max(1, int(self.ttl)))

    def _remember(self, digest: str, text: str) -> None:
        self._memory[digest] = text
        self._memory.move_to_end(digest)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    async def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        if self._redis is None or time.monotonic() < self._resting_until:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                return await getattr(self._redis, command)(*args, **kwargs)
        except Exception as exc:  # redis.RedisError, OSError, timeouts: memory answers meanwhile
            self.fallbacks += 1
            if time.monotonic() >= self._resting_until:
                log.warning("redis unavailable for persisted queries, using memory: %r", exc)
            self._resting_until = time.monotonic() + self.rest
            return None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


@dataclass(frozen=True)
class TrustedDocuments:
    """The operations a manifest lists: by id, and by the SHA-256 and text of their bodies."""

    by_id: dict[str, str]
    bodies: frozenset[str]

    @classmethod
    def load(cls, path: str | Path) -> TrustedDocuments:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"BOOKVAULT_TRUSTED_DOCUMENTS: cannot read {path}: {exc}") from exc
        return cls.parse(raw, str(path))

    @classmethod
    def parse(cls, raw: Any, where: str = "manifest") -> TrustedDocuments:
        by_id: dict[str, str] = {}
        if isinstance(raw, dict) and raw.get("format") == "apollo-persisted-query-manifest":
            operations = raw.get("operations")
            if raw.get("version") != 1 or not isinstance(operations, list):
                raise ValueError(f"{where}: an Apollo manifest of version 1 with a list of operations is expected")
            for op in operations:
                if not (isinstance(op, dict) and isinstance(op.get("id"), str) and isinstance(op.get("body"), str)):
                    raise ValueError(f"{where}: every operation needs a string id and body")
                by_id[op["id"]] = op["body"]
        elif isinstance(raw, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            by_id = dict(raw)  # Relay's persisted queries: {id: body}
        else:
            raise ValueError(f"{where}: neither an Apollo persisted-query manifest nor a Relay {{id: body}} map")
        # A client may name an operation by its body's SHA-256 (APQ) even where the
        # manifest's ids are something else (Relay's md5s).
        for body in list(by_id.values()):
            by_id.setdefault(sha256(body), body)
        return cls(by_id, frozenset(by_id.values()))

    def get(self, document_id: str) -> str | None:
        if document_id.startswith("sha256:"):  # GraphQL over HTTP's prefixed document ids
            document_id = document_id[len("sha256:"):]
        return self.by_id.get(document_id)


def manifest(bodies: list[str]) -> dict[str, Any]:
    """Apollo's persisted-query manifest of `bodies` (one operation each), ids their SHA-256."""
    from graphql import OperationDefinitionNode, parse

    operations = []
    for body in bodies:
        (operation,) = [d for d in parse(body).definitions if isinstance(d, OperationDefinitionNode)]
        operations.append({"id": sha256(body), "name": operation.name.value if operation.name else None,
                           "type": operation.operation.value, "body": body})
    return {"format": "apollo-persisted-query-manifest", "version": 1, "operations": operations}
