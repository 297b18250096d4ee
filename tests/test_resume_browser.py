"""Session resume in a real browser: headless Chromium, forward from its command line in front of a
real Rserve, and the network between them cut by tests/cutproxy.py while R is busy.

- The demo page (demo/www, ResumableSocket inside qap.js): `x <- 42`, then an evaluation that
  sleeps, cut for 2 s during the sleep. The answer arrives once, `x` is still 42, R's process id
  is unchanged, the transcript is as it was, and the status line said reconnecting, then
  reconnected.
- rserve.js as published, unchanged, handed ResumableSocket as its WebSocket: the same cut, the
  same R session afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from .conftest import ROOT, Rserve, StartCli, eventually, free_port
from .cutproxy import CutProxy
from .test_browser import CHROMIUM, CHROMIUM_ARGS, DOC_ROOT, need_browser
from .test_layouts import COUNTING_INIT, PAGE, rserve_js

pytestmark = [pytest.mark.rserve, pytest.mark.slow]


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    async_api = need_browser()
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def outage(proxy: CutProxy, seconds: float) -> None:
    """The network goes away (open connections cut, new ones fail) and comes back."""
    proxy.down()
    await asyncio.sleep(seconds)
    proxy.up()


async def log_in(page: Any) -> Callable[..., Awaitable[str]]:
    """Log in on the demo page (OCAP example user); returns `evaluate(expr, during=None)`: type
    `expr`, await `during` meanwhile, and return the entry's output once it is done."""
    await page.fill("#user", "mike")
    await page.fill("#password", "mypwd")
    await page.click("#login button")
    await page.wait_for_selector("body[data-state=ready]")

    async def evaluate(expr: str, during: Awaitable[None] | None = None) -> str:
        count = await page.locator(".entry[data-state=done]").count()
        await page.fill("#expr", expr)
        await page.press("#expr", "Enter")
        if during is not None:
            await during
        entry = page.locator(".entry[data-state=done]").nth(count)
        await entry.wait_for(timeout=60_000)
        return str(await entry.locator(".output").text_content())

    return evaluate


async def carried_on(page: Any, evaluate: Callable[..., Awaitable[str]], pid: str) -> None:
    """After the interruption: the same workspace and R process, and the transcript holds each
    input once, in order, each with its own answer."""
    assert await evaluate("x") == "[1] 42\n"
    assert await evaluate("Sys.getpid()") == pid
    inputs = [await e.text_content() for e in await page.locator(".entry .input").all()]
    assert inputs == [
        "x <- 42; invisible(NULL)",
        "Sys.getpid()",
        "Sys.sleep(3); sum(as.numeric(1:1e6))",
        "x",
        "Sys.getpid()",
    ]


