// Hive Gateway settings for bench/versus_hive.py (`hive-gateway supergraph FILE -c gateway.config.ts`).
//
// Reads are retried the way BookVault retries them (README, "Configuration": 2 extra
// attempts, a 50 ms first backoff that doubles). Without it, a pooled keep-alive
// connection that a service (uvicorn, 5 s idle timeout) closes just as the gateway reuses
// it fails the field with "socket hang up", which BookVault's client would have retried;
// on the shared 2-core machine that happens a few times per run.
import { defineConfig } from '@graphql-hive/gateway';

export const gatewayConfig = defineConfig({
  upstreamRetry: { maxRetries: 2, retryDelay: 50, retryDelayFactor: 2 },
});
