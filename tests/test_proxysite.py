"""--proxy-protocol (forward/proxysite.py): the header read off a real socket at every split and
nothing past it; in front of an in-process forward with real Rserves, a small load balancer that
writes a chosen PROXY header first, so that any source address, v1 or v2, LOCAL and UNKNOWN can
be sent: the source is the client for the per-client cap, IP rules, logs and X-Real-IP, on -p,
-w (TLS) and --listen-unix; refused connections (untrusted peer, no header, a late or cut one)
are closed with one log line and never reach R. The real nginx in front is in
test_proxy_nginx.py."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import ssl
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward import proxyproto
from forward.app import Server
from forward.config import Config
from forward.dispatch import make_http_handler
from forward.listeners import bind_unix
from forward.proxyproto import ProxyProtocolError
from forward.proxysite import _Gate, _HeaderFirst, read_header
from forward.stats import Stat, Stats

from .conftest import PKI, Rserve, RunMain, StartCli, StartForward, eventually
from .rclient import RClient
from .resume_client import ResumeClient
from .test_rscript import docroot, rpages, split_request

__all__ = ["docroot", "rpages"]  # fixtures, used by name

V1 = proxyproto.v1(("192.0.2.7", 40001), ("10.0.0.1", 443))
V2 = proxyproto.v2(("2001:db8::7", 40002), ("2001:db8::1", 443), ((0x02, b"r.example.com"),))
TAIL = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # a ClientHello's first bytes


def unread(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0])


# -- reading the header off a socket ------------------------------------------------------------


@pytest.mark.parametrize("raw", [V1, V2, proxyproto.v2(None)], ids=["v1", "v2", "v2-local"])
async def test_read_header_at_every_split_consumes_the_header_and_nothing_more(
    raw: bytes,
) -> None:
    expected = proxyproto.parse(raw)
    for cut in range(1, len(raw)):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.setblocking(False)
            theirs.sendall(raw[:cut])
            reading = asyncio.create_task(read_header(ours, 10))

            def consumed(sock: socket.socket = ours, task: asyncio.Task[Any] = reading) -> bool:
                return unread(sock) == 0 and not task.done()

            # The first part is consumed (all of it is header) before the rest arrives.
            await eventually(consumed, within=5)
            theirs.sendall(raw[cut:] + TAIL)
            assert await reading == expected
            assert ours.recv(100) == TAIL, cut


@pytest.mark.parametrize(
    ("sent", "close", "why"),
    [
        (b"", True, "the connection ended before a PROXY header"),
        (V1[:20], True, "the connection ended inside its PROXY header"),
        (b"GET / HTTP/1.1\r\n", False, "no PROXY header: the connection begins with b'GET / "),
        (TAIL, False, r"no PROXY header: the connection begins with b'\x16\x03"),
        (V2[:14] + b"\xff\xff", False, "declares 65535 bytes"),
    ],
)
async def test_read_header_refuses(sent: bytes, close: bool, why: str) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(sent)
        if close:
            theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyProtocolError) as refused:
            await read_header(ours, 10)
        assert why in str(refused.value)


async def test_read_header_has_a_deadline() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(V1[:10])
        with pytest.raises(ProxyProtocolError, match=r"no complete PROXY header within 0.2 s"):
            await read_header(ours, 0.2)


class _Handler(asyncio.Protocol):
    """Stands for aiohttp's connection handler: what it is given."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self.transport: object = None
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data


class _Transport:
    """The few transport calls the header protocol makes, recorded."""

    def __init__(self) -> None:
        self.protocol: object = None
        self.aborted = False
        self.sock, self.other = socket.socketpair()

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def abort(self) -> None:
        self.aborted = True


@given(
    st.sampled_from([V1, V2, proxyproto.v1(None), proxyproto.v2(None)]),
    st.lists(st.integers(min_value=1, max_value=30), max_size=40),
)
def test_a_plain_connection_hands_over_after_the_header_at_any_split(
    raw: bytes, cuts: list[int]
) -> None:
    """On a plain listener the header is read by a first protocol (the event loop's reads, cut
    anywhere); aiohttp's handler then gets the transport and every byte after the header."""
    stream = raw + UPGRADE
    handlers: list[_Handler] = []

    def factory() -> _Handler:
        handlers.append(_Handler())
        return handlers[-1]

    transport = _Transport()
    with transport.sock, transport.other:
        first = _HeaderFirst(factory, _Gate("http", lambda _: True, 0))
        first.connection_made(transport)  # type: ignore[arg-type]
        pos = 0
        for size in [*cuts, len(stream)]:
            # The event loop reads into whichever protocol the transport has now.
            current = transport.protocol or first
            current.data_received(stream[pos : pos + size])  # type: ignore[attr-defined]
            pos += size
            if pos >= len(stream):
                break
    assert not transport.aborted
    assert len(handlers) == 1 and transport.protocol is handlers[0]
    assert handlers[0].transport is transport
    assert handlers[0].data == UPGRADE
    source = proxyproto.parse(raw).source  # type: ignore[union-attr]
    assert handlers[0]._cache.get("peername") == source


