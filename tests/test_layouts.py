"""Browsers through the documented layouts, as users meet them: rserve.js (the reference client,
unchanged, as published) in headless Chromium, a real Rserve in OCAP mode, forward started from
its command line, real TLS and real nginx.

- The canonical command line (`forward -p P -w W -k KEY -c CERT`): the page from -p opens its
  session on -w.
- A container's published port that differs from forward's own (Docker's port mapping is a
  TCP relay: here tests/cutproxy.py).
- forward's own nginx file, TLS at nginx on a port other than 443.
- Rserve's own nginx example for load-balanced RCloud (no Host passed to forward): refused with
  a log line that says what to change; working with that change, or with --allow-origin.

In each, the same page served by another server on another port of the same host is refused,
and R is never reached for it: every R session Rserve starts appends its pid to a file
(oc.init runs in each session's own process), so the file counts the sessions R really saw.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web

from .conftest import IN_CI, PKI, ROOT, ForwardProcess, Rserve, StartCli, free_port
from .test_browser import CHROMIUM, CHROMIUM_ARGS, need_browser, spki_hash
from .test_deploy import NGINX, need, nginx, site_config

# slow: every test here drives a real Chromium (with test_browser.py, about 35 s in all).
pytestmark = [pytest.mark.rserve, pytest.mark.slow]

JS = ROOT / ".cache" / "js"  # scripts/install-deps puts rserve.js and underscore.js here
PAGE = ROOT / "tests" / "www" / "rserve-js.html"
# 2,000,000 integers (8 MB): many WebSocket frames through every hop. (rserve.js 1.0.2 itself
# cannot parse an answer of 2e6 doubles, 16 MB: "Invalid typed array length".)
BIG = "1:2e6"
BIG_SUMMARY = {"length": 2_000_000, "first": 1, "last": 2_000_000}

COUNTING_INIT = """
library(Rserve)
oc.init <- function() {{
  cat(Sys.getpid(), "\\n", file = "{count}", append = TRUE)
  ocap(function(expr) eval(parse(text = expr), .GlobalEnv))
}}
"""

# Rserve's documentation, "load-balanced RCloud" (its TLS page): the proxy part as published;
# only the listen line (a test port, TLS) and the server list's file are this test's.
RCLOUD_EXAMPLE = """
map $http_upgrade $connection_upgrade {{
        default    upgrade;
    ''    close;
}}

upstream rcloud_servers {{
    least_conn;
    include {servers};
}}

server {{
    listen 127.0.0.1:{port} ssl;
    server_name localhost;

    location / {{
        try_files $uri $uri/ @proxy;
    }}

    location @proxy {{
        proxy_pass        http://rcloud_servers;
        proxy_set_header    X-Real-IP  $remote_addr;
{extra}
        # allow connection upgrade to WebSockets
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;

        proxy_read_timeout 30m;
    }}

    ssl_certificate {cert};
    ssl_certificate_key {key};
}}
"""


def rserve_js() -> Path:
    if (JS / "rserve.js").exists() and (JS / "underscore.js").exists():
        return JS
    if IN_CI:
        pytest.fail(f"rserve.js is required in CI: scripts/install-deps puts it in {JS}")
    pytest.skip("rserve.js is not unpacked (scripts/install-deps)")


@pytest.fixture
def doc_root(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    js = rserve_js()
    shutil.copy(PAGE, root / "index.html")
    for name in ("rserve.js", "underscore.js"):
        shutil.copy(js / name, root / name)
    return root


@dataclass
class CountingR:
    rserve: Rserve
    count: Path

    def sessions(self) -> int:
        """How many R sessions Rserve has started so far."""
        return len(self.count.read_text().split()) if self.count.exists() else 0


@pytest.fixture
def counting_r(fresh_rserve: Callable[..., Rserve], tmp_path: Path) -> CountingR:
    count = tmp_path / "r-sessions"
    return CountingR(fresh_rserve(ocap=True, source=COUNTING_INIT.format(count=count)), count)


@pytest.fixture
async def chromium(pki: PKI) -> AsyncIterator[Any]:
    """Chromium trusting exactly the test certificate's key (forward's and nginx's)."""
    async_api = need_browser()
    trust = f"--ignore-certificate-errors-spki-list={spki_hash(pki.cert.read_bytes())}"
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, trust], headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class OtherSite:
    """Another server on another port of the same host, serving the same page."""

    port: int

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


@pytest.fixture
async def other_site(doc_root: Path, pki: PKI) -> AsyncIterator[OtherSite]:
    app = web.Application()
    app.router.add_static("/", doc_root)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield OtherSite(int(runner.addresses[0][1]))
    finally:
        await runner.cleanup()


async def open_page(browser: Any, page_url: str, ws_url: str, expr: str) -> tuple[str, str]:
    """Load the rserve.js page at `page_url`, connecting to `ws_url` and evaluating `expr`;
    the state it ends in (done, error or closed) and what it shows."""
    page = await browser.new_page()
    try:
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        response = await page.goto(
            f"{page_url}index.html?{urlencode({'ws': ws_url, 'expr': expr})}"
        )
        assert response is not None and response.status == 200
        ended = "body[data-state=done], body[data-state=error], body[data-state=closed]"
        await page.wait_for_selector(ended, state="attached", timeout=60_000)
        assert errors == []
        state = await page.get_attribute("body", "data-state")
        return str(state), str(await page.text_content("#out"))
    finally:
        await page.close()


async def assert_works(browser: Any, page_url: str, ws_url: str, r: CountingR) -> None:
    before = r.sessions()
    state, shown = await open_page(browser, page_url, ws_url, BIG)
    assert state == "done", shown
    assert json.loads(shown) == BIG_SUMMARY
    assert r.sessions() == before + 1


