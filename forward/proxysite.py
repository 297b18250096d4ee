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

The reader peeks and consumes exactly the header (`proxyproto.take`), so the client's first
byte, a TLS ClientHello or a request line, is still in the socket when the event loop takes the
connection over: nothing read has to be handed across.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from aiohttp import web

from . import aiohttp_private, tls
from .aiohttp_private import AcceptingSite
from .proxyproto import MAX_HEADER, ProxyHeader, ProxyProtocolError, take
from .ulog import host_port

log = logging.getLogger(__name__)

Trusts = Callable[[str | None], bool]


class ProxySite(AcceptingSite):
    """A listener (-p, -w, --listen-unix; plain or TLS) whose connections begin with a PROXY
    header. `trusts(peer address)` says who may send one; `timeout` (seconds, 0: none) bounds
    the wait for it; `contexts` gives the TLS context of the moment, None for plain HTTP."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        listener: str,
        trusts: Trusts,
        timeout: float,
        contexts: tls.ContextSource | None = None,
    ) -> None:
        super().__init__(runner, sock, ssl_context=contexts() if contexts else None)
        self._listener = listener
        self._trusts = trusts
        self._timeout = timeout
        self._contexts = contexts

    def accept(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.AbstractServer:
        async def connect(conn: socket.socket) -> None:
            await self._connect(conn, factory)

        return tls.Acceptor(sock, connect, self._listener)

    async def _connect(self, conn: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        address, peer = _peer(conn)
        try:
            if address is None or not self._trusts(address):
                raise ProxyProtocolError(
                    "not a --trusted-proxy, and this listener takes connections only through "
                    "one (--proxy-protocol)"
                )
            header = await read_header(conn, self._timeout)
        except ProxyProtocolError as exc:
            log.warning("closed connection from %s on %s: %s", peer, self._listener, exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        source = header.source
        if source is not None:
            factory = _reporting(factory, source)
            peer = f"{host_port(*source)} (through {peer})"
        if self._contexts is not None:
            await tls.handshake(factory, conn, self._contexts(), self._listener, peer)
            return
        try:
            await asyncio.get_running_loop().connect_accepted_socket(factory, conn)
        except OSError as exc:
            log.info("connection from %s on %s failed: %s", peer, self._listener, exc)
            conn.close()
        except BaseException:
            conn.close()
            raise


async def read_header(conn: socket.socket, within: float) -> ProxyHeader:
    """The PROXY header at the start of `conn` (non-blocking), consumed and nothing more;
    ProxyProtocolError when it is not one, the peer stops before its end, or `within` seconds
    (0: no limit) pass first."""
    loop = asyncio.get_running_loop()
    consumed = b""
    try:
        async with asyncio.timeout(within or None):
            while True:
                try:
                    available = conn.recv(MAX_HEADER - len(consumed), socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    await _readable(loop, conn)
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
        raise ProxyProtocolError(
            f"no complete PROXY header within {within:g} s (--header-timeout)"
        ) from None
    except OSError as exc:
        raise ProxyProtocolError(f"the connection failed before its PROXY header: {exc}") from None


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _reporting(
    factory: Callable[[], asyncio.Protocol], source: tuple[str, int]
) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        handler = factory()
        aiohttp_private.set_peer(handler, source)
        return handler

    return make


def _peer(conn: socket.socket) -> tuple[str | None, str]:
    """(the address `--trusted-proxy` is checked against, the peer for a log line); a peer on
    a unix socket has the address "" (trusted as local), one that already left None."""
    try:
        addr = conn.getpeername()
    except OSError:
        return None, "a peer that left"
    if conn.family == socket.AF_UNIX:
        return "", f"the unix socket {conn.getsockname() or ''}".rstrip()
    return str(addr[0]), host_port(str(addr[0]), int(addr[1]))
