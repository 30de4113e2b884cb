"""Parsing of what clients send: ids, id lists, JSON bodies; and money formatting."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import BadRequest
from .models import AMOUNT
from .patterns import ID, IDS

__all__ = ["parse_id", "parse_ids", "parse_int", "read_body", "money", "cents"]

M = TypeVar("M", bound=BaseModel)


def parse_id(raw: str, name: str = "id") -> int:
    if not ID.matches(raw):
        raise BadRequest(f"{name} must be a positive integer, got {raw[:40]!r}")
    return int(raw)


def parse_ids(raw: str | None, name: str, max_batch: int) -> list[int]:
    """Comma-separated positive ids, de-duplicated in first-seen order (ARCHITECTURE.md, "Services")."""
    if not raw:
        raise BadRequest(f"{name} must list at least one id")
    parts = raw.split(",")
    if len(parts) > max_batch:
        raise BadRequest(f"{name} lists {len(parts)} ids; at most {max_batch} are allowed")
    # The published pattern, as a client checks it: no spaces around the commas.
    if not IDS.matches(raw):
        raise BadRequest(f"{name} must be comma-separated positive integers of at most 18 digits, got {raw[:40]!r}")
    return list(dict.fromkeys(int(part) for part in parts))


def parse_int(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if raw is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,16}", raw) or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


async def read_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
        raise BadRequest("request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(_integral(data), strict=True)
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise BadRequest(f"invalid body: {message}", details=details) from None


def _integral(value: Any) -> Any:
    """JSON has one number type: 416.0 is the integer 416 (RFC 8259 §6; JSON Schema's
    "integer" matches it), so it is accepted where an integer is asked; 416.5 is not."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def money(amount_cents: int, currency: str) -> dict[str, str]:
    return {"amount": f"{amount_cents // 100}.{amount_cents % 100:02d}", "currency": currency}


def cents(amount: str) -> int:
    if not AMOUNT.matches(amount):
        raise BadRequest(f"amount must be a non-negative decimal string, got {amount[:40]!r}")
    whole, _, frac = amount.partition(".")
    return int(whole) * 100 + int(frac.ljust(2, "0") or 0)
