// One GraphQL client at its defaults against the gateway at argv[3]: `node clients.mjs <case> <url> [arg]`.
// A query case prints one JSON line {messages, wire}. A subscription case (arg: an order id) prints
// {first} once the first message arrived, then, after the test changed the order, {messages, wire}
// with the first two messages (tests/test_real_clients.py reads the lines).
// No client is configured beyond its URL, the WebSocket implementation Node 20 lacks, and the
// caller's token (README, "Callers"); the global fetch is wrapped only to log what went over the wire.
const [which, url, arg] = process.argv.slice(2);
const token = process.env.BOOKVAULT_TOKEN;
const authorization = token ? `Bearer ${token}` : undefined;
const wsUrl = url.replace(/^http/, "ws");

const wire = [];
const realFetch = globalThis.fetch;
globalThis.fetch = async (input, init = {}) => {
  const request = new Request(input, init);
  const response = await realFetch(input, init);
  wire.push({ method: request.method, accept: request.headers.get("accept"),
              contentType: response.headers.get("content-type"), status: response.status });
  return response;
};

const BOOK = "query Book($id: ID!) { book(id: $id) { title author { name } } }";
const ORDER = "subscription OrderUpdates($id: ID!) { orderUpdated(id: $id) { id status version customer { name } } }";

const plain = (value) => JSON.parse(JSON.stringify(value ?? null));
const errorOf = (error) => (error ? String(error.stack ?? error) : null);

function done(messages) {
  console.log(JSON.stringify({ messages: plain(messages), wire }));
}

// The first two messages of a subscription started by `start(next, error)` (which returns a
// function ending it): the first printed as soon as it comes, so the test can change the order.
function twoMessages(start) {
  return new Promise((resolve, reject) => {
    const messages = [];
    let stop = () => {};
    stop = start(
      (message) => {
        messages.push(message);
        if (messages.length === 1) console.log(JSON.stringify({ first: plain(message) }));
        if (messages.length === 2) {
          stop();
          resolve(messages);
        }
      },
      (error) => reject(error instanceof Error ? error : new Error(JSON.stringify(error))),
    );
  });
}

const cases = {
  async urql() {
    const { Client, cacheExchange, fetchExchange, gql } = await import("@urql/core");
    const client = new Client({ url, exchanges: [cacheExchange, fetchExchange] });
    const { data, error } = await client.query(gql(BOOK), { id: "1" }).toPromise();
    done([{ data, error: errorOf(error) }]);
  },

  async "graphql-request"() {
    const { request, GraphQLClient, gql } = await import("graphql-request");
    const viaRequest = await request(url, gql`${BOOK}`, { id: "1" });
    const viaClient = await new GraphQLClient(url).request(BOOK, { id: "2" });
    done([{ data: viaRequest }, { data: viaClient }]);
  },

  async "apollo-multipart-subscription"() {
    const { ApolloClient, HttpLink, InMemoryCache, gql } = await import("@apollo/client");
    const client = new ApolloClient({ link: new HttpLink({ uri: url, headers: { authorization } }),
                                      cache: new InMemoryCache() });
    const observable = client.subscribe({ query: gql(ORDER), variables: { id: arg } });
    done(await twoMessages((next, error) => {
      const subscription = observable.subscribe({
        next: (r) => next({ data: r.data ?? null, error: errorOf(r.error) }), error });
      return () => subscription.unsubscribe();
    }));
  },

  async "apollo-ws-subscription"() {
    const { client, ws } = await apolloOverWs();
    const { gql } = await import("@apollo/client");
    const observable = client.subscribe({ query: gql(ORDER), variables: { id: arg } });
    done(await twoMessages((next, error) => {
      const subscription = observable.subscribe({
        next: (r) => next({ data: r.data ?? null, error: errorOf(r.error) }), error });
      return () => subscription.unsubscribe();
    }));
    await ws.dispose();
  },

  async "apollo-ws-query"() {
    const { client, ws } = await apolloOverWs();
    const { gql } = await import("@apollo/client");
    const { data, error } = await client.query({ query: gql(BOOK), variables: { id: "1" } });
    done([{ data, error: errorOf(error) }]);
    await ws.dispose();
  },

  async "graphql-ws-subscription"() {
    const client = await graphqlWs();
    done(await twoMessages((next, error) =>
      client.subscribe({ query: ORDER, variables: { id: arg } }, { next, error, complete() {} })));
    await client.dispose();
  },

  async "graphql-ws-query"() {
    const client = await graphqlWs();
    const messages = [];
    for await (const result of client.iterate({ query: BOOK, variables: { id: "1" } })) messages.push(result);
    done(messages);
    await client.dispose();
  },

  async "graphql-sse-subscription"() {
    const { createClient } = await import("graphql-sse");
    const client = createClient({ url, headers: { authorization } });
    done(await twoMessages((next, error) =>
      client.subscribe({ query: ORDER, variables: { id: arg } }, { next, error, complete() {} })));
    client.dispose();
  },

  async "graphql-sse-query"() {
    const { createClient } = await import("graphql-sse");
    const client = createClient({ url, headers: { authorization } });
    const messages = [];
    for await (const result of client.iterate({ query: BOOK, variables: { id: "1" } })) messages.push(result);
    done(messages);
    client.dispose();
  },

  async introspection() {
    const { getIntrospectionQuery, buildClientSchema, printSchema } = await import("graphql");
    const query = getIntrospectionQuery({ descriptions: true, specifiedByUrl: true, directiveIsRepeatable: true,
                                          schemaDescription: true, inputValueDeprecation: true, oneOf: true });
    const response = await fetch(url, { method: "POST", headers: { "content-type": "application/json" },
                                        body: JSON.stringify({ query }) });
    const result = await response.json();
    const schema = buildClientSchema(result.data);
    const book = schema.getQueryType().getFields().book;
    done([{ errors: result.errors ?? null, bookType: String(book?.type ?? null),
            bookArgs: (book?.args ?? []).map((a) => `${a.name}: ${a.type}`),
            subscriptionFields: Object.keys(schema.getSubscriptionType()?.getFields() ?? {}),
            sdlLength: printSchema(schema).length }]);
  },

  async relay() {
    const { Environment, Network, RecordSource, Store, fetchQuery } = await import("relay-runtime");
    // The fetch function of Relay's docs (relay.dev/docs/guides/network-layer): a POST of JSON,
    // only `content-type` set (fetch's own Accept: */*).
    function fetchFn(operation, variables) {
      return fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ query: operation.text, variables }),
      }).then((response) => response.json());
    }
    const environment = new Environment({ network: Network.create(fetchFn), store: new Store(new RecordSource()) });
    const data = await fetchQuery(environment, RELAY_BOOK, { id: "1" }).toPromise();
    done([{ data }]);
  },
};

