// The graphql-http audit suite (GraphQL over HTTP conformance) against the server at argv[2];
// every result printed as one JSON array (tests/test_real_clients.py reads it).
import { auditServer } from "graphql-http";

const url = process.argv[2];
const results = await auditServer({ url });
console.log(JSON.stringify(results.map((r) => ({
  id: r.id,
  name: r.name,
  status: r.status,
  reason: r.status === "ok" ? null : r.reason,
}))));
