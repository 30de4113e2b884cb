// GraphQL Mesh composition of the six BookVault services for bench/versus_hive.py.
//
// The bench writes each service's OpenAPI document, reduced to what Mesh can compose
// (bench/_hive.py, `mesh_document`), into $VERSUS_HIVE_OPENAPI_DIR, and gives each
// service's base URL in $VERSUS_HIVE_<SERVICE>_URL: Mesh bakes it into the supergraph.
//
// The links between services mirror BookVault's schema (schema/schema.graphql): every
// one is a batched `@resolveTo` over the service's batch route (`keysArg` passes the list
// of keys; `result: "data"` unwraps `{"data": [...], "missing": [...]}`; `valueKeyField`
// matches rows by id, since a batch route does not promise its order).
import { createRenameTransform, defineConfig } from '@graphql-mesh/compose-cli';
import { loadOpenAPISubgraph } from '@omnigraph/openapi';
import { join } from 'node:path';

const dir = process.env.VERSUS_HIVE_OPENAPI_DIR;
if (!dir) throw new Error('VERSUS_HIVE_OPENAPI_DIR is not set (run bench/versus_hive.py)');

const services = ['customers', 'catalog', 'inventory', 'orders', 'payments', 'shipping'];
// Declared by several services with different shapes (e.g. the enum `Status` of orders,
// payments and shipping): renamed per source, `Status` of payments -> `PaymentsStatus`.
const colliding = new Set(['Status', 'Error', 'ErrorDetail', 'Meta', 'Event', 'EventPage']);
const capitalised = (s: string) => s.charAt(0).toUpperCase() + s.slice(1);

function subgraph(name: string) {
  const endpoint = process.env[`VERSUS_HIVE_${name.toUpperCase()}_URL`];
  if (!endpoint) throw new Error(`VERSUS_HIVE_${name.toUpperCase()}_URL is not set`);
  return {
    sourceHandler: loadOpenAPISubgraph(name, {
      source: join(dir as string, `${name}.json`),
      endpoint,
      // Else each batch field returns a union with the 400 error type, which `result`
      // cannot follow; an error status still fails the field.
      ignoreErrorResponses: true,
    }),
    transforms: [
      createRenameTransform({
        typeRenamer: ({ typeName }) => (colliding.has(typeName) ? `${capitalised(name)}${typeName}` : typeName),
      }),
    ],
  };
}

export const composeConfig = defineConfig({
  subgraphs: services.map(subgraph),
  additionalTypeDefs: /* GraphQL */ `
    extend type Order {
      customer: Customer
        @resolveTo(sourceName: "customers", sourceTypeName: "Query", sourceFieldName: "customers",
                   keyField: "customerId", keysArg: "ids", valueKeyField: "id", result: "data")
      payment: Payment
        @resolveTo(sourceName: "payments", sourceTypeName: "Query", sourceFieldName: "payments",
                   keyField: "id", keysArg: "orderIds", valueKeyField: "orderId", result: "data")
      shipment: Shipment
        @resolveTo(sourceName: "shipping", sourceTypeName: "Query", sourceFieldName: "shipments",
                   keyField: "id", keysArg: "orderIds", valueKeyField: "orderId", result: "data")
    }
    extend type OrderItem {
      book: Book
        @resolveTo(sourceName: "catalog", sourceTypeName: "Query", sourceFieldName: "books",
                   keyField: "bookId", keysArg: "ids", valueKeyField: "id", result: "data")
    }
    extend type Book {
      author: Author
        @resolveTo(sourceName: "catalog", sourceTypeName: "Query", sourceFieldName: "authors",
                   keyField: "authorId", keysArg: "ids", valueKeyField: "id", result: "data")
      stock: Stock
        @resolveTo(sourceName: "inventory", sourceTypeName: "Query", sourceFieldName: "stock",
                   keyField: "id", keysArg: "bookIds", valueKeyField: "bookId", result: "data")
    }
    extend type Customer {
      "This customer's orders, newest first (GET /orders?customerId=&limit=&after=)."
      orders(limit: Int, after: String): OrderPage
        @resolveTo(sourceName: "orders", sourceTypeName: "Query", sourceFieldName: "orders",
                   requiredSelectionSet: "{ id }",
                   sourceArgs: { customerId: "{root.id}", limit: "{args.limit}", after: "{args.after}" })
    }
  `,
});
