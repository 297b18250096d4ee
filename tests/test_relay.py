"""The relay against a real Rserve, through both -p and -w (SPEC section 2).

A fake backend appears only where the point is a byte-exact record of what reached it, or a
backend misbehaving in a way Rserve cannot be made to.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from forward import qap, rexp
from forward.qap import Cmd, Header, Xt
from forward.wsconn import HOLD_BACKEND_FULL

from .conftest import PKI, Rserve, StartCli, StartForward, eventually
from .fakes import FakeRserve
from .rclient import RClient, RError

GREETING = "Rsrv0103QAP1\r\n\r\n--------------\r\n"
LISTENERS = pytest.mark.parametrize("listener", ["http", "ws"])


def eval_msg(expr: str, msg_id: int) -> bytes:
    payload = rexp.string_param(expr)
    return Header(Cmd.EVAL, len(payload), msg_id).encode() + payload


# -- classic mode ------------------------------------------------------------------------------


@pytest.mark.rserve
@LISTENERS
async def test_classic_eval(rserve_qap: Rserve, start_forward: StartForward, listener: str) -> None:
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url(listener, "/any/path")) as c:
        assert c.greeting == GREETING  # a str: it arrived as one TEXT frame
        value = await c.eval("1+1")
        assert (value.xt, value.value) == (Xt.ARRAY_DOUBLE, [2.0])
        value = await c.eval("paste('a', 1:3)")
        assert value.value == ["a 1", "a 2", "a 3"]


@pytest.mark.rserve
@LISTENERS
async def test_classic_large_result_and_large_assign(
    rserve_qap: Rserve, start_forward: StartForward, listener: str
) -> None:
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url(listener)) as c:
        # 3e6 doubles = 24 MB: needs XT_LARGE/DT_LARGE headers and arrives as one WS message.
        await c.send(Cmd.EVAL, rexp.string_param("set.seed(1); x <- rnorm(3e6); x"))
        reply = await c.response()
        assert reply.header.length > 2**24
        values = reply.value().value
        assert len(values) == 3_000_000
        check = await c.eval("c(x[1], x[3e6], sum(x))")
        assert values[0] == check.value[0] and values[-1] == check.value[1]
        assert sum(values) == pytest.approx(check.value[2])
        # A 20 MB vector assigned from the browser.
        big = [float(i % 1000) for i in range(2_500_000)]
        await c.assign("y", rexp.doubles(big))
        got = await c.eval("c(length(y), sum(y), y[2500000])")
        assert got.value == [2_500_000.0, float(sum(big)), 999.0]


@pytest.mark.rserve
async def test_split_and_batched_requests_reach_r_in_order(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    """Browser data split inside headers, between messages, many per frame, one byte per frame."""
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url("ws")) as c:
        stream = b"".join(eval_msg(f"{i} * 10", i) for i in range(1, 41))
        offsets = [0, 3, 16, 17, 40, 41, 200, 201, 202, len(stream) - 5, len(stream)]
        # one byte per frame for the first message, then odd cuts, then the rest in one frame
        pieces = [stream[i : i + 1] for i in range(offsets[1])]
        pieces += [stream[a:b] for a, b in itertools.pairwise(offsets[1:])]
        for p in pieces:
            await c.ws.send_bytes(p)
        for i in range(1, 41):
            reply = await c.response()
            assert reply.value().value == [i * 10.0]


@pytest.mark.rserve
async def test_subprotocol_first_offered_is_echoed(
    rserve_qap: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url("http"), protocols=("qap1", "other")) as c:
        assert c.ws.protocol == "qap1"
        assert (await c.eval("2")).value == [2.0]


@pytest.mark.rserve
async def test_many_sessions_are_isolated(rserve_qap: Rserve, start_forward: StartForward) -> None:
    fwd = await start_forward(rserve_qap.socket)
    n = 120

    async def one(i: int) -> tuple[float, float]:
        async with await RClient.connect(fwd.url("http" if i % 2 else "ws")) as c:
            await c.eval(f"me <- {i}")
            pid = (await c.eval("Sys.getpid()")).value[0]
            await asyncio.sleep(0)
            return (await c.eval("me")).value[0], pid

    results = await asyncio.gather(*(one(i) for i in range(n)))
    assert [r[0] for r in results] == [float(i) for i in range(n)]
    assert len({r[1] for r in results}) == n  # one R process each


# -- OCAP mode ---------------------------------------------------------------------------------


async def ocap_login(c: RClient) -> rexp.RObj:
    assert isinstance(c.greeting, bytes)  # the RsOC greeting is a BINARY frame
    assert Header.parse(c.greeting[:16]).cmd == Cmd.OC_INIT
    denied = await c.call(c.capability, rexp.strings(["mike"]), rexp.strings(["wrong"]))
    assert denied.value == ["sorry, unauthorized!"]
    granted = await c.call(c.capability, rexp.strings(["mike"]), rexp.strings(["mypwd"]))
    return granted.as_dict()["parseEval"]


@pytest.mark.rserve
@LISTENERS
async def test_ocap_auth_parse_eval_and_oob(
    rserve_ocap: Rserve, start_forward: StartForward, listener: str
) -> None:
    fwd = await start_forward(rserve_ocap.socket)
    async with await RClient.connect(fwd.url(listener)) as c:
        parse_eval = await ocap_login(c)
        assert parse_eval.attr("class").value == ["OCref"]  # type: ignore[union-attr]
        result = await c.call(parse_eval, rexp.strings(["6 * 7"]))
        assert result.value == [42.0]
        result = await c.call(
            parse_eval, rexp.strings(["for (i in 1:3) self.oobSend(paste('step', i)); 'done'"])
        )
        assert result.value == ["done"]
        assert [o.header.cmd for o in c.oob] == [Cmd.OOB_SEND] * 3
        assert [o.value().value for o in c.oob] == [["step 1"], ["step 2"], ["step 3"]]


@pytest.mark.rserve
async def test_ocap_oob_message_round_trip(
    rserve_ocap: Rserve, start_forward: StartForward
) -> None:
    """R asks the browser (OOB_MSG) and waits; the browser's answer goes back through forward."""
    fwd = await start_forward(rserve_ocap.socket)
    async with await RClient.connect(fwd.url("ws")) as c:
        parse_eval = await ocap_login(c)
        await c.send(
            Cmd.OC_CALL,
            rexp.sexp_param(
                rexp.call(parse_eval, rexp.strings(["paste('got', self.oobMessage('q'))"]))
            ),
        )
        ask = await c.receive()
        assert ask.header.cmd & 0xFFFFF000 == Cmd.OOB_MSG
        answer = rexp.sexp_param(rexp.strings(["browser says hi"]))
        await c.send(ask.header.cmd | Cmd.RESP_OK, answer, msg_id=ask.header.msg_id)
        result = (await c.response()).value()
        assert result.value == ["got browser says hi"]


