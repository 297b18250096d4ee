"""The service lifecycle: PID file, -S ADD/DEL and the unix socket file, written once for a single
forward and the --workers parent."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from forward import srvmgr
from forward.config import Config, ConfigError
from forward.service import Lifecycle

from .conftest import run_forward


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unwritable_pid_file_is_one_line(tmp_path: Path, workers: str) -> None:
    out = run_forward(
        "--workers",
        workers,
        "-p",
        "-1",
        "-u",
        "",
        "--listen-unix",
        str(tmp_path / "forward.sock"),
        "--pid-file",
        "/nonexistent/x.pid",
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == "forward: cannot write --pid-file /nonexistent/x.pid: No such file or directory"
    assert not (tmp_path / "forward.sock").exists()


async def test_lifecycle_writes_and_removes_the_pid_and_socket_files(tmp_path: Path) -> None:
    pid, unix = tmp_path / "forward.pid", tmp_path / "forward.sock"
    config = Config(pid_file=str(pid), listen_unix=str(unix))
    async with Lifecycle(config):
        assert pid.exists()
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(unix))
    assert not pid.exists() and not unix.exists()


async def test_lifecycle_refuses_an_unwritable_pid_file(tmp_path: Path) -> None:
    config = Config(pid_file=str(tmp_path / "no" / "x.pid"))
    with pytest.raises(ConfigError, match="cannot write --pid-file"):
        async with Lifecycle(config):
            pass


async def test_del_is_sent_once_and_only_after_add(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []

    async def send(host: str, port: int, what: str, limit: float = 0.2) -> None:
        sent.append(what)

    monkeypatch.setattr(srvmgr, "send", send)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    config = Config(server_manager="127.0.0.1:4040")
    async with Lifecycle(config):
        pass  # never ready: nothing to take back
    assert sent == []
    async with Lifecycle(config) as lifecycle:
        lifecycle.ready()
        await asyncio.sleep(0)  # ADD goes out in the background
        await lifecycle.stopping()
    assert sent == ["ADD", "DEL"]
