"""GraphiQL in a real browser (Debian's chromium, driven by Playwright), with every request
that is not to this machine blocked: the page loads, runs the order page, shows the answer,
and nothing leaves the machine; a deferred fragment shows up when its part arrives; the
schema it introspects feeds its Docs, autocomplete, lint and explorer; a shared link fills
the editors and runs nothing until the person does."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from playwright.async_api import BrowserContext, Page, Request, Route, async_playwright, expect

from shop import STAFF, Shop, on_a_real_port, running_gateway

CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it (never `playwright install`)
# Headless, and none of chromium's own background traffic (updates, sync, QUIC probes).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ORDER_PAGE = (Path(__file__).resolve().parent.parent / "schema" / "examples" / "order_page.graphql").read_text()
LOCAL = {"127.0.0.1", "localhost"}
SCREENSHOT = Path(os.environ.get("BOOKVAULT_SCREENSHOT", "/tmp/bookvault-graphiql.png"))
DOCS_SCREENSHOT = Path(os.environ.get("BOOKVAULT_DOCS_SCREENSHOT", "/tmp/bookvault-graphiql-docs.png"))
QUERY_EDITOR = '[aria-label="Query Editor"] .CodeMirror'
VARIABLES_EDITOR = '[aria-label="Variables"] .graphiql-editor:not(.hidden) .CodeMirror'
HEADERS_EDITOR = '[aria-label="Headers"] .graphiql-editor:not(.hidden) .CodeMirror'
# What GraphiQL shows when its introspection was refused: the Docs pane, then the explorer.
NO_SCHEMA = ("Error fetching schema", "No Schema Available")


@contextlib.asynccontextmanager
async def gateway_on_a_port(shop: Shop) -> AsyncIterator[str]:
    """The six services and the gateway, each on its own 127.0.0.1 port."""
    async with contextlib.AsyncExitStack() as stack:
        urls = {name: await stack.enter_async_context(on_a_real_port(app)) for name, app in shop.apps.items()}
        _, app = await stack.enter_async_context(running_gateway(shop, urls=urls))
        yield await stack.enter_async_context(on_a_real_port(app))


async def _set_editor(page, selector: str, text: str) -> None:
    # GraphiQL's editors are CodeMirror 5 instances; setValue is what a paste does.
    await page.eval_on_selector(selector, "(el, text) => el.CodeMirror.setValue(text)", text)


@contextlib.asynccontextmanager
async def chromium(problems: list[str]) -> AsyncIterator[tuple[BrowserContext, Page]]:
    """A browser context and a page in it; the page's console errors and exceptions go to `problems`."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 900})
            page = await context.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            yield context, page
        finally:
            await browser.close()


