"""Screenshots of ``agent serve``'s web page on the real model, for docs/ui.md and the README.

Starts ``agent serve`` (the embedded SmolLM2-135M-Instruct and the built-in personas) on a
free port, opens the page in headless Chromium (Playwright, ``executable_path`` = Debian's
``chromium``), has a conversation that passes through three personas -- the poet picked in
the persona menu, the scientist asked for in words, the philosopher addressed as
``@philosopher``, then a turn left to the automatic router (its scores in the routing
panel) -- with a negation in its first sentence, and saves

- ``docs/img/ui-desktop.png``: the whole page at 1280x800;
- ``docs/img/ui-scene.png``: the scene panel with a node's attributes on hover;
- ``docs/img/ui-phone.png``: the page at a phone's width (390 px), full length.

The session it makes is deleted at the end. Run from the repository root:

    .venv/bin/python examples/ui_screenshots.py [--out docs/img] [--chromium PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

TURNS = [  # (the persona menu, the message)
    ("poet", "The old sailor does not see the lighthouse in the fog."),
    ("auto", "Let the scientist explain why the fog hides the light."),
    ("auto", "@philosopher Is a light that nobody sees still a light?"),
    ("auto", "Is it morally right to leave a light burning that no one will ever see?"),
]
WAIT_MS = 180_000  # a turn on the real model, on a slow CPU


def start_server() -> tuple[subprocess.Popen[str], str]:
    """``agent serve`` on a free port; returns the process and the page's URL."""
    agent = shutil.which("agent", path=str(Path(sys.executable).parent)) or "agent"
    server = subprocess.Popen(
        [agent, "serve", "--port", "0", "--quiet", "-o", "max_new_tokens", "90",
         "-o", "seed", "7"], stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    for line in server.stderr:
        print(line, end="", file=sys.stderr)
        found = re.search(r"on (http://\S+)/v1", line)
        if found:
            return server, found.group(1)
    raise SystemExit(f"agent serve exited with {server.wait()} before serving")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or
                        shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        raise SystemExit("no chromium found: apt-get install chromium, or --chromium PATH")
    from playwright.sync_api import expect, sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    session = f"ui-tour-{secrets.token_hex(2)}"
    server, url = start_server()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            expect.set_options(timeout=WAIT_MS)
            page.goto(f"{url}/#session={session}")
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            replies = page.locator("#messages .msg.reply")
            for number, (persona, message) in enumerate(TURNS):
                page.select_option("#persona", persona)
                page.fill("#message", message)
                page.press("#message", "Enter")
                expect(replies.nth(number)).to_have_class("msg reply done")
                print(f"{replies.nth(number).get_attribute('data-persona')}: "
                      f"{replies.nth(number).locator('.text').inner_text()}", file=sys.stderr)
            page.evaluate("window.hyperlex.cy.nodes().removeClass('new')")
            page.screenshot(path=args.out / "ui-desktop.png")
            box = page.locator("#graph").bounding_box()
            spot = page.evaluate("window.hyperlex.cy.nodes('[label = \"lighthouse\"]')"
                                 ".renderedPosition()")
            page.mouse.move(box["x"] + spot["x"], box["y"] + spot["y"])
            expect(page.locator("#node-info")).to_be_visible()
            page.locator("#scene").screenshot(path=args.out / "ui-scene.png")
            phone = browser.new_page(viewport={"width": 390, "height": 844},
                                     device_scale_factor=2)
            phone.goto(f"{url}/#session={session}")
            expect(phone.locator("#messages .msg.reply")).to_have_count(len(TURNS))
            phone.screenshot(path=args.out / "ui-phone.png", full_page=True)
            browser.close()
        request = urllib.request.Request(f"{url}/api/sessions/{session}", method="DELETE")
        with urllib.request.urlopen(request) as answer:
            print(json.load(answer), file=sys.stderr)
    finally:
        server.terminate()
        server.wait(60)
    names = ("ui-desktop.png", "ui-scene.png", "ui-phone.png")
    print(f"wrote {', '.join(str(args.out / name) for name in names)}")


if __name__ == "__main__":
    main()
