"""The browser's end of a session after the WebSocket upgrade: a small asyncio Protocol.

aiohttp parses the upgrade request and runs the checks (origin, addresses, client certificate);
then `accept` writes the 101 answer itself and takes the connection away from aiohttp
(`transport.set_protocol`). From there a `ServerWebSocket` reads frames with `wsframe`, answers
pings, runs the close handshake and the keep-alive pings, and hands data to its handler from the
transport's callback. An aiohttp `WebSocketResponse` would keep the request, its handler task, a
reader and a message queue alive for the whole session (about 10 KB of a session's 16) and add a
task switch to every message; this keeps only what a relay needs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from typing import TYPE_CHECKING, Protocol

from aiohttp import hdrs, web

from . import aiohttp_private, wsframe
from .guard import shown
from .wsframe import Close, CloseReason, Opcode, Ping, ProtocolError, Text

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# How long a close we started waits for the browser's answer before the connection is dropped
# (aiohttp's WebSocketResponse waits as long).
CLOSE_TIMEOUT = 10.0
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

# Why reading from the browser is held back; reading resumes when no reason is left.
HOLD_CONNECTING = 1  # the session's Rserve connection is not made yet
HOLD_BACKEND_FULL = 2  # Rserve's socket buffer is full: let TCP push back on the browser
# The browser does not read what we send (its pongs, R's answers, conn_broken answers): stop
# reading what it sends too, or a peer that only writes (pings) could grow our buffer unbounded.
HOLD_BROWSER_FULL = 4
# The session is being handed over to another process: what the browser sends now is sent
# again to the next process (it counts from what forward acknowledged).
HOLD_HANDOVER = 8


class Handler(Protocol):
    def ws_data(self, data: bytearray) -> None: ...

    # A piece of a text message; only for a WebSocket started with `split_text`.
    def ws_text(self, data: bytearray, final: bool) -> None: ...

    # The browser broke the protocol; the WebSocket closes with `code` right after this.
    def ws_error(self, code: CloseReason, reason: str) -> None: ...
    def ws_pause_writing(self) -> None: ...
    def ws_resume_writing(self) -> None: ...
    def ws_closed(self, why: str) -> None: ...


def handshake(request: web.Request, protocol: str | None = None) -> bytes:
    """The 101 answer to a WebSocket upgrade request (RFC 6455 section 4.2), or an HTTP error.

    The answer names `protocol`, by default the first subprotocol the browser offered, like the
    C forward (a browser that offered some fails a handshake that names none); no
    extension is accepted (permessage-deflate would cost CPU and memory on every session and
    QAP payloads are mostly binary)."""
    headers = request.headers
    # Sent more than once, the values are read as one list (RFC 9110 section 5.3): `13` then
    # `8` is `13, 8`, which asks for a version this server does not speak.
    version = ", ".join(headers.getall(hdrs.SEC_WEBSOCKET_VERSION, ()))
    if version != "13":
        raise web.HTTPUpgradeRequired(
            text=f"Unsupported WebSocket version {shown(version, 40) or '(none)'}: "
            "this server speaks 13.\n",
            headers={hdrs.SEC_WEBSOCKET_VERSION: "13", hdrs.UPGRADE: "websocket"},
        )
    keys = headers.getall(hdrs.SEC_WEBSOCKET_KEY, ())
    if len(keys) > 1:  # RFC 6455 section 11.3.1: it must not appear more than once
        raise web.HTTPBadRequest(text="Bad WebSocket handshake: Sec-WebSocket-Key sent twice.\n")
    key = keys[0].strip() if keys else ""
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:  # binascii.Error, or a key that is not ASCII
        valid = False
    if not valid:
        raise web.HTTPBadRequest(text="Bad WebSocket handshake: invalid Sec-WebSocket-Key.\n")
    accept = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept,
    ]
    if protocol is None:
        protocol = first_subprotocol(request)
    if protocol:
        if not set(protocol) <= _TOKEN_CHARS:
            raise web.HTTPBadRequest(text="Bad WebSocket handshake: invalid subprotocol name.\n")
        lines.append(b"Sec-WebSocket-Protocol: " + protocol.encode())
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def first_subprotocol(request: web.Request) -> str:
    offered = request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "")
    return offered.split(",", 1)[0].strip()


def subprotocols(request: web.Request) -> list[str]:
    """Every subprotocol offered, in order (the header may also be repeated)."""
    return [
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    ]


class NullHandler:
    """The handler of a WebSocket that is only closed (refused, or retired from its session)."""

    def ws_data(self, data: bytearray) -> None:
        pass

    def ws_text(self, data: bytearray, final: bool) -> None:
        pass

    def ws_error(self, code: CloseReason, reason: str) -> None:
        pass

    def ws_pause_writing(self) -> None:
        pass

    def ws_resume_writing(self) -> None:
        pass

    def ws_closed(self, why: str) -> None:
        pass


class Detached(web.StreamResponse):
    """What the request handler returns once the connection is no longer aiohttp's: the access
    log records a 101, and nothing more is written."""

    def __init__(self) -> None:
        super().__init__(status=101)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def take_over(request: web.Request, answer: bytes) -> tuple[asyncio.Transport, bytes]:
    """Write the 101 `answer` and take the connection from aiohttp.

    Returns the transport and the bytes the browser already sent after its request. aiohttp's
    connection handler is told the connection is gone (its transport is set to None, as after a
    disconnect), so when the request handler returns it writes nothing, closes nothing and
    forgets the connection; graceful shutdown is then the session's business."""
    handler: RequestHandler = request.protocol
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the browser left during the upgrade")
    transport.write(answer)
    return transport, aiohttp_private.detach(handler)


