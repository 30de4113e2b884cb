"""GraphQL over HTTP (the GraphQL-over-HTTP spec, graphql.github.io/graphql-over-http): POST
with JSON, GET for queries only, GraphiQL for browsers, and both ``application/json`` and
``application/graphql-response+json`` answers.

One way through for a request (ARCHITECTURE.md, "The data path"): read the request →
the document cache (parse, limits, validation: once per text) → the operation and its
variables → the plan (once per document, operation and directive values) → the planned
executor, or graphql-core's reference execution for what the planner leaves to it → the
response, with `extensions` (stale, complete/failedServices, traceId). A query with an active
@defer or @stream, from a client that reads multipart/mixed, is answered in parts
(gateway/incremental.py); other clients get the whole answer at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from inspect import isawaitable
from typing import Any, TypeVar

import orjson
import strawberry
from graphql import ExecutionResult, GraphQLError, OperationDefinitionNode, OperationType, experimental_execute_incrementally
from graphql.execution.values import VariableValues, get_variable_values
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from strawberry.exceptions import StrawberryGraphQLError
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext, execution_context_class_kwargs

from .auth import caller_of
from .config import Settings
from .context import RequestContext
from .cost import Cost, CostAnalyzer
from .documents import Document, DocumentCache, Limits
from .errors import GatewayError
from .execute import Part, execute_incremental, execute_plan
from .incremental import MULTIPART, accepts_multipart, payloads, send_multipart
from .persisted import HASH, PersistedQueryError, QueryStore, TrustedDocuments, sha256
from .plan import Plan, Planner
from .relations import Loaders
from .resilience import DEADLINE_HEADER, Deadline, partial_result
from .state import gateway_state
from .telemetry import OperationSpan, operation_span

__all__ = ["GraphQLView", "GRAPHQL_RESPONSE", "execute_reference", "format_errors"]

log = logging.getLogger("bookvault.gateway")
GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"
COST_HEADER = "x-bookvault-cost"  # "1" or "true": the answer's extensions.cost, like {"cost": true} in extensions
LARGE_PARAMS = 64 * 1024  # bytes of parameters past which variables are coerced in a worker thread
T = TypeVar("T")
Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestError(Exception):
    """The request cannot be run at all: an HTTP status and a code, before any execution."""

    def __init__(self, status: int, message: str, code: str = "BAD_REQUEST", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def negotiate(accept: str | None) -> str:
    """The spec's preferred type when the client accepts it; plain JSON otherwise."""
    if not accept:
        return JSON
    for part in accept.split(","):
        media, _, params = part.partition(";")
        if media.strip().lower() == GRAPHQL_RESPONSE and "q=0" not in params.replace(" ", "").split(";"):
            return GRAPHQL_RESPONSE
    return JSON


def _unexpected(error: GraphQLError) -> bool:
    original = error.original_error
    return original is not None and not isinstance(original, (GatewayError, GraphQLError, StrawberryGraphQLError))


def format_errors(errors: list[GraphQLError]) -> list[dict[str, Any]]:
    """The errors as the client sees them: an error that is neither the client's nor a
    service's is a bug, answered with a generic message (the details go to the log)."""
    out = []
    for error in errors:
        if _unexpected(error):
            log.error("internal error at %s", error.path, exc_info=error.original_error)
            error = GraphQLError("Internal error", error.nodes, error.source, error.positions, error.path,
                                 extensions={"code": "INTERNAL_SERVER_ERROR"})
        out.append(error.formatted)
    return out


class _Params:
    """The request's parameters (GraphQL over HTTP, "Request Parameters"), of the right JSON
    types or refused with 400 BAD_REQUEST: a client's mistake, said plainly."""

    __slots__ = ("query", "variables", "operation_name", "extensions", "document_id", "size")

    def __init__(self, raw: Any, size: int = 0) -> None:
        if not isinstance(raw, dict):
            raise RequestError(400, "the request must be one JSON object (batched operations are not supported)")
        query, variables, name = raw.get("query"), raw.get("variables"), raw.get("operationName")
        extensions, document_id = raw.get("extensions"), raw.get("documentId")
        if query is not None and not isinstance(query, str):
            raise RequestError(400, "query must be a string")
        if variables is not None and not isinstance(variables, dict):
            raise RequestError(400, "variables must be a JSON object")
        if name is not None and not isinstance(name, str):
            raise RequestError(400, "operationName must be a string")
        if extensions is not None and not isinstance(extensions, dict):
            raise RequestError(400, "extensions must be a JSON object")
        if document_id is not None and (not isinstance(document_id, str) or not document_id):
            raise RequestError(400, "documentId must be a non-empty string")
        if not query and document_id is None and not (extensions or {}).get("persistedQuery"):
            raise RequestError(400, "No GraphQL query found in the request")
        self.query: str | None = query or None
        self.variables: dict[str, Any] = variables or {}
        self.operation_name: str | None = name or None
        self.extensions: dict[str, Any] = extensions or {}
        self.document_id: str | None = document_id
        self.size = size  # bytes of the request's parameters: large variables are coerced off the event loop


