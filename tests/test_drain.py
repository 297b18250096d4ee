"""Graceful drain at SIGTERM: stop accepting, let sessions finish, then the shutdown notice."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from forward import qap, wsconn

from .conftest import Rserve, StartCli, StartForward, eventually
from .rclient import RClient

pytestmark = pytest.mark.rserve


async def test_drain_lets_open_sessions_finish_and_sends_new_ones_elsewhere(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(rserve_qap.socket, admin_port=3)
    c = await RClient.connect(fwd.url("http"))
    try:
        drain = asyncio.create_task(fwd.server.drain(60))
        await eventually(lambda: fwd.server.status.draining, what="the drain starts")
        async with aiohttp.ClientSession() as http:
            # New sessions get 503 before the upgrade (a proxy may try another instance), and
            # the health check says why, so that load balancers stop sending them here.
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(fwd.url("http"))
            assert refused.value.status == 503
            assert refused.value.headers is not None
            assert refused.value.headers["Retry-After"] == "5"
            async with http.get(f"http://127.0.0.1:{fwd.server.port('admin')}/healthz") as health:
                assert health.status == 503
                assert "draining" in await health.text()
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
