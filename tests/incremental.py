"""Reading incremental answers in tests: the JSON parts of a multipart/mixed body as they
arrive, and the parts put together as a client (Apollo Client, GraphiQL) does."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


async def parts(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON parts of a multipart/mixed answer, each as soon as its delimiter has arrived."""
    assert response.headers["content-type"].startswith('multipart/mixed; boundary="-"')
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        while (end := buffer.find(b"\r\n---", 1)) != -1:
            part, buffer = buffer[:end], buffer[end + 5:]
            head, _, body = part.partition(b"\r\n\r\n")
            if body:
                assert b"content-type: application/json; charset=utf-8" in head.lower()
                yield json.loads(body)
    assert buffer == b"--\r\n"  # the closing delimiter, and nothing after it


def merged(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """The payloads put together: each deferred fragment's data merged in at its path, each
    stream's items put at theirs, errors and stale entries gathered (a part whose own data
    is null, after a null in a non-null position within it, adds only its errors)."""
    first = payloads[0]
    result = {"data": first["data"], "errors": list(first.get("errors", ())),
              "stale": list(first.get("extensions", {}).get("stale", ()))}
    for payload in payloads[1:]:
        result["stale"] += payload.get("extensions", {}).get("stale", [])
        for entry in payload["incremental"]:
            result["errors"] += entry.get("errors", [])
            path = entry["path"]
            if "items" in entry:
                *path, start = path
            node = result["data"]
            for key in path:
                node = node[key]
            if entry.get("items") is not None:
                node[start:start + len(entry["items"])] = entry["items"]
            elif entry.get("data") is not None:
                _merge(node, entry["data"])
    return result


def _merge(into: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list) and len(value) == len(into[key]):
            for i, (a, b) in enumerate(zip(into[key], value)):
                if isinstance(a, dict) and isinstance(b, dict):
                    _merge(a, b)
                else:
                    into[key][i] = b
        else:
            into[key] = value
