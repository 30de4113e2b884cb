"""GraphQL over HTTP (graphql.github.io/graphql-over-http): the /graphql endpoint's HTTP
adapter over the operation pipeline (gateway/pipeline.py). It reads the parameters (POST
with JSON, GET in the URL), hands them to `Pipeline.admit`, and answers in the form the
client accepts (`Accept`, negotiated once, below):

- a query or mutation: ``application/graphql-response+json`` or ``application/json``
  whenever the client accepts either, whatever else it lists (urql lists five types);
  its parts as ``multipart/mixed`` when it has an active @defer or @stream and the client
  reads them (gateway/incremental.py); one `next` event over ``text/event-stream`` for a
  client that accepts only that (graphql-sse);
- a subscription: ``text/event-stream`` (graphql-sse, gateway/live_sse.py) or Apollo's
  multipart subscriptions (``multipart/mixed;subscriptionSpec=1.0``, live_multipart.py);
  406 otherwise (a WebSocket is the other way, gateway/live_ws.py);
- a browser's GET (``Accept: text/html``): GraphiQL, with a shared link's ``?query=``,
  ``variables`` and ``operationName`` in its editors; nothing runs until the person does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from graphql import OperationType
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from .auth import caller_of
from .graphiql import graphiql_response
from .incremental import MULTIPART, accepts_multipart, send_multipart
from .live_multipart import accepts_multipart_subscriptions, serve_multipart_subscription
from .live_sse import EVENT_STREAM, serve_sse, sse_answer, sse_refusal
from .errors import format_errors
from .pipeline import COST_HEADER, Params, Pipeline, Refused
from .resilience import DEADLINE_HEADER, Deadline
from .state import gateway_state
from .telemetry import operation_span

__all__ = ["Accept", "GraphQLView", "GRAPHQL_RESPONSE", "read_params"]

GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON = "application/json"
_ZERO = ("0", "0.0", "0.00", "0.000")
_DEADLINE = DEADLINE_HEADER.lower().encode("latin-1")


@dataclass(frozen=True)
class Accept:
    """What the client reads, from its Accept header (RFC 9110 §12.5.1; q=0 means "not")."""

    graphql_response: bool = False
    json: bool = False
    events: bool = False
    multipart_defer: bool = False
    multipart_subscription: bool = False
    html: bool = False

    @classmethod
    def of(cls, header: str | None) -> Accept:
        if not header:  # GraphQL over HTTP: no Accept is application/json
            return cls(json=True)
        types: set[str] = set()
        for part in header.split(","):
            media, *params = (p.strip().lower() for p in part.split(";"))
            found = dict(p.partition("=")[::2] for p in params)
            if found.get("q", "1").strip() not in _ZERO:
                types.add(media)
        return cls(graphql_response=GRAPHQL_RESPONSE in types,
                   json=bool(types & {JSON, "application/*", "*/*"}),
                   events=EVENT_STREAM in types,
                   multipart_defer=accepts_multipart(header),
                   multipart_subscription=accepts_multipart_subscriptions(header),
                   html="text/html" in types)

    @property
    def media(self) -> str:
        """One answer's media type: the spec's own when accepted, else plain JSON."""
        return GRAPHQL_RESPONSE if self.graphql_response else JSON

    @property
    def events_only(self) -> bool:
        """A graphql-sse client: event streams and nothing of JSON (its refusals are events too)."""
        return self.events and not (self.graphql_response or self.json)


class GraphQLView:
    """The /graphql endpoint for HTTP (pure ASGI)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        accept = Accept.of(_header(scope, b"accept"))
        if scope["method"] == "GET" and accept.html:
            # A browser: GraphiQL, which reads a shared link's parameters into its editors.
            await graphiql_response(Request(scope))(scope, receive, send)
            return
        # The request's budget starts now: reading, parsing and validation spend it too.
        deadline = Deadline.for_request(self.settings.resilience.deadline, _header(scope, _DEADLINE))
        request = Request(scope, _capped(receive, self.settings.max_request_bytes, deadline))
        try:
            params = await read_params(request)
            await self.run(request, params, accept, deadline, send)
        except Refused as refused:
            if refused.status is None and accept.events_only:
                await sse_refusal(refused.errors)(scope, receive, send)
                return
            status, body = _refusal(refused, accept.media)
            await self.respond(request, body, accept.media, refused.headers, send, status)

    async def run(self, request: Request, params: Params, accept: Accept, deadline: Deadline, send: Send) -> None:
        scope = request.scope
        state = gateway_state(request)
        caller = caller_of(scope)
        with operation_span() as span:
            operation = await self.pipeline.admit(params, state=state, caller=caller, client=_client(scope),
                                                  deadline=deadline, span=span, method=request.method)
            if operation.kind is OperationType.SUBSCRIPTION:
                span.outcome = "subscription"
                stream = operation.feed
            else:
                context = self.pipeline.context(request, state, caller, deadline)
                cost_asked = request.headers.get(COST_HEADER, "").lower() in ("1", "true")
                answer = await self.pipeline.answer(operation, context, span, cost_asked=cost_asked,
                                                    multipart=accept.multipart_defer)
                if isinstance(answer, dict):
                    if accept.events_only:
                        await sse_answer(answer)(scope, request.receive, send)
                    else:
                        await self.respond(request, answer, accept.media, None, send)
                else:  # the parts, sent within the operation's span
                    await self.send_parts(request, answer, send)
                return
        # A subscription streams outside the operation's span: it is not one request's work.
        assert stream is not None
        if accept.events:
            await serve_sse(state, stream, caller, scope, request.receive, send)
        elif accept.multipart_subscription:
            await serve_multipart_subscription(state, stream, caller, scope, request.receive, send)
        else:
            raise Refused.http(406, "subscriptions are served as text/event-stream (graphql-sse), "
                                    "multipart/mixed;subscriptionSpec=1.0 (Apollo) or over a graphql-transport-ws "
                                    "WebSocket: say which in Accept", "NOT_ACCEPTABLE")

    @staticmethod
    async def respond(request: Request, body: dict[str, Any], media: str, headers: dict[str, str] | None,
                      send: Send, status: int = 200) -> None:
        response = Response(orjson.dumps(body), status_code=status, media_type=media, headers=headers)
        if (consistency := gateway_state(request).consistency) is not None:
            consistency.stamp(request, response)  # the token of what the answer reflected
        await response(request.scope, request.receive, send)

    @staticmethod
    async def send_parts(request: Request, parts: AsyncIterator[dict[str, Any]], send: Send) -> None:
        first = await anext(parts)  # read before the headers: the consistency token says what it reflects
        response = Response(media_type=MULTIPART)  # headers only: the body follows part by part
        if (consistency := gateway_state(request).consistency) is not None:
            consistency.stamp(request, response)
        await send_multipart(send, request.receive, [(k, v) for k, v in response.raw_headers if k != b"content-length"],
                             first, parts)


