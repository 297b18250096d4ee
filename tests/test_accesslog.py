"""Malformed requests: one WARNING line each (rate-limited), counted, answered without echoing
the request and without aiohttp's version; a good session on the same server goes on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path

import pytest

from forward.accesslog import MalformedRequests
from forward.aiohttp_private import SERVER
from forward.stats import Slot, Stat

from .conftest import StartForward
from .fakes import FakeRserve
from .test_guard import works


def _raw(host: str) -> dict[str, bytes]:
    h = f"Host: {host}\r\n".encode()
    return {
        "two hosts": b"GET / HTTP/1.1\r\n" + h + h + b"\r\n",
        "content-length and chunked": b"POST / HTTP/1.1\r\n" + h + b"Content-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        "two content-lengths": b"POST / HTTP/1.1\r\n" + h + b"Content-Length: 3\r\n"
        b"Content-Length: 4\r\n\r\n",
        "chunked, identity": b"POST / HTTP/1.1\r\n"
        + h
        + b"Transfer-Encoding: chunked, identity\r\n"
        b"\r\n",
        "space before the colon": b"GET / HTTP/1.1\r\n" + h + b"X-A : 1\r\n\r\n",
        "100 KB header": b"GET / HTTP/1.1\r\n" + h + b"X-Big: " + b"\xff" * 100_000 + b"\r\n\r\n",
        "10 KB path": b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n" + h + b"\r\n",
        "no Host": b"GET / HTTP/1.1\r\n\r\n",
        "10,000 headers": b"GET / HTTP/1.1\r\n" + h + b"X: 1\r\n" * 10_000 + b"\r\n",
        "NUL in the path": b"GET /a\x00b HTTP/1.1\r\n" + h + b"\r\n",
        "not HTTP": b"\xff\xfe\x16\x03\x01 / HTTP/1.1\r\n\r\n",
    }


CASES = list(_raw("x"))


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[FakeRserve]:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    yield fake
    await fake.stop()


async def _ask(port: int, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = await asyncio.wait_for(reader.read(), 10)
        return head, body
    finally:
        writer.transport.abort()


@pytest.mark.parametrize("case", CASES)
async def test_a_malformed_request_is_one_line_and_a_plain_answer(
    echo: FakeRserve,
    start_forward: StartForward,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    fwd = await start_forward(echo.path)
    port = fwd.server.port("http")
    caplog.clear()
    head, body = await _ask(port, _raw(f"127.0.0.1:{port}")[case])
    status = int(head.split(b" ", 2)[1])
    assert status == 400, head
    assert f"\r\nServer: {SERVER}\r\n".encode() in head
    assert body == f"{status} {HTTPStatus(status).phrase}\n".encode()  # nothing of the request
    records = [r for r in caplog.records if r.name != "forward.access"]
    assert [r.levelno for r in records] == [logging.WARNING], [r.getMessage() for r in records]
    assert not records[0].exc_info
    assert (
        records[0].getMessage().startswith(f"malformed request from 127.0.0.1 on http: {status}, ")
    )
    assert fwd.server.stats.total(Stat.MALFORMED_REQUESTS) == 1
    await works(fwd)


async def test_no_aiohttp_version_in_any_answer(
    echo: FakeRserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(echo.path)
    port = fwd.server.port("http")
    head, _ = await _ask(
        port,
        f"GET /missing HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 404 ") and f"\r\nServer: {SERVER}\r\n".encode() in head


def test_a_burst_is_cut_to_a_few_lines_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    now = [0.0]
    slot = Slot.private()
    log = MalformedRequests("http", slot, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    for _ in range(1000):
        log.exception("Error handling request from %s", "192.0.2.1", exc_info=BadHttpMessage("x"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == MalformedRequests.BURST
    assert slot.get(Stat.MALFORMED_REQUESTS) == 1000
    now[0] += MalformedRequests.WINDOW
    log.exception("Error handling request from %s", "192.0.2.1", exc_info=BadHttpMessage("x"))
    lines = [r.getMessage() for r in caplog.records][MalformedRequests.BURST :]
    assert lines[0] == f"990 more malformed request(s) not logged in {MalformedRequests.WINDOW:g} s"
    assert lines[1].startswith("malformed request from 192.0.2.1 on http: 400, x")


def test_other_errors_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = MalformedRequests("http", Slot.private())
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        log.exception("Unhandled exception", exc_info=exc)
    (record,) = caplog.records
    assert record.name == "aiohttp.server" and record.levelno == logging.ERROR and record.exc_info


def test_what_was_wrong_does_not_quote_the_request() -> None:
    from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

    from forward.aiohttp_private import parse_failure

    assert parse_failure(LineTooLong(b"\xff" * 100, 16384)) == (
        400,
        "Got more than 16384 bytes when reading",
    )
    assert parse_failure(BadHttpMessage("Invalid header token:\n\n  b'X-A : 1'")) == (
        400,
        "Invalid header token",
    )
    assert parse_failure(RuntimeError("no")) is None
