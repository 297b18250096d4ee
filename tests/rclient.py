"""A small QAP-over-WebSocket client for the tests, speaking to forward as rserve.js does."""

from __future__ import annotations

import itertools
import ssl
from dataclasses import dataclass, field

import aiohttp

from forward import qap, rexp
from forward.qap import Cmd, Header
from forward.rexp import RObj


class RError(Exception):
    def __init__(self, header: Header, payload: bytes) -> None:
        super().__init__(f"R answered cmd=0x{header.cmd:x} (status 0x{header.cmd >> 24:x})")
        self.header = header
        self.payload = payload

    @property
    def status(self) -> int:
        return self.header.cmd >> 24


@dataclass
class Reply:
    header: Header
    payload: bytes

    def value(self) -> RObj:
        for kind, body in rexp.params(self.payload):
            if kind == qap.Dt.SEXP:
                return rexp.decode(body)
        raise AssertionError("reply has no SEXP parameter")


@dataclass
class RClient:
    ws: aiohttp.ClientWebSocketResponse
    session: aiohttp.ClientSession
    greeting: bytes | str = b""
    oob: list[Reply] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        local_addr: str | None = None,
        **kw: object,
    ) -> RClient:
        """`local_addr`: the address to connect from (127.0.0.2, ... on loopback)."""
        connector = aiohttp.TCPConnector(local_addr=(local_addr, 0)) if local_addr else None
        session = aiohttp.ClientSession(connector=connector)
        try:
            ws = await session.ws_connect(url, ssl=ssl_context or True, max_msg_size=0, **kw)  # type: ignore[arg-type]
        except BaseException:
            await session.close()
            raise
        client = cls(ws, session)
        first = await ws.receive()
        if first.type is aiohttp.WSMsgType.TEXT or first.type is aiohttp.WSMsgType.BINARY:
            client.greeting = first.data
        else:
            await client.close()
            raise ConnectionError(f"no greeting: {first.type} {ws.close_code} {first.extra}")
        return client

    @property
    def capability(self) -> RObj:
        """OCAP mode: the object oc.init returned, from the RsOC greeting."""
        assert isinstance(self.greeting, bytes)
        return Reply(Header.parse(self.greeting[:16]), self.greeting[16:]).value()

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()

    async def __aenter__(self) -> RClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, cmd: int, payload: bytes, msg_id: int | None = None) -> int:
        mid = next(self._ids) if msg_id is None else msg_id
        await self.ws.send_bytes(Header(cmd, len(payload), mid).encode() + payload)
        return mid

    async def receive(self) -> Reply:
        msg = await self.ws.receive()
        if msg.type is not aiohttp.WSMsgType.BINARY:
            raise ConnectionError(
                f"expected a binary frame, got {msg.type} {msg.data!r} {msg.extra!r}"
            )
        data: bytes = msg.data
        header = Header.parse(data[:16])
        assert len(data) == 16 + header.length, "one QAP message per WebSocket message"
        return Reply(header, data[16:])

    async def response(self) -> Reply:
        """The next response, collecting OOB messages that come before it."""
        while True:
            reply = await self.receive()
            if qap.is_response(reply.header.cmd):
                if reply.header.cmd & 0xFFFF != Cmd.RESP_OK & 0xFFFF:
                    raise RError(reply.header, reply.payload)
                return reply
            self.oob.append(reply)

    async def eval(self, expr: str) -> RObj:
        await self.send(Cmd.EVAL, rexp.string_param(expr))
        return (await self.response()).value()

    async def assign(self, name: str, value: RObj) -> None:
        await self.send(Cmd.SET_SEXP, rexp.string_param(name) + rexp.sexp_param(value))
        await self.response()

    async def call(self, ocap: RObj, *args: RObj) -> RObj:
        await self.send(Cmd.OC_CALL, rexp.sexp_param(rexp.call(ocap, *args)))
        return (await self.response()).value()
