"""The operation pipeline (ARCHITECTURE.md, "Front door"): the one way from a request's
parameters and caller to an answer, whatever the transport. POST, GET, WebSocket, SSE and
multipart are thin adapters over it (gateway/view.py, live_ws.py, live_sse.py,
live_multipart.py); none reaches an executor another way, so every rule below holds for
each of them, and a new way in gets them all.

`admit` applies the rules in order, before anything is read from a service: the caller's
rate limit → persisted queries and trusted documents → the document (parse, limits,
introspection setting and bounds, validation: once per text, off the event loop) → the
operation (a GET runs queries only) → variables → cost → for a subscription, its payload's
plan → the time left. Each refusal is a `Refused` with coded errors. `answer` then plans
and executes a query or mutation: the planned executor, or graphql-core's reference
execution for what the planner leaves to it; a subscription is handed to the live hub by
its transport."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import strawberry
from graphql import (
    ExecutionResult,
    FieldNode,
    GraphQLError,
    OperationDefinitionNode,
    OperationType,
    experimental_execute_incrementally,
)
from graphql.execution.values import VariableValues, get_variable_values
from starlette.requests import HTTPConnection
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext, execution_context_class_kwargs

from .auth import Caller
from .config import Settings
from .context import RequestContext
from .cost import Cost, CostAnalyzer
from .documents import Document, DocumentCache, Limits
from .errors import format_errors
from .execute import Part, execute_incremental, execute_plan
from .incremental import payloads
from .live import Feed, Live, prepare
from .persisted import HASH, PersistedQueryError, QueryStore, TrustedDocuments, sha256
from .plan import Planner
from .relations import Loaders
from .resilience import Deadline, partial_result
from .telemetry import OperationSpan, stage

if TYPE_CHECKING:
    from .state import GatewayState

__all__ = ["Operation", "Params", "Pipeline", "Refused", "execute_reference"]

COST_HEADER = "x-bookvault-cost"  # "1" or "true": the answer's extensions.cost, like {"cost": true} in extensions
LARGE_PARAMS = 64 * 1024  # bytes of parameters past which variables are coerced in a worker thread
INTROSPECTION_ANSWERS = 32  # introspection-only answers kept: the schema never changes while running
T = TypeVar("T")


class Refused(Exception):
    """The request is not run: its errors, each with a code. `status` is set when the
    refusal is HTTP's own (400 malformed parameters, 405, 413, 415, 429, 504...); None
    for a GraphQL request error, whose status follows the media type (GraphQL over HTTP)."""

    def __init__(self, errors: list[GraphQLError], status: int | None = None,
                 headers: dict[str, str] | None = None, *, graphql: bool = False) -> None:
        super().__init__(errors[0].message if errors else "refused")
        self.errors, self.status, self.headers = errors, status, headers
        self.graphql = graphql  # with a status, still a GraphQL response (`"data": null` in plain JSON)

    @classmethod
    def http(cls, status: int, message: str, code: str = "BAD_REQUEST",
             headers: dict[str, str] | None = None) -> Refused:
        return cls([GraphQLError(message, extensions={"code": code})], status, headers)


@dataclass(frozen=True)
class Params:
    """A request's parameters (GraphQL over HTTP, "Request Parameters"; graphql-ws's and
    graphql-sse's `subscribe` payload is the same object), of the right JSON types or
    refused with 400 BAD_REQUEST: a client's mistake, said plainly."""

    query: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    operation_name: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)
    document_id: str | None = None
    size: int = 0  # bytes of the parameters: large variables are coerced off the event loop

    @classmethod
    def of(cls, raw: Any, size: int = 0) -> Params:
        if not isinstance(raw, dict):
            raise Refused.http(400, "the request must be one JSON object (batched operations are not supported)")
        query, variables, name = raw.get("query"), raw.get("variables"), raw.get("operationName")
        extensions, document_id = raw.get("extensions"), raw.get("documentId")
        if query is not None and not isinstance(query, str):
            raise Refused.http(400, "query must be a string")
        if variables is not None and not isinstance(variables, dict):
            raise Refused.http(400, "variables must be a JSON object")
        if name is not None and not isinstance(name, str):
            raise Refused.http(400, "operationName must be a string")
        if extensions is not None and not isinstance(extensions, dict):
            raise Refused.http(400, "extensions must be a JSON object")
        if document_id is not None and (not isinstance(document_id, str) or not document_id):
            raise Refused.http(400, "documentId must be a non-empty string")
        if not query and document_id is None and not (extensions or {}).get("persistedQuery"):
            raise Refused.http(400, "No GraphQL query found in the request")
        return cls(query or None, variables or {}, name or None, extensions or {}, document_id, size)


@dataclass
class Operation:
    """A request that passed every rule: what `answer` (or the live hub, for `feed`) runs."""

    params: Params
    document: Document
    node: OperationDefinitionNode
    variables: VariableValues
    cost: Cost
    feed: Feed | None = None  # a subscription, planned (gateway/live.py)

    @property
    def kind(self) -> OperationType:
        return self.node.operation


