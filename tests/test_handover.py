"""A hand-over between two forward processes (forward/succession.py, docs/operations.md), with a
real Rserve: resumable sessions carry on in the new process with the same R, every byte exactly
once; sessions that did not ask for resume get the shutdown notice; no connection is refused
while it happens; a new process that cannot take over leaves the running one serving."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from forward import qap

from .conftest import Rserve, StartCli, eventually, free_port
from .rclient import RClient
from .resume_client import ResumeClient

pytestmark = pytest.mark.rserve


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., ResumeClient]]:
    made: list[ResumeClient] = []

    def make(url: str, **kw: object) -> ResumeClient:
        client = ResumeClient(url, **kw)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await client.close()


def big(i: int) -> str:
    """An R expression whose answer is long and particular to `i`, and its text."""
    return f"paste(rep('{i:04d}-abcdefghij', 5000), collapse='')"


def big_text(i: int) -> str:
    return f"{i:04d}-abcdefghij" * 5000


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def plain_session_works(url: str) -> None:
    async with await RClient.connect(url) as c:
        assert (await c.eval("1 + 1")).value == [2.0]


async def test_fifty_resumable_sessions_survive_a_hand_over(
    rserve_qap: Rserve,
    forward_cli: StartCli,
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
) -> None:
    port = free_port()
    handover = str(tmp_path / "handover.sock")
    args = ("-s", rserve_qap.socket, "-p", str(port), "--handover-socket", handover)
    old = await forward_cli(*args, ports=(), ready="listening on")
    url = f"ws://127.0.0.1:{port}/"

    resumable: list[ResumeClient] = []
    for i in range(50):
        c = clients(url)
        await c.connect()
        await c.eval(f"x <- {i}", 1)
        await c.eval("Sys.getpid()", 2)
        resumable.append(c)
    pids = []
    for c in resumable:
        await c.wait_messages(2)
        pids.append(c.values()[1])
    assert len(set(map(tuple, pids))) == 50  # 50 R processes
    # Half are in the middle of an evaluation when the hand-over happens.
    for i, c in enumerate(resumable[:25]):
        await c.eval(f"Sys.sleep(2); {big(i)}", 3)
    plain = [await RClient.connect(url) for _ in range(3)]
    for p in plain:
        assert (await p.eval("y <- 7")).value == [7.0]

    # New connections keep coming while it happens: every one is served.
    served = 0
    stop_probing = asyncio.Event()

    async def probe() -> None:
        nonlocal served
        while not stop_probing.is_set():
            await plain_session_works(url)
            served += 1

    prober = asyncio.create_task(probe())
    new = await forward_cli(*args, "--takeover", ports=(), ready="took over from process")
    assert await old.wait(within=30) == 0
    await old.expect("50 resumable session(s) handed over")
    stop_probing.set()
    await prober
    assert served > 0

    # The plain sessions got the shutdown notice, then 1001.
    for p in plain:
        msg = await p.ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY
        assert qap.Header.parse(msg.data[:16]).cmd & 0xFFFFF000 == qap.Cmd.OOB_SEND & 0xFFFFF000
        closing = await p.ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await p.close()

    for i, c in enumerate(resumable):
        n = 3 if i < 25 else 2
        await c.wait_messages(n)
        await c.eval("x", n + 1)
        await c.eval("Sys.getpid()", n + 2)
        values = c.values()
        await c.wait_messages(n + 2)
        values = c.values()
        assert values[-2] == [float(i)], i  # the workspace
        assert values[-1] == pids[i] == values[1], i  # the same R process
        if i < 25:
            (text,) = values[2]
            assert sha(text) == sha(big_text(i)), i  # the answer, exactly once
        assert len(c.messages) == n + 2, i
        assert c.resumes == 1, i
    assert await plain_session_works_count(url) == 1
    await new.stop()


async def plain_session_works_count(url: str) -> int:
    await plain_session_works(url)
    return 1
