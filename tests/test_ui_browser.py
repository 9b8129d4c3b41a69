"""The page in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright)
against ``agent serve`` on the tiny model. Every wait is on a condition of the page (a
reply's label, a node in the graph, the Stop button), never on time."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hyperlex.agent.store import Store
from hyperlex.generation import Generation
from hyperlex.serve.http import Server
from hyperlex.serve.server import PersonaService

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (apt-get install chromium; .ci/run does)")
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox"])
        yield browser
        browser.close()


@contextmanager
def serving(host: Any, engine: Any, path: Path, **overrides: Any) -> Iterator[str]:
    with Store(path) as store, Server(PersonaService(host, engine, store=store,
                                                     overrides=overrides),
                                      port=0, log=False) as server:
        yield server.url.removesuffix("/v1")


@pytest.fixture(scope="module")
def base(host, engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(host, engine, tmp_path_factory.mktemp("page") / "store.db") as url:
        yield url


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def open_page(page: Any, base: str, session: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{base}/#session={session}")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def say(page: Any, text: str, persona: str = "auto") -> Any:
    """Send ``text`` and return the locator of its (last) reply once it is done."""
    from playwright.sync_api import expect

    replies = page.locator("#messages .msg.reply")
    before = replies.count()
    page.select_option("#persona", persona)
    page.fill("#message", text)
    page.press("#message", "Enter")  # Enter sends
    reply = replies.nth(before)
    expect(reply).to_have_class("msg reply done")
    return reply


def graph(page: Any, selector: str) -> list[dict[str, Any]]:
    """The data of the scene graph's elements that match a Cytoscape ``selector``."""
    return page.evaluate(
        f"window.hyperlex.cy.elements({selector!r}).map(e => Object.assign("
        "{style: e.style('line-style')}, e.data()))")


def test_a_message_streams_a_labelled_reply_and_the_scene_grows(page, base) -> None:
    from playwright.sync_api import expect

    open_page(page, base, "first")
    reply = say(page, "The sailor does not see the lighthouse.", persona="alpha")
    expect(reply.locator(".persona-label")).to_have_text("alpha")
    expect(reply.locator(".text")).not_to_be_empty()
    expect(page.locator("#route-source")).to_have_text("pinned")
    labels = {node["label"] for node in graph(page, "node")}
    assert {"sailor", "lighthouse"} <= labels
    negated = graph(page, "edge.negated")
    assert [edge["label"] for edge in negated] == ["not see"]
    assert negated[0]["style"] == "dashed"
    expect(page.locator("#links-table tr.negated")).to_contain_text("NOT see")
    expect(page.locator("#field-emotion")).not_to_have_text("–")
    expect(page.locator("#session-list li[data-session=first]")).to_contain_text("1 turn")


def test_switching_persona_and_the_routing_panel(page, base) -> None:
    from playwright.sync_api import expect

    open_page(page, base, "switch")
    first = say(page, "Tell me about the sea.", persona="alpha")
    second = say(page, "And the moon?", persona="beta")
    expect(first.locator(".persona-label")).to_have_text("alpha")
    expect(second.locator(".persona-label")).to_have_text("beta")
    routed = say(page, "alpha, what now?")  # auto: a request in words
    expect(routed.locator(".persona-label")).to_have_text("alpha")
    expect(page.locator("#route-source")).to_have_text("request")
    expect(page.locator("#scene-version")).to_be_enabled()  # three versions to slide over
    page.locator("#scene-version").fill("0")
    expect(page.locator("#scene-version-label")).to_contain_text("after turn 0")


def test_stop_cancels_the_reply_and_saves_nothing(browser, host, engine, tmp_path,
                                                   monkeypatch) -> None:
    from playwright.sync_api import expect

    stream = engine.stream

    class HeldOpen(Generation):
        """The engine's reply: its first piece, then nothing until it is cancelled, so that
        Stop always lands mid-stream, however fast the model is."""

        def __init__(self, inner: Generation):
            super().__init__(inner.persona)
            self.inner = inner

        def _pieces(self) -> Iterator[str]:
            pieces = iter(self.inner)
            yield next(pieces, "")
            self._cancelled.wait(WAIT_MS / 1000)
            yield from pieces
            self.usage, self.finish_reason = self.inner.usage, self.inner.finish_reason

        def cancel(self) -> None:
            super().cancel()
            self.inner.cancel()

    def held(*args: Any, **kwargs: Any) -> Generation:
        return HeldOpen(stream(*args, **kwargs))

    monkeypatch.setattr(engine, "stream", held)
    with serving(host, engine, tmp_path / "store.db") as base:
        context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone
        page = context.new_page()
        open_page(page, base, "stopped")
        page.fill("#message", "Go on and on.")
        page.click("#send")
        reply = page.locator("#messages .msg.reply")
        expect(reply.locator(".text")).not_to_be_empty()  # streaming has begun
        page.click("#stop")
        expect(reply).to_have_class("msg reply stopped")
        expect(page.locator("#stop")).to_be_disabled()
        expect(page.locator("#status")).to_contain_text("Stopped")
        context.close()
        with Store(tmp_path / "store.db") as store:
            assert not store.has_session("stopped"), store.session("stopped")


def test_a_session_resumes_after_a_server_restart(page, host, engine, tmp_path) -> None:
    from playwright.sync_api import expect

    path = tmp_path / "store.db"
    with serving(host, engine, path) as base:
        open_page(page, base, "kept")
        say(page, "The lighthouse is old.", persona="beta")
    with serving(host, engine, path) as base:  # a new server on the same store
        page.goto(f"{base}/")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        page.get_by_role("button", name="Open session kept").click()
        expect(page.locator("#messages .msg.reply .persona-label")).to_have_text("beta")
        expect(page.locator("#status")).to_contain_text("Resumed kept")
        say(page, "Is it?", persona="alpha")
        expect(page.locator("#session-list li[data-session=kept]")).to_contain_text("2 turns")
    with Store(path) as store:
        assert [t["persona"] for t in store.session("kept").turns] == ["beta", "alpha"]


def test_every_control_is_labelled_and_the_page_fits_a_phone(page, base) -> None:
    from playwright.sync_api import expect

    open_page(page, base, "labelled")
    for label in ("Persona", "Mood", "Weight", "Message", "Scene version"):
        expect(page.get_by_label(label, exact=True)).to_be_attached()
    unnamed = page.evaluate("""() => [...document.querySelectorAll(
        'button, select, input, textarea')].filter(el => el.offsetParent !== null && !(
        el.labels && el.labels.length || el.getAttribute('aria-label')
        || el.textContent.trim())).map(el => el.outerHTML)""")
    assert unnamed == []
    page.keyboard.press("Tab")  # the first stop skips to the message box
    expect(page.locator(":focus")).to_have_text("Skip to the message box")
    for width, height in ((1280, 800), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        wide = page.evaluate("""(w) => [...document.querySelectorAll('*')].filter(
            el => el.getBoundingClientRect().right > w + 1).map(el => el.tagName + '#' + el.id
            + '.' + el.className + ' ' + el.getBoundingClientRect().right)""", width)
        assert page.evaluate("document.documentElement.scrollWidth") <= width, wide
