"""CORS for browser frontends on other origins (the Fetch standard's CORS protocol,
fetch.spec.whatwg.org/#http-cors-protocol): only the origins listed in
BOOKVAULT_CORS_ORIGINS, with credentials; none listed, nothing beyond the same origin."""

from __future__ import annotations

import re
from collections.abc import Iterable

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

__all__ = ["parse_origins", "cors_middleware"]

# scheme://host[:port], what a browser sends in `Origin` (RFC 6454 §6.1)
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def parse_origins(raw: str | None) -> tuple[str, ...]:
    """`"https://shop.example, http://localhost:5173"` -> the origins, checked.
    A wildcard is refused: with credentials it would let any site act as the user."""
    origins = []
    for item in (raw or "").split(","):
        origin = item.strip().rstrip("/")
        if not origin:
            continue
        if origin == "*":
            raise ValueError("BOOKVAULT_CORS_ORIGINS must list origins; '*' would let any site call with the user's credentials")
        if not _ORIGIN.fullmatch(origin):
            raise ValueError(f"BOOKVAULT_CORS_ORIGINS: {origin!r} is not an origin like https://shop.example or http://localhost:5173")
        origins.append(origin.lower())  # Origin's scheme and host are lowercase (RFC 6454 §6.2)
    return tuple(dict.fromkeys(origins))


def cors_middleware(origins: Iterable[str]) -> list[Middleware]:
    """Starlette's CORSMiddleware (pure ASGI) for `origins`; nothing when there are none."""
    # Here, not at the top: config.py imports parse_origins, and these modules import config.
    from .resilience import DEADLINE_HEADER
    from .telemetry import TRACE_ID_HEADER

    origins = list(origins)
    if not origins:
        return []
    headers = sorted({"accept", "authorization", "content-type", DEADLINE_HEADER.lower(), "traceparent",
                      "tracestate"})
    return [Middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_credentials=True,
        allow_methods=["GET", "POST"],
        allow_headers=headers,
        expose_headers=[TRACE_ID_HEADER],  # so a frontend can link an answer to its trace
        max_age=600,  # seconds a browser may reuse a preflight answer
    )]
