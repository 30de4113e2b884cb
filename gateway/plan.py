"""The planner (ARCHITECTURE.md, "Plan, then execute"): an operation, with the values of the
variables its @skip/@include read, becomes a tree of `Field`s with fragments merged,
directives applied and every field's getter, serializer and nullability resolved; each
relation field knows which relations below it can be read in its own level (their keys are
its keys) and which must wait for its data.

`Planner.plan` returns None for what the planned engine does not cover (introspection
below the root's `__typename`, abstract types, nested lists, resolvers with arguments that
declare no relation, operations other than queries): those run through graphql-core, the
reference execution, never wrongly."""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLField,
    GraphQLIncludeDirective,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    GraphQLSkipDirective,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    is_leaf_type,
)
from graphql.execution.values import VariableValues, get_argument_values, get_directive_values

from .documents import Document
from .relations import RELATION, Relation

__all__ = ["Field", "Group", "Plan", "Planner", "Unsupported", "LEAF", "OBJECT", "RELATION_FIELD", "TYPENAME"]

LEAF, OBJECT, RELATION_FIELD, TYPENAME = range(4)


class Unsupported(Exception):
    """Something the planned engine leaves to the reference execution."""


@dataclass(eq=False)
class Field:
    key: str  # the response key (alias or name)
    nodes: tuple[FieldNode, ...]
    kind: int
    parent_type: GraphQLObjectType
    field_def: GraphQLField | None  # None for __typename
    get: Callable[[Any], Any] | None = None  # attribute or argument-less resolver
    serialize: Callable[[Any], Any] | None = None
    # A leaf value of exactly this Python type is its own serialization (str for String
    # and ID, int for Int, bool for Boolean): no serializer call for the common case.
    native: type | None = None
    non_null: bool = False
    is_list: bool = False
    item_non_null: bool = False
    children: tuple[Field, ...] = ()
    relation: Relation | None = None
    static_args: dict[str, Any] | None = None  # arguments without variables, coerced once
    # For relation fields: where the keys come from. `parent` is the relation field above
    # (None: the keys are in the arguments); `same` says the keys are the parent's own keys
    # (read in the parent's level), else they are read off the parent's entities through
    # the embedded fields `path`.
    parent: Field | None = None
    same: bool = False
    path: tuple[Field, ...] = ()

    @property
    def name(self) -> str:
        return self.nodes[0].name.value


@dataclass(frozen=True)
class Group:
    """The reads of one binding in one level: one `Reader.read` for all its fields' keys,
    started as soon as the groups its keys come from (`after`, indexes) are read."""

    level: int
    fields: tuple[Field, ...]
    after: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    root: tuple[Field, ...]
    groups: tuple[Group, ...]  # by level; a group only waits for groups before it


class Planner:
    def __init__(self, schema: GraphQLSchema, size: int = 1024) -> None:
        self.schema = schema
        self.size = size
        self._plans: OrderedDict[tuple[Any, ...], Plan | None] = OrderedDict()
        self.planned = 0

    def plan(self, document: Document, operation: OperationDefinitionNode, variables: VariableValues) -> Plan | None:
        """The plan of `operation`, made once per document, operation and directive values."""
        key = (document.hash, operation.name.value if operation.name else None, *(variables.coerced.get(v) for v in document.directive_variables))
        try:
            plan = self._plans[key]
            self._plans.move_to_end(key)
            return plan
        except KeyError:
            pass
        try:
            plan = _Build(self.schema, document, variables).operation(operation)
        except Unsupported:
            plan = None
        self.planned += 1
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan


