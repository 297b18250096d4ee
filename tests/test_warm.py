"""The --warm pool (forward/warm.py): its pure parts with byte literals, then with a real Rserve:
a pooled session gets an R of its own (its pid, an empty workspace, held by nobody before), an R
killed while pooled is never handed out, Rserve restarted under a full pool, the pool never
holds more than N, SIGTERM ends the pooled R processes, /metrics shows the pool."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from forward import qap
from forward.app import Server, session_capacity
from forward.config import Config, ConfigError
from forward.qap import Cmd, Header
from forward.stats import Stat, Stats
from forward.warm import Backoff, GreetingReader, WarmPool, wanted

from .conftest import ForwardProcess, Rserve, StartCli, StartForward, eventually, running
from .fakes import ID_STRING, FakeRserve
from .rclient import RClient
from .resume_client import ResumeClient

QAP_ID = ID_STRING
OCAP_GREETING = Header(Cmd.OC_INIT, 8, 0).encode() + b"\x0a\x04\x00\x00\x00\x00\x00\x00"

SLOW_INIT = """
library(Rserve)
oc.init <- function() { Sys.sleep(0.3); ocap(function() Sys.getpid()) }
"""


# -- the pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize("greeting", [QAP_ID, OCAP_GREETING])
def test_a_greeting_split_anywhere_is_complete_only_at_its_last_byte(greeting: bytes) -> None:
    for cut in range(1, len(greeting)):
        reader = GreetingReader()
        assert not reader.feed(greeting[:cut])
        assert reader.feed(greeting[cut:])
        assert bytes(reader.data) == greeting
    for i in range(len(greeting)):
        reader = GreetingReader()
        done = [reader.feed(greeting[j : j + 1]) for j in range(i + 1)]
        assert done == [False] * i + [i == len(greeting) - 1]


def test_bytes_that_are_not_a_greeting_are_refused() -> None:
    with pytest.raises(qap.GreetingError):
        GreetingReader().feed(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(qap.MessageTooLarge):
        GreetingReader(max_size=4).feed(OCAP_GREETING)


def test_backoff_doubles_to_its_cap_and_starts_over_after_a_success() -> None:
    b = Backoff(0.1, 1.0)
    assert [b.failed() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    b.succeeded()
    assert b.failed() == 0.1


def test_the_pool_opens_only_what_brings_it_to_its_size() -> None:
    assert wanted(4, 0, 0) == 4
    assert wanted(4, 1, 2) == 1
    assert wanted(4, 3, 1) == 0
    assert wanted(4, 5, 0) == 0


def test_warm_connections_take_room_from_max_sessions() -> None:
    assert session_capacity(10, 4) == 8
    assert session_capacity(10, 3) == 8
    assert session_capacity(10, 0) == 10


def test_the_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="--warm"):
        replace(Config(), warm=-1).validate()
    assert Config().warm == 0  # off by default


# -- misbehaving backends (a real Rserve does neither on demand) -----------------------------


async def test_a_pooled_connection_whose_r_speaks_unasked_is_dropped(tmp_path: Path) -> None:
    spoke = asyncio.Event()

    async def greet_then_speak(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fake: FakeRserve
    ) -> None:
        writer.write(ID_STRING)
        await writer.drain()
        if fake.connections == 1:  # only the first: the pool must then drop it and refill
            await spoke.wait()
            writer.write(Header(Cmd.OOB_SEND, 0, 0).encode())
            await writer.drain()
        await reader.read()

    fake = await FakeRserve(tmp_path / "r.sock", greet_then_speak).start()
    stats = Stats()
    pool = WarmPool(str(fake.path), 1, 5.0, stats.slot(0))
    pool.start()
    try:
        await eventually(lambda: pool.held == 1, what="one pooled connection")
        spoke.set()
        await eventually(lambda: stats.total(Stat.WARM_DISCARDED) == 1, what="dropped")
        await eventually(lambda: pool.held == 1 and fake.connections == 2, what="replaced")
        warm = pool.take()
        assert warm is not None and warm.greeting == ID_STRING
        warm.sock.close()
    finally:
        await pool.close()
        await fake.stop()


async def test_a_backend_that_never_greets_is_retried_with_backoff(tmp_path: Path) -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fake: FakeRserve
    ) -> None:
        await reader.read()

    fake = await FakeRserve(tmp_path / "r.sock", silent).start()
    stats = Stats()
    pool = WarmPool(str(fake.path), 2, 0.05, stats.slot(0))
    pool.start()
    try:
        await eventually(lambda: stats.total(Stat.WARM_FAILURES) >= 4, what="failures")
        assert pool.held == 0 and pool.opening <= 2
        assert pool.take() is None  # a miss: the session connects by itself
        assert stats.total(Stat.WARM_MISSES) == 1
    finally:
        await pool.close()
        await fake.stop()
    assert pool.opening == 0


async def test_an_r_that_quits_after_greeting_is_replaced_with_backoff(tmp_path: Path) -> None:
    async def greet_and_quit(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fake: FakeRserve
    ) -> None:
        writer.write(ID_STRING)
        await writer.drain()

    fake = await FakeRserve(tmp_path / "r.sock", greet_and_quit).start()
    stats = Stats()
    pool = WarmPool(str(fake.path), 1, 5.0, stats.slot(0))
    pool.start()
    try:
        await eventually(lambda: stats.total(Stat.WARM_DISCARDED) >= 3, what="three dropped")
        # No tight loop of forks: each loss waited longer than the one before, since no
        # connection ever served a session.
        assert pool.next_delay() >= 0.1 * 2**3
    finally:
        await pool.close()
        await fake.stop()


# -- with a real Rserve ----------------------------------------------------------------------


def pool_of(server: Server) -> WarmPool:
    assert server.warm is not None
    return server.warm


async def full(pool: WarmPool, within: float = 10) -> None:
    await eventually(
        lambda: pool.held == pool.size, within=within, what=f"{pool.size} pooled R sessions"
    )


async def until(check: Callable[[], Awaitable[bool]], within: float = 10, what: str = "") -> None:
    """`eventually` for a condition that must be awaited (an HTTP answer)."""
    deadline = asyncio.get_running_loop().time() + within
    delay = 0.005
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within} s: {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def gone(pid: int) -> bool:
    return not running(pid)


async def pid_of(client: RClient) -> int:
    return int((await client.eval("Sys.getpid()")).value[0])


@pytest.mark.rserve
async def test_each_session_gets_an_r_of_its_own_from_the_pool(
    fresh_rserve: Callable[..., Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()
    fwd = await start_forward(r.socket, warm=2)
    pool = pool_of(fwd.server)
    await full(pool)
    # Besides the pooled two, the R forked for the fixture's readiness check may still be exiting.
    await eventually(lambda: len(r.children()) == 2, what="only the two pooled R processes")
    seen: set[int] = set()
    for i in range(5):
        waiting = set(r.children())
        async with await RClient.connect(fwd.url("http")) as c:
            assert isinstance(c.greeting, str) and c.greeting.startswith("Rsrv0103QAP1")
            pid = await pid_of(c)
            assert pid in waiting, "the session's R was waiting in the pool"
            assert pid not in seen, "an R is handed out once"
            seen.add(pid)
            assert (await c.eval("ls()")).value == []  # a fresh workspace
            await c.eval(f"x{i} <- {i}")
        await full(pool)
        assert pool.held + pool.opening <= 2
    stats = fwd.server.stats
    assert stats.total(Stat.WARM_HANDED) == 5
    assert stats.total(Stat.WARM_MISSES) == 0
    await eventually(lambda: pid not in r.children(), what="the last session's R ended")


@pytest.mark.rserve
async def test_ocap_with_a_slow_oc_init_greets_from_the_pool(
    fresh_rserve: Callable[..., Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve(ocap=True, source=SLOW_INIT)
    fwd = await start_forward(r.socket, warm=2)
    pool = pool_of(fwd.server)
    await full(pool)
    waiting = set(r.children())
    async with await RClient.connect(fwd.url("http")) as c:
        pid = (await c.call(c.capability)).value[0]
        assert pid in waiting
    assert fwd.server.stats.total(Stat.WARM_HANDED) == 1


@pytest.mark.rserve
async def test_an_r_killed_while_pooled_is_never_handed_out(
    fresh_rserve: Callable[..., Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()
    fwd = await start_forward(r.socket, warm=3)
    pool = pool_of(fwd.server)
    await full(pool)
    killed = set(r.children())
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # As soon as they are dead (their sockets closed), whether or not the pool has noticed yet:
    # the take checks too.
    await eventually(lambda: all(gone(pid) for pid in killed), what="the killed R processes")
    for _ in range(3):
        async with await RClient.connect(fwd.url("http")) as c:
            assert await pid_of(c) not in killed
    await full(pool)
    assert not killed & set(r.children())
    assert fwd.server.stats.total(Stat.WARM_DISCARDED) >= 1


@pytest.mark.rserve
async def test_rserve_restarted_under_a_full_pool(
    fresh_rserve: Callable[..., Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()
    fwd = await start_forward(r.socket, warm=2)
    pool = pool_of(fwd.server)
    await full(pool)
    r.stop()  # its process group, pooled R processes included
    await eventually(lambda: pool.held == 0, what="the dead connections dropped")
    stats = fwd.server.stats
    await eventually(lambda: stats.total(Stat.WARM_FAILURES) >= 1, what="a failed refill")
    # Meanwhile a session is refused as without a pool, with its reason.
    c = None
    with pytest.raises(ConnectionError):
        c = await RClient.connect(fwd.url("http"))
    assert c is None
    r.start()
    await full(pool, within=30)  # the backoff grew while Rserve was away (up to 5 s)
    waiting = set(r.children())
    async with await RClient.connect(fwd.url("http")) as c:
        assert await pid_of(c) in waiting


@pytest.mark.rserve
async def test_the_pool_never_holds_more_than_n(
    fresh_rserve: Callable[..., Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()
    fwd = await start_forward(r.socket, warm=3)
    pool = pool_of(fwd.server)
    sizes: list[int] = []
    loop = asyncio.get_running_loop()

    def sample() -> None:
        sizes.append(pool.held + pool.opening)
        handle[0] = loop.call_later(0.001, sample)

    handle = [loop.call_later(0, sample)]
    try:
        await full(pool)

        async def one() -> int:
            async with await RClient.connect(fwd.url("http")) as c:
                return await pid_of(c)

        pids = await asyncio.gather(*(one() for _ in range(10)))
        assert len(set(pids)) == 10
        await full(pool)
    finally:
        handle[0].cancel()
    assert max(sizes) <= 3
    # Every R besides the pool's has ended with its session.
    await eventually(lambda: len(r.children()) == 3, what="only the pooled R processes left")
    stats = fwd.server.stats
    assert stats.total(Stat.WARM_HANDED) + stats.total(Stat.WARM_MISSES) == 10


@pytest.mark.rserve
async def test_a_resumable_session_from_the_pool_survives_a_cut(
    fresh_rserve: Callable[..., Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()
    fwd = await start_forward(r.socket, warm=2, resume_grace=30.0)
    pool = pool_of(fwd.server)
    await full(pool)
    waiting = set(r.children())
    client = ResumeClient(fwd.url("http"))
    try:
        await client.connect()
        await client.eval("x <- Sys.getpid()")
        await client.wait_messages(1)
        assert client.greeting is not None and client.greeting.startswith(b"Rsrv0103QAP1")
        await client.drop()
        await client.resume()
        await client.eval("x")
        (_, reply) = await client.wait_messages(2)
        assert reply.value().value[0] in waiting
    finally:
        await client.close()
    assert fwd.server.stats.total(Stat.RESUMES) == 1


@pytest.mark.rserve
async def test_sigterm_ends_the_pooled_r_processes_and_metrics_show_the_pool(
    fresh_rserve: Callable[..., Rserve], forward_cli: StartCli
) -> None:
    r = fresh_rserve()
    fwd: ForwardProcess = await forward_cli(
        "-s", str(r.socket), "--warm", "2", ports=("-p", "--admin-port"), ready=2
    )
    await fwd.expect("warm pool: keeping 2")
    await eventually(lambda: len(r.children()) == 2, what="two pooled R processes")

    async def metric(name: str) -> float:
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{fwd.ports['--admin-port']}/metrics"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                if (f"{sample.name}{{{labels}}}" if labels else sample.name) == name:
                    return sample.value
        raise AssertionError(f"no {name} in /metrics")

    async def pooled() -> bool:
        return await metric("forward_warm_sessions") == 2

    # The processes fork before they greet: the gauge follows once forward has read the greeting.
    await until(pooled, what="forward_warm_sessions 2")
    async with await RClient.connect(fwd.url("ws", "-p")) as c:
        await c.eval("1")
    assert await metric("forward_warm_events_total{event=handed}") == 1
    assert await metric("forward_warm_events_total{event=miss}") == 0
    await eventually(lambda: len(r.children()) == 2, what="the pool refilled")
    assert await fwd.stop() == 0
    await eventually(lambda: r.children() == [], what="the pooled R processes ended")
