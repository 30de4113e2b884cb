"""Remembered answers (ARCHITECTURE.md, "Remembered answers").

A warm query reads every entity from this process's memory (`Reader.peek`) and shapes them
into its answer. Asked again by the same caller with the same variables while each of those
entries is still the one in memory, and fresh, the query has the same answer. So that answer
is kept, beside the reads it was made of, and given again once `Reader.again` has found the
very same entries (one lookup per entity; no keys worked out, nothing shaped). Whatever
changes one of them (a newer version read, an event's invalidation, its TTL, a feed gap, a
consistency token this instance has not reached) fails that check, and the query runs as
usual. Only whole answers are kept: no error, nothing stale, every read warm."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from graphql.execution.values import VariableValues

    from .plan import Plan
    from .source import Peeked, Reader

__all__ = ["Memo", "Memos"]


@dataclass(frozen=True, slots=True)
class Memo:
    # Weakly: a plan lives with its document (gateway/documents.py), and an answer kept here
    # must not keep a document the document cache let go (issue 25); with its plan gone, it
    # is never given again.
    plan: weakref.ref[Plan]
    # The answer's `data` as JSON, written once: the response embeds it as it is (orjson
    # writes a `Fragment` verbatim). A history's 50 KB of bytes, where its tree of dicts and
    # lists took several times that, and a warm answer is not serialized again.
    data: orjson.Fragment
    reads: tuple[Peeked, ...]
    entities: int


class Memos:
    """The kept answers of one gateway, the least recently given dropped first once there are
    more than `max_answers`, or once they are made of more than `max_entities` entities (an
    answer's size goes with its entities': an order history's 155 make some 50 KB)."""

    def __init__(self, max_answers: int = 1024, max_entities: int = 50_000) -> None:
        self.max_answers, self.max_entities = max_answers, max_entities
        self._kept: OrderedDict[Hashable, Memo] = OrderedDict()
        self._entities = 0

    @staticmethod
    def key(plan: Plan, reader: Reader, variables: VariableValues) -> Hashable | None:
        """The plan, who asks (the whole verified caller: its scopes decide what it may see)
        and the variables; None when nothing is to be kept (a traced request, whose spans only
        reads make)."""
        if reader.traced:
            return None
        try:
            return id(plan), reader.caller, orjson.dumps(variables.coerced, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # a value JSON cannot spell (none of the schema's scalars today)
            return None

    def recall(self, plan: Plan, key: Hashable, reader: Reader) -> Memo | None:
        memo = self._kept.get(key)
        if memo is None or memo.plan() is not plan or not reader.again(memo.reads):
            return None  # `plan`: not another plan made since at the same address
        self._kept.move_to_end(key)
        return memo

    def remember(self, plan: Plan, key: Hashable, data: dict[str, Any] | None, reads: list[Peeked]) -> orjson.Fragment:
        """Keep `data`; it comes back as the JSON kept, for this answer to be sent as it is too."""
        self._drop(key)
        memo = self._kept[key] = Memo(weakref.ref(plan), orjson.Fragment(orjson.dumps(data)), tuple(reads),
                                      sum(len(r.entries) for r in reads))
        self._entities += memo.entities
        while self._kept and (len(self._kept) > self.max_answers or self._entities > self.max_entities):
            self._drop(next(iter(self._kept)))
        return memo.data

    def _drop(self, key: Hashable) -> None:
        memo = self._kept.pop(key, None)
        if memo is not None:
            self._entities -= memo.entities

    def __len__(self) -> int:
        return len(self._kept)
