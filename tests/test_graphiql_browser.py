"""GraphiQL in a real browser (Debian's chromium, driven by Playwright), with every request
that is not to this machine blocked: the page loads, runs the order page, shows the answer,
and nothing leaves the machine; a deferred fragment shows up when its part arrives."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import BrowserContext, Page, Request, Route, async_playwright

from shop import STAFF, Shop, on_a_real_port, running_gateway

CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it (never `playwright install`)
# Headless, and none of chromium's own background traffic (updates, sync, QUIC probes).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ORDER_PAGE = (Path(__file__).resolve().parent.parent / "schema" / "examples" / "order_page.graphql").read_text()
LOCAL = {"127.0.0.1", "localhost"}
SCREENSHOT = Path(os.environ.get("BOOKVAULT_SCREENSHOT", "/tmp/bookvault-graphiql.png"))


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


async def _open(page: Page, url: str, query: str, variables: dict[str, str]) -> None:
    """GraphiQL at `url` with `query` and `variables` in its editors, and a staff token in its headers."""
    await page.goto(f"{url}/graphql")
    await page.wait_for_selector('[aria-label="Query Editor"] .CodeMirror', timeout=20_000)
    await _set_editor(page, '[aria-label="Query Editor"] .CodeMirror', query)
    await _set_editor(page, '[aria-label="Variables"] .graphiql-editor:not(.hidden) .CodeMirror', json.dumps(variables))
    await page.get_by_role("button", name="Headers").click()
    await _set_editor(page, '[aria-label="Headers"] .graphiql-editor:not(.hidden) .CodeMirror',
                      json.dumps({"Authorization": STAFF["authorization"]}))


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
    blocked: list[str] = []
    problems: list[str] = []

    async def only_local(route: Route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL:
            await route.continue_()
        else:
            blocked.append(route.request.url)
            await route.abort("blockedbyclient")

    async with gateway_on_a_port(shop) as url, chromium(problems) as (context, page):
        await context.route("**/*", only_local)
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
    assert blocked == [] and problems == []
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


@pytest.fixture(autouse=True)
def _chromium_is_installed() -> None:
    assert Path(CHROMIUM).exists(), "chromium missing: .ci/run installs it (apt-get install chromium)"
