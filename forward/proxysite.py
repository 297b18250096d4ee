"""`--proxy-protocol`: listeners that read a PROXY header (proxyproto.py) before anything else.

Behind a TCP load balancer every connection comes from the balancer; the header it writes first
names the client. The header is read before the TLS handshake, and only from a peer that
`--trusted-proxy` names (a peer on the `--listen-unix` socket is a local process and trusted, as
for X-Forwarded-For): any other peer, a missing, malformed or unsupported header, or one not
complete within `--header-timeout`, closes the connection with one log line naming the peer,
before aiohttp, and so R, ever sees it. The header's source then becomes the connection's peer
for aiohttp (`aiohttp_private.set_peer`), which makes it `request.remote`, the one place every
client address in forward is read from: per-client caps, IP rules, logs, X-Real-IP for `.R`
scripts, a resumed session's client.

A plain listener keeps the event loop's own accept loop: a first protocol collects the header
from what it reads, then hands the transport and the bytes after the header to aiohttp's
handler (`set_protocol`), so a connection costs one object more for the header's time only. A
TLS handshake cannot be given bytes already read, so a TLS listener accepts in a loop of its own
(tls.Acceptor, as without the header) and peeks: it consumes exactly the header
(`proxyproto.take`), and the ClientHello is still in the socket when the handshake starts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from . import aiohttp_private, tls
from .aiohttp_private import AcceptingSite
from .listeners import wait_ready
from .proxyproto import MAX_HEADER, ProxyHeader, ProxyProtocolError, parse, take
from .ulog import host_port

log = logging.getLogger(__name__)

Trusts = Callable[[str | None], bool]
Factory = Callable[[], asyncio.Protocol]


def proxy_site(
    runner: web.BaseRunner,
    sock: socket.socket,
    listener: str,
    trusts: Trusts,
    timeout: float,
    contexts: tls.ContextSource | None = None,
) -> web.BaseSite:
    """A listener (-p, -w, --listen-unix) whose connections begin with a PROXY header.
    `trusts(peer address)` says who may send one; `timeout` (seconds, 0: none) bounds the wait
    for it; `contexts` gives the TLS context of the moment, None for plain HTTP."""
    gate = _Gate(listener, trusts, timeout)
    if contexts is None:
        return _PlainSite(runner, sock, gate)
    return _TLSSite(runner, sock, gate, contexts)


@dataclass(frozen=True, slots=True)
class _Gate:
    listener: str
    trusts: Trusts
    timeout: float

    def check(self, address: str | None) -> None:
        if address is None or not self.trusts(address):
            raise ProxyProtocolError(
                "not a --trusted-proxy, and this listener takes connections only through one "
                "(--proxy-protocol)"
            )

    def refused(self, peer: str, why: object) -> None:
        log.warning("closed connection from %s on %s: %s", peer, self.listener, why)

    def late(self) -> ProxyProtocolError:
        return _late(self.timeout)


def _late(within: float) -> ProxyProtocolError:
    return ProxyProtocolError(f"no complete PROXY header within {within:g} s (--header-timeout)")


# -- plain HTTP: asyncio's accept loop, the header read by a first protocol ---------------------


class _PlainSite(aiohttp_private.WrappingSite):
    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: _Gate) -> None:
        super().__init__(runner, sock)
        self._gate = gate

    def wrap(self, factory: Factory) -> Factory:
        gate = self._gate
        return lambda: _HeaderFirst(factory, gate)


class _HeaderFirst(asyncio.Protocol):
    """A plain connection's protocol until its PROXY header is complete; then the connection
    goes to aiohttp's handler (`set_protocol`) with the bytes that followed the header, and
    this object is done with. Buffered: at most `MAX_HEADER` bytes and one read."""

    __slots__ = ("_buffer", "_factory", "_gate", "_peer", "_timer", "_transport")

    def __init__(self, factory: Factory, gate: _Gate) -> None:
        self._factory = factory
        self._gate = gate
        self._buffer = b""
        self._peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they are ones.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        address, self._peer = tls.peer(sock) if sock is not None else (None, "?")
        try:
            self._gate.check(address)
        except ProxyProtocolError as exc:
            self._refuse(exc)
            return
        if self._gate.timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(
                self._gate.timeout, lambda: self._refuse(self._gate.late())
            )

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._buffer += data
        try:
            header = parse(self._buffer)
        except ProxyProtocolError as exc:
            self._refuse(exc)
            return
        if header is None:
            return
        self._stop_timer()
        rest, self._buffer, self._transport = self._buffer[header.length :], b"", None
        handler = self._factory()
        if header.source is not None:
            aiohttp_private.set_peer(handler, header.source)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if rest:
            handler.data_received(rest)

    def eof_received(self) -> bool:
        self._refuse(
            ProxyProtocolError(
                "the connection ended inside its PROXY header"
                if self._buffer
                else "the connection ended before a PROXY header"
            )
        )
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self._transport = None

    def _refuse(self, why: ProxyProtocolError) -> None:
        self._stop_timer()
        transport, self._transport = self._transport, None
        if transport is not None:
            self._gate.refused(self._peer, why)
            transport.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# -- TLS: an accept loop of our own, the header peeked and consumed before the handshake --------


class _TLSSite(AcceptingSite):
    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        gate: _Gate,
        contexts: tls.ContextSource,
    ) -> None:
        super().__init__(runner, sock, ssl_context=contexts())
        self._gate = gate
        self._contexts = contexts

    def accept(self, sock: socket.socket, factory: Factory) -> asyncio.AbstractServer:
        async def connect(conn: socket.socket) -> None:
            await self._connect(conn, factory)

        return tls.Acceptor(sock, connect, self._gate.listener)

    async def _connect(self, conn: socket.socket, factory: Factory) -> None:
        address, peer = tls.peer(conn)
        try:
            self._gate.check(address)
            header = await read_header(conn, self._gate.timeout)
        except ProxyProtocolError as exc:
            self._gate.refused(peer, exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        source = header.source
        if source is not None:
            factory = _reporting(factory, source)
            peer = f"{host_port(*source)} (through {peer})"
        await tls.handshake(factory, conn, self._contexts(), self._gate.listener, peer)


async def read_header(conn: socket.socket, within: float) -> ProxyHeader:
    """The PROXY header at the start of `conn` (non-blocking), consumed and nothing more;
    ProxyProtocolError when it is not one, the peer stops before its end, or `within` seconds
    (0: no limit) pass first."""
    consumed = b""
    try:
        async with asyncio.timeout(within or None):
            while True:
                try:
                    available = conn.recv(MAX_HEADER - len(consumed), socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    await wait_ready(conn)
                    continue
                if not available:
                    raise ProxyProtocolError(
                        "the connection ended inside its PROXY header"
                        if consumed
                        else "the connection ended before a PROXY header"
                    )
                header, used = take(consumed, available)
                # Peeked, so there; never more than the header's own bytes.
                consumed += conn.recv(used)
                if header is not None:
                    return header
    except TimeoutError:
        raise _late(within) from None
    except OSError as exc:
        raise ProxyProtocolError(f"the connection failed before its PROXY header: {exc}") from None


def _reporting(factory: Factory, source: tuple[str, int]) -> Factory:
    def make() -> asyncio.Protocol:
        handler = factory()
        aiohttp_private.set_peer(handler, source)
        return handler

    return make
