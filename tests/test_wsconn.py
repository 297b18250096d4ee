"""The WebSocket end forward runs itself after the upgrade (wsconn.py), seen from the wire.

A raw socket plays the browser, so that each case can send exactly the bytes it needs: frames
the RFC forbids, frames pipelined behind the upgrade request, a ping between the fragments of a
message. The relay's behaviour with real Rserve is covered in test_relay.py and test_soak.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from forward.qap import Cmd, Header
from forward.wsframe import Opcode

from .conftest import Rserve, Running, StartForward, eventually
from .fakes import ID_STRING, FakeRserve
from .rclient import RClient
from .test_guard import works
from .test_wsframe import client_frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # the example of RFC 6455 section 1.3


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[FakeRserve]:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    yield fake
    await fake.stop()


@pytest.fixture
async def peers() -> AsyncIterator[list[Peer]]:
    """Every raw connection a test opens, closed at its end whatever happened."""
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        # Abort: a peer with unsent bytes (some tests fill its buffer on purpose) would never
        # finish a graceful close.
        peer.writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            await peer.writer.wait_closed()


def upgrade(port: int, *, key: str = KEY, extra: str = "") -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
    ).encode()


V13 = "Sec-WebSocket-Version: 13\r\n"


class Peer:
    """A browser at the byte level."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, fwd: Running, first: bytes | None = None, *, track: list[Peer], **kw: str
    ) -> Peer:
        port = fwd.server.port("http")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if first is None:
            extra = V13 + kw.pop("extra", "")
            first = upgrade(port, extra=extra, **kw)
        writer.write(first)
        peer = cls(reader, writer)
        track.append(peer)
        return peer

    async def head(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)

    async def frame(self) -> tuple[int, bool, bytes]:
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 10)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return b0 & 0x0F, bool(b0 & 0x80), await self.reader.readexactly(n)

    async def data_frame(self) -> tuple[int, bool, bytes]:
        while True:
            opcode, fin, payload = await self.frame()
            if opcode not in (Opcode.PING, Opcode.PONG):
                return opcode, fin, payload

    async def message(self) -> tuple[int, bytes]:
        """A whole data message: forward streams R's answer as it arrives, in fragments."""
        opcode, fin, payload = await self.data_frame()
        while not fin:
            more, fin, rest = await self.data_frame()
            assert more == Opcode.CONTINUATION
            payload += rest
        return opcode, payload

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    def close(self) -> None:
        self.writer.close()


def forward_tasks() -> list[asyncio.Task[object]]:
    """The loop's tasks but the fake backend's (one per connection, on its side)."""
    return [t for t in asyncio.all_tasks() if "FakeRserve" not in t.get_coro().__qualname__]


def qap_call(payload: bytes, msg_id: int = 1) -> bytes:
    return Header(Cmd.EVAL, len(payload), msg_id).encode() + payload


