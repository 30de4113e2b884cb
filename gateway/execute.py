"""The planned executor (ARCHITECTURE.md, "Plan, then execute"): reads level by level, one
`Reader.read` per binding per level (the reads of one level run concurrently), then shapes
the response from the fetched entities in one synchronous pass: no coroutine, future or
object per field.

The shaping follows the GraphQL spec's value completion (§6.4.3, "Handling Field Errors"):
a field error is recorded once, at the path where it happened; a null in a non-null
position makes the nearest nullable ancestor null. The reference execution (graphql-core)
is held to the same answers by the differential tests.

Incremental delivery (ARCHITECTURE.md, "Incremental delivery"): `execute_incremental`
shapes the initial part once the initial groups are read, and each deferred fragment, at each
object it was spread on, once its own groups are; a @stream list keeps its first items in
its part and sends the rest in the next (a root list of ids, split by the planner, when the
rest is read). A deferred fragment is sent only where its object
made it into the part before (a null that propagated over it drops it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from graphql import GraphQLError, located_error
from graphql.execution.values import VariableValues, get_argument_values
from graphql.pyutils import inspect

from .errors import GatewayError
from .plan import LEAF, OBJECT, TYPENAME, Deferred, Field, Group, Plan
from .relations import peek_pages, read_pages
from .source import Reader, Stale

if TYPE_CHECKING:
    from .auth import Caller

__all__ = ["Fetched", "Part", "execute_incremental", "execute_plan"]

Fetched = dict[int, dict[Any, Any]]  # id(binding) -> key -> answer


class _Null(Exception):
    """A null in a non-null position: the error is recorded, the parent becomes null."""


async def execute_plan(plan: Plan, variables: VariableValues, reader: Reader, fetched: Fetched | None = None
                       ) -> tuple[dict[str, Any] | orjson.Fragment | None, list[GraphQLError], list[dict[str, Any]]]:
    """`data`, the field errors and the stale entries served, for one operation (a plan
    without incremental delivery). `fetched`: entities already read, not read again (a live
    update's shared read, gateway/hub.py). A kept answer's `data` (gateway/memo.py) is its
    JSON already, an `orjson.Fragment`, which the response embeds as it is."""
    assert not plan.incremental
    memos = reader.source.memos if fetched is None else None  # a live update's shared read: not kept
    key = memos.key(plan, reader, variables) if memos is not None else None
    if key is not None:
        if (known := memos.recall(plan, key, reader)) is not None:  # type: ignore[union-attr]
            return known.data, [], []
        reader.peeked = []
    run = _Run(variables, reader.caller)
    if fetched is not None:
        run.fetched = fetched
    warm = await run.fetch(plan, reader)
    data = run.shape_root(plan.root)
    if key is not None:
        peeked, reader.peeked = reader.peeked, None
        if warm and not run.errors and not run.stale:
            return memos.remember(plan, key, data, peeked), [], []  # type: ignore[union-attr,arg-type]
    return data, run.errors, run.stale


@dataclass
class Part:
    """One part of an incremental answer: the initial data, a deferred fragment's data at the
    object at `path`, or a stream's further items (`path` ends with the first one's index)."""

    path: list[Any]
    label: str | None = None
    data: dict[str, Any] | None = None
    items: list[Any] | None = None
    errors: list[GraphQLError] = field(default_factory=list)
    stale: list[dict[str, Any]] = field(default_factory=list)
    stream: bool = False


@dataclass
class _Spread:
    """Deferred fragments met while shaping a part: at `obj`, shaped as `anchor` at `path`."""

    deferred: tuple[Deferred, ...]
    obj: Any
    path: Path
    anchor: Any


@dataclass
class _Rest:
    """A stream's further items, shaped with their list (`anchor`, its first items)."""

    part: Part
    found: list[_Spread | _Rest]
    path: Path
    anchor: list[Any]


