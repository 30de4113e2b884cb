"""The document cache (ARCHITECTURE.md, "Front door"): a query text is parsed, checked
against the limits and validated once; every later request with the same text reuses the
result, errors included.

Every limit is computed in time linear in the document: a fragment's depth and alias count
are computed once and reused at each spread, so a document of fragments that each spread
the next twice costs one pass, not 2^n (strawberry's limiters expand every spread). The
limits run before validation, so a hostile document is refused before graphql-core's
validation walks it.

Validation is not linear: graphql-core's OverlappingFieldsCanBeMerged compares every pair
of fields with one response name, so a few hundred repeated fields cost a second of CPU.
The length and selection limits bound that work, and a document not yet cached is parsed
and validated in a worker process (`load`): in a thread it would still share the GIL with
the event loop, and under a stream of hostile documents the loop then waited 100-300 ms at a
time (bench/hostile_bench.py, `loopLagUnderHostileLoad`). The worker gets the schema as SDL
and sends back the parsed document (graphql-core's AST pickles) and its errors as plain
data. Workers are forked from a fork server that has this module imported, so a new one
costs milliseconds; if the pool breaks, loads fall back to a thread. Concurrent requests
with one new text share one load.

What is kept is what the cyclic garbage collector walks, and its full collections hold the
event loop for as long as that takes (about 0.5 µs per object here): a stream of new texts
once held it 100-260 ms at a time, while the cost and plan of a new document take a few
milliseconds at most (issue 25, bench/hostile_bench.py). So a document carries its plans
and costs (`Document.plans`, `.costs`: they go with it), its AST keeps no tokens
(graphql-core links every token of the text to the next: the AST is acyclic without them,
and a fifth smaller), and a text seen once is not admitted among the kept ones: it waits in
a small window (`window` texts, `window_chars` characters), and only a second sight keeps it
(a "doorkeeper", as TinyLFU admits entries). A client sending a new text each time leaves
nothing behind; the app sets its startup heap aside from the collector (`gc.freeze`,
gateway/app.py), so a full collection walks only what requests keep.

Every error carries a code a client can act on: GRAPHQL_PARSE_FAILED,
GRAPHQL_VALIDATION_FAILED, INTROSPECTION_DISABLED, or the limit it broke."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    REMOVE,
    DirectiveNode,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    GraphQLSyntaxError,
    InlineFragmentNode,
    Node,
    NoSchemaIntrospectionCustomRule,
    OperationDefinitionNode,
    SelectionSetNode,
    Source,
    VariableNode,
    Visitor,
    build_schema,
    parse,
    print_schema,
    specified_rules,
    validate,
    visit,
)

__all__ = ["Document", "DocumentCache", "Limits"]

log = logging.getLogger("bookvault.documents")


@dataclass(frozen=True)
class Limits:
    """Per document (README, "Limits and cost"): characters of the text, lexical tokens, field
    depth, aliases, and selections (fields, fragment spreads, inline fragments, as written)."""

    max_length: int = 32_768
    max_tokens: int = 5000
    max_depth: int = 12
    max_aliases: int = 50
    max_selections: int = 200
    introspection: bool = True  # off: __schema and __type are refused, and no "Did you mean" hints


@dataclass
class Document:
    """One query text, parsed, checked and validated: `errors` is empty when it may run."""

    text: str
    hash: str  # SHA-256 of the text, the id persisted queries use
    node: DocumentNode | None = None
    errors: list[GraphQLError] = field(default_factory=list)
    operations: dict[str | None, OperationDefinitionNode] = field(default_factory=dict)
    # Variables that @skip/@include/@defer/@stream read: the only ones that change the plan.
    directive_variables: tuple[str, ...] = ()
    validated: bool = False  # within the limits, so graphql-core's validation ran
    # The document without @defer and @stream, for the reference execution, which ignores
    # them (ARCHITECTURE.md, "Incremental delivery"); `node` itself when it has none.
    plain: DocumentNode | None = None
    # What is worked out from it, kept with it and dropped with it (see the module doc): its
    # plans (gateway/plan.py) and costs (gateway/cost.py), each by operation and variables.
    plans: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict, repr=False)
    costs: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict, repr=False)

    def operation(self, name: str | None) -> OperationDefinitionNode | GraphQLError:
        if name is None:
            if len(self.operations) == 1:
                return next(iter(self.operations.values()))
            return GraphQLError("Must provide operation name if query contains multiple operations.")
        found = self.operations.get(name)
        return found if found is not None else GraphQLError(f"Unknown operation named '{name}'.")


class DocumentCache:
    """`size` texts kept once seen twice, and a window of texts seen once (`window` of them,
    `window_chars` characters; the newest always), least recently used out first;
    `validations` counts documents validated; `workers` processes load new texts (0: a
    thread, as in tests that need no isolation)."""

    def __init__(self, schema: GraphQLSchema, limits: Limits | None = None, size: int = 512,
                 workers: int = 0, window: int = 8, window_chars: int = 16_384) -> None:
        self.schema = schema
        self.limits = limits or Limits()
        self.size = size
        self.workers = workers
        self.window, self.window_chars = window, window_chars
        self.validations = 0
        self._documents: OrderedDict[str, Document] = OrderedDict()
        self._window: OrderedDict[str, Document] = OrderedDict()  # seen once
        self._window_length = 0
        self._loading: dict[str, asyncio.Future[Document]] = {}
        self._rules = _rules(self.limits)
        self._executor: Executor | None = None
        self._starting: asyncio.Future[Any] | None = None  # the worker process being started

    def get(self, text: str) -> Document:
        """The document of `text`, loaded on the calling thread if it is not cached."""
        document = self.cached(text)
        if document is None:
            document = self._seen(text, self._load(text))
        return document

    def cached(self, text: str) -> Document | None:
        """The document of `text` if it is kept, or seen once (then it is kept from now on)."""
        document = self._documents.get(text)
        if document is not None:
            self._documents.move_to_end(text)
            return document
        document = self._window.pop(text, None)
        if document is not None:
            self._window_length -= len(text)
            self._store(text, document)
        return document

    async def load(self, text: str) -> Document:
        """The document of `text`; a new text is loaded in a worker process, once however many
        requests ask for it meanwhile (cancelling one request leaves the load to the others)."""
        document = self.cached(text)
        if document is not None:
            return document
        flight = self._loading.get(text)
        if flight is None:
            flight = asyncio.ensure_future(self._away(text))
            self._loading[text] = flight
            flight.add_done_callback(lambda f: self._landed(text, f))
        return await asyncio.shield(flight)

    def start(self) -> asyncio.Future[Any]:
        """Start the worker in the background (the app's lifespan calls this): the fork server
        imports the gateway (~0.5 s), and starting a process blocks whoever starts it, so
        it is done from a thread, once, before any document is sent to it."""
        if self._starting is None:
            executor = self._processes()
            self._starting = asyncio.ensure_future(asyncio.to_thread(executor.submit, _warm))
            # Closed while starting (a short-lived app): the next load, if any, says why.
            self._starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._starting

    async def ready(self) -> None:
        """Until the worker started by `start` has answered (or failed to start: new
        documents are then loaded in a thread); at once when none was started."""
        if self._starting is None:
            return
        await asyncio.wait([self._starting])
        if not self._starting.cancelled() and self._starting.exception() is None:
            await asyncio.wait([asyncio.wrap_future(self._starting.result())])

    def _processes(self) -> Executor:
        if self._executor is None:
            # forkserver: a worker is forked from a clean process with this module loaded,
            # never from this one (its threads and event loop do not survive a fork).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                                 initargs=(print_schema(self.schema), self.limits, os.getpid()))
        return self._executor

    async def _away(self, text: str) -> Document:
        """`text` loaded off the event loop: in a worker process, or a thread."""
        loop = asyncio.get_running_loop()
        if self.workers and not isinstance(self._executor, ThreadPoolExecutor):
            try:
                await self.start()
                wire = await loop.run_in_executor(self._executor, _load_in_worker, text)
                if wire[3]:
                    self.validations += 1
                return _from_wire(text, wire)
            except (BrokenProcessPool, OSError, RuntimeError) as exc:  # broken, or shut down under us
                log.warning("document workers failed (%s): new documents are loaded in a thread", type(exc).__name__)
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
                self.workers = 0
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="bookvault-documents")
        return await loop.run_in_executor(self._executor, self._load, text)

    def _landed(self, text: str, flight: asyncio.Future[Document]) -> None:
        self._loading.pop(text, None)
        if not flight.cancelled() and flight.exception() is None:
            self._seen(text, flight.result())

    def _seen(self, text: str, document: Document) -> Document:
        """A text seen for the first time waits in the window: a second sight keeps it."""
        self._window[text] = document
        self._window_length += len(text)
        while len(self._window) > 1 and (len(self._window) > self.window or self._window_length > self.window_chars):
            self._window_length -= len(self._window.popitem(last=False)[0])
        return document

    def _store(self, text: str, document: Document) -> Document:
        self._documents[text] = document
        if len(self._documents) > self.size:
            self._documents.popitem(last=False)
        return document

    async def aclose(self) -> None:
        """Stop the worker and wait for it to exit (off the event loop): a process killed by
        its stop signal right after the lifespan runs no exit handlers to do it."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)

    def _load(self, text: str) -> Document:
        document = _load(text, self.schema, self.limits, self._rules)
        if document.validated:
            self.validations += 1
        return document


def _rules(limits: Limits) -> list[Any]:
    return [*specified_rules, *([] if limits.introspection else [NoSchemaIntrospectionCustomRule])]


def _load(text: str, schema: GraphQLSchema, limits: Limits, rules: list[Any]) -> Document:
    document = Document(text, hashlib.sha256(text.encode()).hexdigest())
    if len(text) > limits.max_length:
        # Checked before parsing: the lexer's time grows with the text, tokens or not.
        document.errors = [GraphQLError(f"The document has {len(text)} characters: the limit is "
                                        f"{limits.max_length}", extensions={"code": "LENGTH_LIMIT_EXCEEDED"})]
        return document
    try:
        document.node = parse(text, max_tokens=limits.max_tokens)
    except GraphQLSyntaxError as error:
        document.errors = [_parse_error(error, limits.max_tokens)]
        return document
    document.operations = {d.name.value if d.name else None: d for d in document.node.definitions
                           if isinstance(d, OperationDefinitionNode)}
    document.errors = _check(document.node, limits)
    if not document.errors:
        document.validated = True
        document.errors = [_coded(e, "GRAPHQL_VALIDATION_FAILED") for e in
                           validate(schema, document.node, rules, max_errors=50,
                                    hide_suggestions=not limits.introspection)]
    if not document.errors:
        document.directive_variables = _directive_variables(document.node)
        document.plain = _plain(text, document.node)
    _drop_tokens(document.node)
    return document


def _drop_tokens(root: Node) -> None:
    """Unlink every node's location from the text's tokens: only `start`, `end` and `source`
    are read after validation (an error's locations), and graphql-core chains the tokens of
    a whole text together (`prev`, `next`), so a kept AST would keep them all, in cycles."""
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        loc = node.loc
        if loc is not None:
            loc.start_token = loc.end_token = None
        for key in node.keys:
            value = getattr(node, key, None)
            if isinstance(value, Node):
                stack.append(value)
            elif isinstance(value, (tuple, list)):
                stack.extend(v for v in value if isinstance(v, Node))


# -- the worker process ------------------------------------------------------------------

_WORKER: tuple[GraphQLSchema, Limits, list[Any]] | None = None  # this worker process's schema and limits
Wire = tuple[DocumentNode | None, list[tuple[str, list[int] | None, dict[str, Any] | None]], tuple[str, ...], bool]


def _start_worker(sdl: str, limits: Limits, gateway: int) -> None:
    global _WORKER
    # Ctrl-C reaches the whole process group: the gateway stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER = (build_schema(sdl), limits, _rules(limits))
    threading.Thread(target=_exit_with, args=(gateway,), daemon=True, name="gateway-watch").start()


def _exit_with(gateway: int) -> None:
    """Exit when the gateway does. A worker is the fork server's child and holds its own
    queue's pipes, so nothing tells it that a gateway killed (SIGKILL, or a re-raised stop
    signal) is gone; it would live on, holding the gateway's stderr."""
    try:
        pidfd = os.pidfd_open(gateway)  # Linux: readable once the process has exited
        select.select([pidfd], [], [])
    except (AttributeError, OSError):  # no pidfd here: look every second
        while True:
            time.sleep(1.0)
            try:
                os.kill(gateway, 0)
            except ProcessLookupError:
                break
    os._exit(0)


def _warm() -> None:
    """Nothing: submitted once so that the worker starts before the first document needs it."""


def _load_in_worker(text: str) -> Wire:
    """`_load` in a worker, as plain data: errors do not pickle with their locations."""
    assert _WORKER is not None
    document = _load(text, *_WORKER)
    errors = [(e.message, e.positions, e.extensions) for e in document.errors]
    node = _outline(document.node) if document.errors and document.node is not None else document.node
    return node, errors, document.directive_variables, document.validated


def _outline(node: DocumentNode) -> DocumentNode:
    """A refused document's operations without their selections: what the view still reads
    (names and kinds) is kept, and a large hostile AST is not unpickled on the event loop."""
    return DocumentNode(definitions=tuple(
        OperationDefinitionNode(operation=d.operation, name=d.name, variable_definitions=(), directives=(),
                                selection_set=SelectionSetNode(selections=()))
        for d in node.definitions if isinstance(d, OperationDefinitionNode)))


def _from_wire(text: str, wire: Wire) -> Document:
    node, errors, directive_variables, validated = wire
    document = Document(text, hashlib.sha256(text.encode()).hexdigest(), node, validated=validated,
                        directive_variables=directive_variables)
    source = Source(text)
    document.errors = [GraphQLError(message, source=source, positions=positions, extensions=extensions)
                       for message, positions, extensions in errors]
    if node is not None:
        document.operations = {d.name.value if d.name else None: d for d in node.definitions
                               if isinstance(d, OperationDefinitionNode)}
        if not errors:
            document.plain = _plain(text, node)
    return document


def _parse_error(error: GraphQLSyntaxError, max_tokens: int) -> GraphQLError:
    # graphql-core reports its token limit as a syntax error; it is a limit, said as one.
    if "tokens. Parsing aborted" in error.message:
        return GraphQLError(f"The document has more than {max_tokens} tokens: the limit is {max_tokens}",
                            extensions={"code": "TOKEN_LIMIT_EXCEEDED", "limit": max_tokens})
    return _coded(error, "GRAPHQL_PARSE_FAILED")


def _coded(error: GraphQLError, code: str) -> GraphQLError:
    if error.extensions and "code" in error.extensions:
        return error
    if error.message.startswith("GraphQL introspection has been disabled"):
        code = "INTROSPECTION_DISABLED"
    elif error.message == "Maximum introspection depth exceeded":  # graphql-core's own rule, the same bound
        code = "INTROSPECTION_LIMIT_EXCEEDED"
    error.extensions = {**(error.extensions or {}), "code": code}
    return error


def _check(node: DocumentNode, limits: Limits) -> list[GraphQLError]:
    selections = _selections(node)
    if selections > limits.max_selections:
        return [GraphQLError(f"The document has {selections} selections (fields and fragments): the limit is "
                             f"{limits.max_selections}", extensions={"code": "FIELD_LIMIT_EXCEEDED",
                                                                      "limit": limits.max_selections})]
    fragments = {d.name.value: d for d in node.definitions if isinstance(d, FragmentDefinitionNode)}
    measure = _Measure(fragments)
    errors = []
    for definition in node.definitions:
        if not isinstance(definition, OperationDefinitionNode):
            continue
        size = measure.selections(definition.selection_set)
        name = definition.name.value if definition.name else "anonymous"
        if size.depth > limits.max_depth:
            errors.append(GraphQLError(f"'{name}' exceeds maximum operation depth of {limits.max_depth}",
                                       [definition], extensions={"code": "DEPTH_LIMIT_EXCEEDED", "limit": limits.max_depth}))
        if size.aliases > limits.max_aliases:
            errors.append(GraphQLError(f"{size.aliases if size.aliases < 10**6 else 'more than a million'} aliases "
                                       f"found. Allowed: {limits.max_aliases}", [definition],
                                       extensions={"code": "ALIAS_LIMIT_EXCEEDED", "limit": limits.max_aliases}))
        lists, of_type = size.worst
        for found, bound, what in ((size.roots, MAX_INTROSPECTION_ROOTS, "__schema and __type fields"),
                                   (lists, MAX_INTROSPECTION_LISTS, "nested lists of fields, interfaces, possibleTypes "
                                                                    "or inputFields"),
                                   (of_type, MAX_OF_TYPE, "nested ofType fields")):
            if found > bound:
                errors.append(GraphQLError(f"'{name}' has {found} {what}: introspection allows {bound}", [definition],
                                           extensions={"code": "INTROSPECTION_LIMIT_EXCEEDED", "limit": bound}))
    return errors


def _selections(node: DocumentNode) -> int:
    """Fields, fragment spreads and inline fragments as written (each fragment once)."""
    count, stack = 0, [d.selection_set for d in node.definitions if getattr(d, "selection_set", None)]
    while stack:
        selection_set = stack.pop()
        for selection in selection_set.selections:
            count += 1
            if getattr(selection, "selection_set", None) is not None:
                stack.append(selection.selection_set)
    return count


# Introspection is bounded on its own terms (README, "Limits and cost"): its queries are deep
# by nature (graphql-js's getIntrospectionQuery is 15 fields deep, 9 of them `ofType`), so
# the fields under `__schema` and `__type` count as one level of depth, and are bounded
# instead by what makes introspection expensive, as GraphQL Armor and Apollo Router do:
# nested lists of the schema's types (graphql-js's MaxIntrospectionDepthRule: 3 is too
# many), the `ofType` chain, and how many times the schema is introspected per operation.
INTROSPECTION_ROOTS = frozenset({"__schema", "__type"})
INTROSPECTION_LISTS = frozenset({"fields", "interfaces", "possibleTypes", "inputFields"})
MAX_INTROSPECTION_LISTS = 2  # getIntrospectionQuery nests 1 (a type's fields' args are not counted)
MAX_OF_TYPE = 16  # getIntrospectionQuery's typeDepth is 9 by default; [[[Int!]!]!]! needs 6
MAX_INTROSPECTION_ROOTS = 3  # `__schema` and `__type` fields per operation, spreads counted


@dataclass(frozen=True)
class _Size:
    """What the limits measure of a selection set: `depth` (an introspection field counts
    one), `aliases`, `roots` (`__schema`/`__type` fields), and, along its deepest paths,
    `lists` and `of_type` (introspection list fields and `ofType` fields); `worst` is the
    greatest (lists, of_type) under any introspection root within it."""

    depth: int = 0
    aliases: int = 0
    roots: int = 0
    lists: int = 0
    of_type: int = 0
    worst: tuple[int, int] = (0, 0)

    def join(self, other: _Size) -> _Size:
        return _Size(max(self.depth, other.depth), self.aliases + other.aliases, self.roots + other.roots,
                     max(self.lists, other.lists), max(self.of_type, other.of_type),
                     (max(self.worst[0], other.worst[0]), max(self.worst[1], other.worst[1])))


_EMPTY = _Size()


class _Measure:
    """The `_Size` of selection sets, each fragment measured once (a fragment's size does
    not depend on where it is spread)."""

    def __init__(self, fragments: dict[str, FragmentDefinitionNode]) -> None:
        self.fragments = fragments
        self.memo: dict[str, _Size] = {}
        self.visiting: set[str] = set()

    def selections(self, selection_set: SelectionSetNode | None) -> _Size:
        size = _EMPTY
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                size = size.join(self.field(selection))
            elif isinstance(selection, InlineFragmentNode):
                size = size.join(self.selections(selection.selection_set))
            elif isinstance(selection, FragmentSpreadNode):
                size = size.join(self.fragment(selection.name.value))
        return size

    def field(self, node: FieldNode) -> _Size:
        inner = self.selections(node.selection_set)
        name, alias = node.name.value, node.alias is not None
        if name in INTROSPECTION_ROOTS:
            worst = (max(inner.worst[0], inner.lists), max(inner.worst[1], inner.of_type))
            return _Size(1, inner.aliases + alias, inner.roots + 1, 0, 0, worst)
        return _Size(inner.depth + 1, inner.aliases + alias, inner.roots,
                     inner.lists + (name in INTROSPECTION_LISTS), inner.of_type + (name == "ofType"), inner.worst)

    def fragment(self, name: str) -> _Size:
        if name in self.memo:
            return self.memo[name]
        definition = self.fragments.get(name)
        if definition is None or name in self.visiting:
            return _EMPTY  # unknown or cyclic: validation says so
        self.visiting.add(name)
        self.memo[name] = self.selections(definition.selection_set)
        self.visiting.discard(name)
        return self.memo[name]


def _directive_variables(node: DocumentNode) -> tuple[str, ...]:
    found: set[str] = set()

    def visit(n: Any) -> None:
        for directive in getattr(n, "directives", None) or ():
            if directive.name.value in ("skip", "include", "defer", "stream"):
                for argument in directive.arguments or ():
                    if isinstance(argument.value, VariableNode):
                        found.add(argument.value.name.value)
        selection_set = getattr(n, "selection_set", None)
        for child in selection_set.selections if selection_set else ():
            visit(child)

    for definition in node.definitions:
        visit(definition)
    return tuple(sorted(found))


class _Incremental(Visitor):
    def enter_directive(self, node: DirectiveNode, *_: Any) -> Any:
        return REMOVE if node.name.value in ("defer", "stream") else None


def _plain(text: str, node: DocumentNode) -> DocumentNode:
    # (`@ defer` is a directive too: the name alone decides whether to look.)
    return visit(node, _Incremental()) if "defer" in text or "stream" in text else node  # type: ignore[no-any-return]
