"""Routes that document themselves: each route is declared once, with the OpenAPI 3.1
operation that describes it, so `/openapi.json` is generated from what is served."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .models import Error
from .patterns import ID, IDS

__all__ = ["Api", "query_param", "path_param", "batch_of", "ref"]

Endpoint = Callable[[Request], Awaitable[Response]]
# What params.parse_id and parse_ids check, with the same ECMA-262 semantics (patterns.py).
ID_PATTERN = ID.source
IDS_PATTERN = IDS.source


def ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def batch_of(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["data", "missing"],
        "properties": {"data": {"type": "array", "items": ref(model)}, "missing": {"type": "array", "items": {"type": "integer"}}},
    }


def query_param(name: str, description: str, schema: dict[str, Any] | None = None, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema or {"type": "string"}}


def path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "pattern": ID_PATTERN}}


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_UNPOSITIONED = ("/events", "/_meta", "/healthz", "/openapi.json")


class Api:
    def __init__(self, service: str) -> None:
        self.service = service
        self._endpoints: dict[str, dict[str, Endpoint]] = {}
        self.paths: dict[str, dict[str, Any]] = {}
        self.models: set[type[BaseModel]] = {Error}

    def add(
        self,
        method: str,
        path: str,
        endpoint: Endpoint,
        *,
        summary: str,
        params: list[dict[str, Any]] = (),  # type: ignore[assignment]
        body: type[BaseModel] | None = None,
        ok: tuple[int, type[BaseModel] | dict[str, Any] | None] = (200, None),
        errors: tuple[int, ...] = (400,),
        etag: bool = False,
    ) -> None:
        self._endpoints.setdefault(path, {})[method] = endpoint
        status, schema = ok
        responses: dict[str, Any] = {str(status): {"description": "OK"}}
        if schema is not None:
            if isinstance(schema, type):
                self.models.add(schema)
                schema = ref(schema)
            responses[str(status)]["content"] = _content(schema)
        if not path.startswith(_UNPOSITIONED):  # mock_services/position.py
            responses[str(status)]["headers"] = {"X-Feed-Seq": {"schema": {"type": "integer"}, "description": (
                "The highest change-feed seq written when the answer was sent: every change it reflects is at or "
                "below it")}}
        if etag:
            responses[str(status)].setdefault("headers", {})["ETag"] = {"schema": {"type": "string"},
                                                                        "description": 'W/"<version>"'}
            responses["304"] = {"description": "Not modified (If-None-Match matched the version)"}
        for code in errors:
            responses[str(code)] = {"description": "Error", "content": _content(ref(Error))}
        operation: dict[str, Any] = {"summary": summary, "operationId": f"{method.lower()}{path}", "responses": responses}
        if params:
            operation["parameters"] = list(params)
        if body is not None:
            self.models.add(body)
            operation["requestBody"] = {"required": True, "content": _content(ref(body))}
        self.paths.setdefault(path, {})[method.lower()] = operation

    @property
    def routes(self) -> list[Route]:
        """One route per path, whatever its methods, so a 405 (or OPTIONS) lists them all
        in `Allow` (RFC 9110 §15.5.6), not only those of the first route to match."""
        return [Route(path, _dispatch(endpoints), methods=list(endpoints)) for path, endpoints in self._endpoints.items()]

    def document(self, version: str) -> dict[str, Any]:
        _, defs = models_json_schema(
            [(m, "serialization") for m in sorted(self.models, key=lambda m: m.__name__)],
            ref_template="#/components/schemas/{model}",
        )
        return {
            "openapi": "3.1.0",
            "info": {"title": f"BookVault {self.service} service", "version": version},
            "paths": self.paths,
            "components": {"schemas": defs.get("$defs", {})},
        }


def _dispatch(endpoints: dict[str, Endpoint]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    return endpoint
