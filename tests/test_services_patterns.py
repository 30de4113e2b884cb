"""Patterns that mean the same everywhere (issue 24): every `pattern` the services publish in their
OpenAPI documents is run, on the same strings, through a client's reading of it (ECMA-262:
node's RegExp, with and without the `u` flag) and through the server's own checking of the value
it applies to (the request body's model as the service validates it, or a real request for a
path, query or header parameter): the two agree on every string."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter, ValidationError

from backends import SQLITE_ONLY
from mock_services import SERVICES, create_app
from mock_services.patterns import published

# Characters each engine reads its own way: Unicode's White_Space and ECMA-262's WhiteSpace and
# LineTerminator (U+0085 and U+FEFF are in one and not the other), digits of other scripts, NUL,
# an astral character (one code point, two UTF-16 units), letters of other cases and scripts.
TRICKY = [chr(c) for c in (*range(0x09, 0x0E), 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200C),
                           0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF, 0x180E, 0x200B)] + [
    "\x00", "\x7f", "٣", "１", "𝟙", "😀", "é", "ß", "İ", "K", "ǅ", "-", ",", ".", "@", "!", "~", "/", "%"]
EXAMPLES = ["", "0", "1", "01", "10", "1.5", "1.55", "1.555", ".5", "1.", "999999999.99", "1000000000", "123456789012345678",
            "1234567890123456789", "1,2", "1, 2", "1,,2", ",1", "1,", "a@b.c", "a@b", "a@@b.c", "ab.c", "EUR", "eur", "EU",
            "EURO", "NL", "card", "card-declined", "Card", "-card", "a" * 33, "author", "author,author", "author,",
            "authors", "key-1", "k" * 255, "k" * 256, "Ada Okafor"]


def _corpus() -> list[str]:
    strings = set(EXAMPLES)
    for tricky in TRICKY:  # at the end, at the start and inside of values that match without it
        for example in ("a@b.c", "1", "12", "EUR", "NL", "card", "author", "Ada", "1,2", "key"):
            strings |= {example + tricky, tricky + example, example[:1] + tricky + example[1:]}
    rng = random.Random(24)
    alphabet = "09az@.,-AZ" + "".join(TRICKY)
    strings |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))) for _ in range(400)}
    return sorted(strings)


CORPUS = _corpus()
# A client's reading of each pattern, in JavaScript: new RegExp(pattern, flags).test(value).
NODE = """
const {patterns, strings} = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const out = {};
for (const p of patterns) out[p] = {u: strings.map(s => new RegExp(p, 'u').test(s)),
                                    plain: strings.map(s => new RegExp(p).test(s))};
process.stdout.write(JSON.stringify(out));
"""


def _documents() -> dict[str, dict[str, Any]]:
    return {name: create_app(spec).state.openapi for name, spec in SERVICES.items()}


def _client_reading(patterns: set[str], strings: list[str]) -> dict[str, dict[str, list[bool]]]:
    node = shutil.which("node")
    assert node, "node is needed (tests/js; .ci/run installs it)"
    done = subprocess.run([node, "-e", NODE], input=json.dumps({"patterns": sorted(patterns), "strings": strings}),
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def _pointer(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.lstrip("#/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _service_models() -> dict[str, type[BaseModel]]:
    """The services' pydantic models by name, as the documents' components name them (models.py's, and any a
    service module declares itself)."""
    found: dict[str, type[BaseModel]] = {}
    pending = list(BaseModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending.extend(model.__subclasses__())
        if model.__module__.startswith("mock_services."):
            found[model.__name__] = model
    return found


def _body_field_accepts(pointer: str) -> Any:
    """`#/components/schemas/<Model>/properties/<field>/pattern`: how the service reads that field of a
    request body (read_body: the model, strict): does it pass the field's pattern?"""
    parts = pointer.split("/")
    model, field = _service_models()[parts[3]], parts[5]
    info = model.model_fields[field]
    adapter = TypeAdapter(Annotated[info.annotation, info])  # the field exactly as the model declares it

    def accepts(value: str) -> bool | None:
        """None: refused for another rule (a length), before the pattern was looked at."""
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            return False if any(error["type"] == "string_pattern_mismatch" for error in exc.errors()) else None
        return True

    return accepts


