"""Every use of aiohttp's private API, in one place, each behind a name of ours.

forward leans on aiohttp for HTTP and uses a few of its internals where the public API has no
way in. Each is wrapped here, and `RELIES_ON` lists them, so that tests/test_aiohttp_private.py
fails naming the attribute when an aiohttp upgrade renames or removes one, instead of forward
failing at its first WebSocket session, slow client or static file:

- taking a connection away from aiohttp after a WebSocket upgrade (`detach`): the connection
  handler's read-ahead (`_message_tail`) and its manager (`_manager`);
- whether a connection has sent a complete request header yet (`requests_started`:
  `_request_count`), for the header deadline in guard.py;
- the protocol factory an `AppRunner` makes (`WrappingRunner`: `_make_server`);
- `FileResponse`'s choice of file and its send path when `sendfile` is missing
  (`ChosenFileResponse`: `_get_file_path_stat_encoding`, `_sendfile_fallback`);
- a listener that runs its own accept loop (`AcceptingSite`: `_runner`, `_sock`, `_server`);
- the compiled WebSocket mask (`websocket_mask`: `aiohttp._websocket.helpers.websocket_mask`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

# (where, attribute): what the wrappers below use. Instance attributes are checked on an instance.
RELIES_ON = (
    ("aiohttp.web_protocol.RequestHandler", "_message_tail"),
    ("aiohttp.web_protocol.RequestHandler", "_manager"),
    ("aiohttp.web_protocol.RequestHandler", "_request_count"),
    ("aiohttp.web_protocol.RequestHandler", "force_close"),
    ("aiohttp.web_runner.AppRunner", "_make_server"),
    ("aiohttp.web_fileresponse.FileResponse", "_get_file_path_stat_encoding"),
    ("aiohttp.web_fileresponse.FileResponse", "_sendfile_fallback"),
    ("aiohttp.web_runner.SockSite", "_runner"),
    ("aiohttp.web_runner.SockSite", "_sock"),
    ("aiohttp.web_runner.SockSite", "_server"),
    ("aiohttp._websocket.helpers", "websocket_mask"),
)


def detach(handler: RequestHandler) -> bytes:
    """Tell aiohttp's connection handler that its connection is gone (its transport is set to
    None, as after a disconnect), so that when the request handler returns it writes nothing,
    closes nothing and forgets the connection. Returns what it had read past the request."""
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    handler.transport = None
    handler.force_close()
    manager = handler._manager
    if manager is not None:
        manager.connection_lost(handler, None)
    return tail


def requests_started(handler: Any) -> int:
    """How many requests the connection has sent; aiohttp counts one once its header is
    complete."""
    return int(handler._request_count)


class WrappingRunner(web.AppRunner):
    """An AppRunner whose protocol factory a subclass may wrap (`wrap_server`)."""

    async def _make_server(self) -> web.Server:
        return self.wrap_server(await super()._make_server())

    def wrap_server(self, server: web.Server) -> web.Server:
        return server


FileChoice = tuple[Path | None, os.stat_result, str | None]


class ChosenFileResponse(web.FileResponse):
    """A FileResponse with two steps a subclass may replace: `choose_file` (which file and
    content encoding to send, given Accept-Encoding) and `send_fallback` (the send when the
    event loop has no `sendfile`, as with uvloop)."""

    def _get_file_path_stat_encoding(self, accept_encoding: str) -> FileChoice:
        return self.choose_file(accept_encoding)

    async def _sendfile_fallback(
        self, writer: AbstractStreamWriter, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        return await self.send_fallback(writer, fobj, offset, count)

    def choose_file(self, accept_encoding: str) -> FileChoice:
        return super()._get_file_path_stat_encoding(accept_encoding)

    async def send_fallback(
        self, writer: AbstractStreamWriter, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        return await super()._sendfile_fallback(writer, fobj, offset, count)


class AcceptingSite(web.SockSite):
    """A SockSite that runs its own accept loop on its socket: `accept(sock, factory)` returns
    the server object that the site then stops as it would asyncio's."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # the runner's bookkeeping, without SockSite's server
        factory = self._runner.server
        assert factory is not None
        self._server = self.accept(self._sock, factory)

    def accept(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.AbstractServer:
        raise NotImplementedError


def websocket_mask() -> Callable[[bytes, bytearray], None] | None:
    """aiohttp's compiled XOR for WebSocket masks (several GB/s), or None when this build of
    aiohttp has none."""
    try:
        from aiohttp._websocket.helpers import websocket_mask as mask
    except ImportError:  # pragma: no cover - depends on the aiohttp build
        return None
    return mask
