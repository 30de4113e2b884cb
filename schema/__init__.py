"""The BookVault GraphQL schema: types and their bindings to the services, declared only
(the gateway builds the executable schema from them). `schema.graphql` beside this file is
its exported SDL; a test fails when the two drift apart (regenerate with `bookvault schema`)."""

from __future__ import annotations

from pathlib import Path

from gateway import Api, executable_schema

from .mutation import Mutation
from .query import Query
from .subscription import Subscription
from .types import BINDINGS

__all__ = ["API", "BINDINGS", "Mutation", "Query", "SDL_PATH", "Subscription", "sdl"]

SDL_PATH = Path(__file__).with_name("schema.graphql")
API = Api(Query, BINDINGS, Mutation, Subscription)


def sdl() -> str:
    return executable_schema(Query, Mutation, Subscription).as_str() + "\n"
