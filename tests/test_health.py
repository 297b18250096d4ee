"""The admin listener: /healthz follows Rserve, /metrics follows real traffic; the access log."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from forward import health
from forward.app import Server
from forward.config import Config
from forward.stats import Stat, Stats

from .conftest import Rserve, StartForward, bound
from .rclient import RClient

pytestmark = pytest.mark.rserve


class Fwd:
    def __init__(self, server: Server) -> None:
        self.server = server

    def url(self, listener: str, path: str = "/") -> str:
        scheme = "ws" if listener == "ws" else "http"
        return f"{scheme}://127.0.0.1:{self.server.port(listener)}{path}"


@pytest.fixture
async def with_admin() -> AsyncIterator[Callable[..., asyncio.Future[Fwd]]]:
    servers: list[Server] = []

    async def start(socket_path: Path, **kw: object) -> Fwd:
        config = replace(
            Config(), socket=str(socket_path), http_port=1, ws_port=2, admin_port=3, **kw
        ).validate()
        server = Server(config, stats=Stats())
        await server.start({"http": [bound()], "ws": [bound()], "admin": [bound()]})
        servers.append(server)
        return Fwd(server)

    yield start  # type: ignore[misc]
    for s in servers:
        await s.stop()


async def get(url: str, **kw: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.text()


async def metrics(fwd: Fwd) -> dict[str, float]:
    status, text = await get(fwd.url("admin", "/metrics"))
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def test_healthz_flips_to_503_when_rserve_stops(
    fresh_rserve: Callable[..., Rserve], with_admin: Callable[..., asyncio.Future[Fwd]]
) -> None:
    r = fresh_rserve()
    fwd = await with_admin(r.socket)
    assert await get(fwd.url("admin", "/healthz")) == (200, "ok\n")
    assert (await get(fwd.url("admin", "/readyz")))[0] == 200
    r.stop()
    status, text = await get(fwd.url("admin", "/healthz"))
    assert status == 503
    assert f"cannot connect to {r.socket}" in text
    assert await get(fwd.url("admin", "/livez")) == (200, "ok\n")  # the process itself is fine
    r.start()
    assert (await get(fwd.url("admin", "/healthz")))[0] == 200


async def test_admin_paths_are_not_on_the_public_port(
    rserve_qap: Rserve, with_admin: Callable[..., asyncio.Future[Fwd]]
) -> None:
    fwd = await with_admin(rserve_qap.socket)
    for path in ("/metrics", "/healthz"):
        status, text = await get(fwd.url("http", path))
        assert status == 404 and "forward_" not in text


async def test_metrics_move_with_real_traffic(
    fresh_rserve: Callable[..., Rserve], with_admin: Callable[..., asyncio.Future[Fwd]]
) -> None:
    r = fresh_rserve()
    fwd = await with_admin(r.socket)
    before = await metrics(fwd)
    assert before["forward_sessions_total"] == 0
    assert before["forward_sessions_open"] == 0
    async with await RClient.connect(fwd.url("ws")) as c:
        assert (await c.eval("paste(rep('x', 1000), collapse='')")).value == ["x" * 1000]
        during = await metrics(fwd)
        assert during["forward_sessions_open"] == 1
    await get(fwd.url("http", "/nothing-here"))
    # The session ends in its own task after the close handshake: wait for the gauge to drop.
    async with asyncio.timeout(10):
        while (after := await metrics(fwd))["forward_sessions_open"] != 0:
            continue  # each scrape is a round trip through the event loop
    assert after["forward_sessions_total"] == 1
    assert after["forward_worker_sessions_total{worker=0}"] == 1
    assert after["forward_relay_messages_total{direction=to_r}"] == 1
    assert after["forward_relay_messages_total{direction=from_r}"] == 1
    # Request header + command; answer header + the 1000-character string (+ greeting 32).
    assert after["forward_relay_bytes_total{direction=to_r}"] > 16
    assert after["forward_relay_bytes_total{direction=from_r}"] > 1000 + 32
    assert after["forward_http_requests_total{status=101}"] == 1
    assert after["forward_http_requests_total{status=404}"] == 1
    assert after["forward_backend_connect_failures_total"] == 0

    r.stop()
    async with aiohttp.ClientSession() as s, s.ws_connect(fwd.url("ws")) as ws:
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1011
    final = await metrics(fwd)
    assert final["forward_backend_connect_failures_total"] == 1
    assert final["forward_sessions_total"] == 1


async def test_access_log_line_and_trusted_proxy(
    rserve_qap: Rserve,
    with_admin: Callable[..., asyncio.Future[Fwd]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fwd = await with_admin(rserve_qap.socket, trusted_proxy=("127.0.0.1",))
    caplog.set_level(logging.INFO, logger="forward.access")
    await get(fwd.url("http", "/a?b=1"), headers={"X-Forwarded-For": "203.0.113.9"})
    untrusted = await with_admin(rserve_qap.socket, trusted_proxy=("none",))
    await get(untrusted.url("http", "/c"), headers={"X-Forwarded-For": "203.0.113.9"})
    await get(untrusted.url("admin", "/livez"))  # probes stay out of the access log
    await get(fwd.url("http", "/d"), headers={"X-Real-IP": "198.51.100.7"})
    lines = [r.getMessage() for r in caplog.records if r.name == "forward.access"]
    assert len(lines) == 3
    assert lines[0].startswith('203.0.113.9 "GET /a?b=1 HTTP/1.1" 404 ')
    assert lines[1].startswith('127.0.0.1 "GET /c HTTP/1.1" 404 ')
    assert lines[2].startswith('198.51.100.7 "GET /d HTTP/1.1" 404 ')


async def test_tls_handshake_failures_are_counted(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    fwd = await start_forward(rserve_qap.socket, ssl_context=server_ctx)
    stats = fwd.server.stats
    good = ssl.create_default_context()
    ca.configure_trust(good)
    async with await RClient.connect(fwd.url("http"), ssl_context=good) as c:
        assert (await c.eval("1")).value == [1.0]
    assert stats.total(Stat.TLS_HANDSHAKE_FAILURES) == 0
    # Plain HTTP to the TLS port: the server's handshake fails and it closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.server.port("http"))
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await reader.read() == b""
    writer.close()
    assert stats.total(Stat.TLS_HANDSHAKE_FAILURES) == 1
    # A client that offers only TLS 1.2: the server refuses the version.
    old = ssl.create_default_context()
    ca.configure_trust(old)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(aiohttp.ClientConnectorError):
        await RClient.connect(fwd.url("http"), ssl_context=old)
    assert stats.total(Stat.TLS_HANDSHAKE_FAILURES) == 2


@pytest.mark.parametrize(
    ("first", "problem"),
    [
        (b"Rsrv0103QAP1\r\n\r\n--------------\r\n", None),
        (b"RsOC" + bytes(12), None),
        (b"RSpx0100QAP1\r\n\r\n", "RSpx proxy protocol"),
        (b"HTTP/1.1 200 OK\r\n", "not an Rserve greeting"),
    ],
)
async def test_probe_classifies_the_greeting_as_a_session_would(
    tmp_path: Path, first: bytes, problem: str | None
) -> None:
    path = tmp_path / "fake.sock"

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(greet, str(path))
    async with server:
        answer = await health.probe(str(path))
    if problem is None:
        assert answer is None
    else:
        assert answer is not None and problem in answer