def test_every_published_pattern_is_read_alike_by_node_and_by_the_services_models():
    """Each body field's pattern: node's RegExp ('u' and plain) and the service's own validation agree on ~1,900 strings."""
    documents = _documents()
    found = [(name, pointer, pattern) for name, document in documents.items() for pointer, pattern in published(document)]
    assert len({pattern for _, _, pattern in found}) >= 9  # money, currency, email, text, method, country, ids, ...
    js = _client_reading({pattern for _, _, pattern in found}, CORPUS)
    disagreements, checked = [], 0
    for name, pointer, pattern in found:
        if not pointer.startswith("#/components/schemas/"):
            continue  # parameters: by real requests, below
        accepts = _body_field_accepts(pointer)
        checked += 1
        for value, by_u, by_plain in zip(CORPUS, js[pattern]["u"], js[pattern]["plain"], strict=True):
            server = accepts(value)
            if server is not None and not server == by_u == by_plain:
                disagreements.append((name, pointer, value, server, by_u, by_plain))
    assert checked >= 8
    assert disagreements == []


def test_the_email_pattern_accepts_next_line_as_a_client_reads_it():
    """The issue's case: a@b.c + U+0085 matches the published email pattern in JavaScript, so the model takes it; U+FEFF is refused by both."""
    pattern = _pointer(_documents()["customers"], "#/components/schemas/CustomerPatch/properties/email/pattern")
    js = _client_reading({pattern}, ["a@b.c\u0085", "a@b.c\ufeff"])[pattern]
    assert js == {"u": [True, False], "plain": [True, False]}
    accepts = _body_field_accepts("#/components/schemas/CustomerPatch/properties/email/pattern")
    assert [accepts("a@b.c\u0085"), accepts("a@b.c\ufeff")] == [True, False]


async def test_patching_an_email_with_next_line_is_accepted(service):
    """PATCH /customers/9 {"email": "a@b.c\\u0085"}: 200 and stored as sent (it was a 400); with U+FEFF: a 400."""
    customers = await service("customers")
    response = await customers.patch("/customers/9", json={"email": "a@b.c\u0085"})
    assert response.status_code == 200, response.text
    assert (await customers.get("/customers/9")).json()["email"] == "a@b.c\u0085"
    assert (await customers.patch("/customers/9", json={"email": "a@b.c\ufeff"})).status_code == 400


# Valid values of the parameters a request needs besides the one under test.
REQUIRED = {"ids": "1", "bookIds": "1", "orderIds": "1", "id": "1", "bookId": "1"}


def _sendable(value: str, where: str) -> bool:
    if where == "header":  # a header value is visible ASCII or spaces and tabs inside (RFC 9110 §5.5)
        return value == value.strip(" \t") and all(c == " " or c == "\t" or "!" <= c <= "~" for c in value)
    if where == "path":  # "" and "/" would be another route
        return value != "" and "/" not in value
    return True


@SQLITE_ONLY  # parameters are checked before the database is read: the backend plays no part
async def test_every_parameter_pattern_is_applied_as_a_client_reads_it(service):
    """Each published path, query and header pattern: a request with the value is refused (400) exactly when node's RegExp says no."""
    documents = _documents()
    strings = [s for s in CORPUS if len(s) <= 24][::3] + ["1, 2", "1,2", "123456789012345678", "1234567890123456789",
                                                           "author", "author,author", "٣", "1\n", "k" * 255, "k" * 256]
    patterns = {pattern for document in documents.values() for _, pattern in published(document)}
    js = _client_reading(patterns, strings)
    disagreements, checked = [], set()
    for name, document in documents.items():
        client = await service(name)
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                # Reads, and the writes that take no body (a body is read before some parameters are)
                if method not in ("get", "post") or "requestBody" in operation:
                    continue
                for parameter in operation.get("parameters", []):
                    pattern = parameter.get("schema", {}).get("pattern")
                    if pattern is None:
                        continue
                    checked.add((parameter["in"], parameter["name"]))
                    for value, expected in zip(strings, js[pattern]["u"], strict=True):
                        if not _sendable(value, parameter["in"]):
                            continue
                        answer = await _request(client, method, path, operation, parameter, value)
                        refused = answer.status_code == 400
                        if refused == expected:
                            disagreements.append((name, method, path, parameter["name"], value, answer.status_code))
    assert {("path", "id"), ("query", "ids"), ("query", "customerId"), ("query", "customerIds"), ("query", "include"),
            ("header", "Idempotency-Key")} <= checked
    assert disagreements == []


async def _request(client, method: str, path: str, operation: dict[str, Any], parameter: dict[str, Any], value: str):
    query: dict[str, str] = {}
    headers: dict[str, str] = {}
    url = path
    for other in operation.get("parameters", []):
        given = value if other is parameter else REQUIRED.get(other["name"]) if other.get("required") else None
        if given is None:
            continue
        if other["in"] == "path":
            url = url.replace("{" + other["name"] + "}", quote(given, safe=""))
        elif other["in"] == "query":
            query[other["name"]] = given
        else:
            headers[other["name"]] = given
    return await client.request(method.upper(), url, params=query, headers=headers)
