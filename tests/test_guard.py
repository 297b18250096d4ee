"""Admission rules (pure) and, on a running server, each refusal while a good session goes on."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from forward.config import ConfigError
from forward.guard import (
    client_address,
    client_identity,
    ip_allowed,
    origin_allowed,
    parse_ip_rules,
)
from forward.qap import SHUTDOWN_NOTICE, Cmd

from .conftest import Running, StartForward
from .fakes import FakeRserve
from .rclient import RClient

RSTUDIO_EXAMPLE = """
deny    192.168.1.10
allow   192.168.1.0/24   # the office
deny    all
"""


def test_ip_rules_first_match_wins() -> None:
    rules = parse_ip_rules(RSTUDIO_EXAMPLE)
    assert not ip_allowed(rules, "192.168.1.10")
    assert ip_allowed(rules, "192.168.1.11")
    assert not ip_allowed(rules, "10.0.0.1")
    assert not ip_allowed(rules, "::1")


def test_ip_rules_ipv6_and_mapped_and_no_match() -> None:
    rules = parse_ip_rules("allow 2001:db8::/32\ndeny 127.0.0.0/8\n")
    assert ip_allowed(rules, "2001:db8::5")
    assert not ip_allowed(rules, "::ffff:127.0.0.1")  # IPv4-mapped peer on a dual-stack socket
    assert ip_allowed(rules, "10.1.1.1")  # no rule matches: allowed, as in RStudio
    assert ip_allowed((), "anything")
    assert not ip_allowed(rules, "not-an-ip")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("permit 1.2.3.4", "line 1: expected"),
        ("allow\n", "line 1"),
        ("allow 1.2.3.4\ndeny 300.1.1.1", "line 2: '300.1.1.1' is not an address"),
    ],
)
def test_ip_rules_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_ip_rules(text)


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "scheme", "ok"),
    [
        (None, "x:1", (), "http", True),  # not a browser
        ("http://x:1", "x:1", (), "http", True),
        ("http://X:1", "x:1", (), "http", True),  # host names are case-insensitive
        ("https://x", "x:443", (), "https", True),  # default ports
        ("http://x:2", "x:1", (), "http", False),
        ("http://evil.com", "x:1", (), "http", False),
        ("null", "x:1", (), "http", False),
        ("http://evil.com", "x:1", ("*",), "http", True),
        ("https://a.b.example.com", "x", ("*.example.com",), "https", True),
        ("https://example.com.evil.net", "x", ("*.example.com",), "https", False),
        ("https://app.example.com", "x", ("https://app.example.com",), "https", True),
        ("http://app.example.com", "x", ("https://app.example.com",), "https", False),
    ],
)
def test_origin_rules(
    origin: str | None, host: str, allowed: tuple[str, ...], scheme: str, ok: bool
) -> None:
    assert origin_allowed(origin, host, allowed, scheme) is ok


def test_client_address_believes_only_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("1.2.3.4", "6.6.6.6", trusted) == "1.2.3.4"  # forged: ignored
    assert client_address("10.0.0.2", "5.5.5.5", trusted) == "5.5.5.5"
    assert client_address("10.0.0.2", "6.6.6.6, 5.5.5.5, 10.0.0.9", trusted) == "5.5.5.5"
    assert client_address("10.0.0.2", None, trusted) == "10.0.0.2"
    assert client_address("10.0.0.2", "5.5.5.5", ()) == "10.0.0.2"
    assert client_address("::ffff:10.0.0.2", "5.5.5.5", trusted) == "5.5.5.5"
    assert client_address("", "5.5.5.5", ()) == "5.5.5.5"  # the unix-socket listener
    assert client_address("", None, ()) == "unix"


def test_x_real_ip_is_believed_only_from_trusted_proxies() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("10.0.0.2", None, trusted, "5.5.5.5") == "5.5.5.5"
    assert client_address("1.2.3.4", None, trusted, "6.6.6.6") == "1.2.3.4"  # forged: ignored
    assert client_address("10.0.0.2", "7.7.7.7", trusted, "5.5.5.5") == "7.7.7.7"  # XFF first
    assert client_address("10.0.0.2", None, trusted, "not an address") == "10.0.0.2"


# -- on a running server ------------------------------------------------------------------------


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[FakeRserve]:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    yield fake
    await fake.stop()


async def works(fwd: Running, listener: str = "http") -> None:
    async with await RClient.connect(fwd.url(listener)) as c:
        await c.send(Cmd.EVAL, b"ping", msg_id=1)
        assert (await c.response()).payload == b"ping"


async def test_foreign_origin_is_refused_before_any_backend_connection(
    echo: FakeRserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(echo.path, allow_origin=("*.example.com",))
    async with aiohttp.ClientSession() as s:
        for listener in ("http", "ws"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(fwd.url(listener), origin="https://evil.example.net")
            assert info.value.status == 403
    assert echo.connections == 0
    port = fwd.server.port("http")
    for origin in (f"http://127.0.0.1:{port}", "https://app.example.com"):
        async with await RClient.connect(fwd.url("http"), origin=origin) as c:
            await c.send(Cmd.EVAL, b"ok", msg_id=1)
            assert (await c.response()).payload == b"ok"


async def test_ip_rules_refuse_http_and_websocket(
    echo: FakeRserve, start_forward: StartForward, tmp_path: Path
) -> None:
    rules = tmp_path / "ip-rules"
    rules.write_text("deny 127.0.0.0/8\nallow all\n")
    fwd = await start_forward(echo.path, ip_rules=str(rules))
    async with aiohttp.ClientSession() as s:
        async with s.get(fwd.http_url("/")) as r:
            assert r.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(fwd.url("ws"))
        assert info.value.status == 403
    assert echo.connections == 0


async def test_too_many_sessions_per_client_get_1013(
    echo: FakeRserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(echo.path, max_sessions_per_client=2)
    first = await RClient.connect(fwd.url("http"))
    second = await RClient.connect(fwd.url("ws"))
    async with aiohttp.ClientSession() as s, s.ws_connect(fwd.url("http")) as ws:
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1013 and "too many sessions from 127.0.0.1" in msg.extra
    assert echo.connections == 2
    await first.close()
    await works(fwd)  # a freed place is usable again
    await second.close()


async def test_slowloris_connection_is_closed_while_others_are_served(
    echo: FakeRserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(echo.path, header_timeout=0.3)
    loop = asyncio.get_running_loop()
    slow = socket.create_connection(("127.0.0.1", fwd.server.port("http")))
    slow.setblocking(False)
    try:
        await loop.sock_sendall(slow, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await works(fwd)
        # The server closes the connection: reading ends (EOF or reset), no answer is sent.
        try:
            data = await asyncio.wait_for(loop.sock_recv(slow, 100), 20)
        except ConnectionResetError:
            data = b""
        assert data == b""
    finally:
        slow.close()


async def test_oversized_header_is_refused(echo: FakeRserve, start_forward: StartForward) -> None:
    fwd = await start_forward(echo.path)
    async with (
        aiohttp.ClientSession() as s,
        s.get(fwd.http_url("/"), headers={"X-Big": "a" * 20000}) as r,
    ):
        assert r.status in (400, 431)
    await works(fwd)


async def test_idle_session_is_closed_and_heartbeats_do_not_count(
    echo: FakeRserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(echo.path, idle_timeout=0.5, heartbeat=0.1)
    async with await RClient.connect(fwd.url("ws")) as c:
        kinds = []
        while True:
            msg = await c.ws.receive()
            if msg.type is not aiohttp.WSMsgType.BINARY:
                break
            kinds.append(msg.data)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert c.ws.close_code == 1001 and "idle" in msg.extra
        assert kinds[-1] == SHUTDOWN_NOTICE
    await asyncio.wait_for(echo.closed.wait(), 10)  # the R side was ended too


async def test_session_lifetime_limit(echo: FakeRserve, start_forward: StartForward) -> None:
    fwd = await start_forward(echo.path, max_lifetime=1.0)
    async with await RClient.connect(fwd.url("http")) as c:
        await c.send(Cmd.EVAL, b"x", msg_id=1)
        assert (await c.response()).payload == b"x"
        msg = await c.ws.receive()
        while msg.type is aiohttp.WSMsgType.BINARY:
            msg = await c.ws.receive()
        assert c.ws.close_code == 1001 and "lifetime" in msg.extra


async def test_dead_peer_found_by_pings_and_r_side_ended(
    echo: FakeRserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(echo.path, ws_ping=0.2)
    async with aiohttp.ClientSession() as s:
        # A client that never answers pings, like a peer whose network vanished.
        ws = await s.ws_connect(fwd.url("ws"), autoping=False)
        await asyncio.wait_for(echo.closed.wait(), 20)
        await ws.close()
    await works(fwd)


async def test_slow_tls_handshake_does_not_lift_the_header_deadline(
    echo: FakeRserve, start_forward: StartForward, tmp_path: Path
) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    fwd = await start_forward(echo.path, header_timeout=0.3, ssl_context=server_ctx)
    raw = socket.create_connection(("127.0.0.1", fwd.server.port("http")))
    try:
        await asyncio.sleep(0.5)  # the handshake starts after the header deadline has passed
        reader, writer = await asyncio.open_connection(
            sock=raw, ssl=client_ctx, server_hostname="127.0.0.1"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(100), 20)
        except (ConnectionError, ssl.SSLError):
            data = b""
        assert data == b""  # closed without an answer
        writer.close()
    finally:
        raw.close()


# -- who is calling, as told to R (.R scripts) --

NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "real", "expected"),
    [
        # an untrusted peer is the client, whatever it claims
        (
            "203.0.113.5",
            "1.2.3.4",
            "1.2.3.4",
            [("X-Real-IP", "203.0.113.5"), ("X-Forwarded-For", "203.0.113.5")],
        ),
        # a trusted proxy: its chain is kept and it is appended
        (
            "127.0.0.1",
            "198.51.100.7",
            "198.51.100.7",
            [("X-Real-IP", "198.51.100.7"), ("X-Forwarded-For", "198.51.100.7, 127.0.0.1")],
        ),
        # the chain decides, not an X-Real-IP a client slipped through the proxy
        (
            "127.0.0.1",
            "6.6.6.6, 198.51.100.7",
            "6.6.6.6",
            [
                ("X-Real-IP", "198.51.100.7"),
                ("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 127.0.0.1"),
            ],
        ),
        # Rserve's nginx example sets only X-Real-IP: believed from a trusted proxy
        (
            "127.0.0.1",
            None,
            "198.51.100.7",
            [("X-Real-IP", "198.51.100.7"), ("X-Forwarded-For", "127.0.0.1")],
        ),
        # no X-Real-IP: the nearest untrusted address in the chain
        (
            "127.0.0.1",
            "198.51.100.7, 203.0.113.9, 10.1.1.1",
            None,
            [
                ("X-Real-IP", "203.0.113.9"),
                ("X-Forwarded-For", "198.51.100.7, 203.0.113.9, 10.1.1.1, 127.0.0.1"),
            ],
        ),
        # a trusted proxy that says nothing: it is the client
        ("127.0.0.1", None, None, [("X-Real-IP", "127.0.0.1"), ("X-Forwarded-For", "127.0.0.1")]),
        ("::1", None, None, [("X-Real-IP", "::1"), ("X-Forwarded-For", "::1")]),
        # a dual-stack listener's view of an IPv4 client; still the trusted 127.0.0.1
        (
            "::ffff:127.0.0.1",
            "192.0.2.1",
            None,
            [("X-Real-IP", "192.0.2.1"), ("X-Forwarded-For", "192.0.2.1, 127.0.0.1")],
        ),
        (
            "::ffff:192.0.2.8",
            None,
            None,
            [("X-Real-IP", "192.0.2.8"), ("X-Forwarded-For", "192.0.2.8")],
        ),
    ],
)
def test_client_identity(
    peer: str, xff: str | None, real: str | None, expected: list[tuple[str, str]]
) -> None:
    assert client_identity(peer, xff, real, NETS) == expected


def test_client_identity_without_trusted_proxies() -> None:
    assert client_identity("127.0.0.1", "1.1.1.1", "1.1.1.1", ()) == [
        ("X-Real-IP", "127.0.0.1"),
        ("X-Forwarded-For", "127.0.0.1"),
    ]