async def _only_local(context: BrowserContext, blocked: list[str]) -> None:
    """Every request of `context` to anything but this machine is aborted, its URL put in `blocked`."""
    async def only_local(route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL:
            await route.continue_()
        else:
            blocked.append(route.request.url)
            await route.abort("blockedbyclient")

    await context.route("**/*", only_local)


@dataclass
class Visit:
    """A page's problems (console errors, exceptions) and the requests blocked for leaving the machine."""

    problems: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def local(self, shop: Shop) -> AsyncIterator[tuple[str, BrowserContext, Page]]:
        """The gateway on a port and a chromium page whose requests may go to this machine only."""
        async with gateway_on_a_port(shop) as url, chromium(self.problems) as (context, page):
            await _only_local(context, self.blocked)
            yield url, context, page


async def _value(page: Page, selector: str) -> str:
    """The text in the CodeMirror editor at `selector`."""
    return await page.eval_on_selector(selector, "el => el.CodeMirror.getValue()")  # type: ignore[no-any-return]


async def _open(page: Page, url: str, query: str, variables: dict[str, str]) -> None:
    """GraphiQL at `url` with `query` and `variables` in its editors, and a staff token in its headers."""
    await page.goto(f"{url}/graphql")
    await page.wait_for_selector(QUERY_EDITOR, timeout=20_000)
    await _set_editor(page, QUERY_EDITOR, query)
    await _set_editor(page, VARIABLES_EDITOR, json.dumps(variables))
    await page.get_by_role("button", name="Headers").click()
    await _set_editor(page, HEADERS_EDITOR, json.dumps({"Authorization": STAFF["authorization"]}))


async def _shown(page: Page, wanted: str) -> dict[str, Any]:
    """The result pane's answer, once its text includes `wanted`."""
    shown = await page.wait_for_function(
        """(wanted) => { const cm = document.querySelector('.result-window .CodeMirror');
                         const text = cm && cm.CodeMirror.getValue(); return text && text.includes(wanted) && text; }""",
        arg=wanted, timeout=20_000)
    return json.loads(await shown.json_value())  # type: ignore[no-any-return]


async def test_graphiql_runs_the_order_page_in_a_browser_with_nothing_leaving_the_machine(shop):
    """In chromium, GraphiQL from /graphql runs the order page for 4850 and shows its status and customer; every request stays local."""
    async with shop.client("orders") as orders:
        order = (await orders.get("/orders/4850")).json()
    async with shop.client("customers") as customers:
        customer = (await customers.get(f"/customers/{order['customerId']}")).json()

    requests: list[Request] = []
    visit = Visit()
    async with visit.local(shop) as (url, context, page):
        context.on("request", lambda request: requests.append(request))
        await _open(page, url, ORDER_PAGE, {"id": "4850"})
        await page.click(".graphiql-execute-button")
        result = await _shown(page, '"data"')
        await page.screenshot(path=str(SCREENSHOT))

    assert result["data"]["order"]["status"] == order["status"]
    assert result["data"]["order"]["customer"]["name"] == customer["name"]
    assert "errors" not in result
    posts = [r for r in requests if r.method == "POST"]
    assert [urlsplit(r.url).path for r in posts] == ["/graphql", "/graphql"]  # the schema, then the query
    assert posts[-1].headers["authorization"] == STAFF["authorization"]
    assert visit.blocked == [] and visit.problems == []
    assert {urlsplit(r.url).hostname for r in requests} == {"127.0.0.1"}
    assert {urlsplit(r.url).path for r in requests if r.method == "GET"} >= {"/graphql", "/graphiql/assets/graphiql-3.8.3/graphiql.min.js"}


DEFERRED_ORDER_PAGE = """query DeferredOrderPage($id: ID!) {
  order(id: $id) {
    id
    status
    customer { name }
    ... @defer(label: "shipping") {
      shipment { carrier trackingNumber }
    }
  }
}"""


async def test_graphiql_shows_a_deferred_fragment_when_its_part_arrives(shop):
    """In chromium, GraphiQL runs a deferred order page: the pane shows the order while shipping is held, then the shipment once it is let go."""
    await shop.faults("shipping", hang=True, paths=["/shipments"])
    problems: list[str] = []
    async with gateway_on_a_port(shop) as url, chromium(problems) as (_, page):
        await _open(page, url, DEFERRED_ORDER_PAGE, {"id": "4850"})
        await page.click(".graphiql-execute-button")
        initial = await _shown(page, '"status"')
        async with shop.client("shipping") as shipping:  # let the held shipments call go
            (await shipping.delete("/_admin/faults")).raise_for_status()
        whole = await _shown(page, '"trackingNumber"')

    assert "shipment" not in initial["data"]["order"] and initial["data"]["order"]["customer"]["name"]
    assert whole["data"]["order"]["shipment"]["carrier"] and whole["data"]["order"]["customer"]["name"]
    assert "errors" not in whole
    assert problems == []


async def test_graphiql_runs_a_subscription_over_its_websocket_and_shows_each_change(shop):
    """In chromium, GraphiQL runs orderUpdated with the Headers tab's token (sent in connection_init): the order, then its new status after a PATCH."""
    async with shop.client("orders") as orders:
        order = (await orders.get("/orders/4850")).json()
    problems: list[str] = []
    sockets: list[str] = []
    query = "subscription($id: ID!) { orderUpdated(id: $id) { id status version } }"
    result_text = """() => { const cm = document.querySelector('.result-window .CodeMirror');
                             const text = cm && cm.CodeMirror.getValue(); return text && text.includes('"data"') && text; }"""
    async with gateway_on_a_port(shop) as url, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.on("pageerror", lambda e: problems.append(str(e)))
            await page.goto(f"{url}/graphql")
            await page.wait_for_selector('[aria-label="Query Editor"] .CodeMirror', timeout=20_000)
            await _set_editor(page, '[aria-label="Query Editor"] .CodeMirror', query)
            await _set_editor(page, '[aria-label="Variables"] .graphiql-editor:not(.hidden) .CodeMirror',
                              json.dumps({"id": "4850"}))
            await page.get_by_role("button", name="Headers").click()
            await _set_editor(page, '[aria-label="Headers"] .graphiql-editor:not(.hidden) .CodeMirror',
                              json.dumps({"Authorization": STAFF["authorization"]}))
            await page.click(".graphiql-execute-button")
            first = json.loads(await (await page.wait_for_function(result_text, timeout=20_000)).json_value())
            status = {"PLACED": "PAID", "PAID": "SHIPPED", "SHIPPED": "DELIVERED"}[order["status"]]
            async with shop.client("orders") as orders:
                (await orders.patch("/orders/4850", json={"status": status})).raise_for_status()
            changed = await page.wait_for_function(
                f"() => {{ const t = ({result_text})(); return t && t.includes('{status}') && t; }}", timeout=20_000)
            second = json.loads(await changed.json_value())
        finally:
            await browser.close()
    assert first["data"]["orderUpdated"] == {"id": "4850", "status": order["status"], "version": order["version"]}
    assert second["data"]["orderUpdated"] == {"id": "4850", "status": status, "version": order["version"] + 1}
    assert [urlsplit(s).path for s in sockets] == ["/graphql"] and urlsplit(sockets[0]).scheme == "ws"
    assert problems == []


def _introspection(request: Request) -> bool:
    """Whether `request` is GraphiQL's introspection (a POST asking for `__schema`)."""
    return request.method == "POST" and "__schema" in (request.post_data or "")


async def _with_schema(page: Page, address: str) -> None:
    """GraphiQL at `address`, once its introspection was answered and its query editor has the schema (what hints and lint use)."""
    async with page.expect_response(lambda response: _introspection(response.request), timeout=20_000) as answer:
        await page.goto(address)
    introspected = await (await answer.value).json()
    assert "errors" not in introspected, introspected["errors"]
    await page.wait_for_function(
        "(selector) => { const cm = document.querySelector(selector); return cm && cm.CodeMirror.options.hintOptions.schema; }",
        arg=QUERY_EDITOR, timeout=20_000)


async def _shows_no_schema_error(page: Page) -> None:
    """The page shows neither the Docs pane's nor the explorer's "no schema" message."""
    for text in NO_SCHEMA:
        await expect(page.get_by_text(text)).to_have_count(0)


async def test_graphiql_docs_list_the_fields_of_query(shop):
    """In chromium, GraphiQL's Documentation Explorer opens on the root type Query and lists its fields: book, books, order and the rest."""
    visit = Visit()
    async with visit.local(shop) as (url, context, page):
        await page.goto(f"{url}/graphql")
        await page.get_by_role("button", name="Show Documentation Explorer").click()
        docs = page.locator(".graphiql-doc-explorer")
        # Root Types: "query: Query", the type a link after its operation's name.
        query_type = docs.locator(".graphiql-doc-explorer-root-type ~ .graphiql-doc-explorer-type-name", has_text="Query")
        await expect(query_type.or_(docs.get_by_text(NO_SCHEMA[0]))).to_be_visible(timeout=20_000)
        await _shows_no_schema_error(page)
        await query_type.click()
        await expect(docs.locator(".graphiql-doc-explorer-title")).to_have_text("Query")
        await expect(docs.locator(".graphiql-doc-explorer-field-name").get_by_text("books", exact=True)).to_be_visible()
        fields = await docs.locator(".graphiql-doc-explorer-field-name").all_inner_texts()
        await _shows_no_schema_error(page)
        await page.screenshot(path=str(DOCS_SCREENSHOT))

    assert {"me", "order", "orders", "customer", "book", "books"} <= set(fields)
    assert visit.blocked == [] and visit.problems == []


async def test_graphiql_autocompletes_query_fields_as_they_are_typed(shop):
    """In chromium, typing `{ bo` in GraphiQL's query editor offers `book` and `books` from the introspected schema."""
    visit = Visit()
    async with visit.local(shop) as (url, context, page):
        await _with_schema(page, f"{url}/graphql")
        await _set_editor(page, QUERY_EDITOR, "")
        await page.click(f"{QUERY_EDITOR} .CodeMirror-lines")
        await page.keyboard.type("{ bo")
        hints = page.locator(".CodeMirror-hints .CodeMirror-hint")
        await expect(hints.first).to_be_visible(timeout=10_000)
        offered = await hints.all_inner_texts()

    assert {"book", "books"} <= set(offered)
    assert visit.blocked == [] and visit.problems == []


async def test_graphiql_marks_a_misspelt_field(shop):
    """In chromium, `{ bok(id: 1) { title } }` gets an error mark on `bok`, whose tooltip suggests book and books."""
    visit = Visit()
    async with visit.local(shop) as (url, context, page):
        await _with_schema(page, f"{url}/graphql")
        await _set_editor(page, QUERY_EDITOR, "{ bok(id: 1) { title } }")
        mark = page.locator(f"{QUERY_EDITOR} .CodeMirror-lint-mark-error").first  # `bok`, then the `(` after it
        await expect(mark).to_have_text("bok", timeout=10_000)
        await mark.hover()
        tooltip = page.locator(".CodeMirror-lint-tooltip")
        await expect(tooltip).to_be_visible()
        message = await tooltip.inner_text()

    assert 'Cannot query field "bok" on type "Query"' in message and '"book"' in message
    assert visit.blocked == [] and visit.problems == []


async def test_graphiql_explorer_lists_the_root_fields(shop):
    """In chromium, GraphiQL's Explorer plugin lists Query's fields, book and books among them, never "No Schema Available"."""
    visit = Visit()
    async with visit.local(shop) as (url, context, page):
        await page.goto(f"{url}/graphql")
        await page.get_by_role("button", name="Show GraphiQL Explorer").click()
        explorer = page.locator(".graphiql-explorer-root")
        fields = explorer.locator(".graphiql-explorer-field-view")
        books = fields.get_by_text("books", exact=True)
        await expect(books.or_(page.get_by_text(NO_SCHEMA[1]))).to_be_visible(timeout=20_000)
        await _shows_no_schema_error(page)
        listed = await fields.all_inner_texts()

    assert {"book", "books", "order", "customer"} <= set(listed)
    assert visit.blocked == [] and visit.problems == []


SHARED_QUERY = """query Shelf($id: ID!) {
  book(id: $id) { id title }
}

query Everything {
  books(ids: ["1", "2"]) { title }
}"""


async def test_a_shared_link_fills_graphiql_and_runs_nothing_until_run_is_clicked(shop):
    """In chromium, /graphql?query=&variables=&operationName=&headers= fills query and variables (never headers); only introspection is POSTed until Run, then the link's Shelf once."""
    async with shop.client("catalog") as catalog:
        book = (await catalog.get("/books/1")).json()
    variables = json.dumps({"id": "1"})
    link = urlencode({"query": SHARED_QUERY, "variables": variables, "operationName": "Shelf",
                      "headers": json.dumps({"Authorization": STAFF["authorization"]})})
    requests: list[Request] = []
    visit = Visit()
    async with visit.local(shop) as (url, context, page):
        context.on("request", lambda request: requests.append(request))
        await shop.reset_stats()
        await _with_schema(page, f"{url}/graphql?{link}")
        query_shown = await _value(page, QUERY_EDITOR)
        variables_shown = await _value(page, VARIABLES_EDITOR)
        await page.get_by_role("button", name="Headers").click()
        headers_shown = await _value(page, HEADERS_EDITOR)
        before_run = list(requests)
        catalog_before_run = (await shop.calls())["catalog"]
        await page.click(".graphiql-execute-button")
        result = await _shown(page, '"title"')

    assert query_shown == SHARED_QUERY and variables_shown == variables and headers_shown == ""
    posts_before = [r for r in before_run if r.method == "POST"]
    assert posts_before and all(_introspection(r) for r in posts_before)
    assert catalog_before_run == []  # no book was read before Run
    run = [r for r in requests[len(before_run):] if r.method == "POST"]
    assert len(run) == 1 and urlsplit(run[0].url).path == "/graphql"
    body = json.loads(run[0].post_data or "{}")
    assert body["query"] == SHARED_QUERY and body["operationName"] == "Shelf" and body["variables"] == {"id": "1"}
    assert "authorization" not in run[0].headers
    assert result["data"] == {"book": {"id": "1", "title": book["title"]}} and "errors" not in result
    assert visit.blocked == [] and visit.problems == []


@pytest.fixture(autouse=True)
def _chromium_is_installed() -> None:
    assert Path(CHROMIUM).exists(), "chromium missing: .ci/run installs it (apt-get install chromium)"
