"""Admission rules (pure) and, on a running server, each refusal while a good session goes on."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from forward.config import ConfigError
from forward.guard import (
    Authority,
    Guard,
    GuardSettings,
    browser_authority,
    client_address,
    client_identity,
    ip_allowed,
    origin_refusal,
    parse_forwarded,
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


def here(host: str | None, secure: bool = False, **proxy: str) -> Authority | None:
    headers = {k.replace("_", "-"): v for k, v in proxy.items()}
    return browser_authority(host, secure, headers or None)


@pytest.mark.parametrize(
    ("origin", "authority", "allowed", "ok"),
    [
        (None, here("x:1"), (), True),  # not a browser
        ("http://x:1", here("x:1"), (), True),
        ("http://X:1", here("x:1"), (), True),  # host names are case-insensitive
        ("http://x.:1", here("x:1"), (), True),  # a trailing dot names the same host
        ("https://x", here("x:443", secure=True), (), True),  # default ports
        ("https://x:443", here("x", secure=True), (), True),
        ("https://x:8443", here("x:8443", secure=True), (), True),
        ("http://[::1]:8080", here("[::1]:8080"), (), True),
        # The canonical layout: the page from -p 8080, its socket on -w 8081.
        ("https://x:8080", here("x:8081", secure=True), (), True),
        ("https://x:9000", here("x:8081", secure=True), (), False),  # another server's page
        ("http://x:2", here("x:1"), (), False),
        ("http://evil.com", here("x:1"), (), False),
        ("http://evil.com:8080", here("x:8081"), (), False),  # -p's port, another host
        ("null", here("x:1"), (), False),
        ("file://", here("x:1"), (), False),
        ("chrome-extension://x", here("x:1"), (), False),
        ("http://x:1", None, (), False),  # no Host
        # A plain-http page may not drive an https session, not even on the same host.
        ("http://x", here("x", secure=True), (), False),
        ("http://x:80", here("x:443", secure=True), (), False),
        # Behind a TLS proxy forward itself is plain: an https page is the normal case.
        ("https://x", here("x"), (), True),
        ("https://x:8443", here("x"), (), False),  # a proxy that dropped the port
        ("http://evil.com", here("x:1"), ("*",), True),
        ("https://a.b.example.com", here("x"), ("*.example.com",), True),
        ("https://example.com.evil.net", here("x"), ("*.example.com",), False),
        ("https://app.example.com", here("x"), ("https://app.example.com",), True),
        ("http://app.example.com", here("x"), ("https://app.example.com",), False),
        # Rserve's RCloud example: nginx passes no Host, forward sees the upstream's name.
        ("https://r.example.com", here("rcloud_servers"), (), False),
        (
            "https://r.example.com:8443",
            here("rcloud_servers"),
            ("https://r.example.com:8443",),
            True,
        ),
        # A trusted proxy's word for the browser's host, in each standard header.
        ("https://r.example.com:8443", here("up", X_Forwarded_Host="r.example.com:8443"), (), True),
        (
            "https://r.example.com:8443",
            here("up", X_Forwarded_Host="r.example.com", X_Forwarded_Port="8443"),
            (),
            True,
        ),
        ("https://r.example.com", here("up", X_Forwarded_Host="r.example.com"), (), True),
        ("https://r.example.com:8443", here("up", Forwarded="host=r.example.com:8443"), (), True),
        (
            "https://r.example.com:8443",
            here("up", Forwarded='for=1.2.3.4, host="r.example.com:8443";proto=https;'),
            (),
            True,
        ),
        # The proxy's own element (the last) counts, not one the client put before it.
        ("https://evil.com", here("up", Forwarded="host=evil.com, host=r.example.com"), (), False),
        ("https://evil.com", here("up", X_Forwarded_Host="evil.com, r.example.com"), (), False),
        # Forwarded proto=https behind a plain listener: a plain-http page is a downgrade.
        ("http://r.example.com", here("up", Forwarded="host=r.example.com;proto=https"), (), False),
        (
            "http://r.example.com",
            here("up", X_Forwarded_Host="r.example.com", X_Forwarded_Proto="https"),
            (),
            False,
        ),
    ],
)
def test_origin_rules(
    origin: str | None, authority: Authority | None, allowed: tuple[str, ...], ok: bool
) -> None:
    why = origin_refusal(origin, authority, allowed, own_ports=(8080,))
    assert (why is None) is ok, why


def test_forwarded_headers_are_believed_only_from_a_trusted_proxy() -> None:
    headers = {"X-Forwarded-Host": "r.example.com", "Forwarded": "host=r.example.com"}
    untrusted = browser_authority("up:8081", False, None)
    assert untrusted == Authority("http", "up", 8081, "Host")
    trusted = browser_authority("up:8081", False, headers)
    assert trusted == Authority("http", "r.example.com", None, "Forwarded")


@pytest.mark.parametrize(
    ("value", "elements"),
    [
        ("host=a:1;proto=https", [{"host": "a:1", "proto": "https"}]),
        ('For="[2001:db8::1]:80";Host="a, b"', [{"for": "[2001:db8::1]:80", "host": "a, b"}]),
        ("for=1.2.3.4, host=b;;", [{"for": "1.2.3.4"}, {"host": "b"}]),
        ('host="a\\"b"', [{"host": 'a"b'}]),
        ("", []),
        ("garbage, ;=, =x", []),
    ],
)
def test_forwarded_header_parsing(value: str, elements: list[dict[str, str]]) -> None:
    assert parse_forwarded(value) == elements


@pytest.mark.parametrize(
    "origin",
    [
        "http://[::1",
        "http://\xff.example",
        "http://\udcff.example",
        "http://x:99999",
        "http://x:port",
        "http://a\r\nSet-Cookie: x",
        "x" * 5000,
    ],
)
def test_hostile_origins_are_refused_with_a_printable_reason(origin: str) -> None:
    for authority in (here("x:1"), here("[::1"), here("\xff"), None):
        why = origin_refusal(origin, authority)
        assert why is not None
        assert why.isascii() and why.isprintable() and len(why) < 1000, why


def test_the_refusal_says_what_to_change() -> None:
    why = origin_refusal("https://r.example.com", here("rcloud_servers"))
    assert why is not None
    assert "'rcloud_servers'" in why and "Host $http_host" in why
    assert "--allow-origin https://r.example.com" in why
    dropped = origin_refusal("https://r.example.com:8443", here("r.example.com"))
    assert dropped is not None and "drop the port" in dropped


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
    # What a proxy forwards is text from the client's side: printable and cut, for the log.
    assert client_address("10.0.0.2", "\udcff\n" + "x" * 100, trusted) == (
        "\\udcff\\x0a" + "x" * 51 + "..."
    )


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


async def test_proxy_headers_count_only_from_a_trusted_proxy(
    echo: FakeRserve, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    origin = "https://r.example.com:8443"
    said = {"X-Forwarded-Host": "r.example.com:8443", "X-Forwarded-Proto": "https"}
    rfc = {"Forwarded": 'for=192.0.2.1;host="r.example.com:8443";proto=https'}
    untrusted = await start_forward(echo.path, trusted_proxy=("none",))
    async with aiohttp.ClientSession() as s:
        for headers in (said, rfc):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(untrusted.url("ws"), origin=origin, headers=headers)
            assert info.value.status == 403
    assert echo.connections == 0
    assert f"origin {origin} is not this server's (Host '127.0.0.1:" in caplog.text
    trusted = await start_forward(echo.path, trusted_proxy=("127.0.0.1",))
    for headers in (said, rfc):
        async with await RClient.connect(trusted.url("ws"), origin=origin, headers=headers) as c:
            await c.send(Cmd.EVAL, b"ok", msg_id=1)
            assert (await c.response()).payload == b"ok"


def test_the_unix_listener_peer_is_a_trusted_proxy() -> None:
    guard = Guard(GuardSettings(trusted=(ipaddress.ip_network("10.0.0.0/8"),)))
    assert guard.trusts("") and guard.trusts("10.1.2.3") and guard.trusts("::ffff:10.1.2.3")
    assert not guard.trusts("192.0.2.1") and not guard.trusts(None)


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
    echo: FakeRserve, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forward.relay")
    fwd = await start_forward(echo.path, ws_ping=0.2)
    async with aiohttp.ClientSession() as s:
        # A client that never answers pings, like a peer whose network vanished.
        ws = await s.ws_connect(fwd.url("ws"), autoping=False)
        await asyncio.wait_for(echo.closed.wait(), 20)
        await ws.close()
    # Ended for the missing pong, not for anything else that could end it in that time.
    (line,) = [r.getMessage() for r in caplog.records if " closed: mode " in r.getMessage()]
    assert line.endswith("no answer to a ping within 0.1 s"), line
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
