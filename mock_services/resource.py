"""The read and write endpoints every service shares, written once (ARCHITECTURE.md, "Services"):
single GET with ETag, batch GET with ``{"data", "missing"}``, versioned PATCH."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, Row, Select, String, Table, bindparam, select, update
from starlette.requests import Request
from starlette.responses import Response

from .api import IDS_PATTERN, Api, batch_of, path_param, query_param, ref
from .context import context
from .db import now_iso
from .errors import BadRequest, NotFound
from .params import parse_id, parse_ids, read_body
from .patterns import one_of
from .responses import JSONResponse

__all__ = ["Entity", "Include", "add_one", "add_reads", "add_patch", "batch_query", "batch_response", "changes", "etag_of",
           "rows_by", "versioned_table"]

Guard = Callable[[Row[Any], Any], None]


@dataclass(frozen=True)
class Entity:
    name: str  # as in events: "book" -> "book.updated"
    table: Table
    to_json: Callable[[Row[Any]], dict[str, Any]]
    schema: type[BaseModel]
    key: str = "id"  # the column that single routes and events name


def versioned_table(name: str, metadata: MetaData, *columns: Column[Any]) -> Table:
    return Table(name, metadata, *columns, Column("version", Integer, nullable=False, default=1),
                 Column("updated_at", String, nullable=False))


def changes(body: BaseModel, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields a PATCH body sets, as columns; an explicit null is refused, not ignored."""
    values = body.model_dump(exclude_unset=True)
    for field, value in values.items():
        if value is None:
            raise BadRequest(f"{field} must not be null")
    return {(rename or {}).get(k, k): v for k, v in values.items()}


def etag_of(version: int) -> str:
    return f'W/"{version}"'


def _not_modified(request: Request, etag: str) -> bool:
    # RFC 9110 §13.1.2: If-None-Match uses weak comparison.
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


@dataclass(frozen=True)
class Include:
    """A related entity of the same service a batch read can carry with its rows, under
    `included` (JSON:API's compound documents, jsonapi.org/format/#document-compound-documents):
    `entity`'s rows whose key is in this table's `column`. One answer, read in one
    transaction, so a client makes one call instead of two in a row."""

    entity: Entity
    column: str


@functools.cache
def rows_by(table: Table, column: str) -> Select[Any]:
    """`table`'s rows whose `column` is one of the `keys` parameter's (an expanding IN). Built
    once per table and column: a read then pays neither the statement's construction nor its
    cache key, which SQLAlchemy memoizes on the statement object (about a sixth of a batch
    read's CPU when built per request)."""
    return select(table).where(table.c[column].in_(bindparam("keys", expanding=True)))


async def batch_response(request: Request, entity: Entity, column: str, ids: list[int],
                         include: dict[str, Include] | None = None) -> JSONResponse:
    included: dict[str, list[dict[str, Any]]] = {}
    async with context(request).db.read() as conn:
        rows = (await conn.execute(rows_by(entity.table, column), {"keys": ids})).all()
        for name, related in (include or {}).items():
            keys = sorted({getattr(r, related.column) for r in rows})
            found_rows = (await conn.execute(rows_by(related.entity.table, related.entity.key), {"keys": keys})).all() \
                if keys else []
            included[name] = [related.entity.to_json(r) for r in found_rows]
    found = {getattr(r, column) for r in rows}
    body: dict[str, Any] = {"data": [entity.to_json(r) for r in rows], "missing": [i for i in ids if i not in found]}
    if include is not None:
        body["included"] = included
    return JSONResponse(body)


def _included(request: Request, include: dict[str, Include]) -> dict[str, Include] | None:
    """The related entities `?include=a,b` asks for (None: not asked); an unknown one is a 400,
    by the pattern the route publishes."""
    raw = request.query_params.get("include")
    if raw is None:
        return None
    if not include or not one_of(*sorted(include)).matches(raw):
        raise BadRequest(f"include takes {', '.join(sorted(include)) or 'nothing'} on this route, got {raw[:40]!r}")
    return {name: include[name] for name in raw.split(",")}


def add_reads(api: Api, entity: Entity, path: str, param: str, batch_param: str = "ids", batch_column: str | None = None,
              include: dict[str, Include] | None = None) -> None:
    add_one(api, entity, path, param)
    column = batch_column or entity.key
    include = include or {}

    async def many(request: Request) -> Response:
        ids = parse_ids(request.query_params.get(batch_param), batch_param, context(request).max_batch)
        return await batch_response(request, entity, column, ids, _included(request, include))

    params, schema = [batch_query(batch_param, required=True)], batch_of(entity.schema)
    if include:
        params.append(query_param("include", f"Related entities to send along, under `included`: {', '.join(sorted(include))}",
                                  one_of(*sorted(include)).schema()))
        schema["properties"]["included"] = {"type": "object", "additionalProperties": False, "properties": {
            name: {"type": "array", "items": ref(related.entity.schema)} for name, related in include.items()}}
    api.add("GET", path, many, summary=f"{entity.name.capitalize()}s by {batch_param}", params=params, ok=(200, schema))


def batch_query(name: str, required: bool = False) -> dict[str, Any]:
    return query_param(name, "Comma-separated ids, at most maxBatch", {"type": "string", "pattern": IDS_PATTERN}, required)


def add_one(api: Api, entity: Entity, path: str, param: str) -> None:
    t = entity.table

    async def one(request: Request) -> Response:
        key = parse_id(request.path_params[param], param)
        async with context(request).db.read() as conn:
            row = (await conn.execute(select(t).where(t.c[entity.key] == key))).first()
        if row is None:
            raise NotFound(f"{entity.name} {key} not found")
        etag = etag_of(row.version)
        if _not_modified(request, etag):
            return Response(status_code=304, headers={"ETag": etag})
        return JSONResponse(entity.to_json(row), headers={"ETag": etag})

    api.add("GET", f"{path}/{{{param}}}", one, summary=f"One {entity.name}", params=[path_param(param)],
            ok=(200, entity.schema), errors=(400, 404), etag=True)


def add_patch(
    api: Api,
    entity: Entity,
    path: str,
    param: str,
    model: type[BaseModel],
    columns: Callable[[Any], dict[str, Any]],
    guard: Guard | None = None,
) -> None:
    """PATCH: the change, its version bump and its event commit together or not at all."""
    t = entity.table

    async def patch(request: Request) -> Response:
        key = parse_id(request.path_params[param], param)
        body = await read_body(request, model)
        values = columns(body)
        if not values:
            raise BadRequest("the body names no field to change")
        db = context(request).db
        now = now_iso()
        async with db.write() as conn:
            current = (await conn.execute(select(t).where(t.c[entity.key] == key))).first()
            if current is None:
                raise NotFound(f"{entity.name} {key} not found")
            if guard:
                guard(current, body)
            row = (
                await conn.execute(
                    update(t)
                    .where(t.c[entity.key] == key)
                    .values(**values, version=t.c.version + 1, updated_at=now)
                    .returning(*t.c)
                )
            ).one()
            await db.emit(conn, entity.name, "updated", key, row.version, now)
        return JSONResponse(entity.to_json(row), headers={"ETag": etag_of(row.version)})

    api.add("PATCH", f"{path}/{{{param}}}", patch, summary=f"Change a {entity.name}", params=[path_param(param)],
            body=model, ok=(200, entity.schema), errors=(400, 404, 409))
