"""Session resume through forward (forward/resumable.py, docs/resume.md), with a real Rserve and
the network between client and forward cut by tests/cutproxy.py: same R process, workspace kept,
every byte exactly once and in order, whatever the cuts; tickets that are refused with their
codes and never reach R; parked sessions that expire; memory bounded by the window."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import replace

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forward import rexp, tls
from forward.config import Config
from forward.qap import Cmd, Header
from forward.resumable import ResumableSession
from forward.resume import PROTOCOL, ResumeClose, ticket_token
from forward.session import State
from forward.stats import Stat

from .conftest import PKI, Rserve, Running, StartForward, eventually
from .cutproxy import DOWN, UP, CutProxy
from .rclient import RClient
from .resume_client import Gone, ResumeClient

pytestmark = pytest.mark.rserve


async def through(
    start_forward: StartForward, rserve: Rserve, proxies: Callable[..., object], **config: object
) -> tuple[Running, CutProxy]:
    fwd = await start_forward(
        rserve.socket, resume_grace=config.pop("resume_grace", 30.0), **config
    )
    proxy = await proxies(fwd.server.port("http"))  # type: ignore[operator]
    return fwd, proxy


def only_session(fwd: Running) -> ResumableSession:
    (session,) = fwd.server.sessions
    assert isinstance(session, ResumableSession)
    return session


async def test_a_plain_client_is_not_resumable(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(rserve_qap.socket, resume_grace=30.0)
    async with await RClient.connect(fwd.url("http"), protocols=("app.v1",)) as c:
        assert c.greeting.startswith("Rsrv0103QAP1")  # a text frame, first, as always
        assert c.ws.protocol == "app.v1"
        assert (await c.eval("1 + 1")).value == [2.0]
        assert not isinstance(next(iter(fwd.server.sessions)), ResumableSession)


async def test_with_resume_off_the_offer_is_an_ordinary_subprotocol(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(rserve_qap.socket, resume_grace=0.0)
    offered = (PROTOCOL, ticket_token("ab" * 24, 0))
    async with await RClient.connect(fwd.url("ws"), protocols=offered) as c:
        # Chromium fails a handshake that names no protocol when some were offered: the first
        # is echoed as before (never a ticket), and no `open` follows: the client sees R.
        assert c.ws.protocol == PROTOCOL
        assert c.greeting.startswith("Rsrv0103QAP1")


async def test_workspace_and_r_process_survive_a_cut_during_an_evaluation(
    rserve_qap: Rserve,
    start_forward: StartForward,
    proxies: Callable[..., object],
    clients: Callable[..., ResumeClient],
) -> None:
    fwd, proxy = await through(start_forward, rserve_qap, proxies)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    assert c.chosen == PROTOCOL and c.controls[0]["t"] == "open"
    await c.eval("x <- 42", 1)
    await c.eval("Sys.getpid()", 2)
    await c.wait_messages(2)
    pid = c.values()[1]
    await c.eval("Sys.sleep(1.5); sum(as.numeric(1:1e6))", 3)
    await asyncio.sleep(0.3)
    proxy.cut()  # during R's sleep
    await eventually(lambda: only_session(fwd).parked, what="the session parks")
    assert fwd.server.stats.total(Stat.SESSIONS_PARKED) == 1
    await c.wait_messages(3)  # resumes
    await c.eval("x", 4)
    await c.eval("Sys.getpid()", 5)
    await c.wait_messages(5)
    assert c.values() == [[42.0], pid, [500000500000.0], [42.0], pid]  # once each, in order
    assert c.resumes == 1
    stats = fwd.server.stats
    assert (stats.total(Stat.PARKS), stats.total(Stat.RESUMES)) == (1, 1)
    assert stats.total(Stat.SESSIONS_PARKED) == 0


async def test_a_client_close_ends_the_session_at_once(
    rserve_qap: Rserve, start_forward: StartForward, clients: Callable[..., ResumeClient]
) -> None:
    fwd = await start_forward(rserve_qap.socket, resume_grace=30.0)
    c = clients(fwd.url("http"))
    await c.connect()
    await c.eval("1", 1)
    await c.wait_messages(1)
    await c.ws.close()  # type: ignore[union-attr]
    await eventually(lambda: not fwd.server.sessions, what="the session ends")
    assert fwd.server.stats.total(Stat.PARKS) == 0


def payloads(draw_sizes: list[int], seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-+=.,"
    return ["".join(rng.choices(alphabet, k=n)) for n in draw_sizes]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=120_000), min_size=1, max_size=8),
    cuts=st.lists(
        st.tuples(st.integers(min_value=1, max_value=400_000), st.sampled_from([UP, DOWN])),
        max_size=4,
    ),
    seed=st.integers(min_value=0, max_value=2**32),
)
async def test_random_cuts_deliver_every_byte_exactly_once_in_order(
    rserve_qap: Rserve,
    start_forward: StartForward,
    proxies: Callable[..., object],
    sizes: list[int],
    cuts: list[tuple[int, str]],
    seed: int,
) -> None:
    """Each request carries a random string up to R, which answers with it twice over (so
    answers are larger than requests); cuts land at random byte offsets of either direction,
    across any number of reconnects. R's answers must equal what the strings say, once each."""
    fwd, proxy = await through(start_forward, rserve_qap, proxies)
    for nbytes, direction in cuts:
        proxy.cut_after(nbytes, direction)
    c = ResumeClient(f"ws://127.0.0.1:{proxy.port}/")
    session = None
    try:
        # A cut inside the handshake loses the session before the client has its ticket (it is
        # parked and expires): the client just starts again.
        await c.resume()
        texts = payloads(sizes, seed)
        for i, text in enumerate(texts, 1):
            await c.eval(f'strrep("{text}", 2)', i)
        await c.wait_messages(len(texts))
        answers = "".join(v[0] for v in c.values()).encode()
        expected = "".join(t * 2 for t in texts).encode()
        assert hashlib.sha256(answers).hexdigest() == hashlib.sha256(expected).hexdigest()
        assert len(c.messages) == len(texts)
        assert c.ticket is not None
        session = fwd.server.resumable[c.ticket[:16]]
        # Byte counts agree on both ends: nothing lost, nothing twice.
        assert session.resume.received == c.sent
        assert session.bytes_to_r == c.sent
        assert session.bytes_from_r == len(c.stream)
    finally:
        await c.close()
        if session is not None:
            done = session
            await eventually(lambda: done.core.state is State.CLOSED, what="the session ends")


