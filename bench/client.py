"""The benchmark's load generator, run by `run.py` as one or more processes; prints one JSON line.

    python bench/client.py latency  --port P [--ca FILE] --calls N --size BYTES
    python bench/client.py bulk     --port P [--ca FILE] --size BYTES --count N --seconds S
    python bench/client.py parallel --port P [--ca FILE] --sessions K --size BYTES --seconds S
    python bench/client.py sessions --port P [--ca FILE] --sessions N --concurrency C

`latency` uses one blocking socket (the cheapest round trip Python can make); the others use
uvloop with a `BufferedProtocol`, so replies land in one reused buffer (`recv_into`) and are only
counted. `sessions` prints its line once every session is open, keeps them open until a line
arrives on stdin (so that `run.py` can measure the relay's memory meanwhile), then closes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import time
from typing import Any

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from wsframes import (
    CMD_EVAL,
    RESUME_PROTOCOL,
    FrameCounter,
    ack_frame,
    check_response,
    client_frame,
    echo_request,
    handshake,
    qap_message,
)

HOST = "127.0.0.1"  # the load never leaves loopback, whatever the relay binds


def client_context(ca: str | None) -> ssl.SSLContext | None:
    if not ca:
        return None
    return ssl.create_default_context(cafile=ca)


# -- blocking: round-trip latency -------------------------------------------------------------

def blocking_session(
    port: int, ctx: ssl.SSLContext | None, resume: bool = False
) -> tuple[socket.socket, FrameCounter]:
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname=HOST)
    protocols = RESUME_PROTOCOL if resume else ""
    sock.sendall(handshake(HOST, port, ctx is not None, protocols=protocols))
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        raw += chunk
    head, rest = raw.split(b"\r\n\r\n", 1)
    check_response(head)
    counter = FrameCounter(text_is_data=not resume)
    got = counter.feed(rest)
    while got < 32:
        chunk = sock.recv(65536)
        if not chunk or counter.closed:
            raise ConnectionError("closed before the greeting")
        got += counter.feed(chunk)
    return sock, counter


# A resume client acknowledges every this many bytes (a quarter of forward's default window).
ACK_EVERY = 256 * 1024


def latency(
    port: int, ctx: ssl.SSLContext | None, calls: int, size: int, resume: bool = False
) -> dict[str, Any]:
    sock, counter = blocking_session(port, ctx, resume)
    received = acked = 32
    frame, reply = echo_request(size)
    buf = bytearray(65536)
    view = memoryview(buf)
    clock = time.perf_counter_ns
    times = []
    warmup = max(20, calls // 20)
    for i in range(warmup + calls):
        t0 = clock()
        sock.sendall(frame)
        got = 0
        while got < reply:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError("relay closed the session")
            got += counter.feed(view[:n])
            if counter.closed:
                raise ConnectionError("relay closed the session")
        if i >= warmup:
            times.append(clock() - t0)
        if resume:
            received += reply
            if received - acked >= ACK_EVERY:
                sock.sendall(ack_frame(received))
                acked = received
    sock.close()
    times.sort()
    return {
        "calls": calls,
        "p50_us": times[len(times) // 2] / 1000,
        "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] / 1000,
        "mean_us": sum(times) / len(times) / 1000,
    }


# -- uvloop: bulk, parallel sessions, many sessions ---------------------------------------------

class Client(asyncio.BufferedProtocol):
    """One WebSocket session; `received` counts data payload bytes since the upgrade."""

    def __init__(self, bufsize: int, resume: bool = False) -> None:
        self.resume = resume
        self._acked = 0
        self._buf = bytearray(bufsize)
        self._view = memoryview(self._buf)
        self._hs: bytearray | None = bytearray()
        self._counter = FrameCounter(text_is_data=not resume)
        self._waiter: asyncio.Future[None] | None = None
        self._target = 0
        self._drained: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self.received = 0
        self.expected = 32  # the greeting
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._view[:nbytes]
        if self._hs is not None:
            self._hs += data
            end = self._hs.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                check_response(bytes(self._hs[:end]))
            except Exception as exc:
                self._fail(exc)
                return
            data = memoryview(bytes(self._hs[end + 4 :]))
            self._hs = None
        self.received += self._counter.feed(data)
        if self.resume and self.received - self._acked >= ACK_EVERY:
            self._acked = self.received
            self.transport.write(ack_frame(self.received))
        if self._counter.closed:
            self._fail(ConnectionError("relay closed the session (close frame)"))
            return
        waiter = self._waiter
        if waiter is not None and self.received >= self._target:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._lost = self._lost or exc
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("relay closed the session"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def wait(self) -> None:
        if self.received >= self.expected:
            return
        if self._lost is not None:
            raise self._lost
        self._target = self.expected
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    async def call(self, frame: bytes, reply: int) -> None:
        self.expected += reply
        self.transport.write(frame)
        if self._drained is not None:
            await self._drained
        await self.wait()


async def open_session(
    port: int, ctx: ssl.SSLContext | None, bufsize: int = 65536, resume: bool = False
) -> Client:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: Client(bufsize, resume), HOST, port, ssl=ctx, server_hostname=HOST if ctx else None
    )
    protocols = RESUME_PROTOCOL if resume else ""
    client.transport.write(handshake(HOST, port, ctx is not None, protocols=protocols))
    await client.wait()
    return client


async def bulk(port: int, ctx: ssl.SSLContext | None, size: int, count: int,
               seconds: float, stall: float, resume: bool = False) -> dict[str, Any]:
    client = await open_session(port, ctx, bufsize=1 << 20, resume=resume)
    frame, reply = echo_request(size)

    async def one() -> None:
        try:
            await asyncio.wait_for(client.call(frame, reply), stall)
        except TimeoutError:
            sys.exit(f"no complete answer to a {size}-byte message within {stall:g} s")

    await one()  # warm-up
    done = 0
    t0 = time.perf_counter()
    while done < count or time.perf_counter() - t0 < seconds:
        await one()
        done += 1
    elapsed = time.perf_counter() - t0
    client.transport.close()
    return {"messages": done, "seconds": elapsed, "mb_per_s": done * size / elapsed / 1e6}


async def parallel(port: int, ctx: ssl.SSLContext | None, sessions: int, size: int,
                   seconds: float) -> dict[str, Any]:
    clients = [await open_session(port, ctx) for _ in range(sessions)]
    frame, reply = echo_request(size)
    counts = [0] * sessions
    measuring = False

    async def loop_one(i: int, client: Client, deadline: float) -> None:
        while time.perf_counter() < deadline:
            await client.call(frame, reply)
            if measuring:
                counts[i] += 1

    await asyncio.gather(*(loop_one(i, c, time.perf_counter() + 0.3) for i, c in
                           enumerate(clients)))
    measuring = True
    t0 = time.perf_counter()
    await asyncio.gather(*(loop_one(i, c, t0 + seconds) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.transport.close()
    return {"messages": sum(counts), "seconds": elapsed, "msg_per_s": sum(counts) / elapsed}


async def many(port: int, ctx: ssl.SSLContext | None, sessions: int,
               concurrency: int) -> dict[str, Any]:
    frame, reply = echo_request(64)
    gate = asyncio.Semaphore(concurrency)
    clients: list[Client] = []
    failures: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                client = await open_session(port, ctx, bufsize=4096)
                await client.call(frame, reply)
                clients.append(client)
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(sessions)))
    elapsed = time.perf_counter() - t0
    print(json.dumps({
        "opened": len(clients), "failed": len(failures), "seconds": elapsed,
        "per_s": len(clients) / elapsed, "first_failure": failures[0] if failures else None,
    }), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for c in clients:
        c.transport.close()
    await asyncio.sleep(0)
    return {}


async def reconnect(port: int, ctx: ssl.SSLContext | None, size: int, count: int) -> dict[str, Any]:
    """Resume: time from a new connection's TCP connect to the first byte of the relay's stream
    on it (what forward replays).

    Each round asks for a `size`-byte echo, reads half of the answer, then drops the connection
    without a close (as a network does) and resumes with its ticket and count, sending again
    what forward says it has not got, as the protocol asks (docs/resume.md)."""
    message = qap_message(CMD_EVAL, 1, size)
    sent = bytearray()  # the client's stream (QAP bytes), to send again what forward lacks
    times: list[float] = []
    ticket: str | None = None
    received = 0  # data bytes of the relay's stream, over every connection
    for _ in range(count + 1):
        offer = RESUME_PROTOCOL
        if ticket is not None:
            offer += f", rserve-ticket.{ticket}.{received}"
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(
            HOST, port, ssl=ctx, server_hostname=HOST if ctx else None
        )
        writer.write(handshake(HOST, port, ctx is not None, protocols=offer))
        check_response(await reader.readuntil(b"\r\n\r\n"))
        # The first message is the control message with the (new) ticket: a short text frame.
        _, b1 = await reader.readexactly(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        control = json.loads(await reader.readexactly(length))
        ticket = control["ticket"]
        counter = FrameCounter(text_is_data=False)
        if control["t"] == "resumed":
            rest = sent[control["received"] :]
            if rest:
                writer.write(client_frame(bytes(rest)))
            got = 0
            while not got:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("relay closed the session")
                got = counter.feed(data)
            times.append(time.perf_counter() - t0)
            received += got
        sent += message
        writer.write(client_frame(message))
        goal = received + size // 2
        while received < goal:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("relay closed the session")
            received += counter.feed(data)
        writer.transport.abort()  # a cut: no close frame
        await asyncio.sleep(0.02)
    times.sort()
    return {
        "resumes": len(times),
        "p50_ms": times[len(times) // 2] * 1000,
        "max_ms": times[-1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("latency", "bulk", "parallel", "sessions", "reconnect"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stall", type=float, default=30.0,
                        help="bulk: give up when one message takes longer than this")
    parser.add_argument("--resume", action="store_true",
                        help="latency, bulk: ask forward for session resume (and acknowledge)")
    args = parser.parse_args()
    ctx = client_context(args.ca)
    if args.mode == "latency":
        out = latency(args.port, ctx, args.calls, args.size, args.resume)
    elif args.mode == "bulk":
        out = uvloop.run(bulk(args.port, ctx, args.size, args.count, args.seconds, args.stall,
                              args.resume))
    elif args.mode == "reconnect":
        out = uvloop.run(reconnect(args.port, ctx, args.size, args.count))
    elif args.mode == "parallel":
        out = uvloop.run(parallel(args.port, ctx, args.sessions, args.size, args.seconds))
    else:
        uvloop.run(many(args.port, ctx, args.sessions, args.concurrency))
        return
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