async function apolloOverWs() {
  const { ApolloClient, InMemoryCache } = await import("@apollo/client");
  const { GraphQLWsLink } = await import("@apollo/client/link/subscriptions");
  const { createClient } = await import("graphql-ws");
  const { WebSocket } = await import("ws");
  const ws = createClient({ url: wsUrl, webSocketImpl: WebSocket, connectionParams: { Authorization: authorization } });
  return { client: new ApolloClient({ link: new GraphQLWsLink(ws), cache: new InMemoryCache() }), ws };
}

async function graphqlWs() {
  const { createClient } = await import("graphql-ws");
  const { WebSocket } = await import("ws");
  return createClient({ url: wsUrl, webSocketImpl: WebSocket, connectionParams: { Authorization: authorization } });
}

// What relay-compiler generates for
//   query BookQuery($id: ID!) { book(id: $id) { title author { name } } }
// (it adds the `id` of every type that has one), written out: relay-compiler needs a project.
const relayArgs = [{ kind: "Variable", name: "id", variableName: "id" }];
const relayDefs = [{ defaultValue: null, kind: "LocalArgument", name: "id" }];
const scalar = (name) => ({ alias: null, args: null, kind: "ScalarField", name, storageKey: null });
const linked = (name, type, args, selections) => ({ alias: null, args, concreteType: type, kind: "LinkedField", name,
                                                    plural: false, selections, storageKey: null });
const RELAY_BOOK = {
  kind: "Request",
  fragment: {
    argumentDefinitions: relayDefs, kind: "Fragment", metadata: null, name: "BookQuery", type: "Query",
    abstractKey: null,
    selections: [linked("book", "Book", relayArgs, [scalar("title"), linked("author", "Author", null, [scalar("name")])])],
  },
  operation: {
    argumentDefinitions: relayDefs, kind: "Operation", name: "BookQuery",
    selections: [linked("book", "Book", relayArgs, [
      scalar("title"), linked("author", "Author", null, [scalar("name"), scalar("id")]), scalar("id")])],
  },
  params: {
    cacheID: "bookvault-book-query", id: null, metadata: {}, name: "BookQuery", operationKind: "query",
    text: "query BookQuery(\n  $id: ID!\n) {\n  book(id: $id) {\n    title\n    author {\n      name\n      id\n    }\n    id\n  }\n}\n",
  },
};

if (!cases[which]) throw new Error(`no such case: ${which}`);
await cases[which]();
