"""Every use of aiohttp's private API, in one place, each behind a name of ours.

forward leans on aiohttp for HTTP and uses a few of its internals where the public API has no
way in. Each is wrapped here, and `RELIES_ON` lists them, so that tests/test_aiohttp_private.py
fails naming the attribute when an aiohttp upgrade renames or removes one, instead of forward
failing at its first WebSocket session, slow client or static file:

- taking a connection away from aiohttp after a WebSocket upgrade (`detach`): the connection
  handler's read-ahead (`_message_tail`) and its manager (`_manager`);
- whether a connection has sent a complete request header yet (`requests_started`:
  `_request_count`), for the header deadline in guard.py;
- the peer a connection reports to its requests (`set_peer`: the handler's `_cache`, where its
  `peername` is kept), so that a PROXY header's source is every request's `remote`;
- the protocol factory an `AppRunner` makes (`WrappingRunner`: `_make_server`);
- `FileResponse`'s choice of file and its send path when `sendfile` is missing
  (`ChosenFileResponse`: `_get_file_path_stat_encoding`, `_sendfile_fallback`);
- a listener that runs its own accept loop (`AcceptingSite`: `_runner`, `_sock`, `_server`), or
  asyncio's with a protocol factory of its own (`WrappingSite`: the same, and `_backlog`);
- the compiled WebSocket mask (`websocket_mask`: `aiohttp._websocket.helpers.websocket_mask`);
- the answer to a request aiohttp's parser refused (`PlainParseErrors`: the connection
  handler's class is swapped for a subclass with its own `handle_error`; `parse_failure` reads
  the parser's `HttpProcessingError`), which would otherwise echo the request's bytes back and
  announce aiohttp's version.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, cast

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
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
    ("aiohttp.web_protocol.RequestHandler", "handle_error"),
    ("aiohttp.web_protocol.RequestHandler", "logger"),
    ("aiohttp.http_exceptions", "HttpProcessingError"),
    ("aiohttp.web_runner.BaseSite", "_backlog"),
    ("aiohttp.web_protocol.RequestHandler", "_cache"),
    ("aiohttp.web_protocol.RequestHandler", "peername"),
)

SERVER = "forward"  # the Server header: no Python or aiohttp version for anyone to read


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


def set_peer(handler: Any, peername: tuple[str, int]) -> None:
    """Make a connection handler, before its connection is made, report `peername` as its
    peer: `request.remote` of every request on it, and `peer_of`. aiohttp reads the
    transport's peername once and keeps it in the handler's cache; this fills the cache first."""
    handler._cache["peername"] = peername


def peer_of(handler: Any) -> Any:
    """The peer a connection handler reports: the transport's peername, or `set_peer`'s."""
    return handler.peername


class WrappingRunner(web.AppRunner):
    """An AppRunner whose protocol factory a subclass may wrap (`wrap_server`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return self.wrap_server(cast(web.Server, PlainParseErrors(server)))

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


class WrappingSite(web.SockSite):
    """A SockSite whose protocol factory a subclass may wrap (`wrap`), for its connections
    only; the accept loop stays asyncio's (uvloop's)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # the runner's bookkeeping, without SockSite's server
        factory = self._runner.server
        assert factory is not None
        self._server = await asyncio.get_running_loop().create_server(
            self.wrap(factory), sock=self._sock, backlog=self._backlog
        )

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return factory


def websocket_mask() -> Callable[[bytes, bytearray], None] | None:
    """aiohttp's compiled XOR for WebSocket masks (several GB/s), or None when this build of
    aiohttp has none."""
    try:
        from aiohttp._websocket.helpers import websocket_mask as mask
    except ImportError:  # pragma: no cover - depends on the aiohttp build
        return None
    return mask


def parse_failure(exc: BaseException | None) -> tuple[int, str] | None:
    """(status, what was wrong) when `exc` is aiohttp's parser refusing a request, else None.
    What was wrong is the first line of the parser's message (the next ones quote the
    request). aiohttp's LineTooLong does not say whether a header or the request line was too
    long, so it stays 400 (RFC 6585's 431 would need that)."""
    if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 400) < 500:
        return None
    what = (exc.message or type(exc).__name__).split("\n", 1)[0]
    what = re.split(r": *(?:b['\"]|bytearray\()", what, maxsplit=1)[0].rstrip(": ")
    return exc.code or 400, what


class _PlainParseErrors(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        failure = parse_failure(exc) if status < 500 else None
        if failure is None:
            response = super().handle_error(request, status, exc, message)
        else:
            # The logger (accesslog.MalformedRequests) turns this into one line.
            self.logger.exception("Error handling request from %s", request.remote, exc_info=exc)
            status = failure[0]
            response = web.Response(status=status, text=f"{status} {HTTPStatus(status).phrase}\n")
            response.force_close()
        response.headers[hdrs.SERVER] = SERVER
        return response


class PlainParseErrors:
    """Protocol factory wrapper: a request aiohttp's parser refuses is answered with its status
    and phrase only (aiohttp's body repeats the offending bytes) and `Server: forward`, and is
    reported to the handler's logger with the parser's exception (its `AppRunner(logger=)`)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def __call__(self) -> Any:
        handler = self._server()
        if type(handler) is RequestHandler:
            handler.__class__ = _PlainParseErrors
        return handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