class _Build:
    def __init__(self, schema: GraphQLSchema, document: Document, variables: VariableValues) -> None:
        self.schema = schema
        self.variables = variables
        assert document.node is not None
        self.fragments = {d.name.value: d for d in document.node.definitions if isinstance(d, FragmentDefinitionNode)}

    def operation(self, operation: OperationDefinitionNode) -> Plan:
        if operation.operation is not OperationType.QUERY or self.schema.query_type is None:
            raise Unsupported
        root = self.selection(self.schema.query_type, [operation.selection_set])
        return Plan(root, _groups(root))

    def selection(self, parent: GraphQLObjectType, sets: list[SelectionSetNode]) -> tuple[Field, ...]:
        grouped: OrderedDict[str, list[FieldNode]] = OrderedDict()
        for selection_set in sets:
            self.collect(parent, selection_set, grouped, set())
        return tuple(self.field(parent, key, nodes) for key, nodes in grouped.items())

    def collect(self, parent: GraphQLObjectType, selection_set: SelectionSetNode,
                grouped: OrderedDict[str, list[FieldNode]], visited: set[str]) -> None:
        """graphql-core's CollectFields: directives, fragments once per selection set."""
        for selection in selection_set.selections:
            if not self.included(selection):
                continue
            if isinstance(selection, FieldNode):
                key = selection.alias.value if selection.alias else selection.name.value
                grouped.setdefault(key, []).append(selection)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                if condition is None or condition.name.value == parent.name:
                    self.collect(parent, selection.selection_set, grouped, visited)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                fragment = self.fragments.get(name)
                if name in visited or fragment is None:
                    continue
                visited.add(name)
                if fragment.type_condition.name.value == parent.name:
                    self.collect(parent, fragment.selection_set, grouped, visited)

    def included(self, node: Any) -> bool:
        if not node.directives:
            return True
        skip = get_directive_values(GraphQLSkipDirective, node, self.variables)
        if skip is not None and skip["if"] is True:
            return False
        include = get_directive_values(GraphQLIncludeDirective, node, self.variables)
        return not (include is not None and include["if"] is False)

    def field(self, parent: GraphQLObjectType, key: str, nodes: list[FieldNode]) -> Field:
        name = nodes[0].name.value
        if name == "__typename":
            return Field(key, tuple(nodes), TYPENAME, parent, None, non_null=True)
        field_def = parent.fields.get(name)
        if field_def is None:  # __schema, __type: introspection
            raise Unsupported
        definition = field_def.extensions.get("strawberry-definition")
        relation = definition.metadata.get(RELATION) if definition is not None and definition.metadata else None
        out = Field(key, tuple(nodes), RELATION_FIELD if relation else OBJECT, parent, field_def, relation=relation)
        t = field_def.type
        if isinstance(t, GraphQLNonNull):
            out.non_null, t = True, t.of_type
        if isinstance(t, GraphQLList):
            out.is_list, t = True, t.of_type
            if isinstance(t, GraphQLNonNull):
                out.item_non_null, t = True, t.of_type
            if isinstance(t, (GraphQLList, GraphQLNonNull)):
                raise Unsupported
        if relation is None:
            out.get = _getter(definition, field_def)
        if field_def.args and not any(_has_variable(a.value) for n in nodes for a in n.arguments or ()):
            out.static_args = get_argument_values(field_def, nodes[0], None)
        if is_leaf_type(t):
            if relation is not None:
                raise Unsupported
            out.kind, out.serialize = LEAF, t.serialize  # type: ignore[union-attr]
            out.native = _NATIVE.get(t.name)  # type: ignore[union-attr]
            if t.name == "Int":  # type: ignore[union-attr]
                out.serialize = _int(t.serialize)  # type: ignore[union-attr]
        elif isinstance(t, GraphQLObjectType):
            out.children = self.selection(t, [n.selection_set for n in nodes if n.selection_set])
        else:  # interfaces and unions
            raise Unsupported
        return out


_NATIVE = {"String": str, "ID": str, "Boolean": bool}  # Int also checks its 32-bit range: serialized


def _int(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def fast(value: Any) -> Any:
        return value if type(value) is int and -2147483648 <= value <= 2147483647 else serialize(value)

    return fast


def _getter(definition: Any, field_def: GraphQLField) -> Callable[[Any], Any]:
    if definition is None:
        raise Unsupported
    resolver = definition.base_resolver
    if resolver is None:
        return operator.attrgetter(definition.python_name)
    if resolver.is_async or field_def.args or resolver.arguments:
        raise Unsupported  # a resolver that needs more than its object: reference execution
    return resolver.wrapped_func  # type: ignore[no-any-return]


def _has_variable(value: Any) -> bool:
    kind = value.kind
    if kind == "variable":
        return True
    if kind == "list_value":
        return any(_has_variable(v) for v in value.values)
    if kind == "object_value":
        return any(_has_variable(f.value) for f in value.fields)
    return False


def _groups(root: tuple[Field, ...]) -> tuple[Group, ...]:
    """Place every relation field in a level and a group (binding, level). A field whose keys
    are its parent's keys is read in its parent's level; one whose keys are read off its
    parent's entities, in the next level, after the parent's group only: a slow service
    holds back what depends on it, nothing else."""
    placed: dict[tuple[int, int], list[Field]] = {}
    waits: dict[tuple[int, int], set[tuple[int, int]]] = {}
    level_of: dict[int, int] = {}
    needs: dict[int, set[tuple[int, int]]] = {}  # field -> groups its keys come from

    def place(f: Field, level: int, deps: set[tuple[int, int]]) -> None:
        group = (level, id(f.relation.binding))  # type: ignore[union-attr]
        placed.setdefault(group, []).append(f)
        waits.setdefault(group, set()).update(deps)
        level_of[id(f)], needs[id(f)] = level, deps
        walk(f, f.children, ())

    def walk(parent: Field | None, fields: tuple[Field, ...], path: tuple[Field, ...]) -> None:
        for f in fields:
            if f.kind == OBJECT:
                walk(parent, f.children, (*path, f))
            elif f.kind == RELATION_FIELD:
                if parent is None:
                    if f.relation.arg is None and not f.relation.mine:  # type: ignore[union-attr]
                        raise Unsupported  # keys from a parent that is no entity
                    place(f, 0, set())
                    continue
                identity = parent.relation.binding.identity  # type: ignore[union-attr]
                f.parent, f.path = parent, path
                binding = f.relation.binding  # type: ignore[union-attr]
                # Read beside its parent when its keys are the parent's own, unless it may be
                # read only once the parent is shown to be the caller's (ARCHITECTURE.md, "Callers").
                f.same = (not path and identity is not None and f.relation.via == identity  # type: ignore[union-attr]
                          and not binding.through_parent)
                if f.same:
                    place(f, level_of[id(parent)], needs[id(parent)])
                else:
                    place(f, level_of[id(parent)] + 1, {(level_of[id(parent)], id(parent.relation.binding))})  # type: ignore[union-attr]

    walk(None, root, ())
    order = sorted(placed, key=lambda g: g[0])
    index = {g: i for i, g in enumerate(order)}
    return tuple(Group(g[0], tuple(placed[g]), tuple(sorted(index[d] for d in waits[g]))) for g in order)
