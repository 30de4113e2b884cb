"""The planner (ARCHITECTURE.md, "Plan, then execute"): an operation, with the values of the
variables its @skip/@include read, becomes a tree of `Field`s with fragments merged,
directives applied and every field's getter, serializer and nullability resolved; each
relation field knows which relations below it can be read in its own level (their keys are
its keys) and which must wait for its data.

`Planner.plan` returns None for what the planned engine does not cover (introspection
below the root's `__typename`, abstract types, nested lists, resolvers with arguments that
declare no relation, operations other than queries): those run through graphql-core, the
reference execution, never wrongly.

Planned for incremental delivery (ARCHITECTURE.md, "Incremental delivery"), a fragment under
an active `@defer` is not merged into its selection set: it becomes a `Deferred` at the
object where it is spread, with its own fields; its relation fields go to groups of their
own (`Group.deferral`), so the initial part never waits for them. `@stream` marks a list
field; on a root list of ids (`books(ids:)`) it is split in two fields, the first
`initialCount` ids and the rest, the rest read and sent like a deferred fragment. Planned
without it (the client reads no multipart answers), both are ignored, as the
spec allows, and the fragments merge as plain ones."""

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
    GraphQLDeferDirective,
    GraphQLEnumType,
    GraphQLField,
    GraphQLIncludeDirective,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    GraphQLSkipDirective,
    GraphQLStreamDirective,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    is_leaf_type,
)
from graphql.execution.values import VariableValues, get_argument_values, get_directive_values

from .documents import Document
from .relations import RELATION, Relation
from .source import Binding

__all__ = ["Deferred", "Field", "Group", "Plan", "Planner", "Unsupported", "LEAF", "OBJECT", "RELATION_FIELD", "TYPENAME"]

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
    # Incremental delivery: the fragments deferred at the object this field yields, the
    # part the field is delivered in (0: the initial one), and @stream's (initialCount, label).
    deferred: tuple[Deferred, ...] = ()
    deferral: int = 0
    stream: tuple[int, str | None] | None = None
    slice: tuple[int, int | None] | None = None  # a split root list: the ids it reads

    @property
    def name(self) -> str:
        return self.nodes[0].name.value


@dataclass(eq=False)
class Deferred:
    """A fragment under @defer: its fields are shaped at each object where it is spread, and
    sent once its own groups are read (and the part it sits in is sent)."""

    index: int  # its deferral: 1, 2, ... (0 is the initial part)
    label: str | None
    fields: tuple[Field, ...] = ()
    deferred: tuple[Deferred, ...] = ()  # fragments deferred inside it, at the same object
    stream: bool = False  # the rest of a split root list: `fields` is that one field


@dataclass(frozen=True)
class Group:
    """The reads of one binding in one level for one part: one `Reader.read` for all its
    fields' keys, started as soon as the groups its keys come from (`after`, indexes) are read."""

    level: int
    fields: tuple[Field, ...]
    after: tuple[int, ...]
    deferral: int = 0
    # Entities of a later group that the service sends along with this group's read when
    # asked (a relation's `included`): (name, binding) each. They are then not read again.
    include: tuple[tuple[str, Binding], ...] = ()


@dataclass(frozen=True)
class Plan:
    root: tuple[Field, ...]
    groups: tuple[Group, ...]  # by level; a group only waits for groups before it
    deferred: tuple[Deferred, ...] = ()  # fragments deferred at the root
    incremental: bool = False  # some @defer or @stream is active: the answer comes in parts


class Planner:
    """Plans, each kept with its document (`Document.plans`, at most `size` per document:
    one per operation and directive values), so they go when it goes (gateway/documents.py)."""

    def __init__(self, schema: GraphQLSchema, size: int = 16) -> None:
        self.schema = schema
        self.size = size
        self.planned = 0

    def plan(self, document: Document, operation: OperationDefinitionNode, variables: VariableValues,
             incremental: bool = False) -> Plan | None:
        """The plan of `operation`, made once per document, operation and directive values;
        `incremental` plans @defer and @stream (else they are ignored)."""
        plans = document.plans
        key = (operation.name.value if operation.name else None, incremental,
               *(variables.coerced.get(v) for v in document.directive_variables))
        try:
            plan: Plan | None = plans[key]
            plans.move_to_end(key)
            return plan
        except KeyError:
            pass
        try:
            plan = _Build(self.schema, document, variables, incremental).operation(operation)
        except Unsupported:
            plan = None
        self.planned += 1
        plans[key] = plan
        if len(plans) > self.size:
            plans.popitem(last=False)
        return plan


