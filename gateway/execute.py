"""The planned executor (ARCHITECTURE.md, "Plan, then execute"): reads level by level, one
`Reader.read` per binding per level (the reads of one level run concurrently), then shapes
the response from the fetched entities in one synchronous pass: no coroutine, future or
object per field.

The shaping follows the GraphQL spec's value completion (§6.4.3, "Handling Field Errors"):
a field error is recorded once, at the path where it happened; a null in a non-null
position makes the nearest nullable ancestor null. The reference execution (graphql-core)
is held to the same answers by the differential tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from graphql import GraphQLError, located_error
from graphql.execution.values import VariableValues, get_argument_values
from graphql.pyutils import inspect

from .errors import GatewayError
from .plan import LEAF, OBJECT, TYPENAME, Field, Group, Plan
from .relations import read_pages
from .source import Reader, Stale

if TYPE_CHECKING:
    from .auth import Caller

__all__ = ["Fetched", "execute_plan"]

Fetched = dict[int, dict[Any, Any]]  # id(binding) -> key -> answer


class _Null(Exception):
    """A null in a non-null position: the error is recorded, the parent becomes null."""


async def execute_plan(plan: Plan, variables: VariableValues, reader: Reader, fetched: Fetched | None = None
                       ) -> tuple[dict[str, Any] | None, list[GraphQLError], list[dict[str, Any]]]:
    """`data`, the field errors and the stale entries served, for one operation. `fetched`:
    entities already read, not read again (a live update's shared read, gateway/hub.py)."""
    run = _Run(variables, reader.caller)
    if fetched is not None:
        run.fetched = fetched
    await run.fetch(plan, reader)
    data = run.shape_root(plan.root)
    return data, run.errors, run.stale


class _Run:
    def __init__(self, variables: VariableValues, caller: Caller | None = None) -> None:
        self.variables = variables
        self.caller = caller  # whose `me` it is
        self.fetched: Fetched = {}
        self.errors: list[GraphQLError] = []
        self.stale: list[dict[str, Any]] = []
        self._args: dict[int, dict[str, Any]] = {}
        self.keys: dict[int, list[Any]] = {}  # relation field -> its keys

    def args(self, f: Field) -> dict[str, Any]:
        if f.static_args is not None:
            return f.static_args
        found = self._args.get(id(f))
        if found is None:
            found = self._args[id(f)] = get_argument_values(f.field_def, f.nodes[0], self.variables)  # type: ignore[arg-type]
        return found

    # -- reading, level by level -------------------------------------------------------

    async def fetch(self, plan: Plan, reader: Reader) -> None:
        if not plan.groups:
            return
        done: list[asyncio.Future[None]] = []
        for group in plan.groups:
            waits = [done[i] for i in group.after]
            done.append(asyncio.ensure_future(self._group(group, waits, reader)))
        await asyncio.gather(*done)

    async def _group(self, group: Group, waits: list[asyncio.Future[None]], reader: Reader) -> None:
        if waits:
            await asyncio.gather(*waits)
        relation = group.fields[0].relation
        assert relation is not None
        wanted: list[Any] = []
        for f in group.fields:
            self.keys[id(f)] = keys = self._keys(f)
            wanted.extend(keys)
        found = self.fetched.setdefault(id(relation.binding), {})
        wanted = [k for k in dict.fromkeys(wanted) if k not in found]  # read once per request
        if wanted:
            try:
                found.update(await (read_pages(reader, relation.binding, wanted) if relation.paged
                                    else reader.read(relation.binding, wanted)))
            except Exception as exc:  # a bug below: masked at each field's path, as graphql-core would
                found.update(dict.fromkeys(wanted, exc))

    def _keys(self, f: Field) -> list[Any]:
        """`f`'s keys: from its arguments, its parent's keys, or its parent's entities."""
        relation = f.relation
        assert relation is not None
        try:
            if f.parent is None:
                return relation.keys_from_args(self.args(f), self.caller)
            args = self.args(f) if f.field_def.args else {}  # type: ignore[union-attr]
            parent_keys = self.keys.get(id(f.parent), [])
            if f.same:
                return [relation.key_for(k, args) for k in parent_keys]
            found = self.fetched.get(id(f.parent.relation.binding), {})  # type: ignore[union-attr]
            parents = [v.value if isinstance(v, Stale) else v for v in (found.get(k) for k in parent_keys)]
            keys = []
            for obj in _walk([p for p in parents if p is not None and not isinstance(p, Exception)], f.path):
                try:
                    keys.append(relation.key_from_parent(obj, args))
                except (TypeError, ValueError, AttributeError):
                    continue  # shaping reports it at its path
            return keys
        except GatewayError:
            return []  # bad arguments: shaping reports them at the field's path

    # -- shaping -------------------------------------------------------------------------

    def shape_root(self, fields: tuple[Field, ...]) -> dict[str, Any] | None:
        try:
            return self.object(fields, None, None)
        except _Null:
            return None

    # Paths are linked pairs (parent, key), made into lists only for an error or a stale
    # entry: most fields never need theirs.

    def object(self, fields: tuple[Field, ...], obj: Any, path: Path) -> dict[str, Any]:
        out = {}
        for f in fields:
            kind = f.kind
            try:
                if kind == LEAF:
                    value = f.get(obj)  # type: ignore[misc]
                    if value is None:
                        if f.non_null:
                            self.null(f, (path, f.key))
                    elif f.is_list:
                        value = self.list(f, value, (path, f.key))
                    elif type(value) is not f.native:
                        value = _leaf(f, value)
                elif kind == OBJECT:
                    value = f.get(obj)  # type: ignore[misc]
                    if value is None:
                        if f.non_null:
                            self.null(f, (path, f.key))
                    elif f.is_list:
                        value = self.list(f, value, (path, f.key))
                    else:
                        value = self.object(f.children, value, (path, f.key))
                elif kind == TYPENAME:
                    value = f.parent_type.name
                else:
                    value = self.relation(f, obj, (path, f.key))
            except _Null:
                if f.non_null:
                    raise
                value = None
            except Exception as exc:
                self.error(exc, f, (path, f.key))
                if f.non_null:
                    raise _Null from None
                value = None
            out[f.key] = value
        return out

    def relation(self, f: Field, obj: Any, path: Path) -> Any:
        relation = f.relation
        assert relation is not None
        found = self.fetched.get(id(relation.binding), {})
        if relation.arg is None and not relation.mine:
            if relation.paged:
                key = relation.key_from_parent(obj, self.args(f))
            else:
                key = int(getattr(obj, relation.via))  # type: ignore[arg-type]
            value = found[key]
        else:
            keys = relation.keys_from_args(self.args(f), self.caller)
            if relation.many:
                return self.list(f, [found[k] for k in keys], path, answers=True)
            value = found[keys[0]] if keys else None
        if type(value) is Stale:
            value = self.unwrap(value, path)
        elif isinstance(value, Exception):
            raise value
        if value is None:
            return self.null(f, path)
        if f.is_list:
            return self.list(f, value, path)
        return self.object(f.children, value, path)

    def unwrap(self, value: Any, path: Path) -> Any:
        if isinstance(value, Stale):
            self.stale.append({"path": _list(path), "service": value.service, "version": value.version,
                               "ageMs": value.age_ms})
            return value.value
        if isinstance(value, Exception):
            raise value
        return value

    def list(self, f: Field, values: Any, path: Path, answers: bool = False) -> list[Any]:
        out = []
        leaf = f.kind == LEAF
        for index, value in enumerate(values):
            try:
                if answers:
                    value = self.unwrap(value, (path, index))
                if value is None:
                    if f.item_non_null:
                        raise TypeError(f"Cannot return null for non-nullable field {f.parent_type.name}.{f.name}.")
                    out.append(None)
                elif leaf:
                    out.append(value if type(value) is f.native else _leaf(f, value))
                else:
                    out.append(self.object(f.children, value, (path, index)))
            except _Null:
                if f.item_non_null:
                    raise
                out.append(None)
            except Exception as exc:
                self.error(exc, f, (path, index))
                if f.item_non_null:
                    raise _Null from None
                out.append(None)
        return out

    def null(self, f: Field, path: Path) -> None:
        if f.non_null:
            self.error(TypeError(f"Cannot return null for non-nullable field {f.parent_type.name}.{f.name}."), f, path)
            raise _Null
        return None

    def error(self, exc: Exception, f: Field, path: Path) -> None:
        self.errors.append(located_error(exc, list(f.nodes), _list(path)))


Path = tuple[Any, Any] | None


def _list(path: Path) -> list[Any]:
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    keys.reverse()
    return keys


def _leaf(f: Field, value: Any) -> Any:
    """graphql-core's leaf completion: the type's serializer, and null is not a value."""
    serialized = f.serialize(value)  # type: ignore[misc]
    if serialized is None:
        raise TypeError(f"Expected `{inspect(value)}` to be a GraphQL value")
    return serialized


def _walk(objects: list[Any], path: tuple[Field, ...]) -> Iterator[Any]:
    """The objects reached from `objects` through embedded fields (lists flattened)."""
    if not path:
        yield from objects
        return
    head, rest = path[0], path[1:]
    reached = []
    for obj in objects:
        try:
            value = head.get(obj)  # type: ignore[misc]
        except Exception:  # shaping reports it at its path
            continue
        if value is None:
            continue
        if head.is_list:
            reached.extend(v for v in value if v is not None)
        else:
            reached.append(value)
    yield from _walk(reached, rest)