async def test_handshake_answer_by_the_rfc(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    fwd = await start_forward(echo.path)
    peer = await Peer.open(
        fwd,
        track=peers,
        extra="Sec-WebSocket-Protocol: chat, superchat\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    head = (await peer.head()).decode()
    assert head.startswith("HTTP/1.1 101 ")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert "Sec-WebSocket-Protocol: chat\r\n" in head  # the first one offered, like the C forward
    assert "Extensions" not in head  # no compression: QAP payloads are mostly binary
    assert await peer.data_frame() == (Opcode.TEXT, True, ID_STRING)
    peer.close()


@pytest.mark.parametrize(
    ("first", "status", "words"),
    [
        ("version 8", "426", "Unsupported WebSocket version 8"),
        ("no version", "426", "Unsupported WebSocket version (none)"),
        ("short key", "400", "invalid Sec-WebSocket-Key"),
        ("bad protocol", "400", "invalid subprotocol"),
    ],
)
async def test_bad_handshakes_get_a_clear_http_answer(
    echo: FakeRserve,
    start_forward: StartForward,
    peers: list[Peer],
    first: str,
    status: str,
    words: str,
) -> None:
    fwd = await start_forward(echo.path)
    port = fwd.server.port("http")
    request = {
        "version 8": upgrade(port, extra="Sec-WebSocket-Version: 8\r\n"),
        "no version": upgrade(port),
        "short key": upgrade(port, key=base64.b64encode(b"short").decode(), extra=V13),
        "bad protocol": upgrade(port, extra=V13 + "Sec-WebSocket-Protocol: a/b\r\n"),
    }[first]
    peer = await Peer.open(fwd, request, track=peers)
    head = (await peer.head()).decode()
    assert head.startswith(f"HTTP/1.1 {status} ")
    if status == "426":
        assert "Sec-WebSocket-Version: 13\r\n" in head
    body = await asyncio.wait_for(peer.reader.read(200), 10)
    assert words in body.decode()
    peer.close()
    assert echo.connections == 0  # refused before R was asked for anything
    await works(fwd)  # and the server goes on


async def test_frames_sent_with_the_upgrade_request_reach_r(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    fwd = await start_forward(echo.path)
    port = fwd.server.port("http")
    calls = qap_call(b"first", 1) + qap_call(b"second", 2)
    pipelined = (
        upgrade(port, extra=V13)
        + client_frame(Opcode.BINARY, calls[:20])
        + client_frame(Opcode.BINARY, calls[20:])
    )
    peer = await Peer.open(fwd, pipelined, track=peers)
    assert (await peer.head()).startswith(b"HTTP/1.1 101 ")
    assert await peer.data_frame() == (Opcode.TEXT, True, ID_STRING)
    for msg_id, body in ((1, b"first"), (2, b"second")):
        opcode, fin, payload = await peer.data_frame()
        assert (opcode, fin) == (Opcode.BINARY, True)
        assert Header.parse(payload[:16]).msg_id == msg_id and payload[16:] == body
    peer.close()
    assert bytes(echo.received[0]) == calls


async def test_ping_between_fragments_is_answered_and_the_message_arrives_whole(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    fwd = await start_forward(echo.path)
    peer = await Peer.open(fwd, track=peers)
    await peer.head()
    await peer.data_frame()  # greeting
    body = os.urandom(5000)
    call = qap_call(body, 7)
    peer.writer.write(
        client_frame(Opcode.BINARY, call[:100], fin=False)
        + client_frame(Opcode.PING, b"still there?")
        + client_frame(Opcode.CONTINUATION, call[100:], fin=True)
    )
    assert await peer.frame() == (Opcode.PONG, True, b"still there?")
    opcode, fin, payload = await peer.data_frame()
    assert (opcode, fin, payload[16:]) == (Opcode.BINARY, True, body)
    peer.close()


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [
        (bytes((0x82, 5)) + b"hello", 1002, "not masked"),
        (client_frame(Opcode.BINARY, b"x", rsv=0x40), 1002, "reserved bits"),
        (client_frame(Opcode.TEXT, b"\xc3\x28"), 1007, "not valid UTF-8"),
        (client_frame(0x5, b""), 1002, "unknown opcode"),
    ],
)
async def test_protocol_errors_close_with_a_code_and_end_the_r_side(
    echo: FakeRserve,
    start_forward: StartForward,
    peers: list[Peer],
    frame: bytes,
    code: int,
    words: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fwd = await start_forward(echo.path)
    peer = await Peer.open(fwd, track=peers)
    await peer.head()
    await peer.data_frame()
    peer.writer.write(frame + frame * 20)  # the rest after an error is not even looked at
    opcode, _, payload = await peer.data_frame()
    assert opcode == Opcode.CLOSE
    assert struct.unpack("!H", payload[:2])[0] == code and words in payload[2:].decode()
    await asyncio.wait_for(echo.closed.wait(), 10)  # R's connection ended with the session
    assert await peer.closed()  # and the connection, without waiting for an answer
    assert len([r for r in caplog.records if words in r.getMessage()]) == 1
    peer.close()
    await works(fwd)


async def test_browser_close_is_answered_and_the_connection_ends(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    fwd = await start_forward(echo.path)
    peer = await Peer.open(fwd, track=peers)
    await peer.head()
    await peer.data_frame()
    peer.writer.write(client_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"bye"))
    assert await peer.data_frame() == (Opcode.CLOSE, True, struct.pack("!H", 1000))
    assert await peer.closed()  # the server closes TCP first (RFC 6455 section 7.1.1)
    await asyncio.wait_for(echo.closed.wait(), 10)
    async with asyncio.timeout(10):
        await fwd.server.sessions.emptied()


async def test_open_sessions_keep_no_task_and_no_aiohttp_connection(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    """Once open, a session is transport callbacks only: no request task waits in aiohttp for
    each one (that and its request objects were most of a session's memory)."""
    fwd = await start_forward(echo.path)
    web_server = fwd.server.runners["http"].server
    assert web_server is not None

    def handed_over() -> bool:  # aiohttp's request handlers for the upgrades have returned
        return not web_server.connections

    async with await RClient.connect(fwd.url()):
        await eventually(handed_over)
        baseline = len(forward_tasks())
    for _ in range(20):
        peer = await Peer.open(fwd, track=peers)
        await peer.head()
        await peer.data_frame()
    assert len(fwd.server.sessions) == 20
    await eventually(handed_over)
    assert len(forward_tasks()) <= baseline
    for peer in peers:
        peer.writer.write(client_frame(Opcode.BINARY, qap_call(b"z")))
        assert (await peer.data_frame())[2][16:] == b"z"
        peer.close()


async def test_pipelined_frames_and_pings_with_real_rserve(
    rserve_qap: Rserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    """The same byte-level paths against a real Rserve: a call sent with the upgrade request,
    then one fragmented around a ping."""
    from forward import rexp

    fwd = await start_forward(rserve_qap.socket)
    port = fwd.server.port("http")

    def eval_call(expr: str, msg_id: int) -> bytes:
        return qap_call(rexp.string_param(expr), msg_id)

    first = eval_call("1+1", 1)
    opening = upgrade(port, extra=V13) + client_frame(Opcode.BINARY, first)
    peer = await Peer.open(fwd, opening, track=peers)
    await peer.head()
    opcode, _, greeting = await peer.data_frame()
    assert opcode == Opcode.TEXT and greeting.startswith(b"Rsrv0103QAP1")
    _, answer = await peer.message()
    assert Header.parse(answer[:16]).cmd == Cmd.RESP_OK and struct.pack("<d", 2.0) in answer
    second = eval_call("paste(rep('x', 10), collapse='')", 2)
    peer.writer.write(
        client_frame(Opcode.BINARY, second[:7], fin=False)
        + client_frame(Opcode.PING, b"p")
        + client_frame(Opcode.CONTINUATION, second[7:])
    )
    assert await peer.frame() == (Opcode.PONG, True, b"p")
    _, answer = await peer.message()
    assert Header.parse(answer[:16]).cmd == Cmd.RESP_OK and b"xxxxxxxxxx" in answer
    peer.close()


async def test_aiohttp_client_still_gets_close_codes(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    fwd = await start_forward(echo.path, max_sessions_per_client=1)
    async with await RClient.connect(fwd.url()) as first:
        async with aiohttp.ClientSession() as s, s.ws_connect(fwd.url()) as ws:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1013
        await first.send(Cmd.EVAL, b"still", msg_id=1)
        assert (await first.response()).payload == b"still"


async def test_pings_wait_while_forward_itself_holds_the_browser_back(
    tmp_path: Path, start_forward: StartForward, peers: list[Peer]
) -> None:
    """While R does not read, forward stops reading from the browser (TCP pushes back), so the
    browser's pong cannot be read either: that is no dead peer, and the session must live."""
    from forward.wsconn import HOLD_BACKEND_FULL

    from .fakes import echo

    done_evaluating = asyncio.Event()

    async def busy_then_echo(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fake: FakeRserve
    ) -> None:
        await done_evaluating.wait()  # R evaluating (not reading its socket), then an echo
        await echo(reader, writer, fake)

    ping = 0.2
    fake = await FakeRserve(tmp_path / "busy.sock", busy_then_echo, record=False).start()
    try:
        fwd = await start_forward(fake.path, ws_ping=ping)
        peer = await Peer.open(fwd, track=peers)
        await peer.head()
        body = os.urandom(4 << 20)  # more than the unix socket takes while R is busy
        peer.writer.write(client_frame(Opcode.BINARY, qap_call(body, 9)))
        (session,) = fwd.server.sessions
        assert session.ws is not None
        await eventually(lambda: session.ws.held & HOLD_BACKEND_FULL, what="browser held back")
        await asyncio.sleep(5 * ping)  # not a wait for anything: five intervals without a pong
        done_evaluating.set()
        answer = bytearray()
        while True:  # a browser answering every ping, as browsers do
            opcode, fin, payload = await asyncio.wait_for(peer.frame(), 20)
            if opcode == Opcode.PING:
                peer.writer.write(client_frame(Opcode.PONG, payload))
            elif opcode in (Opcode.BINARY, Opcode.CONTINUATION):
                answer += payload
                if fin:
                    break
            else:
                assert opcode == Opcode.TEXT, f"unexpected frame {opcode}: {payload[:60]!r}"
        assert bytes(answer[16:]) == body
    finally:
        await fake.stop()


async def test_a_browser_that_only_pings_and_never_reads_is_pushed_back(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    """Every ping wants a pong; a peer that sends pings and reads nothing must not make forward
    queue pongs without bound: once the browser's socket is full, forward stops reading it."""
    from forward.wsconn import HOLD_BROWSER_FULL

    fwd = await start_forward(echo.path)
    peer = await Peer.open(fwd, track=peers)
    await peer.head()
    ping = client_frame(Opcode.PING, b"p" * 125)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while sent < 64 << 20:
            peer.writer.write(ping * 512)
            sent += len(ping) * 512
            await peer.writer.drain()

    flooding = asyncio.create_task(flood())
    try:
        (session,) = fwd.server.sessions
        ws = session.ws
        assert ws is not None and ws.transport is not None
        await eventually(
            lambda: ws.held & HOLD_BROWSER_FULL or flooding.done(),
            what="forward stopped reading from a browser whose socket is full",
        )
        assert not flooding.done(), "forward kept reading from a browser that reads nothing"
        queued = ws.transport.get_write_buffer_size()
        assert queued < 4 << 20, f"{queued} bytes of pongs queued"
    finally:
        flooding.cancel()


async def _many_answers(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: FakeRserve
) -> None:
    writer.write(ID_STRING)
    await reader.read(65536)  # one request, then a stream of 17 KB answers
    body = b"a" * (17 * 1024)
    for i in range(300):
        writer.write(Header(Cmd.RESP_OK, len(body), i).encode() + body)
        await writer.drain()
    await reader.read(1)


async def test_a_stalled_browser_holds_its_bytes_not_whole_read_buffers(
    tmp_path: Path,
    start_forward: StartForward,
    peers: list[Peer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """R's answers are read into a shared 256 KB buffer; a browser that stops reading must not
    keep a new one alive for every read: after the first, queued chunks are copied."""
    from forward import wsconn

    renewals = 0
    real_renew = wsconn.ReadBuffer.renew

    def counting(self: wsconn.ReadBuffer) -> None:
        nonlocal renewals
        renewals += 1
        real_renew(self)

    monkeypatch.setattr(wsconn.ReadBuffer, "renew", counting)
    fake = await FakeRserve(tmp_path / "many.sock", _many_answers, record=False).start()
    try:
        fwd = await start_forward(fake.path)
        peer = await Peer.open(fwd, track=peers)
        await peer.head()
        peer.writer.transport.pause_reading()  # type: ignore[attr-defined]
        peer.writer.write(client_frame(Opcode.BINARY, qap_call(b"go")))
        (session,) = fwd.server.sessions
        await eventually(lambda: session._reading_paused, what="forward paused reading from R")
        assert renewals <= 1, f"{renewals} read buffers renewed for one stalled browser"
    finally:
        await fake.stop()


async def test_shutdown_waits_once_then_drops_browsers_that_do_not_answer(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer]
) -> None:
    fwd = await start_forward(echo.path, shutdown_timeout=0.5)
    peer = await Peer.open(fwd, track=peers)
    await peer.head()
    await peer.data_frame()  # greeting; this browser will never answer a close
    await fwd.server.stop()
    assert not fwd.server.sessions  # not left open after stop()
    frames = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        while True:
            frames.append(await peer.frame())
    assert (Opcode.CLOSE, True) in {(op, fin) for op, fin, _ in frames}


async def test_unparseable_request_gets_400_without_an_error_in_the_log(
    echo: FakeRserve,
    start_forward: StartForward,
    peers: list[Peer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fwd = await start_forward(echo.path)
    peer = await Peer.open(fwd, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", track=peers)
    assert b" 400 Bad Request\r\n" in await peer.head()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("connection", "upgraded"), [("keep-alive, Upgrade", True), ("x-upgrade-not", False)]
)
async def test_connection_header_is_read_as_tokens(
    echo: FakeRserve,
    start_forward: StartForward,
    peers: list[Peer],
    connection: str,
    upgraded: bool,
) -> None:
    fwd = await start_forward(echo.path)
    port = fwd.server.port("ws")  # -w: anything but an upgrade is 426
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: {connection}\r\nSec-WebSocket-Key: {KEY}\r\n{V13}\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = Peer(reader, writer)
    peers.append(peer)
    writer.write(request)
    head = await peer.head()
    assert head.startswith(b"HTTP/1.1 101 " if upgraded else b"HTTP/1.1 426 ")


def _hostile(port: int, case: str) -> bytes:
    """The upgrade requests of issue 15 that once ended in a 500 or a 101."""
    key = f"Sec-WebSocket-Key: {KEY}\r\n".encode()
    head = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    parts = {
        "key of 0xff bytes": b"Sec-WebSocket-Key: " + b"\xff" * 24 + b"\r\n" + V13.encode(),
        "version 1 then 0xff": key + b"Sec-WebSocket-Version: 1\xff\r\n",
        "origin [::1": key + V13.encode() + b"Origin: http://[::1\r\n",
        "origin with 0xff": key + V13.encode() + b"Origin: http://\xff.example\r\n",
        "two keys": key + key.replace(b"dGhl", b"AAAA") + V13.encode(),
        "two versions": key + V13.encode() + b"Sec-WebSocket-Version: 8\r\n",
    }
    if case == "host [::1":
        return b"GET / HTTP/1.1\r\nHost: [::1\r\n" + head + key + V13.encode() + b"\r\n"
    if case == "http/1.0":
        return b"GET / HTTP/1.0\r\n" + host + head + key + V13.encode() + b"\r\n"
    if case == "cr lf in the path":
        return (
            b"GET /a\r\nX-Injected: yes HTTP/1.1\r\n" + host + head + key + V13.encode() + b"\r\n"
        )
    return b"GET / HTTP/1.1\r\n" + host + head + parts[case] + b"\r\n"


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("key of 0xff bytes", 400),
        ("version 1 then 0xff", 426),
        ("origin [::1", 403),
        ("origin with 0xff", 403),
        ("host [::1", 400),
        ("two keys", 400),
        ("two versions", 426),
        ("http/1.0", 505),
        ("cr lf in the path", 400),
    ],
)
@pytest.mark.parametrize("listener", ["http", "ws"])
async def test_hostile_handshakes_are_refused_with_a_4xx_and_one_line(
    echo: FakeRserve,
    start_forward: StartForward,
    peers: list[Peer],
    caplog: pytest.LogCaptureFixture,
    case: str,
    status: int,
    listener: str,
) -> None:
    fwd = await start_forward(echo.path)
    port = fwd.server.port(listener)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = Peer(reader, writer)
    peers.append(peer)
    caplog.clear()
    writer.write(_hostile(port, case))
    head = await peer.head()
    assert head.split(b" ", 2)[1] == str(status).encode(), head
    if status == 426:
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in head
    body = await asyncio.wait_for(reader.read(1000), 10)
    assert b"\xff" not in head + body  # client bytes are never sent back raw
    assert echo.connections == 0  # R was never reached
    records = [r for r in caplog.records if r.name.startswith(("forward", "aiohttp"))]
    records = [r for r in records if r.name != "aiohttp.access"]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert len(records) == 1, [r.getMessage() for r in records]  # one line, saying why
    await works(fwd, listener)  # and the server goes on


async def _greet_then_leave_on_bye(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: FakeRserve
) -> None:
    """An Rserve that echoes like `echo`, but dies in the middle of its answer to `bye`."""
    writer.write(ID_STRING)
    while True:
        try:
            head = Header.parse(await reader.readexactly(16))
            payload = await reader.readexactly(head.length)
        except asyncio.IncompleteReadError:
            return
        if payload == b"bye":  # half an answer, then gone: the session must end
            writer.write(Header(Cmd.RESP_OK, 100, head.msg_id).encode() + b"x")
            return
        writer.write(Header(Cmd.RESP_OK, len(payload), head.msg_id).encode() + payload)


@pytest.mark.parametrize(
    "ending", ["browser close", "protocol error", "R dies mid-answer", "max lifetime"]
)
async def test_every_end_frees_both_connections_while_the_browser_reads_nothing(
    tmp_path: Path,
    start_forward: StartForward,
    peers: list[Peer],
    monkeypatch: pytest.MonkeyPatch,
    ending: str,
) -> None:
    """Issue 15 §4: a browser that stopped reading holds forward's send buffer full; however the
    session ends then, the TCP connection and R's are gone within the close timeout."""
    from forward import wsconn

    monkeypatch.setattr(wsconn, "CLOSE_TIMEOUT", 0.2)
    fake = await FakeRserve(tmp_path / "r.sock", _greet_then_leave_on_bye).start()
    try:
        lifetime = 1.0 if ending == "max lifetime" else 0.0
        fwd = await start_forward(fake.path, max_lifetime=lifetime)
        port = fwd.server.port("http")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        peer = Peer(reader, writer)
        peers.append(peer)
        writer.write(upgrade(port, extra=V13))
        await peer.head()
        await peer.data_frame()
        (session,) = fwd.server.sessions
        ws = session.ws
        assert ws is not None and ws.transport is not None
        transport = ws.transport
        # Forward's side made small and never pushing back: the pongs it owes stay queued in
        # forward, as with a browser that flooded pings and stopped reading (the client
        # needs ~24,000 pings to get there).
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=64 << 20)
        pings = client_frame(Opcode.PING, b"p" * 125) * 4000
        end = {
            "browser close": client_frame(Opcode.CLOSE, struct.pack("!H", 1000)),
            "protocol error": client_frame(3, b""),  # a reserved opcode
            "R dies mid-answer": client_frame(Opcode.BINARY, qap_call(b"bye")),
            "max lifetime": b"",  # forward ends it
        }[ending]
        writer.write(pings + end)
        async with asyncio.timeout(10):
            await fwd.server.sessions.emptied()  # R's connection closed, the slot released
            await fake.closed.wait()
        assert ws.transport is None  # the TCP connection is gone, unsent pongs and all
    finally:
        await fake.stop()


@pytest.mark.parametrize("listener", ["http", "ws"])
async def test_an_upgrade_answered_without_one_ends_the_connection(
    echo: FakeRserve, start_forward: StartForward, peers: list[Peer], listener: str
) -> None:
    """aiohttp's parser reads nothing more after `Connection: Upgrade`: a request that asked for
    another protocol, answered with 404 or 426, must not leave its connection open, unread."""
    fwd = await start_forward(echo.path)
    port = fwd.server.port(listener)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    peer = Peer(reader, writer)
    peers.append(peer)
    writer.write(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n".encode()
    )
    head = await peer.head()
    assert head.split(b" ", 2)[1] in (b"404", b"426")
    await asyncio.wait_for(reader.read(), 10)  # and then the end, not a wait for ever
    assert echo.connections == 0