async def test_a_100_mb_result_cut_three_times_arrives_whole(
    rserve_qap: Rserve,
    start_forward: StartForward,
    proxies: Callable[..., object],
    clients: Callable[..., ResumeClient],
) -> None:
    fwd, proxy = await through(start_forward, rserve_qap, proxies)
    for at in (20_000_000, 7_000_000, 30_000_000):
        proxy.cut_after(at, DOWN)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    await c.eval("as.raw(rep(0:255, length.out = 1e8))", 1)
    (reply,) = await c.wait_messages(1)
    value = reply.value().value
    expected = bytes(range(256)) * (100_000_000 // 256) + bytes(range(100_000_000 % 256))
    assert hashlib.sha256(value).digest() == hashlib.sha256(expected).digest()
    assert proxy.cuts >= 3 and c.resumes == 3
    session = only_session(fwd)
    assert session.resume.outbox.kept <= session.resume.window + 256 * 1024


async def test_a_50_mb_upload_cut_twice_arrives_whole(
    rserve_qap: Rserve,
    start_forward: StartForward,
    proxies: Callable[..., object],
    clients: Callable[..., ResumeClient],
) -> None:
    fwd, proxy = await through(start_forward, rserve_qap, proxies)
    for at in (15_000_000, 20_000_000):
        proxy.cut_after(at, UP)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    data = os.urandom(50_000_000)
    payload = rexp.string_param("up") + rexp.sexp_param(rexp.raw(data))
    await c.send(Header(Cmd.SET_SEXP, len(payload), 1).encode() + payload)
    await c.eval("length(up)", 2)
    await c.eval("sum(as.integer(up))", 3)
    await c.wait_messages(3)
    assigned, length, total = c.messages
    assert assigned.header.cmd == Cmd.RESP_OK
    assert [length.value().value, total.value().value] == [[50_000_000], [float(sum(data))]]
    assert c.resumes == 2
    assert only_session(fwd).resume.received == c.sent


async def test_a_client_that_does_not_acknowledge_holds_r_back_within_the_window(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    window = 64 * 1024
    fwd = await start_forward(rserve_qap.socket, resume_grace=30.0, resume_buffer=window)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(fwd.url("http"), protocols=(PROTOCOL,), max_msg_size=0)
        opened = await ws.receive_json()
        assert opened["window"] == window
        greeting = await ws.receive_bytes()
        expr = rexp.string_param("as.raw(rep(1:255, length.out = 2e7))")
        await ws.send_bytes(Header(Cmd.EVAL, len(expr), 1).encode() + expr)
        session = only_session(fwd)
        await eventually(lambda: session.resume.outbox.full, what="the window fills")
        await asyncio.sleep(0.3)  # R goes on writing into its socket, forward does not read
        assert session.resume.outbox.kept < window + 256 * 1024
        assert session.bytes_from_r < 2_000_000
        assert fwd.server.stats.total(Stat.RESUME_STALLS) == 1
        # An ack frees the window: R is read again.
        got = len(greeting)
        while got < session.resume.outbox.sent:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:  # forward's own acks come as text
                got += len(msg.data)
        before = session.bytes_from_r
        await ws.send_json({"t": "ack", "received": got})
        await eventually(lambda: session.bytes_from_r > before, what="R is read again")
        assert session.resume.outbox.kept < window + 256 * 1024
        await ws.close()


async def test_tickets_refused_with_their_codes_and_r_never_reached(
    fresh_rserve: Callable[..., Rserve],
    start_forward: StartForward,
    proxies: Callable[..., object],
    clients: Callable[..., ResumeClient],
) -> None:
    rserve = fresh_rserve()
    fwd, proxy = await through(start_forward, rserve, proxies)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    await c.eval("Sys.getpid()", 1)
    await c.wait_messages(1)
    (first,) = c.values()
    old_ticket = c.ticket
    proxy.cut()
    await c.resume()
    await c.eval("1", 2)
    await c.wait_messages(2)  # an ack on the new connection: the old ticket is withdrawn
    await eventually(lambda: only_session(fwd).resume._previous is None, what="ticket settled")
    children = len(rserve.children())

    async def refused(token: str, **kw: object) -> int | None:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(fwd.url("ws"), protocols=(PROTOCOL, token), **kw)  # type: ignore[arg-type]
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            return ws.close_code

    assert old_ticket is not None and c.ticket is not None
    assert await refused(ticket_token(old_ticket, 0)) == ResumeClose.GONE
    forged = c.ticket[:16] + ("0" if c.ticket[16] != "0" else "1") + c.ticket[17:]
    assert await refused(ticket_token(forged, 0)) == ResumeClose.GONE
    assert await refused(ticket_token("f" * 48, 0)) == ResumeClose.GONE
    assert await refused(f"rserve-ticket.{c.ticket}.x") == ResumeClose.GONE
    too_many = ticket_token(c.ticket, len(c.stream) + 1)
    assert await refused(too_many) == ResumeClose.GONE
    # A foreign page cannot even try.
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(
                fwd.url("ws"),
                protocols=(PROTOCOL, ticket_token(c.ticket, len(c.stream))),
                origin="https://evil.example",
            )
        assert info.value.status == 403
    assert len(rserve.children()) == children  # no new R process for any of them
    assert fwd.server.stats.total(Stat.RESUMES_REFUSED) == 5
    # The real client still resumes after all that.
    proxy.cut()
    await c.eval("Sys.getpid()", 3)
    await c.wait_messages(3)
    assert c.values()[2] == first


async def test_a_second_connection_takes_the_session_over(
    rserve_qap: Rserve, start_forward: StartForward, clients: Callable[..., ResumeClient]
) -> None:
    fwd = await start_forward(rserve_qap.socket, resume_grace=30.0)
    c = clients(fwd.url("http"))
    await c.connect()
    await c.eval("y <- 7; Sys.getpid()", 1)
    await c.wait_messages(1)
    # A second connection with the ticket while the first still looks alive (the other tab, or
    # a reconnect that won the race against a half-open connection): it takes over.
    old_reader = c._reader
    c._reader = None
    await c.connect()
    with pytest.raises(Gone) as info:
        assert old_reader is not None
        await old_reader
    assert info.value.code == ResumeClose.RETIRED
    await c.eval("y", 2)
    await c.wait_messages(2)
    assert c.values()[1] == [7.0]
    assert fwd.server.stats.total(Stat.TAKEOVERS) == 1


async def test_a_parked_session_expires_and_its_ticket_is_gone(
    fresh_rserve: Callable[..., Rserve],
    start_forward: StartForward,
    proxies: Callable[..., object],
    caplog: pytest.LogCaptureFixture,
    clients: Callable[..., ResumeClient],
) -> None:
    rserve = fresh_rserve()
    fwd, proxy = await through(start_forward, rserve, proxies, resume_grace=0.5)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    await c.eval("1", 1)
    await c.wait_messages(1)
    await eventually(lambda: len(rserve.children()) == 1, what="one R process")
    caplog.set_level(logging.INFO, "forward")
    proxy.cut()
    await eventually(lambda: not fwd.server.sessions, what="the parked session expires")
    assert "expired after 0.5 s without a resume" in caplog.text
    await eventually(lambda: not rserve.children(), what="its R process ends")
    with pytest.raises(Gone) as info:
        await c.resume()
        await c.wait_messages(2)
    assert info.value.code == ResumeClose.GONE
    assert fwd.server.stats.total(Stat.PARKS_EXPIRED) == 1


async def test_parked_sessions_count_towards_the_per_client_cap(
    rserve_qap: Rserve,
    start_forward: StartForward,
    proxies: Callable[..., object],
    clients: Callable[..., ResumeClient],
) -> None:
    fwd, proxy = await through(start_forward, rserve_qap, proxies, max_sessions_per_client=1)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    await c.eval("1", 1)
    await c.wait_messages(1)
    proxy.cut()
    await eventually(lambda: only_session(fwd).parked, what="parked")
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(fwd.url("http"), protocols=(PROTOCOL,))
        msg = await ws.receive()
        assert (msg.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 1013)
    await c.eval("2", 2)
    await c.wait_messages(2)  # its own resume is not a new session
    assert c.values() == [[1.0], [2.0]]


async def test_shutdown_ends_parked_sessions(
    fresh_rserve: Callable[..., Rserve],
    start_forward: StartForward,
    proxies: Callable[..., object],
    clients: Callable[..., ResumeClient],
) -> None:
    rserve = fresh_rserve()
    fwd, proxy = await through(start_forward, rserve, proxies)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    await c.connect()
    await c.eval("1", 1)
    await c.wait_messages(1)
    proxy.cut()
    await eventually(lambda: only_session(fwd).parked, what="parked")
    await fwd.server.stop()
    assert not fwd.server.sessions and not fwd.server.resumable
    await eventually(lambda: not rserve.children(), what="R's process ends")


async def test_a_session_opened_with_a_certificate_resumes_only_with_that_certificate(
    fresh_rserve: Callable[..., Rserve],
    start_forward: StartForward,
    pki: PKI,
    clients: Callable[..., ResumeClient],
) -> None:
    rserve = fresh_rserve()
    settings = {
        "tls_key": str(pki.key),
        "tls_cert": str(pki.cert),
        "tls_ca": str(pki.ca_file),
        "tls_client": ("request",),
        "resume_grace": 30.0,
    }
    contexts = tls.Contexts(replace(Config(), **settings))  # type: ignore[arg-type]
    fwd = await start_forward(rserve.socket, ssl_context=contexts.get, **settings)
    alice, bob = pki.client_context("alice"), pki.client_context("bob")
    c = clients(fwd.url("ws"), ssl_context=alice)
    await c.connect()
    await c.eval("Sys.getpid()", 1)
    await c.wait_messages(1)
    assert only_session(fwd).resume.subject is not None
    children = len(rserve.children())
    token = ticket_token(c.ticket or "", len(c.stream))
    for context in (bob, pki.client_context()):  # another subject, and none at all
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(fwd.url("ws"), protocols=(PROTOCOL, token), ssl=context)
            msg = await ws.receive()
            assert (msg.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, ResumeClose.REFUSED)
    assert len(rserve.children()) == children
    await c.drop()
    await c.resume()  # alice herself still may
    await c.eval("Sys.getpid()", 2)
    await c.wait_messages(2)
    assert c.values()[0] == c.values()[1]


async def test_a_parked_session_keeps_its_lifetime(
    fresh_rserve: Callable[..., Rserve],
    start_forward: StartForward,
    proxies: Callable[..., object],
    caplog: pytest.LogCaptureFixture,
    clients: Callable[..., ResumeClient],
) -> None:
    """Parking buys no time past --max-lifetime: the session ends then, grace or not."""
    rserve = fresh_rserve()
    fwd, proxy = await through(start_forward, rserve, proxies, max_lifetime=1.0)
    c = clients(f"ws://127.0.0.1:{proxy.port}/")
    caplog.set_level(logging.INFO, "forward")
    await c.connect()
    await c.eval("1", 1)
    await c.wait_messages(1)
    proxy.cut()
    await eventually(lambda: only_session(fwd).parked, what="parked")
    await eventually(lambda: not fwd.server.sessions, what="the lifetime ends it", within=20)
    assert "lifetime of 1 s reached" in caplog.text
    assert fwd.server.stats.total(Stat.PARKS_EXPIRED) == 0  # not the grace: the lifetime
    assert fwd.server.stats.total(Stat.SESSIONS_PARKED) == 0
    await eventually(lambda: not rserve.children(), what="its R process ends")
