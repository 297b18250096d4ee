""".R scripts (docs/static.md): the packing as byte literals, then pages rendered by a real OCAP
Rserve, then what forward does when the R side is missing or talks nonsense (a fake backend)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from forward import rexp
from forward.config import Config
from forward.dispatch import make_http_handler
from forward.ocap import (
    Answer,
    pack_call,
    parse_greeting,
    parse_header_lines,
    request_headers,
    unpack_answer,
)
from forward.qap import Cmd, Dt, Header, Xt
from forward.rexp import RObj
from forward.rscript import is_rscript
from forward.static import Refusal

from .conftest import C_FORWARD, Rserve, Running, StartForward, eventually, free_port, running

# -- pure: packing ---------------------------------------------------------------------------------

CAP = b"\x22\x04\x00\x00ab\x00\x01"  # a stand-in capability: XT_ARRAY_STR "ab"


def test_pack_call_bytes() -> None:
    chunks = pack_call(CAP, 7, b"/a.R", b"x=1", b"H: v\n", b"\x00\xff")
    assert (
        b"".join(chunks)
        == (
            b"\x0f\x00\x00\x00\x2c\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00"  # OCcall, 44 bytes
            b"\x0a\x28\x00\x00"  # DT_SEXP, 40
            b"\x16\x24\x00\x00" + CAP + b"\x25\x18\x00\x00"  # XT_LANG_NOTAG, 36  # XT_RAW, 24
            b"\x11\x00\x00\x00"  # 17 bytes of content
            b"/a.R\x00x=1\x00H: v\n\x00\x00\xff"
            b"\x00\x00\x00"  # padding to 4
        )
    )
    assert chunks[1] == b"\x00\xff"  # the body is passed as it is, not copied into the header


@pytest.mark.parametrize("body_size", [0, 1, 2, 3, 4, 1000])
def test_pack_call_matches_rexp_encoding(body_size: int) -> None:
    body = bytes(range(256)) * (body_size // 256) + bytes(range(body_size % 256))
    packed = b"".join(pack_call(CAP, 3, b"/p.R", b"", b"A: b\n", body))
    raw = b"/p.R\0\0A: b\n\0" + body
    expected = rexp.sexp_param(rexp.call(rexp.Verbatim(CAP), rexp.raw(raw)))
    assert packed == Header(Cmd.OC_CALL, len(expected), 3).encode() + expected


def test_pack_call_large() -> None:
    body = bytes(0x1000000)  # past 24 bits: every level switches to the 64-bit length form
    chunks = pack_call(CAP, 1, b"/big.R", b"", b"", body)
    head = chunks[0]
    header = Header.parse(head[:16])
    assert header.length == sum(map(len, chunks)) - 16
    dt = struct.unpack_from("<II", head, 16)
    assert dt[0] & 0xFF == Dt.SEXP | Dt.LARGE
    assert (dt[0] >> 8) | (dt[1] << 24) == header.length - 8
    lang = struct.unpack_from("<II", head, 24)
    assert lang[0] & 0xFF == Xt.LANG_NOTAG | Xt.LARGE
    raw_at = 32 + len(CAP)
    raw = struct.unpack_from("<II", head, raw_at)
    assert raw[0] & 0xFF == Xt.RAW | Xt.LARGE
    (count,) = struct.unpack_from("<I", head, raw_at + 8)
    assert count == len(b"/big.R") + 3 + len(body)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a.R", True),
        (b"/x/y/run.R", True),
        (b"/run.R/info/more", True),
        (b"/library/base/html/mean.html", True),
        (b"/doc/html/index.html", True),
        (b"/a.r", False),
        (b"/a.Rmd", False),
        (b"/index.html", False),
        (b"/libraryx/a", False),
        (b"/R", False),
    ],
)
def test_is_rscript(path: bytes, expected: bool) -> None:
    assert is_rscript(path) is expected


def test_request_headers_unaltered_and_own_headers_stripped() -> None:
    raw = [
        (b"Host", b"example"),
        (b"Content-Type", b"multipart/form-data; boundary=AbCdEf"),
        (b"x-real-ip", b"6.6.6.6"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Request-Method", b"DELETE"),
        (b"X-SSL-Client-CN", b"admin"),
        (b"X-Custom", b"Keep Me"),
    ]
    block = request_headers("POST", raw, [("X-Real-IP", "10.0.0.1")])
    assert block == (
        b"Request-Method: POST\n"
        b"Host: example\n"
        b"Content-Type: multipart/form-data; boundary=AbCdEf\n"
        b"X-Custom: Keep Me\n"
        b"X-Real-IP: 10.0.0.1\n"
    )


def test_request_headers_refuse_nul() -> None:
    with pytest.raises(Refusal) as info:
        request_headers("GET", [(b"A", b"x\0y")], [])
    assert info.value.status == 400


# -- pure: answers -----------------------------------------------------------------------------


def ok(obj: RObj) -> tuple[Header, bytes]:
    payload = rexp.sexp_param(obj)
    return Header(Cmd.RESP_OK, len(payload), 1), payload


def rlist(*items: RObj) -> RObj:
    return RObj(Xt.VECTOR, list(items))


S = rexp.strings
NULL = RObj(Xt.NULL, None)


def test_unpack_answer_bytes() -> None:
    # list("hi") as Rserve sends it: DT_SEXP > XT_VECTOR > XT_ARRAY_STR "hi\0\1"
    payload = b"\x0a\x0c\x00\x00\x10\x08\x00\x00\x22\x04\x00\x00hi\x00\x01"
    assert unpack_answer(Header(Cmd.RESP_OK, len(payload), 0), payload) == Answer(b"hi")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (rlist(S(["<b>x</b>"])), Answer(b"<b>x</b>")),
        (rlist(rexp.raw(b"\x00\x01\xff"), S(["image/png"])), Answer(b"\x00\x01\xff", "image/png")),
        (rlist(S(["x"]), NULL, NULL, RObj(Xt.ARRAY_INT, [404])), Answer(b"x", status=404)),
        (
            rlist(S(["x"]), S(["text/plain"]), S([""]), rexp.doubles([410.0])),
            Answer(b"x", "text/plain", status=410),
        ),
        (
            rlist(S(["x"]), S(["text/plain"]), S(["A: 1\r\nB: 2", "C: 3"])),
            Answer(b"x", "text/plain", (("A", "1"), ("B", "2"), ("C", "3"))),
        ),
        (
            rlist(S(["x"]), S(["t/p"]), S(["Content-Length: 9\nX: y"])),
            Answer(b"x", "t/p", (("X", "y"),), dropped=("Content-Length",)),
        ),
        (rlist(S(["é"])), Answer("é".encode())),
    ],
)
def test_unpack_answer(obj: RObj, expected: Answer) -> None:
    assert unpack_answer(*ok(obj)) == expected


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        (S(["Error in f(): boom"]), "Error in f(): boom"),
        (rlist(), "body is missing"),
        (rlist(RObj(Xt.ARRAY_INT, [1])), "neither a raw vector nor a string"),
        (rlist(S(["x"]), S(["t"]), NULL, RObj(Xt.ARRAY_INT, [99])), "invalid status"),
        (rlist(S(["x"]), S(["t"]), NULL, rexp.doubles([200.5])), "invalid status"),
        (rlist(S(["x"]), S(["t"]), S(["no colon"])), "malformed header line"),
        (rlist(S(["x"]), S(["t"]), S(["Bad Name: 1"])), "malformed header line"),
        (rlist(S(["x"]), S(["a\nb"])), "invalid content type"),
        (rexp.doubles([42.0]), "neither a list nor a character string"),
    ],
)
def test_unpack_answer_errors(obj: RObj, text: str) -> None:
    with pytest.raises(Refusal) as info:
        unpack_answer(*ok(obj))
    assert info.value.status == 500 and text in info.value.text


def test_unpack_resp_err() -> None:
    with pytest.raises(Refusal) as info:
        unpack_answer(Header(Cmd.RESP_ERR | (0x7F << 24), 0, 1), b"")
    assert info.value.status == 500 and "0x7f" in info.value.text
    # an error response that carries R's message shows it
    for payload in (rexp.string_param("Error: boom"), rexp.sexp_param(S(["Error: boom"]))):
        with pytest.raises(Refusal) as info:
            unpack_answer(Header(Cmd.RESP_ERR | (0x45 << 24), len(payload), 1), payload)
        assert info.value.text == "R failed while rendering this page: Error: boom"
    garbage = b"\x0a\x08\x00\x00\xee\xee"
    with pytest.raises(Refusal, match="0x45"):
        unpack_answer(Header(Cmd.RESP_ERR | (0x45 << 24), len(garbage), 1), garbage)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_unpack_garbage_is_a_clear_500(payload: bytes) -> None:
    try:
        unpack_answer(Header(Cmd.RESP_OK, len(payload), 0), payload)
    except Refusal as refusal:
        assert refusal.status == 500 and refusal.text
    # or, rarely, the bytes happen to be a valid answer: fine either way


def test_parse_greeting() -> None:
    cap = RObj(Xt.ARRAY_STR, ["oc.abc"], {"class": S(["OCref"])})
    body = rexp.encode(cap)
    payload = rexp.param(Dt.SEXP, body)
    assert parse_greeting(Header(Cmd.OC_INIT, len(payload), 0), payload) == body
    with pytest.raises(Refusal, match="not running in OCAP mode"):
        parse_greeting(Header(0x76737252, 0, 0), payload)
    listed = rexp.param(Dt.SEXP, rexp.encode(rlist(cap)))
    with pytest.raises(Refusal, match="single capability"):
        parse_greeting(Header(Cmd.OC_INIT, len(listed), 0), listed)


def test_parse_header_lines() -> None:
    assert parse_header_lines("A: 1\n\nSet-Cookie: a=b; Path=/\r\n") == (
        [("A", "1"), ("Set-Cookie", "a=b; Path=/")],
        [],
    )


# -- with a real OCAP Rserve -------------------------------------------------------------------

R_PAGES = r"""
library(Rserve)
part <- function(r, a, b) if (b >= a) r[a:b] else raw(0)
render <- function(req) {
  z <- which(req == as.raw(0L))
  url <- rawToChar(part(req, 1L, z[1] - 1L))
  name <- sub("^.*/([A-Za-z0-9_]+)\\.R(/.*)?$", "\\1", url)
  if (startsWith(url, "/library/") || startsWith(url, "/doc/")) name <- "echo"
  switch(name,
    text = list("<h1>Hello from R</h1>"),
    raw = list(as.raw(0:255), "application/octet-stream"),
    json = list('{"answer":42}', "application/json"),
    headers = list("with headers", "text/plain",
                   c("X-From-R: yes", "Set-Cookie: a=1", "Set-Cookie: b=2")),
    status = list("teapot", "text/plain", NULL, 418L),
    dstatus = list("gone", "text/plain", "", 410),
    error = stop("boom from R"),
    errstr = "custom error from R",
    echo = list(req, "application/octet-stream"),
    number = 42,
    pid = list(as.character(Sys.getpid()), "text/plain"),
    loop = repeat {},
    list(paste("unknown page", url), "text/plain", NULL, 404L))
}
oc.init <- function() ocap(render)
"""
PAGES = [
    *("text", "raw", "json", "headers", "status", "dstatus", "error", "errstr", "echo", "number"),
    *("pid", "loop"),
]


@pytest.fixture(scope="module")
def rpages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rserve]:
    r = Rserve(tmp_path_factory.mktemp("rscript"), ocap=True, source=R_PAGES).start()
    yield r
    r.stop()


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "app").mkdir(parents=True)
    for name in PAGES:
        (root / f"{name}.R").write_text("# rendered by the OCAP Rserve\n")
    (root / "app" / "echo.R").write_text("#\n")
    (root / "plain.html").write_text("<p>static</p>")
    return root


async def serve(start_forward: StartForward, root: Path, rsock: Path | str, **kw: Any) -> Running:
    ssl_context = kw.pop("ssl_context", None)
    config = replace(Config(), doc_root=str(root), rscript_socket=str(rsock), **kw)
    return await start_forward(
        root / "no-qap.sock",
        doc_root=str(root),
        rscript_socket=str(rsock),
        http_handler=make_http_handler(config),
        ssl_context=ssl_context,
        **kw,
    )


def split_request(raw: bytes) -> tuple[bytes, bytes, dict[str, str], bytes, list[bytes]]:
    """What R received (echo.R sends it back): url, query, headers, body, header lines."""
    url, query, headers, body = raw.split(b"\0", 3)
    lines = headers.split(b"\n")
    assert lines[-1] == b""
    parsed = {}
    for line in lines[:-1]:
        name, _, value = line.partition(b": ")
        parsed[name.decode().lower()] = value.decode()
    return url, query, parsed, body, lines[:-1]


@pytest.mark.rserve
async def test_pages(rpages: Rserve, docroot: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, docroot, rpages.socket)
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/text.R")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/html"
            assert await r.text() == "<h1>Hello from R</h1>"
        async with s.get(fwd.http_url("/raw.R")) as r:
            assert r.headers["Content-Type"] == "application/octet-stream"
            assert await r.read() == bytes(range(256))
        async with s.get(fwd.http_url("/json.R")) as r:
            assert r.headers["Content-Type"] == "application/json"
            assert await r.json() == {"answer": 42}
        async with s.get(fwd.http_url("/headers.R")) as r:
            assert r.headers["X-From-R"] == "yes"
            assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert await r.text() == "with headers"
        async with s.get(fwd.http_url("/status.R")) as r:
            assert (r.status, await r.text()) == (418, "teapot")
        async with s.get(fwd.http_url("/dstatus.R")) as r:
            assert (r.status, await r.text()) == (410, "gone")
        async with s.head(fwd.http_url("/text.R")) as r:
            assert r.status == 200 and await r.read() == b""
            assert r.headers["Content-Length"] == str(len("<h1>Hello from R</h1>"))
        # static files still come from the same root
        async with s.get(fwd.http_url("/plain.html")) as r:
            assert await r.text() == "<p>static</p>"


@pytest.mark.rserve
async def test_r_errors_are_500_and_server_goes_on(
    rpages: Rserve, docroot: Path, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    fwd = await serve(start_forward, docroot, rpages.socket)
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/error.R")) as r:
            assert r.status == 500
            assert "R failed while rendering this page" in await r.text()
        async with s.get(fwd.http_url("/errstr.R")) as r:
            assert (r.status, await r.text()) == (500, "custom error from R\n")
        async with s.get(fwd.http_url("/number.R")) as r:
            assert r.status == 500 and "neither a list" in await r.text()
        async with s.get(fwd.http_url("/text.R")) as r:
            assert r.status == 200
    assert "R failed while rendering" in caplog.text


@pytest.mark.rserve
async def test_post_body_and_headers_reach_r_intact(
    rpages: Rserve, docroot: Path, start_forward: StartForward
) -> None:
    # Loopback is a trusted proxy by default; here the test client is the client.
    fwd = await serve(start_forward, docroot, rpages.socket, trusted_proxy=("none",))
    body = os.urandom(200_000) + b"\0\0\xff"
    ctype = "multipart/form-data; boundary=----AbCdEfGhIjK"
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            fwd.http_url("/echo.R?a=1&b=%20x"),
            data=body,
            headers={
                "Content-Type": ctype,
                "X-Real-IP": "6.6.6.6",
                "X-Forwarded-For": "6.6.6.6",
                "X-SSL-Client-CN": "admin",
                "Request-Method": "DELETE",
                "X-Mixed": "MiXeD",
            },
        ) as r,
    ):
        assert r.status == 200
        url, query, headers, got, lines = split_request(await r.read())
    assert (url, query, got) == (b"/echo.R", b"a=1&b=%20x", body)
    assert lines[0] == b"Request-Method: POST"
    assert f"Content-Type: {ctype}".encode() in lines
    assert b"X-Mixed: MiXeD" in lines
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert "x-ssl-client-cn" not in headers
    assert b"6.6.6.6" not in b"\n".join(lines)
    assert sum(line.startswith(b"Request-Method") for line in lines) == 1


@pytest.mark.rserve
async def test_trusted_proxy(rpages: Rserve, docroot: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, docroot, rpages.socket, trusted_proxy=("127.0.0.1",))
    async with (
        aiohttp.ClientSession() as s,
        s.get(fwd.http_url("/echo.R"), headers={"X-Forwarded-For": "198.51.100.7"}) as r,
    ):
        _, _, headers, _, _ = split_request(await r.read())
    assert headers["x-real-ip"] == "198.51.100.7"
    assert headers["x-forwarded-for"] == "198.51.100.7, 127.0.0.1"


@pytest.mark.rserve
async def test_path_info_and_library(
    rpages: Rserve, docroot: Path, start_forward: StartForward
) -> None:
    fwd = await serve(start_forward, docroot, rpages.socket)
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/app/echo.R/extra/path%20x?q=1")) as r:
            assert r.status == 200
            url, query, _, body, _ = split_request(await r.read())
            assert (url, query, body) == (b"/app/echo.R/extra/path x", b"q=1", b"")
        async with s.get(fwd.http_url("/library/base/html/mean.html")) as r:
            assert r.status == 200
            url, _, _, _, _ = split_request(await r.read())
            assert url == b"/library/base/html/mean.html"
        async with s.get(fwd.http_url("/doc/html/index.html")) as r:
            assert split_request(await r.read())[0] == b"/doc/html/index.html"
        async with s.put(fwd.http_url("/app/echo.R"), data=b"put-body") as r:
            _, _, _, body, lines = split_request(await r.read())
            assert (lines[0], body) == (b"Request-Method: PUT", b"put-body")
        async with s.get(fwd.http_url("/missing.R")) as r:
            assert (r.status, await r.text()) == (404, "R script not found.\n")
        async with s.get(fwd.http_url("/missing.R/x")) as r:
            assert r.status == 404
        async with s.get(fwd.http_url("/app.R/echo.R")) as r:  # app is a directory
            assert r.status == 404


@pytest.mark.rserve
async def test_body_limit(rpages: Rserve, docroot: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, docroot, rpages.socket, max_body_size=1000)
    async with aiohttp.ClientSession() as s:
        async with s.post(fwd.http_url("/echo.R"), data=b"x" * 1001) as r:
            assert r.status == 413 and "1000" in await r.text()

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(4):
                yield b"y" * 400

        async with s.post(fwd.http_url("/echo.R"), data=chunks()) as r:  # chunked: no length
            assert r.status == 413
        async with s.post(fwd.http_url("/echo.R"), data=b"z" * 1000) as r:
            assert r.status == 200
            assert split_request(await r.read())[3] == b"z" * 1000


@pytest.mark.rserve
async def test_r_pid_is_logged_with_each_request(
    rpages: Rserve, docroot: Path, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forward")
    fwd = await serve(start_forward, docroot, rpages.socket)
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/pid.R")) as r:
        pid = int(await r.text())  # R's own Sys.getpid()
    assert f"GET /pid.R: rendered by R pid {pid}, status 200" in caplog.text
    assert rpages.proc is not None and pid != rpages.proc.pid  # the fork, not Rserve itself


@pytest.mark.rserve
async def test_rscript_timeout(
    fresh_rserve: Callable[..., Rserve],
    docroot: Path,
    start_forward: StartForward,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A script that never returns: 504 past the limit, its R process ended, and the server
    (and Rserve) serving other requests meanwhile and afterwards."""
    rserve = fresh_rserve(ocap=True, source=R_PAGES)
    fwd = await serve(start_forward, docroot, rserve.socket, rscript_timeout=4)
    before = set(rserve.children())
    async with aiohttp.ClientSession() as s:

        async def get(path: str) -> tuple[int, str]:
            async with s.get(fwd.http_url(path)) as r:
                return r.status, await r.text()

        looping = asyncio.create_task(get("/loop.R"))
        await eventually(
            lambda: any(running(p) for p in set(rserve.children()) - before),
            what="an R process for /loop.R",
        )
        # Served while R loops.
        assert (await get("/text.R"))[0] == 200
        assert await get("/pid.R") != (await get("/pid.R"))  # a fresh R process for each
        assert not looping.done()
        status, text = await looping
    assert status == 504 and "--rscript-timeout" in text
    line = next(r.getMessage() for r in caplog.records if "no answer from R" in r.getMessage())
    pid = int(line.split("(pid ", 1)[1].split(")", 1)[0])
    assert "script " + str(docroot / "loop.R") in line and "ended with SIGTERM" in line, line
    assert pid in rserve.children() or not running(pid)
    await eventually(lambda: not running(pid), what=f"R process {pid} ended")
    assert rserve.proc is not None and rserve.proc.poll() is None  # Rserve itself lives on
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/text.R")) as r:
        assert r.status == 200


