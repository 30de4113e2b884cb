"""Patterns the services publish and apply, with one meaning (issue 24).

An OpenAPI 3.1 document's `pattern` is an ECMA-262 regular expression (JSON Schema 2020-12,
validation §6.3.3 and core §6.4), so that is the dialect a client checks a value with. The
services check the same pattern text with an ECMA-262 engine (the `regress` crate, through its
Python binding) rather than pydantic's Rust `regex` or Python's `re`, whose `\\s`, `\\d`, `$` and
`.` mean other things: `\\s` there takes U+0085 (NEL) and leaves U+FEFF, the reverse of
ECMA-262's WhiteSpace and LineTerminator, so `a@b.c\\u0085` was refused although the published
pattern accepts it. tests/test_services_patterns.py runs every published pattern through
node's RegExp and through the services' own validation."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import regress
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

__all__ = ["ID", "IDEMPOTENCY_KEY", "IDS", "Pattern", "one_of", "published"]


@dataclass(frozen=True)
class Pattern:
    """An ECMA-262 pattern (anchored with ^...$ where the whole value must match, as JSON
    Schema's `pattern` is not anchored by itself). As a pydantic annotation,
    `Annotated[str, Pattern(r"^...$")]`, it validates with ECMA-262 semantics and publishes the
    same text as the field's `pattern`."""

    source: str
    _regex: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The `u` flag: code points, not UTF-16 halves, as validators of JSON Schema apply it.
        object.__setattr__(self, "_regex", regress.Regex(self.source, "u"))

    def matches(self, value: str) -> bool:
        return self._regex.find(value) is not None

    def schema(self) -> dict[str, str]:
        """The JSON Schema of a string parameter that must match."""
        return {"type": "string", "pattern": self.source}

    def _check(self, value: str) -> str:
        if not self.matches(value):
            # The type pydantic gives its own pattern errors: same code, same wording.
            raise PydanticCustomError("string_pattern_mismatch", "String should match pattern '{pattern}'",
                                      {"pattern": self.source})
        return value

    def __get_pydantic_core_schema__(self, source: type[Any], handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["pattern"] = self.source
        return json_schema


# At most 18 digits: ids fit a signed 64-bit integer (models.MAX_ID).
ID = Pattern(r"^[1-9][0-9]{0,17}$")
IDS = Pattern(r"^[1-9][0-9]{0,17}(,[1-9][0-9]{0,17})*$")
# Visible ASCII, as the Idempotency-Key draft's sf-string allows.
IDEMPOTENCY_KEY = Pattern(r"^[!-~]{1,255}$")


@functools.cache  # built once per route, not per request
def one_of(*names: str) -> Pattern:
    """A comma-separated list of these names (words of [a-z]), each any number of times."""
    alternatives = "|".join(names)
    return Pattern(f"^({alternatives})(,({alternatives}))*$")


def published(document: Any, where: str = "#") -> list[tuple[str, str]]:
    """Every (JSON pointer, pattern) of an OpenAPI document (or any JSON value)."""
    found: list[tuple[str, str]] = []
    if isinstance(document, dict):
        for key, value in document.items():
            pointer = f"{where}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if key == "pattern" and isinstance(value, str):
                found.append((pointer, value))
            else:
                found.extend(published(value, pointer))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found.extend(published(value, f"{where}/{index}"))
    return found
