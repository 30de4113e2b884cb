"""The BookVault GraphQL schema. `schema.graphql` beside this file is its exported SDL;
a test fails when the two drift apart (regenerate with `bookvault schema`)."""

from __future__ import annotations

from pathlib import Path

import strawberry
from graphql import GraphQLError
from strawberry.types import ExecutionContext
from strawberry.extensions import MaxAliasesLimiter, MaxTokensLimiter, ParserCache, QueryDepthLimiter, ValidationCache

from gateway.telemetry import OperationSpan
from gateway.view import MaskInternalErrors

from .query import Query
from .types import BINDINGS

__all__ = ["schema", "sdl", "SDL_PATH", "BINDINGS"]

SDL_PATH = Path(__file__).with_name("schema.graphql")


class _Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        # strawberry logs every error with its traceback; client and upstream errors are
        # expected, and internal ones are logged where they are masked.
        return None


schema = _Schema(
    query=Query,
    extensions=[
        OperationSpan,  # first, so its span covers the others' work too
        # Parse and validation results are cached: a repeated query is not re-parsed.
        lambda: ParserCache(maxsize=512),
        lambda: ValidationCache(maxsize=512),
        lambda: QueryDepthLimiter(max_depth=12),
        lambda: MaxAliasesLimiter(max_alias_count=50),
        lambda: MaxTokensLimiter(max_token_count=5000),
        MaskInternalErrors,
    ],
)


def sdl() -> str:
    return schema.as_str() + "\n"
