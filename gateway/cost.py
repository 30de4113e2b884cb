"""Cost analysis (README, "Limits and cost"): before anything is fetched, every operation
gets an estimate of the upstream calls it may make and the entities it may fetch, read off
the document, its arguments and variables, and the relations' declarations:

- a relation field reads one key per parent (`order(id)`, `Book.author`), or as many as its
  list argument names (`books(ids)`: the length of the list, inline or in a variable);
- a paged relation (`Customer.orders`) reads one page of `first` items per parent;
- an embedded list (`Order.items`) holds `list_size` items per parent, unless its field
  declares its own estimate (`metadata=estimate(5)`), and a relation may declare how many
  entities one key stands for (`Relation(..., estimate=n)`);
- each relation field costs one call per `maxBatch` keys (the service's batch size).

Entities multiply down the tree: the books of twenty orders of five items are a hundred.
The estimate is an upper bound: it ignores @skip/@include and the de-duplication the
executors do, so a refused operation may well have been cheaper, never the reverse.

Computed in time linear in the document (a fragment spread at the same multiplicity is
counted once, like the limits in `documents.py`) and kept with the document
(`Document.costs`) per operation and variables *shape* (list lengths and integers: what
the estimate reads). It takes well under a millisecond even for the heaviest accepted
documents (95 repeated fields: 0.3 ms), so it runs on the event loop (issue 25)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLList,
    GraphQLNonNull,
    GraphQLSchema,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    get_named_type,
)
from graphql.execution.values import VariableValues, get_argument_values

from .documents import Document
from .relations import RELATION, Relation

__all__ = ["Cost", "CostAnalyzer", "ESTIMATE", "estimate"]

ESTIMATE = "bookvault.estimate"  # strawberry field metadata: items of an embedded list


def estimate(items: int) -> dict[str, int]:
    """Field metadata saying how many items an embedded list holds, for the cost analysis."""
    return {ESTIMATE: items}


@dataclass(frozen=True)
class Cost:
    calls: int
    entities: int

    @property
    def total(self) -> int:
        return self.calls + self.entities

    def as_dict(self, limit: int) -> dict[str, int]:
        return {"cost": self.total, "calls": self.calls, "entities": self.entities, "limit": limit}


class CostAnalyzer:
    """The cost of an operation, or the request error that refuses it (cost over `limit`,
    a list argument over `max_ids`)."""

    def __init__(self, schema: GraphQLSchema, *, limit: int, max_ids: int, list_size: int = 5,
                 batch: Mapping[str, int] | None = None, size: int = 64) -> None:
        self.schema = schema
        self.limit, self.max_ids, self.list_size = limit, max_ids, list_size
        self.batch = dict(batch or {})
        self.size = size  # costs kept per document (`Document.costs`): they go when it goes
        self.computed = 0

    def oversized(self, operation: OperationDefinitionNode, raw: Mapping[str, Any]) -> GraphQLError | None:
        """A list variable longer than `max_ids`, refused before its items are coerced:
        coercing 10,000 ids costs ~50 ms of CPU that the limit would then refuse anyway."""
        for definition in operation.variable_definitions or ():
            value = raw.get(definition.variable.name.value)
            if isinstance(value, list) and len(value) > self.max_ids:
                name = definition.variable.name.value
                return GraphQLError(f"${name} holds {len(value)} items: at most {self.max_ids} per list",
                                    [definition], extensions={"code": "IDS_LIMIT_EXCEEDED", "ids": len(value),
                                                              "limit": self.max_ids})
        return None

    def cost(self, document: Document, operation: OperationDefinitionNode,
             variables: VariableValues) -> Cost | GraphQLError:
        costs: OrderedDict[tuple[Any, ...], Cost | GraphQLError] = document.costs
        key = (operation.name.value if operation.name else None, _shape(variables.coerced))
        found = costs.get(key)
        if found is not None:
            costs.move_to_end(key)
            return found
        try:
            found = _Count(self, document, variables).operation(operation)
            if found.total > self.limit:
                found = GraphQLError(
                    f"The operation's estimated cost is {found.total} (upstream calls and entities it may fetch): "
                    f"the limit is {self.limit}", [operation],
                    extensions={"code": "COST_LIMIT_EXCEEDED", **found.as_dict(self.limit)})
        except GraphQLError as error:
            found = error
        self.computed += 1
        costs[key] = found
        if len(costs) > self.size:
            costs.popitem(last=False)
        return found


def _shape(coerced: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of the variables the estimate reads: list lengths and integers (`first`)."""
    out = []
    for name, value in coerced.items():
        if isinstance(value, list):
            out.append((name, "list", len(value)))
        elif isinstance(value, int) and not isinstance(value, bool):
            out.append((name, value))
    return tuple(out)


