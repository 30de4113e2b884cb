"""Subscriptions, declared and planned (ARCHITECTURE.md, "Live updates").

A subscription field declares what it follows with `Live`, as a relation field declares
its keys: the binding whose changes it reports, where the key comes from (an argument, or
every entity the caller owns), and the Query field that reads one such entity by id.

Its payload is shaped by the planned engine: the subscription's selection is planned once
per document as the query ``query { <key>: order(id: ...) { <selection> } }`` (the text is
made here and goes through the document cache, so limits, validation, cost and the plan
cache apply as for any query). The hub (gateway/hub.py) runs that plan once per change
and per distinct document and variables, over one shared read, whatever the number of
subscribers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    Visitor,
    print_ast,
    value_from_ast,
    visit,
)
from graphql.execution.values import VariableValues, get_variable_values

from .cost import CostAnalyzer
from .documents import Document, DocumentCache
from .errors import BadUserInput, GatewayError
from .plan import Plan, Planner
from .relations import int_id
from .source import Binding, Reader

__all__ = ["LIVE", "Live", "Feed", "declared", "follow", "prepare"]

LIVE = "bookvault-live"
KEY_VARIABLE = "bvLiveKey"  # the synthesized query's variable for the changed entity's id
# Synthesized query texts by (document hash, operation name): printing a wide selection
# costs ~2 ms, once per document rather than per subscribe (issue 25: a hundred subscribe
# messages of one document in one read).
_QUERIES: OrderedDict[tuple[str, str | None], str] = OrderedDict()
_MAX_QUERIES = 1024


@dataclass(frozen=True)
class Live:
    """How a subscription field follows `binding`'s entities: the one named by argument
    `arg`, or (`arg` None) every one whose `owner` attribute is the caller's customer.
    `related` bindings are cached under the followed entity's key (a payment under its
    order's id, `Binding.feed_key`): their events change what the subscriber sees too.
    `query_field` is the Query field that reads one such entity by its `id` argument.
    `current` (caller-wide subscriptions): the keys of the customer's entities its first
    messages show, read through the hub's reader."""

    binding: Binding
    query_field: str
    owner: str
    arg: str | None = None
    related: tuple[Binding, ...] = ()
    current: Callable[[Reader, int], Awaitable[list[int]]] | None = None

    def metadata(self) -> dict[str, Live]:
        return {LIVE: self}


def declared(schema: GraphQLSchema) -> list[Live]:
    """The `Live` declarations of the schema's subscription fields."""
    root = schema.subscription_type
    found = []
    for field_def in root.fields.values() if root is not None else ():
        definition = field_def.extensions.get("strawberry-definition")
        live = (definition.metadata or {}).get(LIVE) if definition is not None else None
        if live is not None:
            found.append(live)
    return found


async def follow(*_: Any, **__: Any) -> AsyncGenerator[Any, None]:
    """The body of every live field: the hub serves them (gateway/hub.py), not graphql-core's
    subscription execution; this is here so that the schema has a subscription type."""
    raise GatewayError("subscriptions are served over graphql-transport-ws and graphql-sse")
    yield  # an async generator, as strawberry requires of a subscription


@dataclass(eq=False)
class Feed:
    """One subscription request, planned: what is followed (`key`, or the caller's entities),
    the plan of its payload, and `group`: subscriptions with the same document, operation
    and variables get the same payload for the same change, shaped once."""

    live: Live
    document: Document  # the synthesized query
    plan: Plan
    variables: dict[str, Any]  # as sent
    key: int | None
    group: tuple[Any, ...]
    watched: tuple[Binding, ...] = ()  # `live.related` bindings the plan reads (their versions order messages)
    _coerced: dict[int, VariableValues] = field(default_factory=dict)

    def variables_for(self, schema: Any, key: int) -> VariableValues:
        """The synthesized query's variables for entity `key` (coerced once per key)."""
        found = self._coerced.get(key)
        if found is None:
            if len(self._coerced) > 64:
                self._coerced.clear()
            found = self._coerced[key] = _coerce(schema, self.document, self.live, self.variables, key)
        return found


def _coerce(schema: Any, document: Document, live: Live, variables: dict[str, Any], key: int) -> VariableValues:
    values = variables if live.arg else {**variables, KEY_VARIABLE: str(key)}
    operation = document.operation(None)
    assert isinstance(operation, OperationDefinitionNode)
    coerced = get_variable_values(schema, operation.variable_definitions or (), values)
    if not isinstance(coerced, VariableValues):
        raise BadUserInput(coerced[0].message)
    return coerced


