"""The benchmark's own servers, each run as a separate process by `run.py`.

`echo`: a QAP backend on a unix socket standing in for Rserve. It greets each connection with the
classic ID string and answers every message with RESP_OK and the same payload, streamed through
as it arrives (never collected), from several pre-forked uvloop processes sharing one listening
socket so that it is never the bottleneck.

`ceiling`: the no-relay ceiling, a WebSocket server (aiohttp + uvloop) that gives the same
answers itself, with no backend hop: what a relay could at best reach with this client.

`passthrough`: a TCP relay on uvloop that parses nothing, only passes bytes both ways (shared
receive buffer, one write per read): the least CPU any relay written in Python on uvloop can
spend per relayed call. The real-R section puts it in front of Rserve's own WebSocket listener.

    python bench/servers.py echo --socket PATH [--workers N]
    python bench/servers.py ceiling --port PORT [--cert FILE --key FILE]
    python bench/servers.py passthrough --port PORT --upstream PORT
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import struct
import sys
from typing import Any

import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from forward.wsframe import frame_header

HEADER = struct.Struct("<IIII")
RESP_OK = 0x10001
GREETING = b"Rsrv0103QAP1\r\n\r\n--------------\r\n"


class Echo(asyncio.Protocol):
    """One backend connection: rewrite each header's cmd to RESP_OK, pass payload bytes on."""

    __slots__ = ("_head", "_left", "transport")

    def __init__(self) -> None:
        self._head = bytearray()
        self._left = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        pos, end = 0, len(data)
        out: list[bytes | memoryview] = []
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out.append(view[pos : pos + take])
                self._left -= take
                pos += take
                continue
            need = 16 - len(self._head)
            if self._head or end - pos < 16:
                self._head += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._head) < 16:
                    break
                head = bytes(self._head)
                self._head.clear()
            else:
                head = data[pos : pos + 16]
                pos += 16
            _, lo, msg_id, hi = HEADER.unpack(head)
            out.append(HEADER.pack(RESP_OK, lo, msg_id, hi))
            self._left = lo | (hi << 32)
        if out:
            self.transport.writelines(out)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


def run_echo(path: str, workers: int) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4096)
    sock.setblocking(False)
    for _ in range(workers - 1):
        if os.fork() == 0:
            break

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Echo, sock=sock, backlog=4096)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(serve())


def run_ceiling(port: int, cert: str | None, key: str | None) -> None:
    from aiohttp import WSMsgType, web

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0, compress=False)
        await ws.prepare(request)
        await ws.send_bytes(GREETING)
        transport = request.transport
        protocol = request.protocol
        assert transport is not None
        async for msg in ws:
            if msg.type is not WSMsgType.BINARY:
                break
            data: bytes = msg.data
            _, lo, msg_id, hi = HEADER.unpack_from(data)
            # Same shape as the relay's own writes: frame header, then the payload unjoined.
            transport.writelines(
                (frame_header(0x2, True, len(data)), HEADER.pack(RESP_OK, lo, msg_id, hi),
                 memoryview(data)[16:])
            )
            if protocol.writing_paused:
                await protocol._drain_helper()
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    context = None
    if cert and key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
    web.run_app(
        app, host="127.0.0.1", port=port, ssl_context=context, access_log=None, print=None,
        handle_signals=True, loop=uvloop.new_event_loop(),
    )


class Pass(asyncio.BufferedProtocol):
    """One end of a pass-through connection: what it reads is written to the other end."""

    buffer = memoryview(bytearray(256 * 1024))  # one per process: read, written, done

    def __init__(self) -> None:
        self.peer: Pass | None = None
        self.transport: Any = None
        self.early: list[bytes] = []  # what the client sent before upstream was connected

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.buffer[:nbytes])  # the transport may keep what it cannot send now
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


def run_passthrough(port: int, upstream: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()

        def accepted() -> Pass:
            down = Pass()

            async def connect() -> None:
                try:
                    _, up = await loop.create_connection(Pass, "127.0.0.1", upstream)
                except OSError:
                    if down.transport is not None:
                        down.transport.close()
                    return
                up.peer, down.peer = down, up
                for data in down.early:
                    up.transport.write(data)
                down.early.clear()
                if down.transport is None:
                    up.transport.close()

            tasks.add(task := loop.create_task(connect()))
            task.add_done_callback(tasks.discard)
            return down

        tasks: set[asyncio.Task[None]] = set()
        server = await loop.create_server(accepted, "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    echo = sub.add_parser("echo")
    echo.add_argument("--socket", required=True)
    echo.add_argument("--workers", type=int, default=2)
    ceiling = sub.add_parser("ceiling")
    ceiling.add_argument("--port", type=int, required=True)
    ceiling.add_argument("--cert")
    ceiling.add_argument("--key")
    passthrough = sub.add_parser("passthrough")
    passthrough.add_argument("--port", type=int, required=True)
    passthrough.add_argument("--upstream", type=int, required=True)
    args = parser.parse_args()
    if args.role == "echo":
        run_echo(args.socket, args.workers)
    elif args.role == "passthrough":
        run_passthrough(args.port, args.upstream)
    else:
        run_ceiling(args.port, args.cert, args.key)


if __name__ == "__main__":
    main()