# -- when the backend goes away ----------------------------------------------------------------


@pytest.mark.rserve
async def test_r_killed_mid_session_answers_conn_broken(
    fresh_rserve: type[Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()  # type: ignore[call-arg]
    fwd = await start_forward(r.socket)
    async with await RClient.connect(fwd.url("http")) as c:
        pid = int((await c.eval("Sys.getpid()")).value[0])
        assert pid in r.children()
        # A request in flight when R dies is answered, then so is every later one.
        await c.send(Cmd.EVAL, rexp.string_param("Sys.sleep(60)"), msg_id=77)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RError) as info:
            await c.response()
        assert (info.value.status, info.value.header.msg_id) == (0x42, 77)
        for mid in (5, 6, 1234):
            await c.send(Cmd.EVAL, rexp.string_param("1"), msg_id=mid)
            with pytest.raises(RError) as info:
                await c.response()
            assert info.value.header.cmd == 0x42010002
            assert info.value.header.msg_id == mid
        assert not c.ws.closed  # the browser is not dropped
    # The server goes on: a new session gets a new R process.
    async with await RClient.connect(fwd.url("http")) as c:
        assert (await c.eval("3")).value == [3.0]


async def test_backend_missing_gives_clear_close_and_server_keeps_serving(
    tmp_path: Path, start_forward: StartForward
) -> None:
    path = tmp_path / "not-yet.sock"
    fwd = await start_forward(path)
    async with aiohttp.ClientSession() as s, s.ws_connect(fwd.url("ws")) as ws:
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1011
        assert "Rserve unavailable" in msg.extra
    fake = await FakeRserve(path).start()
    try:
        async with await RClient.connect(fwd.url("ws")) as c:
            await c.send(Cmd.EVAL, b"abc", msg_id=3)
            assert (await c.response()).payload == b"abc"
    finally:
        await fake.stop()


async def test_bytes_reach_the_backend_unchanged_whatever_the_fragmentation(
    tmp_path: Path, start_forward: StartForward
) -> None:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    fwd = await start_forward(fake.path)
    try:
        wire = [Header(Cmd.EVAL, n, n).encode() + os.urandom(n) for n in (0, 1, 15, 16, 17, 70_000)]
        data = b"".join(wire)
        for size in (1, 5, 16, 33, 4096, len(data)):
            async with await RClient.connect(fwd.url("http")) as c:
                for i in range(0, len(data), size):
                    await c.ws.send_bytes(data[i : i + size])
                for m in wire:
                    reply = await c.receive()
                    assert reply.payload == m[16:]
                    assert reply.header.msg_id == Header.parse(m[:16]).msg_id
            assert bytes(fake.received[-1]) == data
    finally:
        await fake.stop()


async def test_large_message_from_backend_streams_as_one_ws_message(
    tmp_path: Path, start_forward: StartForward
) -> None:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    fwd = await start_forward(fake.path)
    try:
        async with await RClient.connect(fwd.url("ws")) as c:
            body = os.urandom(8 * 2**20 + 3)
            await c.send(Cmd.EVAL, body, msg_id=9)
            reply = await c.receive()  # asserts one QAP message per WebSocket message
            assert reply.payload == body
    finally:
        await fake.stop()


@pytest.mark.parametrize(
    ("greeting", "reason"),
    [(b"RSpx" + bytes(28), "RSpx"), (b"HTTP/1.0 400 Bad\r\n\r\n", "not an Rserve greeting")],
)
async def test_bad_greeting_closes_with_reason(
    tmp_path: Path, start_forward: StartForward, greeting: bytes, reason: str
) -> None:
    async def bad(r: asyncio.StreamReader, w: asyncio.StreamWriter, _: FakeRserve) -> None:
        w.write(greeting)
        await w.drain()
        await r.read()

    fake = await FakeRserve(tmp_path / "bad.sock", bad).start()
    fwd = await start_forward(fake.path)
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(fwd.url("ws")) as ws:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1011 and reason in msg.extra
    finally:
        await fake.stop()


async def test_backend_dying_mid_message_closes_the_websocket(
    tmp_path: Path, start_forward: StartForward
) -> None:
    async def dies(r: asyncio.StreamReader, w: asyncio.StreamWriter, _: FakeRserve) -> None:
        w.write(b"Rsrv0103QAP1\r\n\r\n--------------\r\n")
        await r.readexactly(16)
        w.write(Header(Cmd.RESP_OK, 1000, 0).encode() + b"partial")
        await w.drain()

    fake = await FakeRserve(tmp_path / "dies.sock", dies).start()
    fwd = await start_forward(fake.path)
    try:
        async with await RClient.connect(fwd.url("ws")) as c:
            await c.send(Cmd.EVAL, b"")
            msg = await c.ws.receive()
            # The partial message must never be delivered as if it were whole.
            while msg.type is aiohttp.WSMsgType.BINARY:
                msg = await c.ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert c.ws.close_code == 1011 and "middle of a message" in msg.extra
    finally:
        await fake.stop()


async def test_heartbeat_sends_the_idle_oob_message(
    tmp_path: Path, start_forward: StartForward
) -> None:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    fwd = await start_forward(fake.path, heartbeat=0.05)
    try:
        async with await RClient.connect(fwd.url("ws")) as c:
            msg = await c.ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY
            assert msg.data == qap.IDLE_MESSAGE
            await c.send(Cmd.EVAL, b"after", msg_id=1)
            reply = await c.response()
            assert reply.payload == b"after"
    finally:
        await fake.stop()


async def test_oversized_message_from_browser_is_refused_before_r_sees_it(
    tmp_path: Path, start_forward: StartForward
) -> None:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    fwd = await start_forward(fake.path, max_message_size=1000)
    try:
        async with await RClient.connect(fwd.url("ws")) as c:
            await c.send(Cmd.EVAL, b"ok", msg_id=1)
            assert (await c.response()).payload == b"ok"
            await c.ws.send_bytes(Header(Cmd.EVAL, 5000, 2).encode() + b"x" * 100)
            # Whatever follows a refused header, even a well-formed message, never reaches R.
            await c.ws.send_bytes(Header(Cmd.EVAL, 4, 3).encode() + b"late")
            msg = await c.ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert c.ws.close_code == 1009 and "exceeds the limit" in msg.extra
        ok = Header(Cmd.EVAL, 2, 1).encode() + b"ok"
        assert bytes(fake.received[-1]) == ok  # nothing of the refused message reached R
    finally:
        await fake.stop()


async def test_shutdown_sends_notice_and_going_away(
    tmp_path: Path, start_forward: StartForward
) -> None:
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    fwd = await start_forward(fake.path)
    try:
        c = await RClient.connect(fwd.url("http"))
        stopping = asyncio.create_task(fwd.server.stop())
        msg = await c.ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == qap.SHUTDOWN_NOTICE
        msg = await c.ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE and c.ws.close_code == 1001
        await c.close()
        await stopping
    finally:
        await fake.stop()


async def test_stalled_backend_without_greeting_is_given_up(
    tmp_path: Path, start_forward: StartForward
) -> None:
    async def stalls(r: asyncio.StreamReader, w: asyncio.StreamWriter, _: FakeRserve) -> None:
        await r.read()

    fake = await FakeRserve(tmp_path / "stall.sock", stalls).start()
    fwd = await start_forward(fake.path, backend_timeout=0.3)
    try:
        async with aiohttp.ClientSession() as s, s.ws_connect(fwd.url("ws")) as ws:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1011 and "no greeting within 0.3 s" in msg.extra
        await asyncio.wait_for(fake.closed.wait(), 10)
    finally:
        await fake.stop()


@pytest.mark.rserve
async def test_r_killed_while_sending_a_large_result(
    fresh_rserve: type[Rserve], start_forward: StartForward
) -> None:
    r = fresh_rserve()  # type: ignore[call-arg]
    fwd = await start_forward(r.socket)
    async with await RClient.connect(fwd.url("ws")) as c:
        pid = int((await c.eval("Sys.getpid()")).value[0])
        # R sends a 400 MB answer; once part of it went through forward, R is killed.
        await c.send(Cmd.EVAL, rexp.string_param("raw(4e8)"), msg_id=1)
        (session,) = fwd.server.sessions
        await eventually(lambda: session.bytes_from_r >= 2**20, what="1 MB of the answer relayed")
        os.kill(pid, signal.SIGKILL)
        msg = await c.ws.receive()
        # The truncated message is never delivered as if it were whole.
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert c.ws.close_code == 1011 and "middle of a message" in msg.extra


async def test_backend_socket_recreated_serves_new_sessions(
    tmp_path: Path, start_forward: StartForward
) -> None:
    path = tmp_path / "r.sock"
    fake = await FakeRserve(path).start()
    fwd = await start_forward(path)
    async with await RClient.connect(fwd.url("ws")) as c:
        await c.send(Cmd.EVAL, b"one", msg_id=1)
        assert (await c.response()).payload == b"one"
    await fake.stop()
    path.unlink(missing_ok=True)
    fake = await FakeRserve(path).start()  # "Rserve restarted"
    try:
        async with await RClient.connect(fwd.url("ws")) as c:
            await c.send(Cmd.EVAL, b"two", msg_id=2)
            assert (await c.response()).payload == b"two"
    finally:
        await fake.stop()


async def test_browser_gone_mid_message_ends_the_r_side(
    tmp_path: Path, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forward.relay")
    fake = await FakeRserve(tmp_path / "echo.sock").start()
    fwd = await start_forward(fake.path)
    try:
        c = await RClient.connect(fwd.url("ws"))
        await c.ws.send_bytes(Header(Cmd.EVAL, 1000, 1).encode() + b"half")
        transport = c.ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.abort()  # no close handshake: the network went away
        await c.session.close()
        await asyncio.wait_for(fake.closed.wait(), 10)
        (line,) = [r.getMessage() for r in caplog.records if " closed: mode " in r.getMessage()]
        assert line.endswith("browser went away"), line  # why it ended
        async with await RClient.connect(fwd.url("ws")) as c2:
            await c2.send(Cmd.EVAL, b"still here", msg_id=2)
            assert (await c2.response()).payload == b"still here"
    finally:
        await fake.stop()


async def test_slow_browser_slows_r_instead_of_growing_memory(
    tmp_path: Path, start_forward: StartForward
) -> None:
    size = 256 * 2**20
    block = os.urandom(2**20)
    sent = [0]

    async def big_answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, _: FakeRserve) -> None:
        w.write(b"Rsrv0103QAP1\r\n\r\n--------------\r\n")
        await r.readexactly(16)
        w.write(Header(Cmd.RESP_OK, size, 1).encode())
        while sent[0] < size:
            w.write(block)
            await w.drain()
            sent[0] += len(block)
        await r.read()

    fake = await FakeRserve(tmp_path / "big.sock", big_answer).start()
    fwd = await start_forward(fake.path)
    try:
        c = await RClient.connect(fwd.url("ws"))
        transport = c.ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.pause_reading()  # the browser stops reading
        await c.send(Cmd.EVAL, b"", msg_id=1)
        (session,) = fwd.server.sessions
        await eventually(lambda: session._reading_paused, what="forward paused reading from R")
        before = sent[0]
        await asyncio.sleep(0.2)  # not a wait for anything: R stays held back for a while
        assert sent[0] - before <= 8 * 2**20
        assert sent[0] < 64 * 2**20, f"{sent[0]} bytes left R while the browser read nothing"
        transport.resume_reading()
        msg = await c.ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY and len(msg.data) == 16 + size
        assert msg.data[16 : 16 + 2**20] == block and msg.data[-(2**20) :] == block
        await c.close()
    finally:
        await fake.stop()


@pytest.mark.rserve
async def test_oob_answer_is_not_taken_for_a_pending_request(
    fresh_rserve: type[Rserve], start_forward: StartForward
) -> None:
    """After an OOB_MSG round trip, R dying answers only the request really pending."""
    r = fresh_rserve(ocap=True)  # type: ignore[call-arg]
    fwd = await start_forward(r.socket)
    async with await RClient.connect(fwd.url("ws")) as c:
        parse_eval = await ocap_login(c)
        pid = int((await c.call(parse_eval, rexp.strings(["Sys.getpid()"]))).value[0])
        code = "self.oobMessage('q'); Sys.sleep(60)"
        await c.send(
            Cmd.OC_CALL, rexp.sexp_param(rexp.call(parse_eval, rexp.strings([code]))), msg_id=41
        )
        ask = await c.receive()
        assert ask.header.cmd & 0xFFFFF000 == Cmd.OOB_MSG
        await c.send(
            ask.header.cmd | Cmd.RESP_OK,
            rexp.sexp_param(rexp.strings(["a"])),
            msg_id=ask.header.msg_id,
        )
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RError) as info:
            await c.response()
        assert (info.value.status, info.value.header.msg_id) == (0x42, 41)
        await c.send(Cmd.OC_CALL, b"", msg_id=42)  # the next reply answers the next request
        with pytest.raises(RError) as info:
            await c.response()
        assert info.value.header.msg_id == 42


