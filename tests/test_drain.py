"""Graceful drain at SIGTERM: stop accepting, let sessions finish, then the shutdown notice."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from forward import qap, wsconn

from .conftest import Rserve, StartCli, StartForward
from .rclient import RClient

pytestmark = pytest.mark.rserve


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:  # it reached the backlog as the socket closed: try again
        return False
    writer.close()
    return False


async def test_drain_lets_open_sessions_finish(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(rserve_qap.socket)
    port = fwd.server.port("http")
    c = await RClient.connect(fwd.url("http"))
    try:
        drain = asyncio.create_task(fwd.server.drain(60))
        async with asyncio.timeout(10):
            while not await refused(port):  # the listener closes first
                continue
        assert not drain.done()
        assert (await c.eval("2 + 2")).value == [4.0]  # the open session still works
    finally:
        await c.close()
    async with asyncio.timeout(10):  # ...and its end ends the drain, long before 60 s
        await drain


async def test_sessions_left_after_the_drain_get_the_shutdown_notice(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url("ws")) as c:
        assert (await c.eval("1")).value == [1.0]
        await fwd.server.drain(0.05)
        stopping = asyncio.create_task(fwd.server.stop())
        notice = await c.ws.receive()
        assert notice.type is aiohttp.WSMsgType.BINARY and notice.data == qap.SHUTDOWN_NOTICE
        closing = await c.ws.receive()  # aiohttp answers the close (autoclose)
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        # The answer ends the session: stop() returns then, not after the close timeout.
        async with asyncio.timeout(wsconn.CLOSE_TIMEOUT / 2):
            await stopping
        assert not fwd.server.sessions


async def test_sigterm_drains_then_exits_zero(rserve_qap: Rserve, forward_cli: StartCli) -> None:
    fwd = await forward_cli("-s", str(rserve_qap.socket), "--drain-timeout", "60")
    async with await RClient.connect(fwd.url()) as c:
        fwd.send_signal(signal.SIGTERM)
        await fwd.expect("draining")
        assert (await c.eval("3 * 3")).value == [9.0]
    assert await fwd.wait() == 0
    assert "drained: every session has ended" in fwd.log() and "Traceback" not in fwd.log()
