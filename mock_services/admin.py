"""Fault injection and request stats, for demos, tests and benchmarks (ARCHITECTURE.md, "Services").

A pure ASGI middleware, present only when the service runs with ``--admin``; without it
the ``/_admin`` routes do not exist (404) and requests pay nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .params import read_body
from .responses import JSONResponse

__all__ = ["Faults", "AdminState", "AdminMiddleware", "admin_routes"]


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latencyMs: int = Field(0, ge=0, le=120_000)
    jitterMs: int = Field(0, ge=0, le=120_000)
    errorRate: float = Field(0.0, ge=0.0, le=1.0)
    errorStatus: int = Field(500, ge=400, le=599)
    hang: bool = False
    # orders only: the process exits (os._exit) right after this checkout step is recorded,
    # for the crash-recovery tests (README, "Checkout").
    crashAfterStep: Literal["order", "reserve", "pay", "ship", "confirm", "complete"] | None = None
    malformed: bool = False
    # Only requests whose path starts with one of these are affected (all when unset),
    # so a test can break /books while the change feed keeps flowing.
    paths: list[str] | None = None
    # Only this many requests are affected, then the service recovers (always when unset).
    count: int | None = Field(None, ge=0)


@dataclass
class AdminState:
    faults: Faults = field(default_factory=Faults)
    stats: list[dict[str, Any]] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    faulted: int = 0  # requests affected since the faults were set

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        self.faulted = 0
        # Wake requests hung by the previous setting; they go on to be served.
        self.released.set()
        self.released = asyncio.Event()


def _ids_count(scope: Scope) -> int:
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key.lower().endswith("ids"):
            return len({part for part in value.split(",") if part})
    params = scope.get("path_params") or {}
    return 1 if params else 0


class AdminMiddleware:
    def __init__(self, app: ASGIApp, state: AdminState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_admin"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        record: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "route": scope["path"],
            "ids": 0,
            "start": time.monotonic(),
            "end": None,
            "status": None,
            "traceparent": headers.get(b"traceparent", b"").decode("latin-1") or None,
            "deadlineMs": headers.get(b"x-request-deadline-ms", b"").decode("latin-1") or None,
        }
        self.state.stats.append(record)

        async def send_recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                record["end"] = time.monotonic()

        try:
            await self._with_faults(scope, receive, send_recorded)
        except Exception:
            # ServerErrorMiddleware, outside this one, turns the exception into a 500.
            record["status"] = record["status"] or 500
            raise
        finally:
            route = scope.get("route")
            record["route"] = getattr(route, "path", scope["path"])
            record["ids"] = _ids_count(scope)
            if record["end"] is None:  # hung until the client left, or failed
                record["end"] = time.monotonic()

    async def _with_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        faults = self.state.faults
        spent = faults.count is not None and self.state.faulted >= faults.count
        if spent or (faults.paths is not None and not any(scope["path"].startswith(p) for p in faults.paths)):
            await self.app(scope, receive, send)
            return
        self.state.faulted += 1
        delay = faults.latencyMs + random.uniform(0, faults.jitterMs)
        if delay:
            await asyncio.sleep(delay / 1000)
        if faults.hang:
            buffered = await self._hang(receive)
            if buffered is None:
                return  # the client gave up; nothing to answer
            receive = _replay(buffered, receive)
            faults = self.state.faults  # released by a change: serve under the new faults
        if faults.errorRate and random.random() < faults.errorRate:
            body = {"error": {"code": "INJECTED_FAULT", "message": "fault injected by /_admin/faults"}}
            await JSONResponse(body, status_code=faults.errorStatus)(scope, receive, send)
            return
        if faults.malformed:
            # A truncated JSON document under a JSON content type, as a crashing proxy sends.
            await Response(b'{"data": [{"id": 1, "tit', media_type="application/json")(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _hang(self, receive: Receive) -> list[Message] | None:
        """Hold the request until the client disconnects (None) or faults change."""
        buffered: list[Message] = []

        async def until_disconnect() -> None:
            while (message := await receive())["type"] != "http.disconnect":
                buffered.append(message)

        watcher = asyncio.ensure_future(until_disconnect())
        released = asyncio.ensure_future(self.state.released.wait())
        done, pending = await asyncio.wait({watcher, released}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return None if watcher in done else buffered


def _replay(buffered: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        return buffered.pop(0) if buffered else await receive()

    return replay


def admin_routes(state: AdminState) -> list[Route]:
    async def put_faults(request: Request) -> JSONResponse:
        state.set_faults(await read_body(request, Faults))
        return JSONResponse(state.faults.model_dump())

    async def clear_faults(request: Request) -> Response:
        state.set_faults(Faults())
        return Response(status_code=204)

    async def get_faults(request: Request) -> JSONResponse:
        return JSONResponse(state.faults.model_dump())

    async def get_stats(request: Request) -> JSONResponse:
        return JSONResponse({"requests": state.stats})

    async def clear_stats(request: Request) -> Response:
        state.stats.clear()
        return Response(status_code=204)

    return [
        Route("/_admin/faults", put_faults, methods=["POST"]),
        Route("/_admin/faults", clear_faults, methods=["DELETE"]),
        Route("/_admin/faults", get_faults, methods=["GET"]),
        Route("/_admin/stats", get_stats, methods=["GET"]),
        Route("/_admin/stats", clear_stats, methods=["DELETE"]),
    ]
