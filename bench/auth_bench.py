"""What verifying a caller costs per request (README, "Callers"; issue: the overhead of
verification, with and without a token).

One gateway in process (httpx.ASGITransport, services in process too), a query answered from
the cache (`{ book(id: 1) { title } }` after a warm-up), sent in interleaved rounds A B C A B C
(no token; an HS256 token; an RS256 token from a JWKS), so the machine's noise falls on
every variant alike. Reported: CPU microseconds per request of each, and the overhead of each
token kind over none, as a difference and as a ratio (a token seen in the last minute is not
verified again); the CPU of one full verification, what a token's first request pays; and
the time of one rate-limit decision, in memory and in Redis.

    .venv/bin/python bench/auth_bench.py --requests 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bookvault import create_app  # noqa: E402
from gateway.auth import mint  # noqa: E402
from gateway.config import JwtConfig  # noqa: E402
from backends import seed_sqlite  # noqa: E402
from shop import on_a_real_port, running_shop, settings_for  # noqa: E402

SECRET = "bench-secret-" + "0123456789abcdef" * 2
QUERY = {"query": "{ book(id: 1) { title } }"}


async def run(requests: int, rounds: int) -> dict[str, object]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": "k1", "use": "sig",
              "alg": "RS256"}
    jwks = Starlette(routes=[Route("/jwks", lambda r: JSONResponse({"keys": [public]}))])
    rs256 = jwt.encode({"sub": "customer-7", "customer_id": 7, "exp": int(time.time()) + 3600}, key,
                       algorithm="RS256", headers={"kid": "k1"})
    variants = {"none": {}, "HS256": {"authorization": f"Bearer {mint(SECRET, 'customer-7', customer=7)}"},
                "RS256": {"authorization": f"Bearer {rs256}"}}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        seeded_dir = Path(tmp) / "seeded"
        seeded_dir.mkdir()
        await asyncio.to_thread(seed_sqlite, seeded_dir)
        async with running_shop(seeded_dir, Path(tmp)) as shop, on_a_real_port(jwks) as url:
            settings = settings_for(shop, gateway={"jwt": JwtConfig(secret=SECRET, jwks_url=f"{url}/jwks"),
                                                   "follow_feeds": False, "learn_limits": False})
            app = create_app(settings, transports=shop.transports)
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
                await app.state.gateway.documents.ready()  # else its start may spend the first query's deadline
                for headers in variants.values():  # warm: the book cached, the JWKS fetched
                    assert (await client.post("/graphql", json=QUERY, headers=headers)).status_code == 200
                authenticator = app.state.gateway.authenticator
                uncached = {}
                for name in ("HS256", "RS256"):  # a token's first request: its signature checked
                    token = variants[name]["authorization"].removeprefix("Bearer ")
                    started = time.process_time()
                    for _ in range(requests):
                        await authenticator._verify(token)
                    uncached[name] = round((time.process_time() - started) / requests * 1e6, 1)
                for _ in range(rounds):
                    for name, headers in variants.items():
                        started = time.process_time()
                        for _ in range(requests):
                            await client.post("/graphql", json=QUERY, headers=headers)
                        cpu[name].append((time.process_time() - started) / requests * 1e6)
    limits = await limiter_costs(requests)
    best = {name: min(values) for name, values in cpu.items()}
    return {"requests_per_round": requests, "rounds": rounds,
            "cpu_us_per_request_best": {k: round(v, 1) for k, v in best.items()},
            "overhead_us": {k: round(best[k] - best["none"], 1) for k in ("HS256", "RS256")},
            "ratio_to_none": {k: round(best[k] / best["none"], 3) for k in ("HS256", "RS256")},
            "first_use_verify_cpu_us": uncached, "rate_limit_check": limits}


async def limiter_costs(n: int) -> dict[str, float | None]:
    """One rate-limit decision: in memory, and in Redis (REDIS_URL, else the local default;
    a namespace of its own whose keys expire by themselves): wall microseconds per call."""
    import os
    import uuid

    from gateway.config import RateLimit
    from gateway.ratelimit import Limiter

    out: dict[str, float | None] = {}
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    for name, redis_url in (("memory_us", None), ("redis_us", url)):
        limiter = Limiter(RateLimit(rate=1e6, burst=1000), redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
        try:
            await limiter.wait("warm")
            started = time.perf_counter()
            for i in range(n):
                await limiter.wait(f"caller-{i % 50}")
            out[name] = round((time.perf_counter() - started) / n * 1e6, 1)
        finally:
            await limiter.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.requests, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