class _Build:
    def __init__(self, schema: GraphQLSchema, document: Document, variables: VariableValues, incremental: bool) -> None:
        self.schema = schema
        self.variables = variables
        self.incremental = incremental
        self.deferrals = 0  # deferred fragments made so far
        self.streams = 0
        self.deferral = 0  # the part the fields being built are delivered in
        assert document.node is not None
        self.fragments = {d.name.value: d for d in document.node.definitions if isinstance(d, FragmentDefinitionNode)}

    def operation(self, operation: OperationDefinitionNode) -> Plan:
        if operation.operation is not OperationType.QUERY or self.schema.query_type is None:
            raise Unsupported
        root, deferred = self.selection(self.schema.query_type, [operation.selection_set])
        return Plan(root, _groups(root, deferred), deferred, bool(self.deferrals or self.streams))

    def selection(self, parent: GraphQLObjectType, sets: list[SelectionSetNode]
                  ) -> tuple[tuple[Field, ...], tuple[Deferred, ...]]:
        """The fields of `sets` on `parent`, and the fragments deferred there."""
        grouped: OrderedDict[str, list[FieldNode]] = OrderedDict()
        later: list[tuple[str | None, SelectionSetNode]] = []
        for selection_set in sets:
            self.collect(parent, selection_set, grouped, set(), later)
        fields = tuple(self.field(parent, key, nodes) for key, nodes in grouped.items())
        deferred = [self.defer(parent, label, selection_set) for label, selection_set in later]
        if parent is self.schema.query_type:
            deferred += [self.split(parent, f) for f in fields if f.stream is not None and f.relation is not None
                         and f.relation.many and f.relation.arg is not None]
        return fields, tuple(deferred)

    def split(self, parent: GraphQLObjectType, head: Field) -> Deferred:
        """@stream on a root list of ids: `head` reads the first `initialCount`, the rest is
        a field of its own, in a part of its own (its reads, and those below it, too)."""
        (count, label), head.stream, head.slice = head.stream, None, (0, head.stream[0])  # type: ignore[misc]
        self.deferrals += 1
        deferred, outer = Deferred(self.deferrals, label, stream=True), self.deferral
        self.deferral = deferred.index
        try:
            rest = self.field(parent, head.key, list(head.nodes))
        finally:
            self.deferral = outer
        rest.stream, rest.slice = None, (count, None)
        deferred.fields = (rest,)
        return deferred

    def defer(self, parent: GraphQLObjectType, label: str | None, selection_set: SelectionSetNode) -> Deferred:
        self.deferrals += 1
        deferred, outer = Deferred(self.deferrals, label or None), self.deferral
        self.deferral = deferred.index
        try:
            deferred.fields, deferred.deferred = self.selection(parent, [selection_set])
        finally:
            self.deferral = outer
        return deferred

    def collect(self, parent: GraphQLObjectType, selection_set: SelectionSetNode,
                grouped: OrderedDict[str, list[FieldNode]], visited: set[str],
                later: list[tuple[str | None, SelectionSetNode]]) -> None:
        """graphql-core's CollectFields: directives, fragments once per selection set; a
        fragment under an active @defer is set aside in `later` (with its label)."""
        for selection in selection_set.selections:
            if not self.included(selection):
                continue
            if isinstance(selection, FieldNode):
                key = selection.alias.value if selection.alias else selection.name.value
                grouped.setdefault(key, []).append(selection)
                continue
            deferred = self.deferred(selection)
            if isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                if condition is not None and condition.name.value != parent.name:
                    continue
                inner = selection.selection_set
            else:
                name = selection.name.value
                fragment = self.fragments.get(name)
                if fragment is None or (deferred is None and name in visited):
                    continue  # a deferred spread is collected on its own: `visited` is not its
                if deferred is None:
                    visited.add(name)
                if fragment.type_condition.name.value != parent.name:
                    continue
                inner = fragment.selection_set
            if deferred is not None:
                later.append((deferred, inner))
            else:
                self.collect(parent, inner, grouped, visited, later)

    def deferred(self, node: InlineFragmentNode | FragmentSpreadNode) -> str | None:
        """The label of an active @defer on `node` ("" without one); None: not deferred."""
        if not self.incremental or not node.directives:
            return None
        defer = get_directive_values(GraphQLDeferDirective, node, self.variables)
        if defer is None or defer["if"] is False:
            return None
        return defer.get("label") or ""

    def stream(self, node: FieldNode) -> tuple[int, str | None] | None:
        if not self.incremental or not node.directives:
            return None
        stream = get_directive_values(GraphQLStreamDirective, node, self.variables)
        if stream is None or stream["if"] is False:
            return None
        self.streams += 1
        return max(stream.get("initialCount") or 0, 0), stream.get("label")

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
        out = Field(key, tuple(nodes), RELATION_FIELD if relation else OBJECT, parent, field_def, relation=relation,
                    deferral=self.deferral)
        t = field_def.type
        if isinstance(t, GraphQLNonNull):
            out.non_null, t = True, t.of_type
        if isinstance(t, GraphQLList):
            out.is_list, t = True, t.of_type
            if isinstance(t, GraphQLNonNull):
                out.item_non_null, t = True, t.of_type
            if isinstance(t, (GraphQLList, GraphQLNonNull)):
                raise Unsupported
            out.stream = self.stream(nodes[0])
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
            elif isinstance(t, GraphQLEnumType):
                out.serialize = _enum(t.serialize)
        elif isinstance(t, GraphQLObjectType):
            out.children, out.deferred = self.selection(t, [n.selection_set for n in nodes if n.selection_set])
        else:  # interfaces and unions
            raise Unsupported
        return out


