"""Small fake Rserve backends for edge cases a real Rserve cannot produce on demand.

Acceptance tests use the real Rserve; these only stand in where the point is a byte-exact record
of what reached the backend, or a backend that misbehaves (bad greeting, dies mid-message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from forward.qap import ClientStream, Cmd, Header

ID_STRING = b"Rsrv0103QAP1\r\n\r\n--------------\r\n"

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "FakeRserve"], Awaitable[None]]


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fake: FakeRserve
) -> None:
    """Classic greeting, then each message answered with RESP_OK, its payload and msg_id."""
    writer.write(ID_STRING)
    framer = ClientStream()
    received = bytearray()
    if fake.record:
        fake.received.append(received)
    pending: dict[int, bytearray] = {}
    while data := await reader.read(65536):
        if fake.record:
            received += data
        for chunk in framer.feed(data):
            body = pending.setdefault(id(chunk.header), bytearray())
            body += chunk.data[16:] if chunk.first else chunk.data
            if chunk.last:
                del pending[id(chunk.header)]
                h = chunk.header
                writer.write(Header(Cmd.RESP_OK, len(body), h.msg_id).encode() + body)
        await writer.drain()
    writer.close()


@dataclass
class FakeRserve:
    path: Path
    behaviour: Behaviour = echo
    record: bool = True  # keep every byte received, for byte-exact checks
    received: list[bytearray] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    connections: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> FakeRserve:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.behaviour(r, w, self)
            except ConnectionError:
                pass
            finally:
                w.close()
                self.closed.set()

        self.server = await asyncio.start_unix_server(handle, str(self.path))
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
