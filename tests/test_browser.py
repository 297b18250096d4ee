"""End to end in a real browser: headless Chromium loads the demo page from forward and uses R.

forward runs as the product runs (`python -m forward -p PORT -s SOCKET -r demo/www [-k KEY -c
CERT]`, a subprocess) in front of a real Rserve in OCAP mode with demo/init.R. Debian's chromium
is driven by Playwright with `executable_path` (no browser download). Over HTTPS the certificate
comes from a trustme test CA and Chromium trusts it through `--ignore-certificate-errors-spki-list`
with the SHA-256 of the certificate's public key: certificate errors are not ignored wholesale, so
a wrong certificate would still fail the test. The page shows what R itself prints: it is R's
console, so for each expression its text must be exactly what `Rscript -e` prints (a real
Rscript, run by the test). Plots must arrive as pictures that decode and are not blank.
Screenshots go to artifacts/ (gitignored): browser-https.png, browser-http.png, demo-console.png,
demo-plot-{plot,hist,loop}.png, demo-busy.png and demo-phone.png.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .conftest import IN_CI, PKI, ROOT, ForwardProcess, Rserve, StartCli, need_rserve

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


async def log_in(page: Any, url: str) -> None:
    response = await page.goto(url)
    assert response is not None and response.status == 200
    await page.wait_for_selector("body[data-state=login]")
    await page.fill("#user", "mike")
    await page.fill("#password", "mypwd")
    await page.click("#login button")
    await page.wait_for_selector("body[data-state=ready]")


async def evaluate(page: Any, expr: str) -> dict[str, Any]:
    """Types `expr` into the page, runs it and waits for its entry to be done: what the entry
    shows (its input, its output's text, the classes of the output's pieces, its images)."""
    count = await page.locator(".entry[data-state=done]").count()
    await page.fill("#expr", expr)
    await page.press("#expr", "Enter")
    entry = page.locator(".entry[data-state=done]").nth(count)
    await entry.wait_for(timeout=60_000)
    output = entry.locator(".output")
    return {
        "input": await entry.locator(".input").text_content(),
        "text": await output.text_content(),
        "pieces": [
            (await o.get_attribute("class"), await o.text_content())
            for o in await output.locator("span").all()
        ],
        "images": await output.locator("img").count(),
        "entry": entry,
    }


@pytest.mark.parametrize("tls", [True, False], ids=["https", "http"])
async def test_demo_page_in_chromium(
    tls: bool, pki: PKI, fresh_rserve: Callable[..., Rserve], forward_cli: StartCli
) -> None:
    async_api = need_browser()
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    if tls:
        cli = await serve_demo(forward_cli, rserve, "-k", str(pki.key), "-c", str(pki.cert))
        trust = [f"--ignore-certificate-errors-spki-list={spki_hash(pki.cert.read_bytes())}"]
        scheme, ws_scheme = "https", "wss"
    else:
        cli = await serve_demo(forward_cli, rserve)
        trust, scheme, ws_scheme = [], "http", "ws"
    ws_url = cli.url(ws_scheme)

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

            shown = await evaluate(page, "1+1")
            assert (shown["input"], shown["text"]) == ("1+1", "[1] 2\n")

            # What R writes, in the order it wrote it, each piece marked with its stream.
            progress = await evaluate(
                page,
                'for (i in 1:2) message("step ", i); print(head(letters, 3)); x <- log(-1); "done"',
            )
            assert progress["pieces"] == [
                ("console-msg", "step 1\n"),
                ("console-msg", "step 2\n"),
                ("console-out", '[1] "a" "b" "c"\n'),
                ("console-err", "Warning message:\nIn log(-1) : NaNs produced\n"),
                ("console-out", '[1] "done"\n'),
            ]
            # The session keeps its state between calls (one R process per WebSocket).
            assert (await evaluate(page, "x"))["text"] == "[1] NaN\n"
            error = await evaluate(page, 'stop("no luck")')
            assert error["pieces"] == [("error", "Error: no luck\n")]

            # When the session's R process ends, forward answers for it instead of hanging.
            broken = [("error", "Rserve: the connection to R is broken\n")]
            assert (await evaluate(page, 'quit(save = "no")'))["pieces"] == broken
            assert (await evaluate(page, "1"))["pieces"] == broken

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / f"browser-{'https' if tls else 'http'}.png"
            await page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            assert console_errors == []
        finally:
            await browser.close()


# Typed into the page and given to `Rscript -e`: the page must show exactly what Rscript prints.
CONSOLE = [
    "head(mtcars)",
    'data.frame(n = 1:3, s = c("a", NA, "c"), f = factor(c("x", "y", "x")))',
    "matrix(1:6, 2)",
    'matrix(c(1.5, NA, 3, 4), 2, dimnames = list(c("r1", "r2"), c("A", "B")))',
    'factor(c("lo", "hi", "lo"), levels = c("lo", "hi"))',
    'list(a = 1:3, b = list(c = "x", d = NULL), 3)',
    'as.Date("2024-03-01") + 0:2',
    "summary(mtcars$mpg)",
    "summary(iris)",
    'str(list(a = 1, b = "x", c = list(d = TRUE)))',
    "set.seed(1); t.test(rnorm(20))",
    "invisible(5)",
    "x <- 1:10",
    'cat("hello\\n"); print(letters[1:5])',
    'cat("no newline"); 42',
    "1:30",
    "sqrt(-1:-3)",
    'warning("careful"); 1',
    'f <- function() stop("boom"); f()',
    'stop("no luck")',
    'g <- function() { warning("w1"); stop("e1") }; g()',
    'log("a")',
    "1 +* 2",
    'for (i in 1:2) message("step ", i); table(c("a", "b", "a"))',
]


async def rscript(code: str) -> str:
    """What `Rscript -e CODE` prints (stdout and stderr as they interleave on a terminal; R
    flushes its output before it writes to stderr), less what only a script run prints: the
    "Calls:" summary of the stack under an error and the final "Execution halted"."""
    proc = await asyncio.create_subprocess_exec(
        "Rscript",
        "--vanilla",
        "-e",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    if proc.returncode != 0:
        halted = "Execution halted\n"
        assert text.endswith(halted), text
        text = text.removesuffix(halted)
        error = text.rfind("Error")
        text = text[:error] + re.sub(r"^Calls: .*\n", "", text[error:], flags=re.M)
    return text


BLANK_CHECK = """img => {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let ink = 0;
    let hash = 0;
    for (let i = 0; i < data.length; i += 4) {
        if (data[i + 3] > 0 && (data[i] < 200 || data[i + 1] < 200 || data[i + 2] < 200)) {
            ink++;
            hash = (hash * 31 + i) % 1000000007;
        }
    }
    return {width: img.naturalWidth, height: img.naturalHeight,
            shownWidth: img.getBoundingClientRect().width, ink, pixels: data.length / 4, hash};
}"""


async def plot_images(entry: Any) -> list[dict[str, int]]:
    """Each image of an entry once it has loaded: its size, how many pixels are not white, and
    a hash of where they are."""
    images = entry.locator(".output img")
    found = []
    for i in range(await images.count()):
        img = images.nth(i)
        await img.evaluate("img => img.decode()")  # rejects when the bytes are no image
        found.append(await img.evaluate(BLANK_CHECK))
    return found


async def test_console_shows_what_r_prints_and_plots(
    fresh_rserve: Callable[..., Rserve], forward_cli: StartCli, tmp_path: Path
) -> None:
    """The page as R's console: for each expression its output is Rscript's, byte for byte;
    plots are pictures (one per page, each one decoding and not blank); the history, the busy
    state, and a phone-sized high-DPI screen."""
    async_api = need_browser()
    need_rserve()
    expected = dict(zip(CONSOLE, await asyncio.gather(*map(rscript, CONSOLE)), strict=True))
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    cli = await serve_demo(forward_cli, rserve)
    ARTIFACTS.mkdir(exist_ok=True)

    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await log_in(page, cli.url("http"))

            for expr, printed in expected.items():
                shown = await evaluate(page, expr)
                assert (shown["input"], shown["text"]) == (expr, printed), expr
                assert shown["images"] == 0
            await page.screenshot(path=str(ARTIFACTS / "demo-console.png"), full_page=True)

            # Plots: one image per page, drawn by R, decoding in the browser and not blank.
            loop = 'for (i in 1:3) plot(sin(seq(0, i * pi, length.out = 50)), type = "l")'
            for name, expr, count in [
                ("plot", "plot(1:10)", 1),
                ("hist", "hist(c(1, 2, 2, 3, 3, 3, 4, 4, 5))", 1),
                ("loop", loop, 3),
            ]:
                shown = await evaluate(page, expr)
                assert shown["text"] == "" and shown["images"] == count, expr
                images = await plot_images(shown["entry"])
                for img in images:
                    assert img["width"] > 0 and img["height"] > 0, (expr, img)
                    assert 0.001 * img["pixels"] < img["ink"] < 0.5 * img["pixels"], (expr, img)
                # Different pictures, not one page sent again.
                assert len({img["hash"] for img in images}) == count, expr
                await shown["entry"].screenshot(path=str(ARTIFACTS / f"demo-plot-{name}.png"))
            # Nothing was left in R's temporary directory.
            files = await evaluate(page, "list.files(tempdir(), all.files = TRUE, no.. = TRUE)")
            assert files["text"] == "character(0)\n"

            # History: up goes back through what was run, down comes forward to the draft.
            await page.fill("#expr", "draft")
            await page.press("#expr", "ArrowUp")
            assert await page.input_value("#expr") == files["input"]
            await page.press("#expr", "ArrowUp")
            assert await page.input_value("#expr") == loop
            await page.press("#expr", "ArrowDown")
            await page.press("#expr", "ArrowDown")
            assert await page.input_value("#expr") == "draft"

            # Busy: while R works the page says so and counts the time; R waits for the test.
            go = tmp_path / "go"
            await page.fill("#expr", f'while (!file.exists("{go}")) Sys.sleep(0.05); "went"')
            await page.press("#expr", "Enter")
            await page.wait_for_selector("body[data-busy] #busy:not([hidden])")
            first = await page.text_content("#elapsed")
            assert re.fullmatch(r"\d+\.\d s", first or ""), first
            await page.wait_for_function(
                "first => document.querySelector('#elapsed').textContent !== first", arg=first
            )
            assert await page.is_disabled("#eval button")
            await page.screenshot(path=str(ARTIFACTS / "demo-busy.png"))
            go.touch()
            await page.wait_for_selector("body:not([data-busy]) #busy[hidden]", state="attached")
            assert await page.locator(".entry .output").last.text_content() == '[1] "went"\n'
            assert errors == []
        finally:
            await browser.close()


async def test_demo_page_on_a_phone(
    fresh_rserve: Callable[..., Rserve], forward_cli: StartCli
) -> None:
    """A phone-sized screen at three device pixels per CSS pixel: nothing is wider than the
    screen but R's own lines (which scroll sideways inside their box), and plots are drawn at
    the screen's resolution and shown at the page's width."""
    async_api = need_browser()
    rserve = fresh_rserve(ocap=True, source=(ROOT / "demo" / "init.R").read_text())
    cli = await serve_demo(forward_cli, rserve)
    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(
                viewport={"width": 390, "height": 844},
                device_scale_factor=3,
                is_mobile=True,
                has_touch=True,
            )
            page = await context.new_page()
            await log_in(page, cli.url("http"))
            assert (await evaluate(page, "summary(iris)"))["text"].startswith("  Sepal.Length")
            shown = await evaluate(page, "plot(cars)")
            [img] = await plot_images(shown["entry"])
            assert img["ink"] > 0
            assert img["shownWidth"] <= 390
            # Drawn at three device pixels per CSS pixel of the width it is shown at.
            assert img["width"] == round(img["shownWidth"]) * 3
            overflow = await page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0
            assert await page.is_visible("#expr") and await page.is_visible("#eval button")
            await page.screenshot(path=str(ARTIFACTS / "demo-phone.png"), full_page=True)
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
