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
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import httpx
import jwt
import orjson
from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError, BaseUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Scope

from .config import JwtConfig
from .errors import Unauthenticated

__all__ = ["Authenticator", "Caller", "authentication", "bearer", "caller_of", "caller_header", "mint"]

ASYMMETRIC = ("RS256", "ES256")
REVERIFY = 60.0  # seconds a verified token is trusted before its signature is checked again
MAX_VERIFIED = 10_000  # verified tokens remembered
CALLER_HEADER = "x-bookvault-caller"  # who asked, for the services' logs (beside traceparent)
# The request's caller, named to the services on every upstream call (`caller_header`).
_CURRENT: ContextVar[Caller | None] = ContextVar("bookvault_caller", default=None)


@dataclass(frozen=True)
class Caller(BaseUser):
    """A verified caller: the token's subject, the customer it acts as (if any) and its scopes.
    Starlette's authentication middleware keeps it as the scope's `user`."""

    subject: str
    customer_id: int | None = None
    scopes: frozenset[str] = frozenset()
    staff: bool = False  # holds the scope that sees every customer's data
    # The token's `exp` (seconds since the epoch): a subscription's rights end with it
    # (gateway/hub.py, `expires_in`). None: no token to end (the hub's own caller).
    expires: float | None = field(default=None, compare=False)

    @cached_property  # verified tokens are remembered with their caller: made once per token
    def key(self) -> str:
        """The caller's private cache scope and single-flight key: a hash of the subject, so
        cache keys never carry a customer's identifier in clear."""
        return hashlib.sha256(self.subject.encode()).hexdigest()[:32]

    def owns(self, owner: Any) -> bool:
        """Whether this caller may see data whose owner is the customer `owner`."""
        return self.staff or (self.customer_id is not None and owner == self.customer_id)


    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.subject

    @property
    def identity(self) -> str:
        return self.subject

    @cached_property  # sent with every upstream call
    def header(self) -> str:
        """The `X-BookVault-Caller` value: an RFC 8941 dictionary of printable ASCII."""
        def text(value: str) -> str:
            clean = "".join(c if " " <= c <= "~" else "?" for c in value)[:200]
            return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'

        parts = [f"sub={text(self.subject)}", f"scopes={text(' '.join(sorted(self.scopes)))}"]
        if self.customer_id is not None:
            parts.append(f"customer={self.customer_id}")
        return ", ".join(parts)


def caller_of(scope: Scope) -> Caller | None:
    """The caller the authentication middleware verified for this request (None: anonymous)."""
    user = scope.get("user")
    return user if isinstance(user, Caller) else None


def caller_header() -> str | None:
    """`X-BookVault-Caller` for an upstream call: the services log who asked. A read shared
    by single-flight (public data) names the caller whose request sent it."""
    caller = _CURRENT.get()
    return None if caller is None else caller.header


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
        self.clock = clock
        self._verified: dict[str, tuple[Caller, float, float]] = {}  # token -> (caller, exp, verify again at)
        self.keys = None
        if config.jwks_url:
            self.keys = _KeySet(config.jwks_url, client or httpx.AsyncClient(), config.jwks_timeout,
                                config.jwks_refresh, clock)

    async def verify(self, token: str) -> Caller:
        """The token's caller, or `Unauthenticated`. A token verified in the last minute
        (and not expired since) is not verified again: an SPA sends the same one with every
        request, and an RSA signature check costs ~0.1 ms of CPU (bench/auth_bench.py)."""
        now = time.time()
        known = self._verified.get(token)
        if known is not None and now < known[1] and self.clock() < known[2]:
            return known[0]
        caller, expires = await self._verify(token)
        self._verified[token] = (caller, expires, self.clock() + REVERIFY)
        if len(self._verified) > MAX_VERIFIED:
            self._verified.pop(next(iter(self._verified)))  # the oldest verified first
        return caller

    async def _verify(self, token: str) -> tuple[Caller, float]:
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
            key = jwk.key  # the key object itself: PyJWT re-prepares a PyJWK on every decode
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
        return self.caller(claims), float(claims["exp"])

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
        exp = claims.get("exp")
        expires = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
        return Caller(subject, customer, scopes, config.staff_scope in scopes, expires)

    async def aclose(self) -> None:
        if self.keys is not None:
            await self.keys.client.aclose()


class _Backend(AuthenticationBackend):
    def __init__(self, authenticator_of: Callable[[HTTPConnection], Authenticator]) -> None:
        self.authenticator_of = authenticator_of

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        token = bearer(conn.headers.get("authorization"))
        if token is None:
            return None  # anonymous
        if not token:
            raise AuthenticationError("the Authorization header must be 'Bearer <token>'")
        try:
            caller = await self.authenticator_of(conn).verify(token)
        except Unauthenticated as exc:
            raise AuthenticationError(str(exc)) from exc
        _CURRENT.set(caller)
        return AuthCredentials(sorted(caller.scopes)), caller


def _refused(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    # RFC 6750 §3: 401 with a WWW-Authenticate challenge naming the error; nothing has run.
    body = orjson.dumps({"errors": [{"message": str(exc), "extensions": {"code": "UNAUTHENTICATED"}}]})
    challenge = f'Bearer error="invalid_token", error_description="{str(exc).replace(chr(34), chr(39))}"'
    return Response(body, status_code=401, media_type="application/json", headers={"WWW-Authenticate": challenge})


def authentication(app: ASGIApp, authenticator_of: Callable[[HTTPConnection], Authenticator]) -> ASGIApp:
    """Starlette's AuthenticationMiddleware (pure ASGI) with the bearer-JWT backend: the
    scope's `user` is a `Caller`, or anonymous; a bad token is answered 401 UNAUTHENTICATED."""
    return AuthenticationMiddleware(app, backend=_Backend(authenticator_of), on_error=_refused)


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