@pytest.mark.rserve
async def test_client_certificate_subject_reaches_r(
    rpages: Rserve, docroot: Path, start_forward: StartForward
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    fwd = await serve(start_forward, docroot, rpages.socket, ssl_context=server_ctx)

    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ca.issue_cert("alice@example.org", common_name="alice").configure_cert(client_ctx)
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/echo.R"), ssl=client_ctx) as r:
        _, _, headers, _, _ = split_request(await r.read())
    assert headers["x-ssl-client-cn"] == "alice"
    assert "CN=alice" in headers["x-ssl-client-s-dn"]

    anonymous = ssl.create_default_context()
    ca.configure_trust(anonymous)
    async with (
        aiohttp.ClientSession() as s,
        s.get(fwd.http_url("/echo.R"), ssl=anonymous, headers={"X-SSL-Client-CN": "alice"}) as r,
    ):
        _, _, headers, _, _ = split_request(await r.read())
    assert "x-ssl-client-cn" not in headers and "x-ssl-client-s-dn" not in headers


# -- when R is missing or talks nonsense -------------------------------------------------------


async def test_r_socket_missing(
    docroot: Path, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    fwd = await serve(start_forward, docroot, docroot / "nobody-listens.sock")
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/text.R")) as r:
            assert (r.status, await r.text()) == (500, "Cannot connect to R services.\n")
        async with s.get(fwd.http_url("/plain.html")) as r:
            assert r.status == 200
    assert "cannot connect to R services" in caplog.text


GOOD_CAP = rexp.encode(RObj(Xt.ARRAY_STR, ["oc.x"], {"class": S(["OCref"])}))
GREETING = Header(Cmd.OC_INIT, len(GOOD_CAP) + 4, 0).encode() + rexp.param(Dt.SEXP, GOOD_CAP)
HELLO = rexp.sexp_param(rlist(S(["hello"])))

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _answer_with(
    reply: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(GREETING)
    head = Header.parse(await reader.readexactly(16))
    await reader.readexactly(head.length)
    writer.write(reply)
    await writer.drain()


FAKES: list[tuple[str, bytes | None, bytes, str]] = [
    # (name, bytes sent first (None: the OCAP greeting, then read the call), reply, 500 text)
    (
        "classic greeting",
        b"Rsrv0103QAP1\r\n\r\n--------------\r\n",
        b"",
        "not running in OCAP mode",
    ),
    ("closed at once", b"", b"", "before the greeting"),
    ("short greeting", GREETING[:20], b"", "in the greeting"),
    ("huge greeting", Header(Cmd.OC_INIT, 1 << 30, 0).encode(), b"", "far too large"),
    (
        "garbage greeting",
        Header(Cmd.OC_INIT, 8, 0).encode() + b"\xff" * 8,
        b"",
        "malformed greeting",
    ),
    (
        "garbage answer",
        None,
        Header(Cmd.RESP_OK, 12, 0).encode() + b"\x0a\x08\x00\x00" + b"\xee" * 8,
        "malformed answer",
    ),
    ("short answer", None, Header(Cmd.RESP_OK, 100, 0).encode() + b"\x0a", "was complete"),
    ("no SEXP", None, Header(Cmd.RESP_OK, 0, 0).encode(), "without an R value"),
    ("unexpected command", None, Header(0x12345, 0, 0).encode(), "unexpected message"),
    ("OOB_MSG", None, Header(Cmd.OOB_MSG, 0, 0).encode(), "OOB_MSG"),
    ("over the limit", None, Header(Cmd.RESP_OK, 1 << 40, 0).encode(), "over the limit"),
]


@pytest.fixture
async def fake_r(tmp_path: Path) -> AsyncIterator[Callable[[Script], Awaitable[Path]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> Path:
        path = tmp_path / f"fake{len(servers)}.sock"

        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await script(reader, writer)
            writer.close()

        servers.append(await asyncio.start_unix_server(run, str(path)))
        return path

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("name", "first", "reply", "text"), FAKES, ids=[f[0] for f in FAKES])
async def test_fake_backend(
    docroot: Path,
    start_forward: StartForward,
    fake_r: Callable[[Script], Awaitable[Path]],
    name: str,
    first: bytes | None,
    reply: bytes,
    text: str,
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if first is None:
            await _answer_with(reply, reader, writer)
        else:
            writer.write(first)
            await writer.drain()

    sock = await fake_r(script)
    fwd = await serve(start_forward, docroot, sock)
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/text.R")) as r:
            assert r.status == 500, name
            assert text in await r.text()
        async with s.get(fwd.http_url("/plain.html")) as r:
            assert r.status == 200


async def test_fake_backend_oob_send_is_skipped(
    docroot: Path, start_forward: StartForward, fake_r: Callable[[Script], Awaitable[Path]]
) -> None:
    oob = rexp.sexp_param(S(["note"]))
    reply = (
        Header(Cmd.OOB_SEND | 5, len(oob), 0).encode()
        + oob
        + Header(Cmd.RESP_OK, len(HELLO), 0).encode()
        + HELLO
    )

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answer_with(reply, reader, writer)

    fwd = await serve(start_forward, docroot, await fake_r(script))
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/text.R")) as r:
        assert (r.status, await r.text()) == (200, "hello")


# -- the same request through the C forward --------------------------------------------------------

CONFORMANCE_REQUEST = (
    b"POST /echo.R/path/info?x=1&y=%20 HTTP/1.1\r\nHost: h\r\n"
    b"Content-Type: multipart/form-data; boundary=AbC\r\nX-Thing: MiXeD value\r\n"
    b"Content-Length: 7\r\nConnection: close\r\n\r\nab\0cd\xff\n"
)


async def _exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


@pytest.mark.rserve
async def test_r_gets_what_the_c_forward_sends(
    rpages: Rserve, docroot: Path, start_forward: StartForward, tmp_path: Path
) -> None:
    """R receives the bytes the C program sends, plus forward's own header lines."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(C_FORWARD),
        "-p",
        str(port),
        "-r",
        str(docroot),
        "-R",
        str(rpages.socket),
        "-s",
        str(tmp_path / "none.sock"),
        "-u",
        str(tmp_path / "no-ulog"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):  # the C program has no readiness signal: poll its port
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.025)
                continue
            w.close()
            await w.wait_closed()
            break
        from_c = await _exchange(port, CONFORMANCE_REQUEST)
    finally:
        proc.terminate()
        await proc.wait()
    fwd = await serve(start_forward, docroot, rpages.socket)
    ours = await _exchange(fwd.server.port("http"), CONFORMANCE_REQUEST)
    own = b"X-Real-IP: 127.0.0.1\nX-Forwarded-For: 127.0.0.1\n"
    assert own in ours
    assert ours.replace(own, b"") == from_c
    assert from_c.endswith(b"\0ab\0cd\xff\n")