class ReadBuffer:
    """A receive buffer shared by every connection of one event loop (`BufferedProtocol`).

    The transport reads into it and the protocol consumes the bytes before returning, so one
    buffer serves all sessions, and a read is not first turned into a new `bytes` object (one copy
    less for every byte relayed). Whoever keeps bytes beyond the callback copies them, or, when a
    transport may still hold a view of the buffer (a write it could not finish), `renew`s it."""

    __slots__ = ("view",)

    SIZE = 256 * 1024

    def __init__(self) -> None:
        self.view = memoryview(bytearray(self.SIZE))

    def renew(self) -> None:
        self.view = memoryview(bytearray(self.SIZE))


class ServerWebSocket(asyncio.BufferedProtocol):
    """One upgraded connection; the session (`Handler`) gets its data and its end."""

    __slots__ = (
        "_close_timer",
        "_handler",
        "_heard",
        "_held_data",
        "_holds",
        "_parser",
        "_ping_interval",
        "_ping_timer",
        "_rbuf",
        "_why",
        "closing",
        "peer_closed",
        "transport",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        handler: Handler,
        buffer: ReadBuffer,
        ping_interval: float = 0.0,
        split_text: bool = False,
    ) -> None:
        self.transport: asyncio.Transport | None = transport
        self._rbuf = buffer  # shared: nothing here may keep a view of it after a callback
        self._handler = handler
        self._parser = wsframe.FrameParser(split_text=split_text)
        self.peer_closed = False  # the browser sent a close frame: it ended the connection
        self._holds = 0
        self._held_data = b""  # what arrived while HOLD_CONNECTING: handled on release
        self.closing = False  # a close frame has been sent: no more data either way
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_interval = ping_interval
        self._ping_timer: asyncio.TimerHandle | None = None
        self._heard = False
        self._why = ""  # how the connection ended, when the browser ended it

    def start(self, tail: bytes, holds: int = 0) -> None:
        """Become the transport's protocol; `tail` is what arrived behind the request."""
        transport = self.transport
        assert transport is not None
        self._holds = holds
        transport.set_protocol(self)
        if self._ping_interval > 0:
            self._ping_timer = asyncio.get_running_loop().call_later(
                self._ping_interval, self._tick
            )
        if tail:
            self.data_received(tail)
        if self._holds:
            transport.pause_reading()
        elif self.transport is not None:
            # aiohttp may have stopped reading when its buffer behind the request filled.
            transport.resume_reading()

    # -- asyncio callbacks -------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._rbuf.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._rbuf.view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        # The frame parser copies what it keeps (payloads are unmasked into new buffers), so
        # `data` may be a view of the shared read buffer.
        self._heard = True
        if self._holds & HOLD_CONNECTING:
            self._held_data += data
            return
        try:
            events = self._parser.feed(data)
        except ProtocolError as exc:
            self._handler.ws_error(exc.code, exc.reason)
            self.close(exc.code, exc.reason)
            # Past a protocol error the rest of the stream means nothing (RFC 6455 section
            # 7.1.7): the close frame is flushed and the connection ends, without waiting.
            if self.transport is not None:
                self.transport.close()
            return
        handler = self._handler
        for event in events:
            if type(event) is bytearray:
                if not self.closing:
                    handler.ws_data(event)
            elif isinstance(event, Ping):
                if not self.closing:
                    self.write(wsframe.control_frame(Opcode.PONG, event.payload))
            elif isinstance(event, Text):
                if not self.closing:
                    handler.ws_text(event.payload, event.final)
            elif isinstance(event, Close):
                self._closed_by_browser(event)
                return
            # A Pong needs nothing more: `_heard` is all it is for.

    def eof_received(self) -> bool:
        return False  # close the transport: a half-closed WebSocket is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for timer in (self._close_timer, self._ping_timer):
            if timer is not None:
                timer.cancel()
        self._close_timer = self._ping_timer = None
        if self._why:
            why = self._why
        elif self.closing:
            why = "closed"
        else:
            why = f"browser went away ({exc})" if exc else "browser went away"
        self._handler.ws_closed(why)

    def pause_writing(self) -> None:
        self.hold(HOLD_BROWSER_FULL)
        self._handler.ws_pause_writing()

    def resume_writing(self) -> None:
        self.release(HOLD_BROWSER_FULL)
        self._handler.ws_resume_writing()

    # -- what the session calls --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def writelines(self, data: tuple[bytes, bytes | bytearray | memoryview]) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(data)

    @property
    def held(self) -> int:
        """The HOLD_* reasons reading from the browser is paused for (0: reading)."""
        return self._holds

    def hold(self, why: int) -> None:
        if not self._holds and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self._holds |= why

    def release(self, why: int) -> None:
        held = self._holds
        self._holds &= ~why
        if held & why & HOLD_CONNECTING and self._held_data:
            data, self._held_data = self._held_data, b""
            self.data_received(data)
        if held and not self._holds and self.transport is not None:
            self.transport.resume_reading()

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake: no data is relayed from here on; the connection ends when
        the browser answers, or after CLOSE_TIMEOUT."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.write(wsframe.close_frame(code, reason))
        if self._holds:
            self._holds = 0
            self._held_data = b""
            self.transport.resume_reading()  # the browser's answer must get through
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def retire(self, code: int, reason: str) -> None:
        """Close this connection for a session that has moved to another one: nothing more of
        it reaches the session, not even its end."""
        self._handler = NullHandler()
        self.close(code, reason)

    # -- internals ---------------------------------------------------------------------------

    def _closed_by_browser(self, event: Close) -> None:
        self.peer_closed = True
        if not self.closing:
            self.closing = True
            self._why = f"browser closed ({event.code or int(CloseReason.NO_STATUS_RCVD)})"
            self.write(wsframe.close_frame(event.code or CloseReason.NORMAL_CLOSURE))
        # The server ends the TCP connection (RFC 6455 section 7.1.1). close() waits until the
        # send buffer is flushed, and a browser that reads nothing never lets it: it gets the
        # close timeout, as every other end does.
        if self.transport is not None:
            self.transport.close()
            if self._close_timer is None:
                self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.abort)

    def _tick(self) -> None:
        # A ping only when the browser has been quiet for a whole interval; anything it sends
        # proves it is there. No answer within half an interval: the peer is gone.
        # While we hold reading back ourselves (R or the browser's own socket is full) its
        # answer could not be read: that is no sign of a dead peer.
        loop = asyncio.get_running_loop()
        if self._heard or self._holds or self.closing:
            self._heard = False
            self._ping_timer = loop.call_later(self._ping_interval, self._tick)
            return
        self.write(wsframe.control_frame(Opcode.PING))
        self._ping_timer = loop.call_later(self._ping_interval / 2, self._check_pong)

    def _check_pong(self) -> None:
        if self._heard or self._holds:
            self._heard = False
            self._ping_timer = asyncio.get_running_loop().call_later(
                self._ping_interval / 2, self._tick
            )
            return
        self._ping_timer = None
        self._why = f"no answer to a ping within {self._ping_interval / 2:g} s"
        self.abort()
