"""The aiohttp internals forward relies on are still there: a failure names the attribute, so an
aiohttp upgrade that moves one is caught here, not at the first WebSocket session."""

from __future__ import annotations

import importlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from forward import aiohttp_private
from forward.aiohttp_private import RELIES_ON


def _resolve(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError:
        module, _, name = where.rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            pytest.fail(f"aiohttp {aiohttp.__version__} has no {where} (see aiohttp_private.py)")


@pytest.mark.parametrize(("where", "attribute"), RELIES_ON, ids=[".".join(r) for r in RELIES_ON])
def test_aiohttp_still_has(where: str, attribute: str) -> None:
    owner = _resolve(where)
    assert hasattr(owner, attribute), (
        f"aiohttp {aiohttp.__version__} has no {where}.{attribute}: forward relies on it "
        "(forward/aiohttp_private.py)"
    )


async def test_a_fresh_connection_handler_has_the_state_detach_reads() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler)
    try:
        connection = server()
        assert isinstance(connection._message_tail, bytes), "RequestHandler._message_tail"
        assert connection._manager is server, "RequestHandler._manager"
        assert aiohttp_private.requests_started(connection) == 0, "RequestHandler._request_count"
    finally:
        await server.shutdown()


async def test_a_connection_handler_reports_the_peer_it_is_given() -> None:
    """set_peer (a PROXY header's source, proxysite.py): what the handler reports as its peer,
    and so what aiohttp gives every request on it as `remote` (test_proxysite.py sees that on
    real connections)."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler)
    try:
        connection = server()
        aiohttp_private.set_peer(connection, ("192.0.2.7", 40001))
        assert aiohttp_private.peer_of(connection) == ("192.0.2.7", 40001), "_cache, peername"
    finally:
        await server.shutdown()


async def test_wrapping_runner_wraps_the_protocol_factory() -> None:
    seen: list[web.Server] = []

    class Runner(aiohttp_private.WrappingRunner):
        def wrap_server(self, server: web.Server) -> web.Server:
            seen.append(server)
            return server

    runner = Runner(web.Application())
    await runner.setup()
    try:
        assert seen and runner.server is seen[0], "AppRunner._make_server is no longer called"
    finally:
        await runner.cleanup()


def test_the_compiled_mask_agrees_with_ours() -> None:
    from forward.wsframe import _mask_python

    mask = aiohttp_private.websocket_mask()
    assert mask is not None, "aiohttp._websocket.helpers.websocket_mask"
    data, expected = bytearray(b"hello, forward!"), bytearray(b"hello, forward!")
    mask(b"\x01\x02\x03\x04", data)
    _mask_python(b"\x01\x02\x03\x04", expected)
    assert data == expected


async def test_a_connection_handler_takes_the_plain_parse_error_answer() -> None:
    from aiohttp.http_exceptions import BadHttpMessage
    from aiohttp.test_utils import make_mocked_request

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler)
    try:
        connection = aiohttp_private.PlainParseErrors(server)()
        assert type(connection).__name__ == "_PlainParseErrors", "RequestHandler's layout changed"
        seen: list[BaseException] = []
        connection.logger = type(
            "L", (), {"exception": lambda *a, exc_info: seen.append(exc_info)}
        )()
        bad = BadHttpMessage("Invalid header token:\n\n  b'X-A : 1'")
        answer = connection.handle_error(make_mocked_request("GET", "/"), 400, bad, bad.message)
        assert isinstance(answer, web.Response) and answer.status == 400
        assert answer.text == "400 Bad Request\n" and answer.headers["Server"] == "forward"
        assert seen == [bad]  # RequestHandler.logger is what reports it
    finally:
        await server.shutdown()
