"""--workers 2: sessions are served by both workers, and a killed worker is replaced."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forward.config import Config
from forward.workers import Supervisor, supervise

from .conftest import Rserve, StartCli, eventually, run_forward, running
from .rclient import RClient

pytestmark = pytest.mark.rserve


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.update(int(k) for k in (task / "children").read_text().split())
    return out


def all_gone(pids: set[int]) -> bool:
    """No process left running (an exited one that nobody reaped yet is a zombie: gone)."""
    return not any(map(running, pids))


async def per_worker(admin: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/metrics") as r:
        text = await r.text()
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "forward_worker_sessions_total"
    }


async def sessions(port: int, n: int) -> None:
    async def one(i: int) -> None:
        async with await RClient.connect(f"ws://127.0.0.1:{port}/") as c:
            assert (await c.eval(f"{i} + 1")).value == [float(i + 1)]

    await asyncio.gather(*(one(i) for i in range(n)))


async def test_two_workers_share_the_port_and_survive_a_kill(
    rserve_qap: Rserve, tmp_path: Path, forward_cli: StartCli
) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify_path))
        ns.settimeout(30)
        fwd = await forward_cli(
            *["--workers", "2", "-s", str(rserve_qap.socket)],
            ports=("-p", "--admin-port"),
            ready="workers serving",
            env={"NOTIFY_SOCKET": str(notify_path)},
        )
        port, admin = fwd.ports["-p"], fwd.ports["--admin-port"]
        # The parent says READY only once both workers have said they serve.
        assert ns.recv(4096).startswith(b"READY=1")
        workers = children(fwd.pid)
        assert len(workers) == 2
        await sessions(port, 24)
        counts = await per_worker(admin)
        assert set(counts) == {"0", "1"}
        assert counts["0"] >= 1 and counts["1"] >= 1, counts
        assert sum(counts.values()) == 24

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        died = await fwd.expect(f"(pid {victim}) died with signal 9")
        row = re.search(r"worker (\d+) \(pid", died)
        assert row, died
        started = await fwd.expect(f"worker {row[1]} started (pid ")
        new = int(started.rsplit("(pid ", 1)[1].rstrip(")\n"))
        now = children(fwd.pid)
        assert now == workers - {victim} | {new}
        # The totals survive the dead worker; new sessions reach both workers again.
        await sessions(port, 24)
        after = await per_worker(admin)
        assert sum(after.values()) == 48
        assert after["0"] > counts["0"] and after["1"] > counts["1"], (counts, after)

        assert await fwd.stop() == 0
        assert all_gone(now)
        assert "Traceback" not in fwd.log()


async def test_workers_stop_when_the_parent_is_killed(
    rserve_qap: Rserve, forward_cli: StartCli
) -> None:
    fwd = await forward_cli("--workers", "2", "-s", str(rserve_qap.socket), ready="workers serving")
    workers = children(fwd.pid)
    assert len(workers) == 2
    assert await fwd.stop(signal.SIGKILL) == -signal.SIGKILL
    await eventually(lambda: all_gone(workers), within=30, what="workers outlived their parent")


def test_a_worker_that_cannot_start_stops_the_whole(tmp_path: Path) -> None:
    # The Rserve socket path is fine, but the unix listener's directory does not exist: the
    # parent cannot bind and says so once, before any worker starts.
    out = run_forward(
        *["--workers", "2", "-p", "-1", "-u", ""],
        *["--listen-unix", str(tmp_path / "no" / "such" / "dir.sock")],
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("forward: cannot listen on ")


def test_a_worker_that_dies_before_it_is_ready_stops_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What a worker fails on is its own business (a TLS file, a setting): a stand-in that exits
    # at once with status 3 tells the parent no more than a real one would.
    monkeypatch.setattr(Supervisor, "_child", lambda self, row: 3)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    pid, unix = tmp_path / "forward.pid", tmp_path / "forward.sock"
    config = Config(http_port=-1, listen_unix=str(unix), workers=2, ulog="", pid_file=str(pid))
    assert supervise(config.validate()) == 1
    assert "exited with status 3 before serving; stopping" in caplog.text
    assert "workers serving" not in caplog.text
    assert not pid.exists() and not unix.exists()
