"""Nullability by ownership (ARCHITECTURE.md, "Schema"; issue 25): a field whose data comes
from another service than its parent's is nullable, so a failing service nulls its own
fields and nothing of the service that answered."""

from __future__ import annotations

from typing import Any

from graphql import GraphQLList, GraphQLNonNull, GraphQLObjectType, GraphQLSchema, get_named_type

from gateway import executable_schema
from gateway.live import LIVE, Live
from gateway.relations import RELATION, Relation
from schema import API, BINDINGS, SDL_PATH
from shop import Shop, as_customer, running_gateway

ORDER_HISTORY = (SDL_PATH.parent / "examples" / "order_history.graphql").read_text()
SCHEMA = executable_schema(API.query, API.mutation, API.subscription)._schema


def declared(field: Any, key: str) -> Any:
    definition = field.extensions.get("strawberry-definition")
    return (definition.metadata or {}).get(key) if definition is not None else None


def roots(schema: GraphQLSchema) -> list[GraphQLObjectType]:
    return [t for t in (schema.query_type, schema.mutation_type, schema.subscription_type) if t is not None]


def services_of(schema: GraphQLSchema) -> dict[str, set[str]]:
    """Which services each object type's data may come from: a relation's type is its
    binding's service's, a subscription's its `Live` binding's, a mutation's result its own
    write's (named after the mutation); a type embedded in another (no relation:
    `Order.items`, `OrderConnection.edges`) comes with its parent's data."""
    todo: list[tuple[GraphQLObjectType, str]] = []
    for root in roots(schema):
        for name, field in root.fields.items():
            named = get_named_type(field.type)
            relation, live = declared(field, RELATION), declared(field, LIVE)
            binding = relation.binding if relation is not None else live.binding if live is not None else None
            if isinstance(named, GraphQLObjectType):
                todo.append((named, binding.service if binding is not None else f"{root.name}.{name}"))  # type: ignore[union-attr]
    found: dict[str, set[str]] = {root.name: {"gateway"} for root in roots(schema)}
    while todo:
        parent, service = todo.pop()
        if service in found.setdefault(parent.name, set()):
            continue
        found[parent.name].add(service)
        for field in parent.fields.values():
            named = get_named_type(field.type)
            if isinstance(named, GraphQLObjectType):
                relation = declared(field, RELATION)
                todo.append((named, relation.binding.service if relation is not None else service))
    return found


def offending_fields(schema: GraphQLSchema) -> list[str]:
    """`Type.field` for every relation (or subscription) to another service than its
    parent's that a failing service would null past itself. A list keyed by the caller's own arguments
    (`books(ids:)`) is the caller's: one item per id asked, so its items must be nullable."""
    out = []
    for name, parents in sorted(services_of(schema).items()):
        parent = schema.get_type(name)
        assert isinstance(parent, GraphQLObjectType)
        for field_name, field in parent.fields.items():
            relation: Relation | Live | None = declared(field, RELATION) or declared(field, LIVE)
            if relation is None or parents == {relation.binding.service}:
                continue
            outer = field.type
            if isinstance(relation, Relation) and relation.many and relation.arg is not None:  # the list is the arguments'; the items are the service's
                outer = outer.of_type if isinstance(outer, GraphQLNonNull) else outer
                assert isinstance(outer, GraphQLList), f"{name}.{field_name}"
                outer = outer.of_type
            if isinstance(outer, GraphQLNonNull):
                out.append(f"{name}.{field_name}: {field.type} (from {relation.binding.service}, "
                           f"its parent from {', '.join(sorted(parents))})")
    return out


def test_every_field_backed_by_another_service_is_nullable() -> None:
    """No relation to another service than its parent's is non-null (`Customer.orders` first), and the walk sees them all."""
    assert offending_fields(SCHEMA) == []
    services = services_of(SCHEMA)
    # The walk reaches every entity type from its binding's service, and embedded types with their parent's.
    assert {b.service for b in BINDINGS} <= {s for found in services.values() for s in found}
    assert services["Customer"] == {"customers"} and services["OrderConnection"] == {"orders"}
    assert services["Book"] == {"catalog"} and services["OrderItem"] == {"orders", "Mutation.cancelOrder"}
    assert services["Query"] == {"gateway"}


def test_the_walk_finds_a_non_null_field_of_another_service() -> None:
    """Made non-null again, `Customer.orders` is reported (the check can fail)."""
    customer = SCHEMA.get_type("Customer")
    assert isinstance(customer, GraphQLObjectType)
    orders = customer.fields["orders"]
    nullable = orders.type
    orders.type = GraphQLNonNull(nullable)
    try:
        assert [line.split(":")[0] for line in offending_fields(SCHEMA)] == ["Customer.orders"]
    finally:
        orders.type = nullable


async def test_with_orders_down_the_order_history_keeps_the_customer(shop: Shop) -> None:
    """The orders service failing: the history keeps the customer's name and tier, `orders: null` with UPSTREAM_UNAVAILABLE at its path."""
    async with shop.client("customers") as customers:
        (record,) = (await customers.get("/customers?ids=7")).json()["data"]
    async with running_gateway(shop, headers=as_customer(7), service={"retries": 0}) as (client, _):
        await shop.faults("orders", errorRate=1, errorStatus=503, paths=["/orders"])
        response = await client.post("/graphql", json={"query": ORDER_HISTORY, "variables": {"id": "7"}})
    assert response.status_code == 200
    body = response.json()
    assert body["data"] == {"customer": {"name": record["name"], "tier": record["tier"], "orders": None}}
    (error,) = body["errors"]
    assert error["path"] == ["customer", "orders"]
    assert error["extensions"]["code"] == "UPSTREAM_UNAVAILABLE" and error["extensions"]["service"] == "orders"
    assert body["extensions"]["complete"] is False and body["extensions"]["failedServices"] == ["orders"]
