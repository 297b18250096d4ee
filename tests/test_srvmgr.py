"""-S: ADD once listening, DEL at shutdown, retried while the manager is away, never fatal."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest

from forward import srvmgr
from forward.srvmgr import ServerManager, parse

from .conftest import Rserve, StartCli, free_port


class Manager:
    """A TCP server manager: records what each connection sent."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.got.put(await reader.read())
        writer.close()

    async def next(self) -> bytes:
        async with asyncio.timeout(20):
            return await self.got.get()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_parse() -> None:
    assert parse("mgr") == ("mgr", 40)
    assert parse("mgr:4000") == ("mgr", 4000)
    assert parse("[::1]:41") == ("::1", 41)
    for bad in ("", ":40", "h:0", "h:x"):
        with pytest.raises(srvmgr.ServerManagerError):
            parse(bad)


async def test_add_is_retried_until_the_manager_comes_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(srvmgr, "RETRY_MIN", 0.01)
    failed = asyncio.Event()
    real_send = srvmgr.send

    async def counting_send(host: str, port: int, what: str) -> None:
        try:
            await real_send(host, port, what)
        except OSError:
            failed.set()
            raise

    monkeypatch.setattr(srvmgr, "send", counting_send)
    port = free_port()
    mgr = Manager()
    sm = ServerManager("127.0.0.1", port)
    sm.start_add()
    # Nobody listens yet: the first attempts fail, forward goes on; then the manager appears.
    async with asyncio.timeout(10):
        await failed.wait()
    assert not sm.added
    await mgr.start(port)
    try:
        assert await mgr.next() == b"ADD"
        assert sm.added
        await sm.delete()
        assert await mgr.next() == b"DEL"
    finally:
        await mgr.stop()


async def test_del_to_an_absent_manager_gives_up_quickly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(srvmgr, "DEL_BUDGET", 0.3)
    sm = ServerManager("127.0.0.1", free_port())
    async with asyncio.timeout(5):
        await sm.delete()
    assert "cannot send DEL" in caplog.text


@pytest.mark.rserve
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_forward_sends_add_then_del(
    rserve_qap: Rserve, forward_cli: StartCli, sig: signal.Signals
) -> None:
    mgr = Manager()
    mport = await mgr.start()
    try:
        # Not waiting for the log: ADD is what says the listener is up here.
        fwd = await forward_cli("-s", str(rserve_qap.socket), "-S", f"127.0.0.1:{mport}", ready=0)
        assert await mgr.next() == b"ADD"
        # ADD means the listener is up: it accepts at once.
        with socket.create_connection(("127.0.0.1", fwd.ports["-p"]), timeout=5):
            pass
        fwd.send_signal(sig)
        assert await mgr.next() == b"DEL"
        assert await fwd.wait() == 0
    finally:
        await mgr.stop()


@pytest.mark.rserve
async def test_unreachable_manager_is_not_fatal(rserve_qap: Rserve, forward_cli: StartCli) -> None:
    fwd = await forward_cli("-s", str(rserve_qap.socket), "-S", f"127.0.0.1:{free_port()}")
    await fwd.expect("cannot send ADD")
    assert await fwd.stop() == 0
    assert "cannot send DEL" in fwd.log() and "Traceback" not in fwd.log()
