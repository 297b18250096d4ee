"""End to end in a real browser: headless Chromium loads the demo page from forward and uses R.

forward runs as the product runs (`python -m forward -p PORT -s SOCKET -r demo/www [-k KEY -c
CERT]`, a subprocess) in front of a real Rserve in OCAP mode with demo/init.R. Debian's chromium
is driven by Playwright with `executable_path` (no browser download). Over HTTPS the certificate
comes from a trustme test CA and Chromium trusts it through `--ignore-certificate-errors-spki-list`
with the SHA-256 of the certificate's public key: certificate errors are not ignored wholesale, so
a wrong certificate would still fail the test. What the page shows is compared with what R's own
print() gives for the same expressions, asked of R separately. Screenshots go to artifacts/.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from forward.rexp import strings

from .conftest import IN_CI, PKI, ROOT, ForwardProcess, Rserve, StartCli
from .rclient import RClient

DOC_ROOT = ROOT / "demo" / "www"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Containers often have a tiny /dev/shm, where Chromium would otherwise crash its renderers.
    "--disable-dev-shm-usage",
]

# slow: every test here drives a real Chromium (with test_layouts.py, about 35 s in all).
pytestmark = [pytest.mark.rserve, pytest.mark.slow]


def need_browser() -> Any:
    """Playwright's async API, when Chromium and Playwright are installed (always in CI)."""
    try:
        from playwright import async_api
    except ImportError:
        async_api = None
    if async_api is not None and CHROMIUM.exists():
        return async_api
    if IN_CI:
        pytest.fail("Chromium and Playwright are required in CI (scripts/install-deps)")
    pytest.skip("needs Debian's chromium and `pip install playwright`")


def spki_hash(cert_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)), as --ignore-certificate-errors-spki-list takes it."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def serve_demo(forward_cli: StartCli, rserve: Rserve, *extra: str) -> ForwardProcess:
    """forward as the product runs: the demo's page (-r) and its R (-s)."""
    return await forward_cli("-s", str(rserve.socket), "-r", str(DOC_ROOT), *extra)


async def r_print(url: str, ssl_context: Any, expr: str) -> str:
    """What R's print() shows for `expr`, asked of R directly (the oracle for the page)."""
    async with await RClient.connect(url, ssl_context=ssl_context) as client:
        caps = await client.call(client.capability, strings(["mike"]), strings(["mypwd"]))
        code = f"paste(capture.output(print({expr})), collapse = '\\n')"
        answer = await client.call(caps.as_dict()["parseEval"], strings([code]))
        return str(answer.value[0])


# Expressions whose answer the page renders like R's print(); the test compares with R.
PRINTED = [
    "1+1",
    "1:30",
    "c(a = 1.5, long = 2, c = NA)",
    'c("x", NA, "y z")',
    "c(TRUE, NA, FALSE)",
    'list(a = 1, b = list(c = "x"), 3)',
    'factor(c("lo", "hi", "lo"), levels = c("lo", "hi"))',
    "c(0.1 + 0.2, 1e-20, 100)",
    "seq(-2, 148, by = 0.75)",
    "NULL",
]


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_demo_page_in_chromium(
    tls: bool, pki: PKI, fresh_rserve: Callable[..., Rserve], forward_cli: StartCli
) -> None:
    async_api = need_browser()
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    if tls:
        cli = await serve_demo(forward_cli, rserve, "-k", str(pki.key), "-c", str(pki.cert))
        trust = [f"--ignore-certificate-errors-spki-list={spki_hash(pki.cert.read_bytes())}"]
        scheme, ws_scheme, ssl_context = "https", "wss", pki.client_context()
    else:
        cli = await serve_demo(forward_cli, rserve)
        trust, scheme, ws_scheme, ssl_context = [], "http", "ws", None
    ws_url = cli.url(ws_scheme)
    expected = {expr: await r_print(ws_url, ssl_context, expr) for expr in PRINTED}

    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + trust, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 1400})
            sockets: list[Any] = []
            page.on("websocket", lambda ws: sockets.append(ws))
            console_errors: list[str] = []
            page.on("pageerror", lambda e: console_errors.append(str(e)))

            response = await page.goto(cli.url(scheme))
            assert response is not None and response.status == 200
            await page.wait_for_selector("body[data-state=login]")
            assert [ws.url for ws in sockets] == [ws_url]
            assert await page.text_content("#status") == f"Connected to R at {ws_url}."

            # auth refuses a wrong password with R's own answer.
            await page.fill("#user", "mike")
            await page.fill("#password", "wrong")
            await page.click("#login button")
            await page.wait_for_selector("#login-error:not([hidden])")
            assert await page.text_content("#login-error") == "sorry, unauthorized!"

            await page.fill("#password", "mypwd")
            await page.click("#login button")
            await page.wait_for_selector("body[data-state=ready]")
            status = await page.text_content("#status")
            assert status == f"Logged in as mike over {ws_url}; R is ready."
            assert await page.is_hidden("#login") and await page.is_visible("#expr")

            async def evaluate(expr: str) -> dict[str, Any]:
                count = await page.locator(".entry[data-state=done]").count()
                await page.fill("#expr", expr)
                await page.press("#expr", "Enter")
                entry = page.locator(".entry[data-state=done]").nth(count)
                await entry.wait_for()
                result = entry.locator(".result, .error").last
                return {
                    "input": await entry.locator(".input").text_content(),
                    "class": await result.get_attribute("class"),
                    "text": await result.text_content(),
                    "oob": [
                        (await o.get_attribute("class"), await o.text_content())
                        for o in await entry.locator(".oob").all()
                    ],
                }

            for expr, printed in expected.items():
                shown = await evaluate(expr)
                assert shown["input"] == expr
                assert (shown["class"], shown["text"]) == ("result", printed), expr
                assert shown["oob"] == []

            error = await evaluate('stop("no luck")')
            assert (error["class"], error["text"]) == ("error", "Error: no luck")

            # OOB output, in the order R sent it, before the answer.
            progress = await evaluate(
                'for (i in 1:3) message("step ", i); print(head(letters, 3)); x <- log(-1); "done"'
            )
            assert progress["oob"] == [
                ("oob console-msg", "step 1"),
                ("oob console-msg", "step 2"),
                ("oob console-msg", "step 3"),
                ("oob console-out", '[1] "a" "b" "c"'),
                ("oob console-err", "Warning: NaNs produced"),
            ]
            assert progress["text"] == '[1] "done"'
            # The session keeps its state between calls (one R process per WebSocket).
            assert (await evaluate("x"))["text"] == "[1] NaN"

            # When the session's R process ends, forward answers for it instead of hanging.
            broken = ("error", "Rserve: the connection to R is broken")
            gone = await evaluate('quit(save = "no")')
            assert (gone["class"], gone["text"]) == broken
            again = await evaluate("1")
            assert (again["class"], again["text"]) == broken

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / f"browser-{'https' if tls else 'http'}.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert console_errors == []
        finally:
            await browser.close()


async def test_https_page_is_refused_without_the_test_certificate_trusted(
    pki: PKI, fresh_rserve: Callable[..., Rserve], forward_cli: StartCli
) -> None:
    """The control for the test above: without the SPKI pin Chromium refuses forward's test
    certificate, so passing there means the certificate was checked, not ignored."""
    async_api = need_browser()
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    cli = await serve_demo(forward_cli, rserve, "-k", str(pki.key), "-c", str(pki.cert))
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page()
            with pytest.raises(async_api.Error, match="ERR_CERT_AUTHORITY_INVALID"):
                await page.goto(cli.url("https"))
        finally:
            await browser.close()