async def execute_incremental(plan: Plan, variables: VariableValues, reader: Reader
                              ) -> AsyncIterator[tuple[list[Part], bool]]:
    """The parts of the answer as they are ready, each batch with `hasNext`; the first
    batch is the initial part alone. Closing the iterator early cancels the reads left."""
    run = _Run(variables, reader.caller)
    tasks = run.start(plan, reader)
    done: dict[int, asyncio.Future[Any]] = {}

    def read(deferral: int) -> asyncio.Future[Any]:  # the groups of one part, read
        if deferral not in done:
            done[deferral] = asyncio.gather(*(t for g, t in zip(plan.groups, tasks) if g.deferral == deferral))
            done[deferral].add_done_callback(_retrieved)  # cancelled when the client leaves: not an error
        return done[deferral]

    waiting: list[tuple[Deferred, Any, Path]] = []
    ready: list[Part] = []

    def follow(found: list[_Spread | _Rest]) -> None:
        for entry in found:
            if isinstance(entry, _Rest):
                ready.append(entry.part)
                follow(entry.found)
            else:
                for d in entry.deferred:
                    if d.stream and not run.has_rest(d.fields[0]):
                        continue  # no ids past `initialCount`: nothing to send
                    waiting.append((d, entry.obj, entry.path))
                    read(d.index)  # started now: the part is sent as soon as its reads are done

    try:
        await read(0)
        initial, found = run.part(plan.root, plan.deferred, None, None, None)
        follow(found)
        yield [initial], bool(waiting or ready)
        while waiting or ready:
            if not ready:
                await asyncio.wait({read(d.index) for d, _, _ in waiting}, return_when=asyncio.FIRST_COMPLETED)
            batch, ready[:] = list(ready), []
            pending, waiting[:] = list(waiting), []
            for d, obj, path in pending:
                if read(d.index).done():
                    part, found = (run.rest(d.fields[0], path, d.label) if d.stream
                                   else run.part(d.fields, d.deferred, obj, path, d.label))
                    batch.append(part)
                    follow(found)
                else:
                    waiting.append((d, obj, path))
            yield batch, bool(waiting or ready)
    finally:
        for future in (*tasks, *done.values()):
            future.cancel()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Run:
    def __init__(self, variables: VariableValues, caller: Caller | None = None) -> None:
        self.variables = variables
        self.caller = caller  # whose `me` it is
        self.fetched: Fetched = {}
        self.errors: list[GraphQLError] = []
        self.stale: list[dict[str, Any]] = []
        self.found: list[_Spread | _Rest] = []  # deferred fragments and streams met while shaping
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

    async def fetch(self, plan: Plan, reader: Reader) -> bool:
        """Reads what the plan needs; True when every group was read warm (`_peek`)."""
        pending = [task for task in self.start(plan, reader, peek=True) if task is not None]
        if pending:
            await asyncio.gather(*pending)
        return not pending

    def start(self, plan: Plan, reader: Reader, peek: bool = False) -> list[asyncio.Future[None] | None]:
        """One task per group, each waiting for the groups its keys come from. With `peek`,
        a group whose keys are known now and whose entities are all fresh in memory is read
        at once instead (None in its place): a warm query starts no task at all."""
        done: list[asyncio.Future[None] | None] = []
        for group in plan.groups:
            waits = [task for task in (done[i] for i in group.after) if task is not None]
            if peek and not waits and self._peek(group, reader):
                done.append(None)
            else:
                done.append(asyncio.ensure_future(self._group(group, waits, reader)))
        return done

    def _wanted(self, group: Group) -> list[Any]:
        """The group's keys not read yet in this request (each is read once per request)."""
        wanted: list[Any] = []
        for f in group.fields:
            self.keys[id(f)] = keys = self._keys(f)
            wanted.extend(keys)
        found = self.fetched.get(id(group.fields[0].relation.binding), {})  # type: ignore[union-attr]
        return [k for k in dict.fromkeys(wanted) if k not in found]

    def _peek(self, group: Group, reader: Reader, wanted: list[Any] | None = None) -> bool:
        relation = group.fields[0].relation
        assert relation is not None
        if wanted is None:
            wanted = self._wanted(group)
        try:
            got = (peek_pages(reader, relation.binding, wanted) if relation.paged
                   else reader.peek(relation.binding, wanted)) if wanted else {}
        except Exception:  # a bug below: `read` meets it again and masks it at each field's path
            return False
        if got is None:
            return False
        self.fetched.setdefault(id(relation.binding), {}).update(got)
        return True

    async def _group(self, group: Group, waits: list[asyncio.Future[None]], reader: Reader) -> None:
        if waits:
            await asyncio.gather(*waits)
        relation = group.fields[0].relation
        assert relation is not None
        wanted = self._wanted(group)
        if wanted and not self._peek(group, reader, wanted):  # what a group before left in the cache
            found = self.fetched.setdefault(id(relation.binding), {})
            try:
                found.update(await (read_pages(reader, relation.binding, wanted) if relation.paged
                                    else reader.read(relation.binding, wanted, include=group.include,
                                                     included=self.fetched)))
            except Exception as exc:  # a bug below: masked at each field's path, as graphql-core would
                found.update(dict.fromkeys(wanted, exc))

    def _keys(self, f: Field) -> list[Any]:
        """`f`'s keys: from its arguments, its parent's keys, or its parent's entities."""
        relation = f.relation
        assert relation is not None
        try:
            if f.parent is None:
                return self.arg_keys(f)
            args = self.args(f) if f.field_def.args else {}  # type: ignore[union-attr]
            parent_keys = self.keys.get(id(f.parent))
            if parent_keys is None:  # the parent's group has not started: its keys are known all the same
                parent_keys = self.keys[id(f.parent)] = self._keys(f.parent)
            if f.same:
                return [relation.key_for(k, args) for k in parent_keys]
            found = self.fetched.get(id(f.parent.relation.binding), {})  # type: ignore[union-attr]
            parents = [v.value if isinstance(v, Stale) else v for v in (found.get(k) for k in parent_keys)]
            keys = []
            via = relation.via
            for obj in _walk([p for p in parents if p is not None and not isinstance(p, Exception)], f.path):
                try:
                    key = int(getattr(obj, via))  # type: ignore[arg-type]
                    keys.append(relation.key_for(key, args) if relation.paged else key)
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

    def part(self, fields: tuple[Field, ...], deferred: tuple[Deferred, ...], obj: Any, path: Path,
             label: str | None) -> tuple[Part, list[_Spread | _Rest]]:
        """The part of `fields` at `obj` (the initial one: `path` None), and the deferred
        fragments and streams it leads to: those whose object is in its data."""
        self.errors, self.stale, self.found = [], [], []
        data = self.shape_root(fields) if path is None else self._object(fields, obj, path)
        found = self.found
        if deferred and data is not None:
            found.append(_Spread(deferred, obj, path, data))
        base = _list(path)
        return Part(base, label, data, None, self.errors, self.stale), _kept(found, data, len(base))

    def rest(self, f: Field, path: Path, label: str | None) -> tuple[Part, list[_Spread | _Rest]]:
        """The part of a split root list's further items (`f` reads them)."""
        self.errors, self.stale, self.found = [], [], []
        start = f.slice[0]  # type: ignore[index]
        items: list[Any] | None
        try:
            items = self.relation(f, None, (path, f.key))
        except _Null:
            items = None
        except Exception as exc:
            self.error(exc, f, (path, f.key))
            items = None
        part = Part([*_list(path), f.key, start], label, None, items, self.errors, self.stale, stream=True)
        rest = {start + i: item for i, item in enumerate(items or ())}
        return part, _kept(self.found, rest, len(part.path) - 1)

    def has_rest(self, f: Field) -> bool:
        try:
            return bool(self.arg_keys(f))
        except GatewayError:  # bad ids: reported with the list's first items
            return False

    def arg_keys(self, f: Field) -> list[Any]:
        keys = f.relation.keys_from_args(self.args(f), self.caller)  # type: ignore[union-attr]
        return keys if f.slice is None else keys[f.slice[0]:f.slice[1]]

    def _object(self, fields: tuple[Field, ...], obj: Any, path: Path) -> dict[str, Any] | None:
        try:
            return self.object(fields, obj, path)
        except _Null:  # a deferred fragment's null stops at its own data (the initial part stands)
            return None

    def child(self, f: Field, value: Any, path: Path) -> dict[str, Any]:
        out = self.object(f.children, value, path)
        if f.deferred:
            self.found.append(_Spread(f.deferred, value, path, out))
        return out

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
                        value = self.child(f, value, (path, f.key))
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
            keys = self.arg_keys(f)
            if f.slice is not None:  # a split root list: its items are numbered from where it starts
                return self.items(f, [found[k] for k in keys], path, True, f.slice[0])
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
        return self.child(f, value, path)

    def unwrap(self, value: Any, path: Path) -> Any:
        if isinstance(value, Stale):
            self.stale.append({"path": _list(path), "service": value.service, "version": value.version,
                               "ageMs": value.age_ms})
            return value.value
        if isinstance(value, Exception):
            raise value
        return value

    def list(self, f: Field, values: Any, path: Path, answers: bool = False) -> list[Any]:
        if f.stream is not None:
            return self.stream(f, list(values), path, answers)
        return self.items(f, values, path, answers)

    def stream(self, f: Field, values: list[Any], path: Path, answers: bool) -> list[Any]:
        """@stream: the first `initialCount` items here, the rest as a part of their own
        (read with the first ones, so they come together, right after this part)."""
        count, label = f.stream  # type: ignore[misc]
        head = self.items(f, values[:count], path, answers)
        if len(values) > count:
            saved = self.errors, self.stale, self.found
            self.errors, self.stale, self.found = [], [], []
            try:
                items: list[Any] | None = self.items(f, values[count:], path, answers, count)
            except _Null:  # a null item in a non-null position: this part's items are null
                items = None
            rest = {count + i: item for i, item in enumerate(items or ())}
            part = Part([*_list(path), count], label, None, items, self.errors, self.stale, stream=True)
            found = _kept(self.found, rest, len(_list(path)))
            self.errors, self.stale, self.found = saved
            self.found.append(_Rest(part, found, path, head))
        return head

    def items(self, f: Field, values: Any, path: Path, answers: bool = False, start: int = 0) -> list[Any]:
        out = []
        leaf = f.kind == LEAF
        for index, value in enumerate(values, start):
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
                    out.append(self.child(f, value, (path, index)))
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


def _kept(found: list[_Spread | _Rest], data: Any, skip: int) -> list[_Spread | _Rest]:
    """The entries of `found` whose anchor is in `data` (the part's data, whose path has
    `skip` keys): a null that propagated over an object drops what was deferred in it."""
    kept = []
    for entry in found:
        node = data
        try:
            for key in _list(entry.path)[skip:]:
                node = node[key]
        except (KeyError, IndexError, TypeError):
            continue
        if node is entry.anchor:
            kept.append(entry)
    return kept


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