class GraphQLView:
    """The /graphql endpoint (pure ASGI). `ide` answers browsers (GraphiQL) and anything
    that is not plain HTTP (WebSocket subscriptions)."""

    def __init__(self, schema: strawberry.Schema, ide: Endpoint, settings: Settings | None = None,
                 store: QueryStore | None = None, trusted: TrustedDocuments | None = None) -> None:
        settings = settings or Settings(services={})
        self.schema = schema
        self.ide = ide
        self.settings = settings
        self.documents = DocumentCache(schema._schema, Limits(
            max_length=settings.max_query_length, max_tokens=settings.max_tokens, max_depth=settings.max_depth,
            max_aliases=settings.max_aliases, max_selections=settings.max_selections,
            introspection=settings.introspection), workers=settings.document_workers)
        self.planner = Planner(schema._schema)
        self.costs = CostAnalyzer(schema._schema, limit=settings.max_cost, max_ids=settings.max_ids,
                                  list_size=settings.cost_list_size,
                                  batch={name: s.max_batch for name, s in settings.services.items()})
        self.store = store or QueryStore(settings.apq_max_entries)
        self.trusted = trusted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "GET" and _wants_html(scope)):
            await self.ide(scope, receive, send)
            return
        request = Request(scope, _capped(receive, self.settings.max_request_bytes))
        media = negotiate(request.headers.get("accept"))
        headers = None
        try:
            status, body = await self.handle(request, media, send)
        except RequestError as exc:
            status, body, headers = exc.status, {"errors": [{"message": exc.message, "extensions": {"code": exc.code}}]}, exc.headers
        if body is None:
            return  # answered in parts
        response = Response(orjson.dumps(body), status_code=status, media_type=media, headers=headers)
        if (consistency := gateway_state(request).consistency) is not None:
            consistency.stamp(request, response)  # the token of what the answer reflected
        await response(scope, receive, send)

    async def handle(self, request: Request, media: str, send: Send | None = None) -> tuple[int, dict[str, Any] | None]:
        # The request's budget starts now: reading, parsing and validation spend it too.
        deadline = Deadline.for_request(self.settings.resilience.deadline, request.headers.get(DEADLINE_HEADER))
        params = await _read(request)
        with operation_span() as span:
            status, body = await self.run(request, params, span, media, deadline)
            if not isinstance(body, dict):  # the parts, sent within the operation's span
                assert send is not None
                await self.send_parts(request, body, send)
                return status, None
            if span.trace_id:
                body.setdefault("extensions", {})["traceId"] = span.trace_id
            return status, body

    async def run(self, request: Request, params: _Params, span: OperationSpan, media: str,
                  deadline: Deadline) -> tuple[int, dict[str, Any] | AsyncIterator[dict[str, Any]]]:
        try:
            text, register = await self.query_text(params)
        except PersistedQueryError as exc:
            error = {"message": exc.message, "extensions": {"code": exc.code}}
            return exc.status, ({"errors": [error]} if media == GRAPHQL_RESPONSE else {"data": None, "errors": [error]})
        document = self.documents.cached(text) or await _within(deadline, self.documents.load(text))
        operation = document.operation(params.operation_name) if document.node is not None else None
        if isinstance(operation, GraphQLError):
            operation.extensions = {"code": "OPERATION_RESOLUTION_FAILURE"}
            return self.request_error([operation], media)
        if operation is not None:
            span.named(params.operation_name or (operation.name.value if operation.name else None),
                       operation.operation.value, document.hash)
            if request.method == "GET" and operation.operation is not OperationType.QUERY:
                # GraphQL over HTTP: GET is for queries only; 405 says to use POST.
                raise RequestError(405, "mutations are not allowed when using GET", "METHOD_NOT_ALLOWED",
                                   headers={"Allow": "POST"})
            if operation.operation is OperationType.SUBSCRIPTION:  # a stream, not one answer (gateway/live_sse.py)
                raise RequestError(400, "subscriptions need Accept: text/event-stream or a graphql-transport-ws WebSocket")
        if document.errors or operation is None:
            return self.request_error(document.errors, media)
        if register:
            await self.store.put(document.hash, text)
        if (oversized := self.costs.oversized(operation, params.variables)) is not None:
            return self.request_error([oversized], media)
        variables = await self.coerce(operation, params, deadline)
        if not isinstance(variables, VariableValues):
            for error in variables:
                error.extensions = {**(error.extensions or {}), "code": "BAD_USER_INPUT"}
            return self.request_error(variables, media)
        cost = self.costs.cost(document, operation, variables)
        if isinstance(cost, GraphQLError):
            return self.request_error([cost], media)
        span.cost = cost
        if deadline.remaining() <= 0:
            raise _timeout()
        context = self.context(request, deadline)
        plan = self.planner.plan(document, operation, variables, accepts_multipart(request.headers.get("accept")))
        if plan is not None and plan.incremental:
            return 200, self.incremental(plan, variables, context, request, params, span, cost)
        if plan is not None:
            data, errors, stale = await execute_plan(plan, variables, context.reader)
            if stale:
                context.extensions["stale"] = stale
        else:
            result = await execute_reference(self.schema, document, params.variables, params.operation_name, context)
            data, errors = result.data, result.errors or []
        body: dict[str, Any] = {"data": data}
        if errors:
            body["errors"] = format_errors(errors)
        if self.extensions(context, body.get("errors", []), request, params, cost):
            body["extensions"] = context.extensions
        span.outcome = "error" if data is None else ("partial" if errors else "complete")
        return 200, body

    def extensions(self, context: RequestContext, errors: list[dict[str, Any]], request: Request, params: _Params,
                   cost: Cost) -> dict[str, Any]:
        """The answer's `extensions` (of its initial part, when in parts): what the
        execution gathered, complete/failedServices, and the cost when asked for."""
        context.extensions.update(partial_result(e.get("extensions", {}) for e in errors if "path" in e))
        if params.extensions.get("cost") is True or request.headers.get(COST_HEADER, "").lower() in ("1", "true"):
            context.extensions["cost"] = cost.as_dict(self.costs.limit)
        return context.extensions

    def incremental(self, plan: Plan, variables: VariableValues, context: RequestContext, request: Request,
                    params: _Params, span: OperationSpan, cost: Cost) -> AsyncIterator[dict[str, Any]]:
        """The payloads of an answer in parts (ARCHITECTURE.md, "Incremental delivery"); the
        initial one carries the response's extensions, each later one its own."""
        def initial(part: Part, errors: list[dict[str, Any]]) -> dict[str, Any]:
            if part.stale:
                context.extensions["stale"] = part.stale
            extensions = self.extensions(context, errors, request, params, cost)
            if span.trace_id:
                extensions["traceId"] = span.trace_id
            span.outcome = "error" if part.data is None else ("partial" if errors else "complete")
            return extensions

        return payloads(execute_incremental(plan, variables, context.reader), format_errors, initial)

    @staticmethod
    async def send_parts(request: Request, parts: AsyncIterator[dict[str, Any]], send: Send) -> None:
        first = await anext(parts)  # read before the headers: the consistency token says what it reflects
        response = Response(media_type=MULTIPART)  # headers only: the body follows part by part
        if (consistency := gateway_state(request).consistency) is not None:
            consistency.stamp(request, response)
        await send_multipart(send, request.receive, [(k, v) for k, v in response.raw_headers if k != b"content-length"],
                             first, parts)

    async def query_text(self, params: _Params) -> tuple[str, bool]:
        """The query to run, and whether it is to be registered (APQ, hash and query sent);
        persisted queries and trusted documents are resolved here (gateway/persisted.py)."""
        persisted = params.extensions.get("persistedQuery")
        digest = None
        if persisted is not None:
            if not isinstance(persisted, dict) or persisted.get("version") != 1:
                raise PersistedQueryError(400, "PERSISTED_QUERY_NOT_SUPPORTED",
                                          "persistedQuery must be {\"version\": 1, \"sha256Hash\": <hex>}")
            digest = persisted.get("sha256Hash")
            if not isinstance(digest, str) or not HASH.fullmatch(digest):
                raise PersistedQueryError(400, "BAD_REQUEST", "persistedQuery.sha256Hash must be 64 lowercase hex digits")
        if params.query is not None and digest is not None and sha256(params.query) != digest:
            raise PersistedQueryError(400, "PERSISTED_QUERY_HASH_MISMATCH",
                                      "persistedQuery.sha256Hash is not the SHA-256 of the query sent")
        if self.trusted is not None:
            # Trusted documents: only the manifest's operations run, whatever else is sent.
            if params.query is not None:
                if params.query in self.trusted.bodies:
                    return params.query, False
                raise PersistedQueryError(400, "PERSISTED_QUERY_NOT_LISTED", "this operation is not a trusted document")
            found = self.trusted.get(params.document_id or digest or "")
            if found is None:
                raise PersistedQueryError(400, "PERSISTED_QUERY_NOT_LISTED", "no trusted document has this id")
            return found, False
        if params.document_id is not None and digest is None:
            candidate = params.document_id.removeprefix("sha256:")
            if not HASH.fullmatch(candidate):
                raise PersistedQueryError(400, "BAD_REQUEST", "documentId must be a SHA-256 (no trusted documents here)")
            digest = candidate
        if params.query is not None:
            return params.query, digest is not None
        assert digest is not None
        found = await self.store.get(digest)
        if found is None:
            # Apollo's protocol: the client sends the query again with the hash (HTTP 200).
            raise PersistedQueryError(200, "PERSISTED_QUERY_NOT_FOUND", "PersistedQueryNotFound")
        return found, False

    async def coerce(self, operation: OperationDefinitionNode, params: _Params,
                     deadline: Deadline) -> VariableValues | list[GraphQLError]:
        def coerce() -> VariableValues | list[GraphQLError]:
            return get_variable_values(self.schema._schema, operation.variable_definitions or (), params.variables,
                                       max_errors=50, hide_suggestions=not self.settings.introspection)

        if params.size < LARGE_PARAMS or not params.variables:
            return coerce()
        return await _within(deadline, asyncio.to_thread(coerce))  # thousands of ids: not on the event loop

    @staticmethod
    def request_error(errors: list[GraphQLError], media: str) -> tuple[int, dict[str, Any]]:
        # GraphQL over HTTP: with application/graphql-response+json a request error is a
        # 400 without `data`; plain JSON keeps 200 and `"data": null` for older clients.
        formatted = format_errors(errors)
        if media == GRAPHQL_RESPONSE:
            return 400, {"errors": formatted}
        return 200, {"data": None, "errors": formatted}

    @staticmethod
    def context(request: Request, deadline: Deadline) -> RequestContext:
        state = gateway_state(request)
        # The consistency token the request brought back (header or cookie), checked.
        session = state.consistency.session(request, deadline) if state.consistency is not None else None
        # The caller the authentication middleware verified (gateway/auth.py), or None.
        reader = state.source.reader(caller_of(request.scope), deadline, session)
        return RequestContext(request, reader, Loaders(reader))


