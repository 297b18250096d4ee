"""The headers on every response (forward/headers.py, docs/static.md): the values as a pure
function of the settings, then every kind of answer a real forward gives (files, 304, `.R` pages
from a real OCAP Rserve, 301, 403, 404, 413, 426, 500, the redirect port), then framing as
headless Chromium enforces it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from forward.cli import parse_args
from forward.config import Config, ConfigError
from forward.headers import (
    HeaderError,
    ResponseHeaders,
    added_header,
    frame_headers,
    response_headers,
)

from .conftest import PKI, Rserve, StartCli, StartForward
from .test_browser import CHROMIUM, CHROMIUM_ARGS, need_browser
from .test_rscript import R_PAGES, serve

CSP = "Content-Security-Policy"

# -- pure ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", [("X-Frame-Options", "DENY"), (CSP, "frame-ancestors 'none'")]),
        ("same", [("X-Frame-Options", "SAMEORIGIN"), (CSP, "frame-ancestors 'self'")]),
        ("any", []),
        ("https://Portal.example.com", [(CSP, "frame-ancestors https://portal.example.com")]),
        (
            "https://a.example:8443, http://[::1]:8080 https://*.example.org",
            [
                (
                    CSP,
                    "frame-ancestors https://a.example:8443 http://[::1]:8080 https://*.example.org",
                )
            ],
        ),
    ],
)
def test_frame_headers(value: str, expected: list[tuple[str, str]]) -> None:
    assert frame_headers(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "NONE",
        "portal.example.com",
        "https://a.example/path",
        "javascript:alert(1)",
        "https://a b",
        "https://x;script-src *",
        "'self'",
        "https://a.example:99999",
    ],
)
def test_frame_origin_refused(value: str) -> None:
    with pytest.raises(HeaderError, match="--frame-origin"):
        frame_headers(value)


def test_added_header() -> None:
    assert added_header("X-Robots-Tag: noindex") == ("X-Robots-Tag", "noindex")
    assert added_header("Permissions-Policy:camera=()") == ("Permissions-Policy", "camera=()")
    for bad, why in [
        ("no-colon", "use NAME:VALUE"),
        ("Bad Name: x", "use NAME:VALUE"),
        (": x", "use NAME:VALUE"),
        ("X-A: a\r\nSet-Cookie: b", "control character"),
        ("X-A: \x7f", "control character"),
        ("Content-Length: 5", "sets this header itself"),
        ("transfer-encoding: chunked", "sets this header itself"),
        ("Strict-Transport-Security: max-age=1", "use --hsts"),
    ]:
        with pytest.raises(HeaderError, match=why):
            added_header(bad)


def test_response_headers() -> None:
    h = response_headers("same", ("X-A: 1", "Referrer-Policy: no-referrer", "X-A: 2"), 3600, True)
    assert h.pairs == (
        ("X-Frame-Options", "SAMEORIGIN"),
        (CSP, "frame-ancestors 'self'"),
        ("X-Content-Type-Options", "nosniff"),
        ("Strict-Transport-Security", "max-age=3600; includeSubDomains"),
        ("X-A", "1"),
        ("Referrer-Policy", "no-referrer"),  # replaces forward's own
        ("X-A", "2"),  # a repeated name is sent twice
    )
    assert "Strict-Transport-Security" not in dict(h.without_hsts().pairs)
    assert "Strict-Transport-Security" not in dict(response_headers("any", (), 0, True).pairs)


def test_apply_replaces_but_adds_csp() -> None:
    response = web.Response(
        headers={"X-Frame-Options": "ALLOWALL", CSP: "default-src 'self'", "X-Other": "kept"}
    )
    ResponseHeaders((("X-Frame-Options", "DENY"), (CSP, "frame-ancestors 'none'"))).apply(response)
    assert response.headers.getall("X-Frame-Options") == ["DENY"]
    assert response.headers.getall(CSP) == ["default-src 'self'", "frame-ancestors 'none'"]
    assert response.headers["X-Other"] == "kept"


def test_options_on_the_command_line(pki: PKI) -> None:
    tls = ["-k", str(pki.key), "-c", str(pki.cert)]
    c = parse_args(["--frame-origin", "https://p.example", "--add-header", "X-A: 1", *tls])
    assert (c.frame_origin, c.add_header, c.hsts_max_age) == (
        "https://p.example",
        ("X-A: 1",),
        86400,
    )
    assert parse_args([*tls, "--hsts", "0"]).hsts_max_age == 0
    assert parse_args([]).hsts_max_age == 0  # no TLS, no HSTS
    assert parse_args(["--hsts", "0"]).hsts == 0  # harmless without TLS
    for argv, why in [
        (["--frame-origin", "example.com"], "--frame-origin 'example.com': use none"),
        (["--add-header", "X-A"], "--add-header 'X-A': use NAME:VALUE"),
        (["--hsts-include-subdomains"], "--hsts-include-subdomains needs TLS"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_args(argv)


def test_options_in_the_configuration_file() -> None:
    from forward import configfile

    text = """
