"""Who is asking (ARCHITECTURE.md, "Callers"): a bearer token (RFC 6750) that is a JSON Web
Token (RFC 7519) verified with PyJWT, or nobody.

- RS256/ES256 tokens are verified with the keys of a JWKS (RFC 7517) fetched with a
  timeout, cached, and fetched again when a token names a `kid` it does not hold (key
  rotation), at most once per `refresh` seconds: a flood of made-up `kid`s cannot turn
  into a flood of calls to the key server. When the key server is down, cached keys go on
  verifying and an unknown `kid` is refused.
- HS256 tokens are verified with a shared secret (the demo's).
- Each algorithm is accepted only with its own kind of key: `alg: none` is never accepted,
  and an HS256 token is never checked against a public key (algorithm confusion, RFC 8725
  §2.1 and §3.1).
- `exp`, `nbf`, `iss` and `aud` are checked with a small clock skew (`leeway`).

A token that is present but fails any check is `Unauthenticated`; the view answers 401
before anything runs. No token is an anonymous caller."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from starlette.types import Scope

from .errors import Unauthenticated

__all__ = ["Authenticator", "Caller", "JwtConfig", "bearer", "caller_of", "mint"]

# Where the authenticated caller is kept in the ASGI scope (an extension key, as ASGI
# servers do for theirs); `caller_of` reads it back.
SCOPE_KEY = "bookvault.caller"
ASYMMETRIC = ("RS256", "ES256")


@dataclass(frozen=True)
class Caller:
    """A verified caller: the token's subject, the customer it acts as (if any) and its scopes."""

    subject: str
    customer_id: int | None = None
    scopes: frozenset[str] = frozenset()
    staff: bool = False  # holds the scope that sees every customer's data

    @property
    def key(self) -> str:
        """The caller's private cache scope and single-flight key: a hash of the subject, so
        cache keys never carry a customer's identifier in clear."""
        return hashlib.sha256(self.subject.encode()).hexdigest()[:32]

    def owns(self, owner: Any) -> bool:
        """Whether this caller may see data whose owner is the customer `owner`."""
        return self.staff or (self.customer_id is not None and owner == self.customer_id)


def caller_of(scope: Scope) -> Caller | None:
    """The caller the authentication middleware verified for this request (None: anonymous)."""
    caller: Caller | None = scope.get(SCOPE_KEY)
    return caller


@dataclass(frozen=True)
class JwtConfig:
    jwks_url: str | None = None
    secret: str | None = None  # HS256; the demo's is generated (bookvault/cli.py)
    issuer: str | None = None
    audience: str | None = None
    customer_claim: str = "customer_id"  # the claim naming the customer the caller acts as
    scopes_claim: str = "scope"  # a space-separated string (RFC 8693 §4.2) or a list
    staff_scope: str = "staff"  # the scope that may read every customer's data
    leeway: float = 30.0  # seconds of clock skew allowed on exp, nbf and iat
    jwks_timeout: float = 2.0  # seconds, for one JWKS fetch
    jwks_refresh: float = 30.0  # at most one fetch per this many seconds for an unknown kid

    @property
    def enabled(self) -> bool:
        return bool(self.jwks_url or self.secret)


class _KeySet:
    """The JWKS's keys by `kid`, fetched on first use and again for an unknown `kid`."""

    def __init__(self, url: str, client: httpx.AsyncClient, timeout: float, refresh: float,
                 clock: Callable[[], float]) -> None:
        self.url, self.client, self.timeout, self.refresh, self.clock = url, client, timeout, refresh, clock
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at: float | None = None
        self.lock = asyncio.Lock()

    async def get(self, kid: str) -> jwt.PyJWK:
        key = self.keys.get(kid)
        if key is not None:
            return key
        async with self.lock:  # one fetch for every request waiting on the same new kid
            if kid not in self.keys and (self.fetched_at is None or self.clock() - self.fetched_at >= self.refresh):
                await self._fetch()
        key = self.keys.get(kid)
        if key is None:
            raise Unauthenticated("the token's signing key is not known")
        return key

    async def _fetch(self) -> None:
        self.fetched_at = self.clock()
        try:
            response = await self.client.get(self.url, timeout=self.timeout)
            response.raise_for_status()
            keys = jwt.PyJWKSet.from_dict(response.json()).keys
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError):
            return  # the key server is down or wrong: the cached keys go on serving
        self.keys = {k.key_id: k for k in keys if k.key_id and k.public_key_use in (None, "sig")}


class Authenticator:
    """Verifies bearer tokens into `Caller`s. Made in the lifespan, with the app's HTTP client."""

    def __init__(self, config: JwtConfig, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.keys = None
        if config.jwks_url:
            self.keys = _KeySet(config.jwks_url, client or httpx.AsyncClient(), config.jwks_timeout,
                                config.jwks_refresh, clock)

    async def verify(self, token: str) -> Caller:
        config = self.config
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("the bearer token is not a JSON Web Token") from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and config.secret:
            key = config.secret
        elif alg in ASYMMETRIC and self.keys is not None:
            kid = header.get("kid")
            if not isinstance(kid, str):
                raise Unauthenticated("the token names no signing key (kid)")
            jwk = await self.keys.get(kid)
            if jwk.algorithm_name != alg:  # an RSA key verifies RS256 only, a P-256 key ES256 only
                raise Unauthenticated("the token's algorithm does not match its key")
            key = jwk
        else:
            raise Unauthenticated(f"tokens signed with {str(alg)[:16]!r} are not accepted")
        required = ["exp", "sub"] + (["iss"] if config.issuer else []) + (["aud"] if config.audience else [])
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=config.audience, issuer=config.issuer,
                                leeway=config.leeway, options={"require": required})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token's issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("the token is not meant for this gateway (audience)") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the token's signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the token is not valid ({type(exc).__name__})") from None
        return self.caller(claims)

    def caller(self, claims: dict[str, Any]) -> Caller:
        config = self.config
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the token's subject must be a non-empty string")
        customer = claims.get(config.customer_claim)
        if isinstance(customer, str) and customer.isdigit():
            customer = int(customer)
        if customer is not None and (not isinstance(customer, int) or isinstance(customer, bool) or customer < 1):
            raise Unauthenticated(f"the token's {config.customer_claim} claim must be a customer id")
        raw = claims.get(config.scopes_claim, ())
        scopes = frozenset(raw.split() if isinstance(raw, str) else (s for s in raw if isinstance(s, str))
                           if isinstance(raw, list) else ())
        return Caller(subject, customer, scopes, config.staff_scope in scopes)

    async def aclose(self) -> None:
        if self.keys is not None:
            await self.keys.client.aclose()


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1), "" when the
    header is there but is not a bearer credential, None when there is no header."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def mint(secret: str, subject: str, *, customer: int | None = None, scopes: Iterable[str] = (),
         ttl: float = 86_400.0, config: JwtConfig | None = None, **claims: Any) -> str:
    """An HS256 token for `subject` (the demo's `bookvault token`, tests and benches)."""
    config = config or JwtConfig(secret=secret)
    now = int(time.time())
    body: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl), **claims}
    if customer is not None:
        body[config.customer_claim] = customer
    if scopes:
        body[config.scopes_claim] = " ".join(scopes)
    if config.issuer:
        body.setdefault("iss", config.issuer)
    if config.audience:
        body.setdefault("aud", config.audience)
    return jwt.encode(body, secret, algorithm="HS256")