def _refusal(refused: Refused, media: str) -> tuple[int, dict[str, Any]]:
    """A refusal's status and body. GraphQL over HTTP: with application/graphql-response+json
    a request error is a 400 without `data`; plain JSON keeps 200 and `"data": null` for
    older clients. A refusal of HTTP's own keeps its status and has no `data`."""
    errors = format_errors(refused.errors)
    status = refused.status if refused.status is not None else (400 if media == GRAPHQL_RESPONSE else 200)
    if media == JSON and (refused.status is None or refused.graphql):
        return status, {"data": None, "errors": errors}
    return status, {"errors": errors}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


async def read_params(request: Request) -> Params:
    """The parameters of a GET (in the URL) or a POST (a JSON body)."""
    if request.method == "GET":
        q = request.query_params
        raw: dict[str, Any] = {"query": q.get("query"), "operationName": q.get("operationName"),
                               "documentId": q.get("documentId")}
        for name in ("variables", "extensions"):  # JSON in the URL (GraphQL over HTTP, "GET")
            if q.get(name):
                try:
                    raw[name] = orjson.loads(q[name])
                except orjson.JSONDecodeError:
                    raise Refused.http(400, f"{name} must be a JSON object") from None
        return Params.of(raw, len(request.url.query))
    if request.method != "POST":
        raise Refused.http(405, "GraphQL is served over GET and POST", "METHOD_NOT_ALLOWED",
                           headers={"Allow": "GET, POST"})
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != JSON:
        # GraphQL over HTTP, "POST": the body is application/json; else 415. Refusing the
        # simple content types (text/plain, forms, multipart) also means no browser can post
        # a query cross-site without a CORS preflight (CSRF).
        raise Refused.http(415, "POST bodies must be application/json", "UNSUPPORTED_MEDIA_TYPE")
    body = await request.body()
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise Refused.http(400, "Unable to parse request body as JSON") from None
    return Params.of(raw, len(body))


def _capped(receive: Receive, limit: int, deadline: Deadline) -> Receive:
    """The request body, refused with 413 once it passes `limit` bytes (never buffered whole),
    and with 408 when it has not all come by the request's deadline: a stalled or trickled
    body is not read for longer than the request may last (issue 25). Once the body is in,
    what is received next (a disconnect, for a stream) is waited for without a limit."""
    seen = 0
    whole = False

    async def capped() -> Message:
        nonlocal seen, whole
        if whole:
            return await receive()
        try:
            async with asyncio.timeout(deadline.remaining()):
                message = await receive()
        except TimeoutError:
            # `connection: close`: the rest of the body is not read; the connection cannot carry another request.
            raise Refused.http(408, "the request body did not arrive within the request's deadline",
                               "REQUEST_TIMEOUT", headers={"connection": "close"}) from None
        whole = message["type"] != "http.request" or not message.get("more_body", False)
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise Refused.http(413, f"request bodies are limited to {limit} bytes", "REQUEST_TOO_LARGE")
        return message

    return capped
