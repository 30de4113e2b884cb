"""GraphQL over HTTP (the GraphQL-over-HTTP spec, graphql.github.io/graphql-over-http):
POST with JSON, GET for queries only, GraphiQL for browsers, and both
``application/json`` and ``application/graphql-response+json`` responses."""

from __future__ import annotations

import hashlib
import logging
from graphql import GraphQLError
from strawberry.asgi import GraphQL
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.extensions import MaskErrors
from strawberry.http import GraphQLHTTPResponse, process_result
from cross_web import HTTPException
from strawberry.types import ExecutionResult
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from .context import RequestContext
from .errors import GatewayError
from .loading import Loaders
from .resilience import DEADLINE_HEADER, Deadline, partial_result
from .state import gateway_state

__all__ = ["GatewayGraphQL", "MaskInternalErrors", "GRAPHQL_RESPONSE"]

log = logging.getLogger("bookvault.gateway")
GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"
_CONTEXT = "bookvault.context"
MAX_REQUEST_BYTES = 1024 * 1024


def negotiate(accept: str | None) -> str:
    """The spec's preferred type when the client accepts it; plain JSON otherwise."""
    if not accept:
        return JSON
    for part in accept.split(","):
        media, _, params = part.partition(";")
        if media.strip().lower() == GRAPHQL_RESPONSE and "q=0" not in params.replace(" ", "").split(";"):
            return GRAPHQL_RESPONSE
    return JSON


def identity(request: Request, header: str) -> str | None:
    """Who is asking, as a hash (never the credential itself), for private cache scopes."""
    value = request.headers.get(header)
    return hashlib.sha256(value.encode()).hexdigest()[:32] if value else None


class MaskInternalErrors(MaskErrors):
    """Errors that are not the client's or a service's are bugs: a generic message for
    the client, the details in the log (DESIGN §6)."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=self._unexpected, error_message="Internal error")

    @staticmethod
    def _unexpected(error: GraphQLError) -> bool:
        original = error.original_error
        return original is not None and not isinstance(original, (GatewayError, GraphQLError, StrawberryGraphQLError))

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        log.error("internal error at %s", error.path, exc_info=error.original_error)
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
        return masked


def _capped(receive: Receive, limit: int) -> Receive:
    """The request body, refused with 413 once it passes `limit` bytes: never buffered whole."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request bodies are limited to {limit} bytes")
        return message

    return capped


class GatewayGraphQL(GraphQL[RequestContext, None]):
    async def get_context(self, request: Request, response: Response) -> RequestContext:  # type: ignore[override]
        state = gateway_state(request)
        deadline = Deadline.for_request(state.settings.resilience.deadline, request.headers.get(DEADLINE_HEADER))
        loaders = Loaders(state.upstream, state.cache, identity(request, state.settings.identity_header), state.policies,
                          deadline, state.flights)
        context = RequestContext(request, response, loaders, negotiate(request.headers.get("accept")))
        request.scope[_CONTEXT] = context
        return context

    async def process_result(self, request: Request, result: ExecutionResult) -> GraphQLHTTPResponse:
        body = process_result(result)
        context: RequestContext = request.scope[_CONTEXT]
        context.extensions.update(partial_result(e.extensions for e in result.errors or () if e.path))
        if context.extensions:
            body["extensions"] = {**body.get("extensions", {}), **context.extensions}
        if context.media_type == GRAPHQL_RESPONSE and result.data is None and result.errors and all(
            e.path is None for e in result.errors
        ):
            # A request error (parse, validation, variables): 400 and no `data` entry.
            context.response.status_code = 400
            body.pop("data", None)
        return body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, _capped(receive, MAX_REQUEST_BYTES))
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        try:
            if request.method == "POST" and content_type != JSON:
                # GraphQL over HTTP §"POST": the body is application/json; else 415.
                raise HTTPException(415, "POST bodies must be application/json")
            response = await self.run(request)
        except HTTPException as exc:
            # A JSON error the client can parse, instead of strawberry's plain text.
            code = "REQUEST_TOO_LARGE" if exc.status_code == 413 else "BAD_REQUEST"
            body = {"errors": [{"message": exc.reason, "extensions": {"code": code}}]}
            response = JSONResponse(body, status_code=exc.status_code,
                                    media_type=negotiate(request.headers.get("accept")))
        context: RequestContext | None = scope.get(_CONTEXT)
        if context is not None and response.media_type == JSON and context.media_type == GRAPHQL_RESPONSE:
            response.headers["content-type"] = GRAPHQL_RESPONSE
        await response(scope, receive, send)
