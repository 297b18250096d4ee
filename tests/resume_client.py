"""A client of forward's resume protocol (docs/resume.md) for the tests, written from the
document alone: it counts both streams, acknowledges, keeps what it sent until forward has it,
and reconnects with its ticket. Its QAP messages come from R's stream reassembled by qap.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from typing import Any

import aiohttp

from forward import qap, rexp
from forward.resume import PROTOCOL, ResumeClose, ticket_token

from .rclient import Reply


class Gone(Exception):
    """forward ended the session: `code` is its close code."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def ends_session(code: int | None) -> bool:
    """A close code after which there is nothing to resume (4100 asks for a resume now)."""
    return code is not None and (code == 1000 or (code >= 4000 and code != ResumeClose.RESUME))


class ResumeClient:
    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        origin: str | None = None,
        protocols: tuple[str, ...] = (),
    ) -> None:
        self.url = url
        self.ssl = ssl_context
        self.origin = origin
        self.protocols = protocols
        self.session = aiohttp.ClientSession()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ticket: str | None = None
        self.window = 0
        self.grace = 0.0
        self.stream = bytearray()  # R's stream, every byte received
        self.acked = 0  # our last ack
        self.outbox = bytearray()  # what we sent that forward has not acknowledged
        self.out_base = 0  # the count of our stream where `outbox` starts
        self.sent = 0
        self.resumes = 0
        self.controls: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.chosen: str | None = None
        self._parser = qap.ServerStream(None)
        self.greeting: bytes | None = None
        self.messages: list[Reply] = []
        self._body = bytearray()
        self._header: qap.Header | None = None
        self._reader: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._acking: asyncio.Future[None] | None = None
        self._all: list[aiohttp.ClientWebSocketResponse] = []  # every connection, released at close

    # -- connections -----------------------------------------------------------------------

    async def connect(self, *extra: str) -> None:
        """A new connection: the first, or a resume when a ticket is held."""
        offered = [*self.protocols, PROTOCOL, *extra]
        if self.ticket is not None:
            offered.append(ticket_token(self.ticket, len(self.stream)))
        headers = {"Origin": self.origin} if self.origin else {}
        ws = await self.session.ws_connect(
            self.url,
            protocols=offered,
            ssl=self.ssl or True,
            headers=headers,
            max_msg_size=0,
            autoping=True,
        )
        self.chosen = ws.protocol
        self.ws = ws
        self._all.append(ws)
        first = await ws.receive()
        if first.type is not aiohttp.WSMsgType.TEXT:
            code = ws.close_code
            await ws.close()
            self.ws = None
            if first.type is aiohttp.WSMsgType.CLOSE and code is not None and code >= 4000:
                raise Gone(code, f"refused: {first.extra!r}")
            raise ConnectionError(f"no control message first: {first.type!r} {first.extra!r}")
        control = json.loads(first.data)
        self.controls.append(control)
        self.ticket, self.window, self.grace = (
            control["ticket"],
            control["window"],
            control["grace"],
        )
        if control["t"] == "resumed":
            self.resumes += 1
            self._acknowledged(control["received"])
            if self.outbox:  # resend what forward does not have
                await ws.send_bytes(bytes(self.outbox))
        else:
            assert control["t"] == "open", control
        self._reader = asyncio.create_task(self._read(ws))

    async def resume(self, attempts: int = 200, delay: float = 0.05) -> None:
        """Reconnect until it works (the network may be down for a while)."""
        await self.drop()
        for _ in range(attempts):
            try:
                await self.connect()
                return
            except (aiohttp.ClientError, OSError):
                await asyncio.sleep(delay)
        raise TimeoutError("could not resume")

    async def drop(self) -> None:
        """Forget the current connection (after a cut), without a close frame."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        ws, self.ws = self.ws, None
        if ws is not None:
            connection = ws._response.connection
            if not ws.closed and connection is not None and connection.transport is not None:
                connection.transport.abort()  # a cut: no close frame
            ws._response.close()  # aiohttp lets go of the connection, closed or not

    async def close(self) -> None:
        """A clean close: the session ends. With the connection down, the client resumes once
        to say so, as docs/resume.md asks (otherwise the session would wait out its grace)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        reader = self._reader
        live = self.ws is not None and not self.ws.closed and reader is not None
        if not live and self.ticket is not None and not self._gone():
            await self.drop()
            with contextlib.suppress(Gone, aiohttp.ClientError, OSError):
                await self.connect()
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
            if self.ws.close_code != 1000 and not self._gone():
                # The close never got its answer (the network broke on it): say it again.
                await self.drop()
                with contextlib.suppress(Gone, aiohttp.ClientError, OSError):
                    await self.connect()
                    await self.ws.close()  # type: ignore[union-attr]
        await self.drop()
        for old in self._all:
            old._response.close()  # a cut connection's too, whatever state aiohttp left it in
        await self.session.close()

    def _gone(self) -> bool:
        return ends_session(self.close_code)

    # -- data ------------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        self.outbox += data
        self.sent += len(data)
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(data)

    async def eval(self, expr: str, msg_id: int = 0) -> None:
        payload = rexp.string_param(expr)
        await self.send(qap.Header(qap.Cmd.EVAL, len(payload), msg_id).encode() + payload)

    async def wait_messages(self, n: int) -> list[Reply]:
        """Wait until `n` QAP messages (besides a classic greeting) have arrived, resuming
        whenever the connection breaks."""
        while len(self.messages) < n:
            self._arrived.clear()
            reader = self._reader
            waiter = asyncio.ensure_future(self._arrived.wait())
            waits: set[asyncio.Future[Any]] = {waiter}
            if reader is not None:
                waits.add(reader)
            done, _ = await asyncio.wait(waits, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not done:
                raise TimeoutError(f"{len(self.messages)} of {n} messages after 60 s")
            if reader is not None and reader in done:
                self._reader = None
                exc = reader.exception()
                if isinstance(exc, Gone):
                    raise exc
                await self.resume()
        return self.messages[:n]

    def values(self) -> list[Any]:
        return [reply.value().value for reply in self.messages]

    # -- internals ---------------------------------------------------------------------------

    def _acknowledged(self, received: int) -> None:
        drop = received - self.out_base
        assert 0 <= drop <= len(self.outbox), (received, self.out_base, len(self.outbox))
        del self.outbox[:drop]
        self.out_base = received

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                control = json.loads(msg.data)
                self.controls.append(control)
                if control.get("t") == "ack":
                    self._acknowledged(control["received"])
            elif msg.type is aiohttp.WSMsgType.BINARY:
                self._data(msg.data)
                if len(self.stream) - self.acked >= self.window // 4:
                    await self._ack()
                elif self._ack_timer is None:
                    loop = asyncio.get_running_loop()
                    self._ack_timer = loop.call_later(0.25, self._ack_later)
        self.close_code = ws.close_code
        code = ws.close_code
        if ends_session(code):
            raise Gone(code, "closed by forward")

    def _ack_later(self) -> None:
        self._ack_timer = None
        if self.ws is not None and len(self.stream) > self.acked:
            self._acking = asyncio.ensure_future(self._ack())

    async def _ack(self) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        self.acked = len(self.stream)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_str(json.dumps({"t": "ack", "received": self.acked}))

    def _data(self, data: bytes) -> None:
        self.stream += data
        for item in self._parser.feed(data):
            if isinstance(item, qap.Greeting):
                self.greeting = bytes(item.data)
                continue
            if item.first:
                self._header = item.header
                self._body = bytearray()
            self._body += item.data
            if item.last:
                assert self._header is not None
                self.messages.append(Reply(self._header, bytes(self._body[16:])))
        self._arrived.set()
