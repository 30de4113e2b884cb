// Apollo Client's automatic persisted queries against the gateway at argv[2]: two queries,
// the wire exchange logged, printed as one JSON object (tests/test_real_clients.py reads it).
import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";
import { createPersistedQueryLink } from "@apollo/client/link/persisted-queries";
import { createHash } from "node:crypto";

const url = process.argv[2];
// The caller's token, as an app would set it on its HttpLink (README, "Callers").
const headers = process.env.BOOKVAULT_TOKEN ? { authorization: `Bearer ${process.env.BOOKVAULT_TOKEN}` } : {};
const wire = [];

async function loggingFetch(input, init = {}) {
  const method = init.method ?? "GET";
  let sent;
  if (method === "POST") {
    sent = JSON.parse(init.body);
  } else {
    const params = new URL(typeof input === "string" ? input : input.url).searchParams;
    sent = Object.fromEntries(params);
    if (sent.extensions) sent.extensions = JSON.parse(sent.extensions);
  }
  const response = await fetch(input, init);
  const body = await response.clone().json();
  wire.push({
    method,
    sha256Hash: sent.extensions?.persistedQuery?.sha256Hash ?? null,
    withQuery: typeof sent.query === "string",
    status: response.status,
    codes: (body.errors ?? []).map((e) => e.extensions?.code ?? null),
    data: body.data ?? null,
  });
  return response;
}

const sha256 = (text) => createHash("sha256").update(text).digest("hex");
const link = createPersistedQueryLink({ sha256 }).concat(new HttpLink({ uri: url, fetch: loggingFetch, headers }));
const client = new ApolloClient({ link, cache: new InMemoryCache() });
const ORDER = gql`
  query ApolloOrder($id: ID!) {
    order(id: $id) { id status customer { name } }
  }
`;
const results = [];
for (let i = 0; i < 2; i++) {
  const { data, error } = await client.query({ query: ORDER, variables: { id: "4850" }, fetchPolicy: "network-only" });
  results.push({ data: data ?? null, error: error ? String(error) : null });
}
console.log(JSON.stringify({ wire, results }));