async def test_demo_page_survives_a_cut_during_an_evaluation(
    fresh_rserve: Callable[..., Rserve],
    forward_cli: StartCli,
    proxies: Callable[[int], Any],
    chromium: Any,
) -> None:
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    fwd = await forward_cli("-s", str(rserve.socket), "-r", str(DOC_ROOT))
    proxy = await proxies(fwd.ports["-p"])
    page = await chromium.new_page(viewport={"width": 1000, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    links: list[str] = []
    await page.expose_function("reportLink", lambda text: links.append(text))
    await page.goto(f"http://127.0.0.1:{proxy.port}/")
    await page.wait_for_selector("body[data-state=login]")
    # Every change of the status line, as the user would have seen it.
    await page.evaluate(
        """() => new MutationObserver(() => window.reportLink(
                document.querySelector('#status').textContent))
            .observe(document.querySelector('#status'), {childList: true, characterData: true,
                                                          subtree: true})"""
    )
    evaluate = await log_in(page)

    assert await evaluate("x <- 42; invisible(NULL)") is not None
    pid = await evaluate("Sys.getpid()")

    async def cut_during_the_sleep() -> None:
        await asyncio.sleep(1.0)
        await outage(proxy, 2.0)

    answer = await evaluate("Sys.sleep(3); sum(as.numeric(1:1e6))", cut_during_the_sleep())
    assert answer == "[1] 500000500000\n"
    await carried_on(page, evaluate, pid)
    assert proxy.cuts >= 1
    await eventually(lambda: any("reconnected" in t for t in links), what="reconnected shown")
    assert any("reconnecting" in t for t in links), links
    assert errors == []
    await fwd.expect("resumed by")
    assert "parked" in fwd.log()


async def test_rserve_js_gains_resume_from_the_wrapper(
    fresh_rserve: Callable[..., Rserve],
    forward_cli: StartCli,
    proxies: Callable[[int], Any],
    chromium: Any,
    tmp_path: Path,
) -> None:
    root = tmp_path / "www"
    root.mkdir()
    js = rserve_js()
    for name in ("rserve.js", "underscore.js"):
        shutil.copy(js / name, root / name)
    shutil.copy(DOC_ROOT / "resume.js", root / "resume.js")
    # The rserve.js test page, with what an application adds: the wrapper in place of the
    # browser's WebSocket before rserve.js opens its socket (modules run in order, after the
    # classic scripts that define Rserve).
    html = PAGE.read_text().replace(
        '<script src="rserve.js"></script>',
        '<script src="rserve.js"></script>\n<script type="module">\n'
        'import { ResumableSocket } from "./resume.js";\nwindow.WebSocket = ResumableSocket;\n'
        "</script>",
    )
    html = html.replace('<script>\n"use strict";', '<script type="module">')
    assert html.count('type="module"') == 2
    (root / "index.html").write_text(html)
    count = tmp_path / "count"
    rserve = fresh_rserve(ocap=True, source=COUNTING_INIT.format(count=count))
    # R sessions so far: Rserve's readiness check (tests/conftest.py) opened one.
    before = len(count.read_text().split()) if count.exists() else 0
    fwd = await forward_cli("-s", str(rserve.socket), "-r", str(root))
    proxy = await proxies(fwd.ports["-p"])
    page = await chromium.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    base = f"http://127.0.0.1:{proxy.port}/"
    query = urlencode(
        {"ws": base.replace("http", "ws", 1), "expr": "x <- 42; Sys.sleep(2.5); 1:2e5"}
    )
    await page.goto(f"{base}index.html?{query}")
    await asyncio.sleep(1.0)  # R is in its sleep
    await outage(proxy, 1.0)
    ended = "body[data-state=done], body[data-state=error], body[data-state=closed]"
    await page.wait_for_selector(ended, state="attached", timeout=60_000)
    assert await page.get_attribute("body", "data-state") == "done", await page.text_content("#out")
    assert json.loads(str(await page.text_content("#out"))) == {
        "length": 200_000,
        "first": 1,
        "last": 200_000,
    }
    assert errors == []
    assert proxy.cuts >= 1
    assert len(count.read_text().split()) == before + 1  # one R session throughout
    await fwd.expect("resumed by")


async def test_demo_page_survives_a_hand_over_during_an_evaluation(
    fresh_rserve: Callable[..., Rserve],
    forward_cli: StartCli,
    chromium: Any,
    tmp_path: Path,
) -> None:
    """forward is replaced by a new process (--takeover) while R sleeps: the page carries on
    with the new one, the same R, the answer once."""
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    port = free_port()
    args = (
        *("-s", str(rserve.socket), "-r", str(DOC_ROOT), "-p", str(port)),
        *("--handover-socket", str(tmp_path / "handover.sock")),
    )
    old = await forward_cli(*args, ports=(), ready="listening on")
    page = await chromium.new_page(viewport={"width": 1000, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"http://127.0.0.1:{port}/")
    await page.wait_for_selector("body[data-state=login]")
    evaluate = await log_in(page)

    await evaluate("x <- 42; invisible(NULL)")
    pid = await evaluate("Sys.getpid()")
    new: list[Any] = []

    async def hand_over_during_the_sleep() -> None:
        await asyncio.sleep(1.0)
        new.append(await forward_cli(*args, "--takeover", ports=(), ready="took over"))

    answer = await evaluate("Sys.sleep(3); sum(as.numeric(1:1e6))", hand_over_during_the_sleep())
    assert answer == "[1] 500000500000\n"
    assert await old.wait() == 0
    assert "1 resumable session(s) handed over" in old.log()
    await carried_on(page, evaluate, pid)
    assert errors == []
    await new[0].expect("resumed by")