class Pipeline:
    """Every rule of the front door, in one place (see the module doc)."""

    def __init__(self, schema: strawberry.Schema, settings: Settings, store: QueryStore | None = None,
                 trusted: TrustedDocuments | None = None, live: list[Live] | None = None) -> None:
        self.schema = schema
        self.settings = settings
        graphql_schema = schema._schema
        self.documents = DocumentCache(graphql_schema, Limits(
            max_length=settings.max_query_length, max_tokens=settings.max_tokens, max_depth=settings.max_depth,
            max_aliases=settings.max_aliases, max_selections=settings.max_selections,
            introspection=settings.introspection), workers=settings.document_workers)
        self.planner = Planner(graphql_schema)
        self.costs = CostAnalyzer(graphql_schema, limit=settings.max_cost, max_ids=settings.max_ids,
                                  list_size=settings.cost_list_size,
                                  batch={name: s.max_batch for name, s in settings.services.items()})
        self.store = store or QueryStore(settings.apq_max_entries)
        self.trusted = trusted
        self.live = live or []
        self.introspection_answers: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()

    # -- admission: every rule, before anything is read ------------------------------------

    async def admit(self, params: Params, *, state: GatewayState | None, caller: Caller | None, client: str | None,
                    deadline: Deadline, span: OperationSpan, method: str = "POST") -> Operation:
        """The operation `params` name, once every rule lets it run; else `Refused`."""
        await self._rate_limit(state, caller, client)
        text, register = await self.query_text(params)
        document = self.documents.cached(text)
        with stage("graphql.document", cached=document is not None):  # parse, limits, validation: once per text
            if document is None:
                document = await _within(deadline, self.documents.load(text))
        node = document.operation(params.operation_name) if document.node is not None else None
        if isinstance(node, GraphQLError):
            node.extensions = {"code": "OPERATION_RESOLUTION_FAILURE"}
            raise Refused([node])
        if node is not None:
            span.named(params.operation_name or (node.name.value if node.name else None),
                       node.operation.value, document.hash)
            if method == "GET" and node.operation is OperationType.MUTATION:
                # GraphQL over HTTP: a GET is safe, so never a mutation; 405 says to use POST.
                # (A subscription may come by GET: EventSource's way, graphql-sse.)
                raise Refused.http(405, "mutations are not allowed when using GET", "METHOD_NOT_ALLOWED",
                                   headers={"Allow": "POST"})
        if document.errors or node is None:
            raise Refused(document.errors)
        if register:
            await self.store.put(document.hash, text)
        if (oversized := self.costs.oversized(node, params.variables)) is not None:
            raise Refused([oversized])
        with stage("graphql.variables"):
            variables = await self._coerce(node, params, deadline)
        with stage("graphql.cost"):
            cost = self.costs.cost(document, node, variables)
        if isinstance(cost, GraphQLError):
            raise Refused([cost])
        span.cost = cost
        operation = Operation(params, document, node, variables, cost)
        if node.operation is OperationType.SUBSCRIPTION:
            with stage("graphql.plan"):
                feed = await prepare(self.documents, self.costs, self.planner, document, node, params.variables,
                                     variables)
            if isinstance(feed, list):
                raise Refused(feed)
            operation.feed = feed
        if deadline.remaining() <= 0:
            raise Refused.http(504, "the request's time budget ran out before it could be executed",
                               "DEADLINE_EXCEEDED")
        return operation

    async def _rate_limit(self, state: GatewayState | None, caller: Caller | None, client: str | None) -> None:
        """Each operation counts, whatever carries it: a WebSocket's subscribe messages too."""
        limiter = state.limiter if state is not None else None
        if limiter is None or not limiter.enabled:
            return
        wait = await limiter.wait(f"s:{caller.key}" if caller is not None else f"a:{client or '?'}")
        if wait > 0:
            raise Refused.http(429, "too many requests: retry after the time in Retry-After", "RATE_LIMITED",
                               headers={"Retry-After": str(max(1, -int(-wait // 1)))})

    async def query_text(self, params: Params) -> tuple[str, bool]:
        """The query to run, and whether it is to be registered (APQ, hash and query sent);
        persisted queries and trusted documents are resolved here (gateway/persisted.py)."""
        try:
            return await self._query_text(params)
        except PersistedQueryError as exc:
            # Apollo's protocol: PERSISTED_QUERY_NOT_FOUND is 200, and the client sends the
            # query again with its hash.
            raise Refused([GraphQLError(exc.message, extensions={"code": exc.code})], exc.status,
                          graphql=True) from None

    async def _query_text(self, params: Params) -> tuple[str, bool]:
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
            raise PersistedQueryError(200, "PERSISTED_QUERY_NOT_FOUND", "PersistedQueryNotFound")
        return found, False

    async def _coerce(self, node: OperationDefinitionNode, params: Params, deadline: Deadline) -> VariableValues:
        def coerce() -> VariableValues | list[GraphQLError]:
            return get_variable_values(self.schema._schema, node.variable_definitions or (), params.variables,
                                       max_errors=50, hide_suggestions=not self.settings.introspection)

        if params.size < LARGE_PARAMS or not params.variables:
            coerced = coerce()
        else:  # thousands of ids: not on the event loop
            coerced = await _within(deadline, asyncio.to_thread(coerce))
        if not isinstance(coerced, VariableValues):
            for error in coerced:
                error.extensions = {**(error.extensions or {}), "code": "BAD_USER_INPUT"}
            raise Refused(coerced)
        return coerced

    # -- execution ----------------------------------------------------------------------

    def context(self, connection: HTTPConnection, state: GatewayState, caller: Caller | None,
                deadline: Deadline) -> RequestContext:
        # The consistency token the request brought back (header or cookie), checked.
        session = state.consistency.session(connection, deadline) if state.consistency is not None else None
        reader = state.source.reader(caller, deadline, session)
        return RequestContext(connection, reader, Loaders(reader))

    async def answer(self, operation: Operation, context: RequestContext, span: OperationSpan, *,
                     multipart: bool = False, cost_asked: bool = False
                     ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        """The answer to a query or mutation: one body, or (with `multipart`, for an
        operation with an active @defer or @stream) the payloads of its parts."""
        assert operation.feed is None
        with stage("graphql.plan"):
            plan = self.planner.plan(operation.document, operation.node, operation.variables, multipart)
        if plan is not None and plan.incremental:
            def initial(part: Part, errors: list[dict[str, Any]]) -> dict[str, Any]:
                if part.stale:
                    context.extensions["stale"] = part.stale
                span.outcome = "error" if part.data is None else ("partial" if errors else "complete")
                return self._extensions(context, errors, operation, span, cost_asked)

            return payloads(execute_incremental(plan, operation.variables, context.reader), format_errors, initial)
        if plan is not None:
            data, errors, stale = await execute_plan(plan, operation.variables, context.reader)
            if stale:
                context.extensions["stale"] = stale
        else:
            result = await self._reference(operation, context)
            data, errors = result.data, result.errors or []
        body: dict[str, Any] = {"data": data}
        if errors:
            body["errors"] = format_errors(errors)
        if extensions := self._extensions(context, body.get("errors", []), operation, span, cost_asked):
            body["extensions"] = extensions
        span.outcome = "error" if data is None else ("partial" if errors else "complete")
        return body

    async def _reference(self, operation: Operation, context: RequestContext) -> ExecutionResult:
        """graphql-core's execution; an introspection-only answer is kept, since the schema
        does not change while the gateway runs (a burst of GraphiQL tabs costs one)."""
        params = operation.params
        key = None
        if _introspection_only(operation.node):
            key = (operation.document.hash, params.operation_name, orjson.dumps(params.variables,
                                                                                  option=orjson.OPT_SORT_KEYS))
            if (kept := self.introspection_answers.get(key)) is not None:
                self.introspection_answers.move_to_end(key)
                return ExecutionResult(kept)
        result = await execute_reference(self.schema, operation.document, params.variables, params.operation_name,
                                          context)
        if key is not None and not result.errors and result.data is not None:
            self.introspection_answers[key] = result.data
            if len(self.introspection_answers) > INTROSPECTION_ANSWERS:
                self.introspection_answers.popitem(last=False)
        return result

    def _extensions(self, context: RequestContext, errors: list[dict[str, Any]], operation: Operation,
                    span: OperationSpan, cost_asked: bool) -> dict[str, Any]:
        """The answer's `extensions` (of its initial part, when in parts): what the
        execution gathered, complete/failedServices, the cost when asked for, the trace id."""
        context.extensions.update(partial_result(e.get("extensions", {}) for e in errors if "path" in e))
        if cost_asked or operation.params.extensions.get("cost") is True:
            context.extensions["cost"] = operation.cost.as_dict(self.costs.limit)
        if span.trace_id:
            context.extensions["traceId"] = span.trace_id
        return context.extensions


def _introspection_only(node: OperationDefinitionNode) -> bool:
    selections = node.selection_set.selections
    return node.operation is OperationType.QUERY and all(
        isinstance(s, FieldNode) and s.name.value in ("__schema", "__type", "__typename") and not s.directives
        for s in selections)


async def _within(deadline: Deadline, work: Awaitable[T]) -> T:
    """`work`, or DEADLINE_EXCEEDED when the request's budget runs out first (the work
    itself goes on: a shared document load serves the next request)."""
    try:
        return await asyncio.wait_for(work, deadline.remaining())
    except TimeoutError:
        raise Refused.http(504, "the request's time budget ran out before it could be executed",
                           "DEADLINE_EXCEEDED") from None


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