frame-origin = "https://portal.example.com"
add-header = ["X-Robots-Tag: noindex", "Permissions-Policy: camera=()"]
hsts = 3600
hsts-include-subdomains = true
tls-ciphers = "ECDHE+AESGCM"
rscript-timeout = 30
"""
    values = configfile.parse(text)
    assert values == {
        "frame_origin": "https://portal.example.com",
        "add_header": ("X-Robots-Tag: noindex", "Permissions-Policy: camera=()"),
        "hsts": 3600,
        "hsts_include_subdomains": True,
        "tls_ciphers": "ECDHE+AESGCM",
        "rscript_timeout": 30.0,
    }
    with pytest.raises(ConfigError, match="hsts: expected an integer"):
        configfile.parse("hsts = 'day'")


# -- every answer of a real forward ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rpages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rserve]:
    r = Rserve(tmp_path_factory.mktemp("headers-r"), ocap=True, source=R_PAGES).start()
    yield r
    r.stop()


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "sub" / "index.html").write_text("<p>index</p>")
    (root / "page.html").write_text("<p>static</p>")
    for name in ("text", "error", "echo", "headers"):
        (root / f"{name}.R").write_text("#\n")
    return root


def assert_secured(headers: Any, what: str, *, extra: bool = True) -> None:
    assert headers.get("X-Frame-Options") == "DENY", what
    assert headers.getall(CSP, []) == ["frame-ancestors 'none'"], what
    assert headers.get("X-Content-Type-Options") == "nosniff", what
    assert headers.get("Referrer-Policy") == "same-origin", what
    if extra:
        assert headers.get("X-Added") == "yes", what


@pytest.mark.rserve
async def test_every_answer_has_the_headers(
    rpages: Rserve, docroot: Path, start_forward: StartForward
) -> None:
    fwd = await serve(
        start_forward, docroot, rpages.socket, max_body_size=16, add_header=("X-Added: yes",)
    )
    requests: list[tuple[str, str, dict[str, str], bytes, int]] = [
        ("GET", "/page.html", {}, b"", 200),
        ("HEAD", "/page.html", {}, b"", 200),
        ("GET", "/page.html", {"Range": "bytes=0-1"}, b"", 206),
        ("GET", "/missing.html", {}, b"", 404),
        ("GET", "/empty/", {}, b"", 403),
        ("GET", "/sub", {}, b"", 301),
        ("GET", "/text.R", {}, b"", 200),
        ("GET", "/headers.R", {}, b"", 200),
        ("GET", "/error.R", {}, b"", 500),
        ("GET", "/nothere.R", {}, b"", 404),
        ("POST", "/echo.R", {}, b"x" * 100, 413),
        # A WebSocket upgrade from another site's page: refused before R, by an HTTPException.
        (
            "GET",
            "/",
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Origin": "https://evil.example",
            },
            b"",
            403,
        ),
    ]
    async with aiohttp.ClientSession() as s:
        for method, path, headers, body, status in requests:
            async with s.request(
                method,
                fwd.http_url(path),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as r:
                assert r.status == status, (path, await r.text())
                assert_secured(r.headers, f"{method} {path}")
        async with s.get(fwd.http_url("/page.html")) as r:
            etag = r.headers["ETag"]
        async with s.get(fwd.http_url("/page.html"), headers={"If-None-Match": etag}) as r:
            assert r.status == 304
            assert_secured(r.headers, "304")
        async with s.get(fwd.http_url("/headers.R")) as r:
            assert r.headers["X-From-R"] == "yes"  # R's own headers are kept beside them
        async with s.get(fwd.url("ws", "/").replace("ws:", "http:")) as r:
            assert r.status == 426  # -w answers anything but an upgrade so
            assert_secured(r.headers, "-w")


async def test_an_unexpected_failure_has_them_too(
    start_forward: StartForward, tmp_path: Path
) -> None:
    """aiohttp's own 500 for a handler that fails (a bug) goes through the same hook."""

    async def broken(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a bug")

    fwd = await start_forward(tmp_path / "no.sock", http_handler=broken, frame_origin="same")
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/x")) as r:
        assert r.status == 500
        assert r.headers["X-Frame-Options"] == "SAMEORIGIN"
        assert r.headers[CSP] == "frame-ancestors 'self'"
        assert r.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.rserve
async def test_https_answers_carry_hsts(
    rpages: Rserve, docroot: Path, start_forward: StartForward, pki: PKI
) -> None:
    from forward import tls

    settings = {"tls_key": str(pki.key), "tls_cert": str(pki.cert)}
    contexts = tls.Contexts(replace(Config(), **settings))
    fwd = await serve(
        start_forward, docroot, rpages.socket, ssl_context=contexts.get, redirect_port=3, **settings
    )
    async with aiohttp.ClientSession() as s:
        for path, status in (("/page.html", 200), ("/text.R", 200), ("/missing", 404)):
            async with s.get(fwd.http_url(path), ssl=pki.client_context()) as r:
                assert r.status == status
                assert r.headers["Strict-Transport-Security"] == "max-age=86400"
                assert_secured(r.headers, path, extra=False)
        plain = f"http://127.0.0.1:{fwd.server.port('redirect')}/page.html"
        async with s.get(plain, allow_redirects=False) as r:
            assert r.status == 301
            assert_secured(r.headers, "redirect", extra=False)
            assert "Strict-Transport-Security" not in r.headers


# -- framing in a real browser ---------------------------------------------------------------------


@pytest.fixture
async def portal() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """Another site (another port: another origin) whose page frames a URL it is given."""
    pages: dict[str, str] = {}

    async def page(request: web.Request) -> web.Response:
        src = pages["src"]
        return web.Response(
            text=f'<iframe id="f" src="{src}" onload="window.framed = true"></iframe>',
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", pages
    await runner.cleanup()


@pytest.mark.slow
async def test_framing_in_chromium(
    forward_cli: StartCli, portal: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    async_api = need_browser()
    origin, pages = portal
    root = tmp_path / "www"
    root.mkdir()
    (root / "app.html").write_text('<p id="marker">forward page</p>')
    (root / "self.html").write_text(
        '<iframe src="/app.html" onload="window.framed = true"></iframe>'
    )

    async def framed(page: Any, url: str) -> bool:
        """Whether the page at `url` shows forward's page in its frame."""
        await page.goto(url)
        await page.wait_for_function("window.framed === true")
        frame = page.frames[1]
        marker = await frame.evaluate("document.getElementById('marker')?.textContent ?? null")
        return bool(marker == "forward page")

    async with async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = await browser.new_page()
            for flags, from_portal, from_itself in [
                ((), False, False),  # the default: none
                (("--frame-origin", "same"), False, True),
                (("--frame-origin", origin), True, False),
                (("--frame-origin", "any"), True, True),
            ]:
                fwd = await forward_cli("-r", str(root), *flags)
                base = fwd.url("http")
                pages["src"] = f"{base}/app.html"
                assert await framed(page, f"{origin}/") is from_portal, flags
                assert await framed(page, f"{base}/self.html") is from_itself, flags
                await fwd.stop()
        finally:
            await browser.close()
