"""Soak: thousands of sessions in waves, random sizes and fragmentation, every byte checked;
file descriptors and memory come back to where they started. Bounded in count, not in time."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import random
import resource
from pathlib import Path

import aiohttp
import pytest

from forward.qap import Cmd, Header
from forward.relay import Session

from .conftest import StartForward
from .fakes import FakeRserve

pytestmark = pytest.mark.slow  # 1500 sessions in waves: over ten seconds

SESSIONS = 1500
WAVE = 150


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def one_session(url: str, http: aiohttp.ClientSession, rng: random.Random) -> int:
    async with http.ws_connect(url, max_msg_size=0) as ws:
        greeting = await ws.receive()
        assert greeting.type is aiohttp.WSMsgType.TEXT
        sizes = [rng.choice((0, 1, 15, 16, 100, 4000, rng.randrange(200_000))) for _ in range(3)]
        messages = [Header(Cmd.EVAL, n, i).encode() + rng.randbytes(n) for i, n in enumerate(sizes)]
        data = b"".join(messages)
        pos = 0
        while pos < len(data):  # random fragmentation across WebSocket messages
            step = rng.choice((1, 7, 16, 1000, len(data)))
            await ws.send_bytes(data[pos : pos + step])
            pos += step
        for m in messages:
            reply = await ws.receive()
            assert reply.type is aiohttp.WSMsgType.BINARY
            head = Header.parse(reply.data[:16])
            assert head.msg_id == Header.parse(m[:16]).msg_id
            assert hashlib.sha256(reply.data[16:]).digest() == hashlib.sha256(m[16:]).digest()
        return len(data)


async def test_soak_waves_of_sessions(tmp_path: Path, start_forward: StartForward) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    fake = await FakeRserve(tmp_path / "echo.sock", record=False).start()
    fwd = await start_forward(fake.path)
    rng = random.Random(20261123)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True)
        ) as http:
            await one_session(fwd.url("ws"), http, rng)
            gc.collect()
            fds = open_fds()
            total, rss_after = 0, []
            for wave in range(SESSIONS // WAVE):
                listener = "http" if wave % 2 else "ws"
                sent = await asyncio.gather(
                    *(one_session(fwd.url(listener), http, rng) for _ in range(WAVE))
                )
                total += sum(sent)
                gc.collect()
                rss_after.append(rss_kib())
        # Every backend connection was closed, every session forgotten.
        async with asyncio.timeout(5):
            await fwd.server.sessions.emptied()
        assert fake.connections == SESSIONS + 1
        gc.collect()
        assert open_fds() <= fds
        assert not [o for o in gc.get_objects() if isinstance(o, Session)]
        # The first waves set the allocator's high-water mark (150 sessions with messages of up to
        # 200 KB in flight); after that a leak would keep growing wave after wave.
        grown = rss_after[-1] - rss_after[2]
        assert grown < 16 * 1024, f"RSS grew by {grown} KiB from wave 3 to the last: {rss_after}"
        assert total > 0
    finally:
        await fake.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
