"""A TCP relay on 127.0.0.1 that a test can cut: the network between a client and forward.

`cut()` drops every connection through it at once (both sides aborted, no close frame, as when a
Wi-Fi network goes away); `cut_after(n, direction)` drops the next connection once `n` bytes have
gone through in that direction, so a cut can land at any byte of any message; `down()` makes new
connections fail until `up()`, as an unreachable network does.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

UP = "up"  # client -> server
DOWN = "down"  # server -> client


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    moved: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})

    def abort(self) -> None:
        for w in (self.client, self.server):
            transport = w.transport
            if not transport.is_closing():
                transport.abort()


class CutProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.links: set[_Link] = set()
        self.connections = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._planned: list[tuple[int, str]] = []  # for the next connections, in order
        self._refusing = False

    async def start(self) -> CutProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        links, self.links = self.links, set()
        for link in links:
            link.abort()
            self.cuts += 1

    def cut_after(self, nbytes: int, direction: str) -> None:
        """Cut the next connection after `nbytes` have gone `direction` (UP or DOWN)."""
        self._planned.append((nbytes, direction))

    def down(self) -> None:
        self._refusing = True
        self.cut()

    def up(self) -> None:
        self._refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            writer.transport.abort()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        link = _Link(writer, server_writer)
        self.links.add(link)
        plan = self._planned.pop(0) if self._planned else None
        await asyncio.gather(
            self._pipe(link, reader, server_writer, UP, plan),
            self._pipe(link, server_reader, writer, DOWN, plan),
        )
        self.links.discard(link)

    async def _pipe(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: str,
        plan: tuple[int, str] | None,
    ) -> None:
        limit = plan[0] if plan is not None and plan[1] == direction else None
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                want = 65536 if limit is None else max(1, min(65536, limit - link.moved[direction]))
                data = await reader.read(want)
                if not data:
                    break
                writer.write(data)
                link.moved[direction] += len(data)
                if limit is not None and link.moved[direction] >= limit:
                    await writer.drain()
                    self.links.discard(link)
                    link.abort()
                    self.cuts += 1
                    return
                await writer.drain()
        if not writer.transport.is_closing():
            writer.close()
