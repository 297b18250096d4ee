"""Readiness for systemd (NOTIFY_SOCKET), the PID file, and the unix-socket listener."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from forward.daemon import PidFile, notify

from .conftest import Rserve, StartCli
from .rclient import RClient


def test_notify_without_socket_does_nothing() -> None:
    assert notify("READY=1", {}) is False


def test_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(4096) == b"READY=1"
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_pid_file_is_written_and_removed_only_if_ours(tmp_path: Path) -> None:
    path = tmp_path / "forward.pid"
    pf = PidFile(str(path))
    pf.write()
    assert path.read_text() == f"{os.getpid()}\n"
    pf.remove()
    assert not path.exists()
    pf.write()
    path.write_text("1\n")  # another instance took over the file
    pf.remove()
    assert path.read_text() == "1\n"


@pytest.mark.rserve
async def test_forward_with_unix_listener_pid_file_and_notify(
    rserve_qap: Rserve, tmp_path: Path, forward_cli: StartCli
) -> None:
    notify_path = tmp_path / "notify.sock"
    unix = tmp_path / "forward.sock"
    pid = tmp_path / "forward.pid"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify_path))
        ns.settimeout(20)
        fwd = await forward_cli(
            *["-p", "-1", "-w", "-1", "--listen-unix", str(unix)],
            *["-s", str(rserve_qap.socket), "--pid-file", str(pid)],
            ports=(),
            env={"NOTIFY_SOCKET": str(notify_path)},
        )
        ready = ns.recv(4096)
        assert ready == f"READY=1\nMAINPID={fwd.pid}".encode()
        assert pid.read_text() == f"{fwd.pid}\n"
        assert oct(unix.stat().st_mode & 0o777) == "0o660"
        conn = aiohttp.UnixConnector(path=str(unix))
        async with aiohttp.ClientSession(connector=conn) as s:
            ws = await s.ws_connect("http://forward/")
            client = RClient(ws, s)
            first = await ws.receive()
            client.greeting = first.data
            assert (await client.eval("6 * 7")).value == [42.0]
            await ws.close()
        fwd.send_signal(signal.SIGTERM)
        assert ns.recv(4096) == b"STOPPING=1"
        assert await fwd.wait() == 0
        assert not pid.exists() and not unix.exists()