async def test_slow_r_slows_the_browser_instead_of_growing_memory(
    tmp_path: Path, start_forward: StartForward
) -> None:
    go = asyncio.Event()
    received = bytearray()

    async def slow_reader(r: asyncio.StreamReader, w: asyncio.StreamWriter, _: FakeRserve) -> None:
        w.write(b"Rsrv0103QAP1\r\n\r\n--------------\r\n")
        await w.drain()
        await go.wait()  # R is busy: it reads nothing for now
        while data := await r.read(2**20):
            received.extend(data)

    fake = await FakeRserve(tmp_path / "slow.sock", slow_reader).start()
    fwd = await start_forward(fake.path)
    try:
        c = await RClient.connect(fwd.url("ws"))
        block = os.urandom(2**20)
        messages = [Header(Cmd.EVAL, len(block), i).encode() + block for i in range(200)]
        sending = asyncio.create_task(_send_all(c, messages))
        (session,) = fwd.server.sessions
        backend, ws = session._backend, session.ws
        assert backend is not None and ws is not None
        # forward stops reading from the browser until R's socket drains
        await eventually(lambda: ws.held & HOLD_BACKEND_FULL, what="forward waited for R")
        assert backend.transport is not None
        buffered = backend.transport.get_write_buffer_size()
        assert buffered < 16 * 2**20, f"{buffered} bytes held for a slow R"
        assert not sending.done()  # and the browser is held back in turn
        go.set()
        await sending
        await eventually(lambda: len(received) == 200 * (2**20 + 16), what="R got every byte")
        assert bytes(received) == b"".join(messages)
        await c.close()
    finally:
        await fake.stop()