def _timeout() -> RequestError:
    return RequestError(504, "the request's time budget ran out before it could be executed", "DEADLINE_EXCEEDED")


async def _within(deadline: Deadline, work: Awaitable[T]) -> T:
    """`work`, or DEADLINE_EXCEEDED when the request's budget runs out first (the work
    itself goes on: a shared document load serves the next request)."""
    try:
        return await asyncio.wait_for(work, deadline.remaining())
    except TimeoutError:
        raise _timeout() from None


async def execute_reference(schema: strawberry.Schema, document: Document, variables: dict[str, Any],
                            operation_name: str | None, context: RequestContext) -> ExecutionResult:
    """graphql-core's execution over the schema's own resolvers: the reference semantics."""
    # @defer and @stream are ignored here (the spec allows it): the whole answer at once.
    # graphql-core runs a schema that declares them only through its incremental entry point.
    result = experimental_execute_incrementally(
        schema._schema, document.plain, context_value=context,  # type: ignore[arg-type]
        variable_values=variables, operation_name=operation_name,
        **execution_context_class_kwargs(StrawberryGraphQLCoreExecutionContext))
    result = await result if isawaitable(result) else result
    assert isinstance(result, ExecutionResult)  # the document has no @defer or @stream left
    return result


def _wants_html(scope: Scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"accept":
            return b"text/html" in value
    return False


async def _read(request: Request) -> _Params:
    if request.method == "GET":
        q = request.query_params
        raw: dict[str, Any] = {"query": q.get("query"), "operationName": q.get("operationName"),
                               "documentId": q.get("documentId")}
        for name in ("variables", "extensions"):  # JSON in the URL (GraphQL over HTTP, "GET")
            if q.get(name):
                try:
                    raw[name] = orjson.loads(q[name])
                except orjson.JSONDecodeError:
                    raise RequestError(400, f"{name} must be a JSON object") from None
        return _Params(raw, len(request.url.query))
    if request.method != "POST":
        raise RequestError(405, "GraphQL is served over GET and POST", "METHOD_NOT_ALLOWED", headers={"Allow": "GET, POST"})
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != JSON:
        # GraphQL over HTTP, "POST": the body is application/json; else 415. Refusing the
        # simple content types (text/plain, forms, multipart) also means no browser can post
        # a query cross-site without a CORS preflight (CSRF).
        raise RequestError(415, "POST bodies must be application/json", "UNSUPPORTED_MEDIA_TYPE")
    body = await request.body()
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RequestError(400, "Unable to parse request body as JSON") from None
    return _Params(raw, len(body))


def _capped(receive: Receive, limit: int) -> Receive:
    """The request body, refused with 413 once it passes `limit` bytes: never buffered whole."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestError(413, f"request bodies are limited to {limit} bytes", "REQUEST_TOO_LARGE")
        return message

    return capped
