"""The document cache's worker process (gateway/documents.py): a new text is parsed and
validated off the event loop's process, with the same outcome as in place."""

from __future__ import annotations

import os
import signal

from graphql import print_ast

from gateway import executable_schema
from gateway.documents import Document, DocumentCache, Limits
from schema import API, SDL_PATH

SCHEMA = executable_schema(API.query, API.mutation)._schema
EXAMPLES = [p.read_text() for p in sorted((SDL_PATH.parent / "examples").glob("*.graphql"))]
TEXTS = [
    *EXAMPLES,
    "query($id: ID!, $full: Boolean!) { order(id: $id) { id payment @include(if: $full) { status } } }",
    "{ book(id: 1) { title ",  # a syntax error, with its location
    "{ book(id: 1) { nope } }",  # a validation error, with its location
    "query A { me { id } } query B { me { name } }",  # two operations
    "{ " + "book(id: 1) { id } " * 300 + "}",  # over the selection limit
    "{ __schema { types { name } } }",  # introspection, refused below
    "{ a " * 3000 + "}" * 3000,  # over the token limit
]


def outcome(document: Document) -> tuple[object, ...]:
    # A refused document keeps only its operations' names and kinds (what the view reads).
    node = document.node
    shape = print_ast(node) if node and not document.errors else (
        [(d.operation.value, d.name.value if d.name else None) for d in node.definitions] if node else None)
    return (document.hash, [e.formatted for e in document.errors], sorted(map(str, document.operations)),
            document.directive_variables, shape, document.validated)


async def test_a_worker_process_loads_documents_as_they_are_loaded_in_place() -> None:
    """Errors (messages, codes, locations), operations, @skip/@include variables and the AST agree (a refused
    document's AST is only its operations' outline)."""
    limits = Limits(introspection=False)
    in_place, away = DocumentCache(SCHEMA, limits), DocumentCache(SCHEMA, limits, workers=1)
    try:
        for text in TEXTS:
            assert outcome(await away.load(text)) == outcome(in_place.get(text)), text[:60]
        assert away.validations == in_place.validations == len(TEXTS) - 3
        assert away._executor is not None and type(away._executor).__name__ == "ProcessPoolExecutor"
    finally:
        await away.aclose()


async def test_a_broken_worker_is_replaced_by_a_thread() -> None:
    """The worker killed: the next new document is still loaded, in a thread, with the same outcome."""
    away = DocumentCache(SCHEMA, workers=1)
    try:
        await away.load(EXAMPLES[0])
        for pid in list(away._executor._processes):  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        loaded = await away.load(TEXTS[-5])
        assert outcome(loaded) == outcome(DocumentCache(SCHEMA).get(TEXTS[-5]))
        assert away.workers == 0
    finally:
        await away.aclose()