async def _send_all(c: RClient, messages: list[bytes]) -> None:
    for m in messages:
        await c.ws.send_bytes(m)


class SeededR:
    """A fake R that answers each request (a seed and a size) with that many seeded random bytes,
    in 1 MB writes, each awaited (so R is held back when forward stops reading it); `written`
    counts the bytes handed to the socket for each seed."""

    def __init__(self) -> None:
        self.written: dict[int, int] = {}

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: FakeRserve
    ) -> None:
        import random

        writer.write(b"Rsrv0103QAP1\r\n\r\n--------------\r\n")
        framer = qap.ClientStream()
        while data := await reader.read(65536):
            for chunk in framer.feed(data):
                seed, size = (
                    int.from_bytes(chunk.data[16:20], "little"),
                    int.from_bytes(chunk.data[20:28], "little"),
                )
                body = random.Random(seed).randbytes(size)
                writer.write(Header(Cmd.RESP_OK, size, chunk.header.msg_id).encode())
                self.written[seed] = 0
                for at in range(0, size, 1 << 20):
                    writer.write(body[at : at + (1 << 20)])
                    self.written[seed] += len(body[at : at + (1 << 20)])
                    await writer.drain()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_slow_browser_keeps_its_bytes_while_other_sessions_stream(
    tmp_path: Path, pki: PKI, scheme: str, forward_cli: StartCli
) -> None:
    """forward reads R's answers into one buffer shared by all sessions and writes from it; a
    browser that is not reading leaves part of a write in its transport, still pointing into
    that buffer. Another session streaming meanwhile must not overwrite those bytes (the buffer is
    renewed). Run on the real CLI: its event loop (uvloop) keeps such views instead of copying."""
    import hashlib
    import random

    r = SeededR()
    fake = await FakeRserve(tmp_path / "seeded.sock", r, record=False).start()
    try:
        tls = ["-k", str(pki.key), "-c", str(pki.cert)] if scheme == "wss" else []
        fwd = await forward_cli("-s", str(fake.path), *tls)

        def expected(seed: int, size: int) -> str:
            return hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest()

        size = 24 << 20
        url = fwd.url(scheme)
        ctx = pki.client_context() if scheme == "wss" else None
        slow = await RClient.connect(url, ssl_context=ctx)
        fast = await RClient.connect(url, ssl_context=ctx)
        try:
            transport = slow.ws._response.connection.transport  # type: ignore[union-attr]
            assert transport is not None
            transport.pause_reading()  # this browser stops reading mid-answer
            await slow.send(Cmd.EVAL, (1).to_bytes(4, "little") + size.to_bytes(8, "little"))
            await eventually(lambda: r.written.get(1, 0) > 0, what="R began the slow answer")
            for seed in (2, 3):
                await fast.send(Cmd.EVAL, seed.to_bytes(4, "little") + size.to_bytes(8, "little"))
                reply = await asyncio.wait_for(fast.response(), 60)
                assert hashlib.sha256(reply.payload).hexdigest() == expected(seed, size)
            # While 48 MB went to the other browser, forward held R back for this one: what the
            # socket buffers on the way take is a few MB, so the answer cannot have left R. Had
            # the browser not been paused (or forward not waited for it), it would have.
            held = r.written[1]
            assert held < size, "forward read R's whole answer for a browser that read nothing"
            transport.resume_reading()
            reply = await asyncio.wait_for(slow.response(), 60)
            assert hashlib.sha256(reply.payload).hexdigest() == expected(1, size)
        finally:
            await slow.close()
            await fast.close()
    finally:
        await fake.stop()