class _Count:
    def __init__(self, analyzer: CostAnalyzer, document: Document, variables: VariableValues) -> None:
        assert document.node is not None
        self.analyzer = analyzer
        self.variables = variables
        self.fragments = {d.name.value: d for d in document.node.definitions if isinstance(d, FragmentDefinitionNode)}
        self.memo: dict[tuple[str, int, int | None], tuple[int, int]] = {}

    def operation(self, operation: OperationDefinitionNode) -> Cost:
        root = self.analyzer.schema.get_root_type(operation.operation)
        calls, entities = self.selections(root, operation.selection_set, 1, None)
        # A mutation field is one call to its service, whatever it reads afterwards.
        if operation.operation.value == "mutation":
            calls += len(operation.selection_set.selections)
        return Cost(calls, entities)

    def selections(self, parent: Any, selection_set: SelectionSetNode | None, many: int,
                   page: int | None) -> tuple[int, int]:
        calls = entities = 0
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                c, e = self.field(parent, selection, many, page)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                inner = self.analyzer.schema.get_type(condition.name.value) if condition else parent
                c, e = self.selections(inner, selection.selection_set, many, page)
            elif isinstance(selection, FragmentSpreadNode):
                c, e = self.fragment(selection.name.value, many, page)
            else:
                continue
            calls, entities = calls + c, entities + e
        return calls, entities

    def fragment(self, name: str, many: int, page: int | None) -> tuple[int, int]:
        key = (name, many, page)
        found = self.memo.get(key)
        if found is None:
            definition = self.fragments[name]  # validated: it exists and spreads no cycle
            inner = self.analyzer.schema.get_type(definition.type_condition.name.value)
            found = self.memo[key] = self.selections(inner, definition.selection_set, many, page)
        return found

    def field(self, parent: Any, node: FieldNode, many: int, page: int | None) -> tuple[int, int]:
        fields = getattr(parent, "fields", None)
        field_def: GraphQLField | None = fields.get(node.name.value) if fields else None
        if field_def is None:  # __typename, __schema, __type: answered by the gateway itself
            return 0, 0
        definition = field_def.extensions.get("strawberry-definition")
        metadata = (definition.metadata or {}) if definition is not None else {}
        relation: Relation | None = metadata.get(RELATION)
        named = get_named_type(field_def.type)
        calls = entities = 0
        inner_page = None
        if relation is not None:
            args = get_argument_values(field_def, node, self.variables)
            keys = many
            if relation.arg is not None and relation.many:
                count = len(args.get(relation.arg) or ())
                if count > self.analyzer.max_ids:
                    raise GraphQLError(f"'{node.name.value}' names {count} ids: at most {self.analyzer.max_ids} "
                                       "ids per field", [node],
                                       extensions={"code": "IDS_LIMIT_EXCEEDED", "ids": count,
                                                   "limit": self.analyzer.max_ids})
                keys = many * count
            batch = max(1, self.analyzer.batch.get(relation.binding.service, 100))
            calls = -(-keys // batch)
            if relation.paged:
                inner_page = int(args.get("first") or 10)
                entities = keys * inner_page
                many = keys  # the page's own fields: once per page; its lists: `first` items
            else:
                many = keys * (relation.estimate or 1)
                entities = many
        elif _is_list(field_def.type) and not _is_leaf(named):
            many *= page if page is not None else metadata.get(ESTIMATE, self.analyzer.list_size)
        if node.selection_set is None:
            return calls, entities
        c, e = self.selections(named, node.selection_set, many, inner_page)
        return calls + c, entities + e


def _is_list(t: Any) -> bool:
    if isinstance(t, GraphQLNonNull):
        t = t.of_type
    return isinstance(t, GraphQLList)


def _is_leaf(t: Any) -> bool:
    return not hasattr(t, "fields")