async def assert_refused(
    browser: Any, page_url: str, ws_url: str, r: CountingR, fwd: ForwardProcess, *said: str
) -> str:
    """The page is refused before R: it sees only a close, R starts no session, and forward
    logs one line for it that contains every string in `said`. Returns that line."""
    before = r.sessions()
    lines_before = fwd.log().count("refused WebSocket")
    state, shown = await open_page(browser, page_url, ws_url, "1")
    assert (state, shown) == ("closed", "close 1006")
    assert r.sessions() == before
    refusals = [line for line in fwd.log().splitlines() if "refused WebSocket" in line]
    assert len(refusals) == lines_before + 1
    line = refusals[-1]
    for text in said:
        assert text in line, line
    return line


async def test_page_on_p_opens_its_session_on_w_over_tls(
    forward_cli: StartCli,
    counting_r: CountingR,
    doc_root: Path,
    pki: PKI,
    chromium: Any,
    other_site: OtherSite,
) -> None:
    fwd = await forward_cli(
        *["-s", str(counting_r.rserve.socket), "-r", str(doc_root)],
        *["-k", str(pki.key), "-c", str(pki.cert)],
        ports=("-p", "-w"),
    )
    page, ws = fwd.url("https", "-p"), fwd.url("wss", "-w")
    await assert_works(chromium, page, ws, counting_r)
    await assert_works(chromium, page, fwd.url("wss", "-p"), counting_r)  # and on -p itself
    for target in (ws, fwd.url("wss", "-p")):
        await assert_refused(
            chromium,
            other_site.url,
            target,
            counting_r,
            fwd,
            f"origin https://127.0.0.1:{other_site.port} is another port than Host",
            f"--allow-origin https://127.0.0.1:{other_site.port}",
        )


async def test_container_port_published_as_another_port(
    forward_cli: StartCli,
    counting_r: CountingR,
    doc_root: Path,
    pki: PKI,
    chromium: Any,
    other_site: OtherSite,
    proxies: Callable[[int], Any],
) -> None:
    fwd = await forward_cli("-s", str(counting_r.rserve.socket), "-r", str(doc_root))
    # A container engine publishes a port as a TCP relay, as this one does.
    outside = (await proxies(fwd.ports["-p"])).port
    assert outside != fwd.ports["-p"]
    page, ws = f"http://127.0.0.1:{outside}/", f"ws://127.0.0.1:{outside}/"
    await assert_works(chromium, page, ws, counting_r)
    await assert_refused(chromium, other_site.url, ws, counting_r, fwd, "another port")


async def test_shipped_nginx_file_on_a_port_other_than_443(
    forward_cli: StartCli,
    counting_r: CountingR,
    doc_root: Path,
    pki: PKI,
    chromium: Any,
    other_site: OtherSite,
    tmp_path: Path,
) -> None:
    need(NGINX, "nginx (nginx-light)")
    # As the README starts each instance behind nginx.
    fwd = await forward_cli(
        *["-s", str(counting_r.rserve.socket), "-r", str(doc_root)],
        *["--trusted-proxy", "127.0.0.1"],
    )
    port = free_port()
    site = site_config([fwd.ports["-p"]], port, pki.cert, pki.key)
    with nginx(tmp_path / "nginx", site, port):
        page, ws = f"https://127.0.0.1:{port}/", f"wss://127.0.0.1:{port}/"
        await assert_works(chromium, page, ws, counting_r)
        await assert_refused(
            chromium,
            other_site.url,
            ws,
            counting_r,
            fwd,
            f"origin https://127.0.0.1:{other_site.port} is another port than",
            f"'127.0.0.1:{port}'",
        )


@pytest.mark.parametrize("variant", ["as published", "Host passed", "--allow-origin"])
async def test_rserve_rcloud_nginx_example(
    variant: str,
    forward_cli: StartCli,
    counting_r: CountingR,
    doc_root: Path,
    pki: PKI,
    chromium: Any,
    other_site: OtherSite,
    tmp_path: Path,
) -> None:
    need(NGINX, "nginx (nginx-light)")
    port = free_port()
    page, ws = f"https://127.0.0.1:{port}/", f"wss://127.0.0.1:{port}/"
    # As the C forward is run there: no option about proxies or origins.
    extra = ["--allow-origin", page.rstrip("/")] if variant == "--allow-origin" else []
    fwd = await forward_cli("-s", str(counting_r.rserve.socket), "-r", str(doc_root), *extra)
    servers = tmp_path / "rcloud-servers"
    servers.write_text(f"server 127.0.0.1:{fwd.ports['-p']};\n")
    # The change the refusal's log line asks for.
    passed = "        proxy_set_header Host $http_host;\n" if variant == "Host passed" else ""
    site = RCLOUD_EXAMPLE.format(
        port=port, servers=servers, cert=pki.cert, key=pki.key, extra=passed
    )
    with nginx(tmp_path / "nginx", site, port):
        if variant == "as published":
            line = await assert_refused(
                chromium,
                page,
                ws,
                counting_r,
                fwd,
                f"origin {page.rstrip('/')} is not this server's (Host 'rcloud_servers')",
                "proxy_set_header Host $http_host",
                f"--allow-origin {page.rstrip('/')}",
            )
            assert re.search(r"refused WebSocket from 127\.0\.0\.1 on http: ", line), line
        else:
            await assert_works(chromium, page, ws, counting_r)
        await assert_refused(chromium, other_site.url, ws, counting_r, fwd, "refused")
