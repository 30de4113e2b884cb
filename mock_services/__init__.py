"""The BookVault services: six REST services, each owning its own database (ARCHITECTURE.md, "Services")."""

from . import catalog, customers, inventory, orders, payments, shipping
from .app import ServiceSpec, create_app, database_url

__all__ = ["SERVICES", "ServiceSpec", "create_app", "database_url"]

SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec for spec in (customers.SPEC, catalog.SPEC, inventory.SPEC, orders.SPEC, payments.SPEC, shipping.SPEC)
}
