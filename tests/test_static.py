"""The document root (docs/static.md): path safety first, then aiohttp's file serving."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forward.config import Config, ConfigError
from forward.dispatch import make_http_handler
from forward.static import DocRoot, Refusal, content_type, parse_target

from .conftest import Running, StartForward

SECRET = b"TOPSECRET-outside-the-root"


def make_tree(base: Path) -> Path:
    """A document root beside a secret that must never be served, with symlinks both ways."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    root = base / "root"
    root.mkdir()
    (root / "index.html").write_text("<p>home</p>")
    (root / "hello.txt").write_text("hello world\n")
    (root / "big.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_text("<p>sub</p>")
    (root / "sub" / "page.html").write_text("<p>page</p>")
    (root / "empty").mkdir()
    (root / "app.js").write_text("console.log('plain')")
    (root / "app.js.gz").write_bytes(gzip.compress(b"console.log('gz')"))
    (root / "app.js.br").write_bytes(b"pretend-brotli")
    (root / "old.css").write_text("body{}")
    (root / "old.css.gz").write_bytes(gzip.compress(b"stale"))
    now = time.time()
    os.utime(root / "old.css.gz", (now - 3600, now - 3600))
    os.utime(root / "old.css", (now, now))
    (root / "link_in").symlink_to(root / "hello.txt")
    (root / "link_out").symlink_to(outside / "secret.txt")
    (root / "dir_out").symlink_to(outside)
    (root / "sub" / "up").symlink_to("..")
    (root / "loop").symlink_to(root / "loop")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


async def serve(start_forward: StartForward, root: Path, **kw: Any) -> Running:
    config = replace(Config(), doc_root=str(root), **kw)
    return await start_forward(
        root / "no-rserve.sock", doc_root=str(root), http_handler=make_http_handler(config), **kw
    )


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (no client-side normalisation of the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1")


# -- hostile paths -----------------------------------------------------------------------------

HOSTILE = [
    ("/../outside/secret.txt", 403),
    ("/../../../../../../etc/passwd", 403),
    ("/../../../etc/shadow", 403),
    ("/%2e%2e/outside/secret.txt", 403),
    ("/%2E%2E/outside/secret.txt", 403),
    ("/.%2e/outside/secret.txt", 403),
    ("/%2e./outside/secret.txt", 403),
    ("/..%2foutside%2fsecret.txt", 403),
    ("/%2e%2e%2foutside%2fsecret.txt", 403),
    ("/sub/../../outside/secret.txt", 403),
    ("/sub/%2e%2e/%2e%2e/outside/secret.txt", 403),
    ("/..%5coutside%5csecret.txt", 403),
    ("/..%5c..%5coutside%5csecret.txt", 403),
    ("/hello.txt%00.html", 403),
    ("/%00", 403),
    ("/%01hello.txt", 403),
    ("/hello%7f.txt", 403),
    # aiohttp's router ("/{tail:.*}") does not match a decoded newline: its own 404.
    ("/%0d%0aSet-Cookie:x", 404),
    ("/link_out", 403),
    ("/dir_out/secret.txt", 403),
    ("/dir_out/", 403),
    ("/sub/up/../outside/secret.txt", 403),
    ("/%252e%252e/outside/secret.txt", 404),  # double-encoded: a literal "%2e%2e" name
    ("/%c0%ae%c0%ae/outside/secret.txt", 404),  # overlong UTF-8 is not ".."
    ("//etc/passwd", 404),
    ("/etc/passwd", 404),
    ("/..;/outside/secret.txt", 404),
    ("/loop", 404),
    ("/hello.txt/x", 404),
    ("/%zz", 400),
    ("/%2", 400),
    ("http://x/../outside/secret.txt", 403),
]


@pytest.mark.parametrize(("path", "status"), HOSTILE)
async def test_hostile_paths(
    tree: Path, start_forward: StartForward, path: str, status: int
) -> None:
    fwd = await serve(start_forward, tree)
    got, _, body = await raw_request(fwd.server.port("http"), get(path))
    assert got == status, (path, body)
    assert SECRET not in body
    assert b"root:" not in body
    assert body.strip(), "an error answer carries a short text"


async def test_absolute_path_of_the_secret_is_not_served(
    tree: Path, start_forward: StartForward
) -> None:
    fwd = await serve(start_forward, tree)
    secret = tree.parent / "outside" / "secret.txt"
    got, _, body = await raw_request(fwd.server.port("http"), get(str(secret)))
    assert got == 404 and SECRET not in body


async def test_backslash_in_raw_path(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    got, _, body = await raw_request(fwd.server.port("http"), get("/..\\outside\\secret.txt"))
    # Refused by us (403) or by the HTTP parser (400); either way nothing is read.
    assert got in (400, 403) and SECRET not in body


async def test_symlinks_inside_are_followed(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/link_in")) as r:
        assert r.status == 200 and await r.text() == "hello world\n"


async def test_follow_symlinks_option(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree, follow_symlinks=True)
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/link_out")) as r:
        assert r.status == 200 and await r.read() == SECRET
    # `..` is still refused: the option is about links the operator made, not about paths.
    got, _, body = await raw_request(fwd.server.port("http"), get("/../outside/secret.txt"))
    assert got == 403 and SECRET not in body


PIECES = [
    "..",
    ".",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    "/",
    "//",
    "%",
    "%25",
    "%00",
    "%0a",
    "sub",
    "up",
    "empty",
    "hello.txt",
    "index.html",
    "link_in",
    "link_out",
    "dir_out",
    "outside",
    "secret.txt",
    "loop",
    "a",
    ";",
    "?",
    "#",
    "%3f",
    "~",
    "%c0%ae",
]


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One tree for every example: hypothesis runs the test body many times per fixture.
    return make_tree(tmp_path_factory.mktemp("prop"))


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=12))
def test_property_resolved_file_is_inside_root(shared_tree: Path, pieces: list[str]) -> None:
    docroot = DocRoot.open(str(shared_tree))
    raw = "/" + "".join(pieces)
    try:
        target = parse_target(raw)
        path, _ = docroot.resolve(target)
    except Refusal as refusal:
        assert refusal.status in (301, 400, 403, 404)
        return
    real = os.path.realpath(path)
    assert real.startswith(str(shared_tree.resolve()) + os.sep), (raw, real)
    assert Path(real).read_bytes() != SECRET


@given(st.text(max_size=40))
def test_property_parse_target_never_yields_unsafe_segments(raw: str) -> None:
    try:
        target = parse_target("/" + raw)
    except Refusal as refusal:
        assert refusal.status in (400, 403)
        return
    for seg in target.segments:
        assert seg not in ("", ".", "..")
        assert "/" not in seg and "\\" not in seg and "\0" not in seg
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg)


# -- serving -----------------------------------------------------------------------------------


async def test_index_and_directories(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/")) as r:
            assert r.status == 200 and await r.text() == "<p>home</p>"
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        async with s.get(fwd.http_url("/sub/")) as r:
            assert await r.text() == "<p>sub</p>"
        async with s.get(fwd.http_url("/sub?x=1"), allow_redirects=False) as r:
            assert r.status == 301 and r.headers["Location"] == "/sub/?x=1"
        async with s.get(fwd.http_url("/empty/")) as r:
            assert r.status == 403 and "listing" in await r.text()


async def test_missing_is_404_with_text(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/nope.html")) as r:
        assert r.status == 404
        assert r.headers["Content-Type"].startswith("text/plain")
        assert await r.text() == "Not found.\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405(tree: Path, start_forward: StartForward, method: str) -> None:
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s, s.request(method, fwd.http_url("/hello.txt")) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, HEAD"
        assert method in await r.text()


async def test_head(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    got, headers, body = await raw_request(
        fwd.server.port("http"), b"HEAD /hello.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert got == 200 and body == b""
    assert headers["content-length"] == "12"
    assert headers["content-type"] == "text/plain; charset=utf-8"


async def test_conditional_get(tree: Path, start_forward: StartForward) -> None:
    # A file changed in this very second is never "not modified": its stamp is rounded.
    past = time.time() - 100
    os.utime(tree / "hello.txt", (past, past))
    fwd = await serve(start_forward, tree)
    url = fwd.http_url("/hello.txt")
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            etag, modified = r.headers["ETag"], r.headers["Last-Modified"]
            assert r.headers["Cache-Control"] == "no-cache"
        async with s.get(url, headers={"If-None-Match": etag}) as r:
            assert r.status == 304 and await r.read() == b""
        async with s.get(url, headers={"If-Modified-Since": modified}) as r:
            assert r.status == 304
        async with s.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"}) as r:
            assert r.status == 200 and await r.text() == "hello world\n"
        async with s.get(url, headers={"If-None-Match": '"other"'}) as r:
            assert r.status == 200


async def test_just_modified_file_is_not_304(tree: Path, start_forward: StartForward) -> None:
    (tree / "fresh.txt").write_text("new")
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/fresh.txt")) as r:
            modified = r.headers["Last-Modified"]
            stamp = email.utils.parsedate_to_datetime(modified).timestamp()
            assert stamp <= time.time()
        async with s.get(fwd.http_url("/fresh.txt"), headers={"If-Modified-Since": modified}) as r:
            assert r.status in (200, 304)
            if stamp < (tree / "fresh.txt").stat().st_mtime:
                assert r.status == 200  # the rounded-down stamp must not hide the change


async def test_last_modified_never_in_future(tree: Path, start_forward: StartForward) -> None:
    future = time.time() + 10 * 365 * 86400
    os.utime(tree / "hello.txt", (future, future))
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s, s.get(fwd.http_url("/hello.txt")) as r:
        stamp = email.utils.parsedate_to_datetime(r.headers["Last-Modified"]).timestamp()
        assert stamp <= time.time() + 1
        assert stamp < future - 86400


async def test_range(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    url = fwd.http_url("/big.bin")
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Range": "bytes=10-19"}) as r:
            assert r.status == 206
            assert await r.read() == bytes(range(10, 20))
            assert r.headers["Content-Range"] == "bytes 10-19/1024"
        async with s.get(url, headers={"Range": "bytes=-4"}) as r:
            assert r.status == 206 and await r.read() == bytes(range(252, 256))
        async with s.get(url, headers={"Range": "bytes=5000-"}) as r:
            assert r.status == 416


async def test_large_file(tree: Path, start_forward: StartForward) -> None:
    # Past the small-file size, chunks are read in a worker thread (aiohttp's own path).
    data = os.urandom(1_000_003)
    (tree / "large.bin").write_bytes(data)
    fwd = await serve(start_forward, tree)
    url = fwd.http_url("/large.bin")
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert await r.read() == data
        async with s.get(url, headers={"Range": "bytes=100000-899999"}) as r:
            assert r.status == 206 and await r.read() == data[100000:900000]


async def test_precompressed_siblings(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        async with s.get(fwd.http_url("/app.js"), headers={"Accept-Encoding": "gzip"}) as r:
            assert r.headers["Content-Encoding"] == "gzip"
            assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert gzip.decompress(await r.read()) == b"console.log('gz')"
            assert "Accept-Encoding" in r.headers["Vary"]
        async with s.get(fwd.http_url("/app.js"), headers={"Accept-Encoding": "gzip, br"}) as r:
            assert r.headers["Content-Encoding"] == "br"
            assert await r.read() == b"pretend-brotli"
        async with s.get(fwd.http_url("/app.js"), headers={"Accept-Encoding": "identity"}) as r:
            assert "Content-Encoding" not in r.headers
            assert await r.read() == b"console.log('plain')"
        # A .gz older than its file is stale and must not be served.
        async with s.get(fwd.http_url("/old.css"), headers={"Accept-Encoding": "gzip"}) as r:
            assert "Content-Encoding" not in r.headers
            assert await r.read() == b"body{}"


async def test_keep_alive_many_requests(tree: Path, start_forward: StartForward) -> None:
    fwd = await serve(start_forward, tree)
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.server.port("http"))
    try:
        for i in range(200):
            path = "/hello.txt" if i % 2 else "/sub/page.html"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            assert body == (b"hello world\n" if i % 2 else b"<p>page</p>")
    finally:
        writer.close()
        await writer.wait_closed()


async def test_http10_is_served_and_http09_refused(tree: Path, start_forward: StartForward) -> None:
    # A plain HTTP/1.0 GET is served (nginx talks HTTP/1.0 to upstreams by default); HTTP/0.9,
    # what a raw CR LF in a request target reads as, is not.
    fwd = await serve(start_forward, tree)
    port = fwd.server.port("http")
    got, _, body = await raw_request(port, b"GET /hello.txt HTTP/1.0\r\n\r\n")
    assert got == 200 and body == b"hello world\n"
    got, _, body = await raw_request(port, b"GET /hello.txt\r\nX: y HTTP/1.1\r\n\r\n")
    assert got == 400 and b"hello" not in body


MIME = [
    ("a.html", "text/html; charset=utf-8"),
    ("a.js", "text/javascript; charset=utf-8"),
    ("a.mjs", "text/javascript; charset=utf-8"),
    ("a.css", "text/css; charset=utf-8"),
    ("a.svg", "image/svg+xml"),
    ("a.png", "image/png"),
    ("a.jpg", "image/jpeg"),
    ("a.jpeg", "image/jpeg"),
    ("a.json", "application/json"),
    ("a.wasm", "application/wasm"),
    ("a.woff2", "font/woff2"),
    ("a.js.map", "application/json"),
    ("a.txt", "text/plain; charset=utf-8"),
    ("A.PNG", "image/png"),
    ("noext", "application/octet-stream"),
]


@pytest.mark.parametrize(("name", "ctype"), MIME)
def test_mime_table(name: str, ctype: str) -> None:
    assert content_type(name) == ctype


async def test_mime_on_the_wire(tree: Path, start_forward: StartForward) -> None:
    for name, _ in MIME:
        (tree / name).write_bytes(b"x")
    fwd = await serve(start_forward, tree)
    async with aiohttp.ClientSession() as s:
        for name, ctype in MIME:
            async with s.get(fwd.http_url("/" + name)) as r:
                assert (r.status, r.headers["Content-Type"]) == (200, ctype), name


def test_doc_root_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        make_http_handler(replace(Config(), doc_root=str(tmp_path / "missing")))


def test_dotfiles_are_hidden_unless_asked_for(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / ".env").write_text("SECRET=1\n")
    (tmp_path / ".well-known").mkdir()
    (tmp_path / ".well-known" / "acme").write_text("token\n")
    hidden = DocRoot.open(str(tmp_path))
    for path in ("/.git/config", "/.env", "/.git/"):
        with pytest.raises(Refusal) as info:
            hidden.resolve(parse_target(path))
        assert info.value.status == 404
    assert hidden.resolve(parse_target("/.well-known/acme"))[0].endswith("acme")
    shown = DocRoot.open(str(tmp_path), dotfiles=True)
    assert shown.resolve(parse_target("/.env"))[0].endswith(".env")