# -- a load balancer in front of forward ---------------------------------------------------------


class Balancer:
    """A TCP load balancer on 127.0.0.1 that writes `header` to forward before the client's
    bytes (nginx's stream module with proxy_protocol on, HAProxy's send-proxy), then relays."""

    def __init__(self, target: int | str, header: bytes) -> None:
        self.target = target
        self.header = header
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for link in list(self._links):
            for w in link:
                w.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if isinstance(self.target, str):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        up_writer.write(self.header)
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._links.discard(link)
            for w in link:
                w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.transport.abort()


Balancers = Callable[[int | str, bytes], Awaitable[Balancer]]


@pytest.fixture
async def balancers() -> AsyncIterator[Balancers]:
    started: list[Balancer] = []

    async def make(target: int | str, header: bytes) -> Balancer:
        b = await Balancer(target, header).start()
        started.append(b)
        return b

    yield make
    for b in started:
        await b.stop()


PROXIED = {"proxy_protocol": True, "trusted_proxy": ("127.0.0.1",)}


@pytest.mark.rserve
async def test_the_per_client_cap_counts_each_source(
    rserve_qap: Rserve,
    start_forward: StartForward,
    balancers: Balancers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two sources behind one balancer address: the cap of 1 applies to each on its own, on -p
    (plain) and -w alike, and the log names the source, never the balancer."""
    caplog.set_level(logging.INFO)
    fwd = await start_forward(rserve_qap.socket, max_sessions_per_client=1, **PROXIED)
    first = await balancers(fwd.server.port("http"), V1)
    second = await balancers(fwd.server.port("ws"), V2)
    again = await balancers(fwd.server.port("ws"), V1)
    async with (
        await RClient.connect(f"ws://127.0.0.1:{first.port}/") as a,
        await RClient.connect(f"ws://127.0.0.1:{second.port}/") as b,
    ):
        assert (await a.eval("1 + 1")).value == [2.0]
        assert (await b.eval("2 + 2")).value == [4.0]
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"ws://127.0.0.1:{again.port}/")
            await ws.receive()
            assert ws.close_code == 1013
        await eventually(lambda: "too many sessions from 192.0.2.7" in caplog.text)
        assert "from 192.0.2.7 on http opened" in caplog.text
        assert "from 2001:db8::7 on ws opened" in caplog.text
        assert "from 127.0.0.1 on" not in caplog.text


@pytest.mark.rserve
@pytest.mark.parametrize(
    ("header", "client"),
    [
        (V1, "192.0.2.7"),
        (V2, "2001:db8::7"),
        (proxyproto.v1(None), "127.0.0.1"),  # UNKNOWN: the peer stays the client
        (proxyproto.v2(None), "127.0.0.1"),  # LOCAL
    ],
    ids=["v1", "v2", "v1-unknown", "v2-local"],
)
async def test_x_real_ip_for_r_scripts_is_the_source(
    rpages: Rserve,
    docroot: Path,
    start_forward: StartForward,
    balancers: Balancers,
    header: bytes,
    client: str,
) -> None:
    """With a source, whatever the browser claims in its own X-Forwarded-For is replaced: the
    source is not a trusted proxy. (LOCAL and UNKNOWN leave the balancer, a trusted proxy, as
    the peer: its headers are believed as any trusted proxy's, so none are sent here.)"""
    lies = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6"}
    claims = lies if client != "127.0.0.1" else {}
    config = replace(Config(), doc_root=str(docroot), rscript_socket=str(rpages.socket))
    fwd = await start_forward(
        docroot / "no-qap.sock",
        doc_root=str(docroot),
        rscript_socket=str(rpages.socket),
        http_handler=make_http_handler(config),
        **PROXIED,
    )
    lb = await balancers(fwd.server.port("http"), header)
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{lb.port}/app/echo.R", headers=claims) as r,
    ):
        assert r.status == 200
        _, _, headers, _, _ = split_request(await r.read())
    assert headers["x-real-ip"] == client
    assert headers["x-forwarded-for"] == client


@pytest.mark.rserve
async def test_ip_rules_see_the_source(
    rserve_qap: Rserve, start_forward: StartForward, balancers: Balancers, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.write_text("deny 192.0.2.0/24\nallow all\n")
    fwd = await start_forward(rserve_qap.socket, ip_rules=str(rules), **PROXIED)
    denied = await balancers(fwd.server.port("http"), V1)
    allowed = await balancers(fwd.server.port("http"), V2)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{denied.port}/") as r:
            assert r.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"ws://127.0.0.1:{denied.port}/")
        assert refused.value.status == 403
    async with await RClient.connect(f"ws://127.0.0.1:{allowed.port}/") as c:
        assert (await c.eval("3")).value == [3.0]


@pytest.mark.rserve
async def test_tls_after_the_header(
    rserve_qap: Rserve,
    pki: PKI,
    start_forward: StartForward,
    balancers: Balancers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The header comes before the TLS handshake; a handshake that then fails is logged with
    the source and the balancer it came through."""
    caplog.set_level(logging.INFO)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.cert, pki.key)
    fwd = await start_forward(
        rserve_qap.socket, ssl_context=context, max_sessions_per_client=1, **PROXIED
    )
    lb = await balancers(fwd.server.port("ws"), V2)
    client_ctx = pki.client_context()
    async with await RClient.connect(f"wss://127.0.0.1:{lb.port}/", ssl_context=client_ctx) as c:
        assert (await c.eval("6 * 7")).value == [42.0]
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"wss://127.0.0.1:{lb.port}/", ssl=client_ctx)
            await ws.receive()
            assert ws.close_code == 1013
        await eventually(lambda: "too many sessions from 2001:db8::7" in caplog.text)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            await s.get(f"http://127.0.0.1:{lb.port}/")
    await eventually(
        lambda: (
            "TLS handshake from [2001:db8::7]:40002 (through 127.0.0.1:" in caplog.text
            and "on ws refused: plain HTTP on a TLS port" in caplog.text
        )
    )


@pytest.mark.rserve
async def test_on_the_unix_socket(
    rpages: Rserve, docroot: Path, balancers: Balancers, tmp_path: Path
) -> None:
    """--listen-unix: its peers are local processes, trusted; the header names the client."""
    path = tmp_path / "forward.sock"
    config = replace(
        Config(),
        socket=str(tmp_path / "no-qap.sock"),
        rscript_socket=str(rpages.socket),
        doc_root=str(docroot),
        http_port=-1,
        ws_port=-1,
        listen_unix=str(path),
        proxy_protocol=True,
        trusted_proxy=("none",),
    ).validate()
    server = Server(config, http_handler=make_http_handler(config), stats=Stats())
    await server.start({"http": [bind_unix(str(path))]})
    try:
        lb = await balancers(str(path), V1)
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{lb.port}/app/echo.R") as r,
        ):
            assert r.status == 200
            _, _, headers, _, _ = split_request(await r.read())
        assert headers["x-real-ip"] == "192.0.2.7"
    finally:
        await server.stop()


@pytest.mark.rserve
async def test_a_resumed_session_moves_to_its_new_source(
    rserve_qap: Rserve,
    start_forward: StartForward,
    balancers: Balancers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that comes back from another address (through the same balancer) resumes its
    session there: the session and its place under the per-client cap move to the new source."""
    caplog.set_level(logging.INFO)
    fwd = await start_forward(rserve_qap.socket, max_sessions_per_client=1, **PROXIED)
    before = await balancers(fwd.server.port("http"), V1)
    after = await balancers(fwd.server.port("http"), V2)
    client = ResumeClient(f"ws://127.0.0.1:{before.port}/")
    try:
        await client.connect()
        await client.eval("x <- 20")
        await client.wait_messages(1)
        client.url = f"ws://127.0.0.1:{after.port}/"
        await client.resume()
        await client.eval("x + 1")
        await client.wait_messages(2)
        assert client.values() == [[20.0], [21.0]]  # the same R session
        await eventually(lambda: "resumed by 2001:db8::7 on http" in caplog.text)
        # The old source's place is free again; the new one's is taken.
        async with await RClient.connect(f"ws://127.0.0.1:{before.port}/") as again:
            assert (await again.eval("1")).value == [1.0]
    finally:
        await client.close()


@pytest.mark.rserve
async def test_the_command_line_on_uvloop(
    rserve_qap: Rserve, forward_cli: StartCli, balancers: Balancers
) -> None:
    """forward as users run it (uvloop's transports): a session and a plain request through
    the balancer, then a connection without a header, on plain -p."""
    fwd = await forward_cli(
        "-s", str(rserve_qap.socket), "--proxy-protocol", "--trusted-proxy", "127.0.0.1"
    )
    lb = await balancers(fwd.ports["-p"], V1)
    async with await RClient.connect(f"ws://127.0.0.1:{lb.port}/") as c:
        assert (await c.eval("2 * 21")).value == [42.0]
        await fwd.expect("session 1 from 192.0.2.7 on http opened")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{lb.port}/x") as r:
            assert r.status == 404
        await fwd.expect('192.0.2.7 "GET /x HTTP/1.1" 404')
        sock = await _connect(fwd.ports["-p"])
        with sock:
            await asyncio.get_running_loop().sock_sendall(sock, b"GET /x HTTP/1.1\r\n\r\n")
            assert await _closed(sock) == b""
        await fwd.expect("on http: no PROXY header: the connection begins with b'GET /x ")
        assert (await c.eval("1 + 1")).value == [2.0]


# -- refused connections -------------------------------------------------------------------------


async def _closed(sock: socket.socket) -> bytes:
    """Everything forward sends before it closes the connection (a reset counts as closed)."""
    loop = asyncio.get_running_loop()
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while data := await loop.sock_recv(sock, 4096):
            out += data
    return out


async def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.mark.rserve
@pytest.mark.parametrize(
    ("source", "sent", "why"),
    [
        ("127.0.0.2", V1 + UPGRADE, "from 127.0.0.2:{port} on http: not a --trusted-proxy"),
        ("127.0.0.1", UPGRADE, "on http: no PROXY header: the connection begins with b'GET / "),
        ("127.0.0.1", V2[:20], "on http: no complete PROXY header within 2 s"),
        ("127.0.0.1", V1[:20] + b"\n", "on http: PROXY v1 line holds a byte that is not printable"),
    ],
    ids=["untrusted-peer", "no-header", "late-header", "malformed-header"],
)
async def test_refused_connections_never_reach_r(
    fresh_rserve: Callable[..., Rserve],
    start_forward: StartForward,
    caplog: pytest.LogCaptureFixture,
    source: str,
    sent: bytes,
    why: str,
) -> None:
    caplog.set_level(logging.INFO)
    rserve = fresh_rserve()
    fwd = await start_forward(rserve.socket, header_timeout=2, **PROXIED)
    port = fwd.server.port("http")
    lb = await Balancer(port, V1).start()
    try:
        async with await RClient.connect(f"ws://127.0.0.1:{lb.port}/") as open_session:
            await eventually(lambda: len(rserve.children()) == 1)
            sock = await _connect(port, source)
            with sock:
                local_port = sock.getsockname()[1]
                await asyncio.get_running_loop().sock_sendall(sock, sent)
                assert await _closed(sock) == b""
            line = why.format(port=local_port)
            await eventually(lambda: line in caplog.text, what=line)
            refusals = [r for r in caplog.records if r.name == "forward.proxysite"]
            assert len(refusals) == 1, caplog.text
            assert "closed connection from" in refusals[0].getMessage()
            # The open session goes on; R never saw the refused connection.
            assert (await open_session.eval("10 + 1")).value == [11.0]
            assert len(rserve.children()) == 1
            assert fwd.server.stats.total(Stat.SESSIONS_TOTAL) == 1
    finally:
        await lb.stop()


# -- configuration -------------------------------------------------------------------------------


def test_the_option(forward_main: RunMain) -> None:
    assert "--proxy-protocol" in forward_main("-h").stdout
    refused = forward_main("--proxy-protocol", "--trusted-proxy", "none", "--check-config")
    assert refused.returncode != 0
    assert "--proxy-protocol with --trusted-proxy none would close every connection" in (
        refused.stderr
    )


def test_the_config_file_key() -> None:
    from forward.configfile import parse

    assert parse("proxy-protocol = true\n") == {"proxy_protocol": True}
    # A unix listener's peers are trusted: no --trusted-proxy is needed there.
    config = replace(
        Config(), proxy_protocol=True, trusted_proxy=("none",), listen_unix="/run/f.sock"
    )
    assert config.validate() is config