_NATIVE = {"String": str, "ID": str, "Boolean": bool}  # Int also checks its 32-bit range: serialized


def _int(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def fast(value: Any) -> Any:
        return value if type(value) is int and -2147483648 <= value <= 2147483647 else serialize(value)

    return fast


def _enum(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """An enum's serializer, remembered per value: strawberry's looks the name up among all of them."""
    known: dict[Any, Any] = {}

    def fast(value: Any) -> Any:
        key = (type(value), value)  # by type too: 1 and True, a str-mixin member and its str
        try:
            return known[key]
        except (KeyError, TypeError):  # not met yet, or not hashable (serialize says what it is)
            out = serialize(value)
            if len(known) < 64 and getattr(value, "__hash__", None) is not None:
                known[key] = out
            return out

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


def _groups(root: tuple[Field, ...], deferred: tuple[Deferred, ...] = ()) -> tuple[Group, ...]:
    """Place every relation field in a level and a group (binding, level, part). A field whose
    keys are its parent's keys is read in its parent's level; one whose keys are read off its
    parent's entities, in the next level, after the parent's group only: a slow service
    holds back what depends on it, nothing else. A deferred fragment's fields have groups of
    their own, which nothing of the parts before it waits for."""
    Key = tuple[int, int, int]  # level, binding, deferral
    placed: dict[Key, list[Field]] = {}
    waits: dict[Key, set[Key]] = {}
    level_of: dict[int, int] = {}
    needs: dict[int, set[Key]] = {}  # field -> groups its keys come from

    def place(f: Field, level: int, deps: set[Key]) -> None:
        group = (level, id(f.relation.binding), f.deferral)  # type: ignore[union-attr]
        placed.setdefault(group, []).append(f)
        waits.setdefault(group, set()).update(deps)
        level_of[id(f)], needs[id(f)] = level, deps
        walk(f, f.children, ())
        for d in f.deferred:
            later(f, d, ())

    def later(parent: Field | None, d: Deferred, path: tuple[Field, ...]) -> None:
        walk(parent, d.fields, path)
        for inner in d.deferred:
            later(parent, inner, path)

    def walk(parent: Field | None, fields: tuple[Field, ...], path: tuple[Field, ...]) -> None:
        for f in fields:
            if f.kind == OBJECT:
                walk(parent, f.children, (*path, f))
                for d in f.deferred:
                    later(parent, d, (*path, f))
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
                    place(f, level_of[id(parent)] + 1, {(level_of[id(parent)], id(parent.relation.binding), parent.deferral)})  # type: ignore[union-attr]

    walk(None, root, ())
    for d in deferred:
        later(None, d, ())
    include: dict[Key, dict[str, Binding]] = {}
    for fields in placed.values():
        for f in fields:
            relation, parent = f.relation, f.parent
            if relation.included and parent is not None and not f.same and not f.path and not parent.relation.paged \
                    and relation.binding.owner is None and not relation.binding.through_parent:  # type: ignore[union-attr]
                key = (level_of[id(parent)], id(parent.relation.binding), parent.deferral)  # type: ignore[union-attr]
                include.setdefault(key, {})[relation.included] = relation.binding  # type: ignore[union-attr]
    order = sorted(placed, key=lambda g: g[0])
    index = {g: i for i, g in enumerate(order)}
    return tuple(Group(g[0], tuple(placed[g]), tuple(sorted(index[d] for d in waits[g])), g[2],
                       tuple(sorted(include.get(g, {}).items(), key=lambda item: item[0]))) for g in order)
