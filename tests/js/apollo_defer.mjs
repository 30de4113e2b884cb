// Apollo Client runs a deferred order page against the gateway at argv[2] (order id argv[3]):
// HttpLink with the deferSpec=20220824 handler reads the multipart answer; every result the
// query emits is printed, with what went over the wire, as one JSON object
// (tests/test_real_clients.py reads it).
import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";
import { Defer20220824Handler } from "@apollo/client/incremental";

const [url, id] = process.argv.slice(2);
// The caller's token, as an app would set it on its HttpLink (README, "Callers").
const headers = process.env.BOOKVAULT_TOKEN ? { authorization: `Bearer ${process.env.BOOKVAULT_TOKEN}` } : {};
const wire = [];

async function loggingFetch(input, init = {}) {
  const response = await fetch(input, init);
  wire.push({ accept: new Headers(init.headers).get("accept"), contentType: response.headers.get("content-type") });
  return response;
}

const client = new ApolloClient({
  link: new HttpLink({ uri: url, fetch: loggingFetch, headers }),
  cache: new InMemoryCache(),
  incrementalHandler: new Defer20220824Handler(),
});
const ORDER = gql`
  query DeferredOrder($id: ID!) {
    order(id: $id) {
      id
      status
      customer { id name }
      ... @defer(label: "shipping") {
        shipment { id carrier trackingNumber }
        items { quantity book { id title stock { available } } }
      }
    }
  }
`;
const emitted = [];
await new Promise((resolve, reject) => {
  const subscription = client
    .watchQuery({ query: ORDER, variables: { id }, fetchPolicy: "network-only" })
    .subscribe({
      next(result) {
        emitted.push({ dataState: result.dataState ?? null, loading: result.loading, data: result.data ?? null,
                       error: result.error ? String(result.error) : null });
        if (result.dataState === "complete" || result.error) {
          subscription.unsubscribe();
          resolve();
        }
      },
      error: reject,
    });
});
console.log(JSON.stringify({ wire, emitted }));