async def prepare(documents: DocumentCache, costs: CostAnalyzer, planner: Planner, document: Document,
                  operation: OperationDefinitionNode, variables: dict[str, Any], coerced: VariableValues
                  ) -> Feed | list[GraphQLError]:
    """An admitted subscription (gateway/pipeline.py) as a `Feed`, or the errors that refuse
    it: its payload's query goes through the same document cache, cost and planner."""
    root = operation.selection_set.selections
    if len(root) != 1 or not isinstance(root[0], FieldNode) or root[0].directives:
        return [_refusal("a subscription selects exactly one field, without directives or fragments")]
    node = root[0]
    schema = documents.schema
    subscription = schema.subscription_type
    field_def = subscription.fields.get(node.name.value) if subscription is not None else None
    definition = field_def.extensions.get("strawberry-definition") if field_def is not None else None
    live: Live | None = (definition.metadata or {}).get(LIVE) if definition is not None else None
    if live is None or field_def is None:
        return [_refusal(f"{node.name.value} is not a live field")]
    planned = await documents.load(_query_of(document, operation, node, live))
    if planned.errors:
        return planned.errors
    key = None
    try:
        if live.arg is not None:
            args = {a.name.value: a for a in node.arguments or ()}
            key = int_id(value_from_ast(args[live.arg].value, field_def.args[live.arg].type, coerced.coerced))
        values = _coerce(schema, planned, live, variables, key or 1)
    except GatewayError as exc:
        return [GraphQLError(str(exc), extensions=exc.extensions)]
    query_operation = planned.operation(None)
    assert isinstance(query_operation, OperationDefinitionNode)
    cost = costs.cost(planned, query_operation, values)
    if isinstance(cost, GraphQLError):
        return [cost]
    plan = planner.plan(planned, query_operation, values)
    if plan is None:
        return [_refusal("this selection cannot be followed live (introspection or abstract types)")]
    bindings = {id(f.relation.binding) for g in plan.groups for f in g.fields if f.relation is not None}
    return Feed(live, planned, plan, variables, key,
                (planned.hash, orjson.dumps(variables, option=orjson.OPT_SORT_KEYS), key),
                tuple(b for b in live.related if id(b) in bindings))


def _query_of(document: Document, operation: OperationDefinitionNode, node: FieldNode, live: Live) -> str:
    """`_as_query`, remembered per document and operation (the text says all of it)."""
    key = (document.hash, operation.name.value if operation.name else None)
    text = _QUERIES.get(key)
    if text is None:
        text = _QUERIES[key] = _as_query(document, operation, node, live)
        if len(_QUERIES) > _MAX_QUERIES:
            _QUERIES.popitem(last=False)
    else:
        _QUERIES.move_to_end(key)
    return text


def _as_query(document: Document, operation: OperationDefinitionNode, node: FieldNode, live: Live) -> str:
    """The subscription's selection as a query reading one entity with `live.query_field`."""
    alias = node.alias.value if node.alias else node.name.value
    definitions = [print_ast(v) for v in operation.variable_definitions or ()]
    if live.arg is not None:
        args = ", ".join(print_ast(a) for a in node.arguments or ())
    else:
        definitions.append(f"${KEY_VARIABLE}: ID!")
        args = f"id: ${KEY_VARIABLE}"
    head = f"query({', '.join(definitions)})" if definitions else "query"
    selection = print_ast(node.selection_set) if node.selection_set else ""
    fragments = _fragments(document, node)
    return "\n".join([f"{head} {{ {alias}: {live.query_field}({args}) {selection} }}", *map(print_ast, fragments)])


def _fragments(document: Document, node: FieldNode) -> list[FragmentDefinitionNode]:
    """The fragments `node` spreads, directly or through other fragments (others would be unused)."""
    assert document.node is not None
    defined = {d.name.value: d for d in document.node.definitions if isinstance(d, FragmentDefinitionNode)}
    found: dict[str, FragmentDefinitionNode] = {}
    pending: list[Any] = [node]

    class Spreads(Visitor):
        def enter_fragment_spread(self, spread: FragmentSpreadNode, *_: Any) -> None:
            name = spread.name.value
            if name in defined and name not in found:
                found[name] = defined[name]
                pending.append(defined[name])

    while pending:
        visit(pending.pop(), Spreads())
    return list(found.values())


def _refusal(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "BAD_REQUEST"})
