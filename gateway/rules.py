"""Authorization as the SDL shows it (ARCHITECTURE.md, "Callers"). The rules are enforced
where entities are read (gateway/source.py: a `Binding`'s `owner` and `through_parent`);
these directives make them visible to whoever reads the schema, as Apollo's
`@authenticated` and Cosmo's `@requiresScopes` do. A test holds the two together."""

from __future__ import annotations

import strawberry
from strawberry.schema_directive import Location

__all__ = ["Authenticated", "OwnedBy"]


@strawberry.schema_directive(locations=[Location.FIELD_DEFINITION], name="authenticated",
                             description="Needs a verified caller (a bearer token); anonymous: null with UNAUTHENTICATED.")
class Authenticated:
    pass


@strawberry.schema_directive(locations=[Location.OBJECT], name="ownedBy",
                             description="Only the customer named by `field` (or, with `through`, the owner of the "
                                         "entity it is read from) or a caller with the staff scope may see it; "
                                         "anyone else: null with FORBIDDEN.")
class OwnedBy:
    field: str | None = strawberry.UNSET
    through: str | None = strawberry.UNSET
