"""QAP1, the wire protocol of Rserve, as pure code: bytes in, events out.

Nothing here touches a socket, an event loop or a logger (the h11/wsproto rule). The relay feeds
what it reads into a `ServerStream` (Rserve -> browser) or a `ClientStream` (browser -> Rserve)
and acts on the `Chunk`s that come out. Payloads are never collected: a chunk is a slice of the
bytes just fed, so a header announcing 100 GB costs 16 bytes of buffer, not 100 GB. Limits are
checked on the header, before a single payload byte is passed on.

Reference: Rserve's src/Rsrv.h (message header, command and error codes) and src/proxy/forward.c
(greeting handling, the idle heartbeat, the connection-broken answer).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .wsframe import CloseReason

# cmd, len (low 32 bits), msg_id, len_hi (high 32 bits); little-endian (Rsrv.h: struct phdr).
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size
# "Rsrv0103QAP1\r\n\r\n--------------\r\n": the classic-mode ID string is 32 bytes.
ID_STRING_SIZE = 32


class Cmd(enum.IntEnum):
    """Command and response codes (Rsrv.h)."""

    LOGIN = 0x001
    EVAL = 0x003
    SHUTDOWN = 0x004
    OC_CALL = 0x00F
    SET_SEXP = 0x020
    RESP_OK = 0x10001
    RESP_ERR = 0x10002
    OOB_SEND = 0x21000
    OOB_MSG = 0x22000
    # An OCAP-mode greeting is a QAP message whose cmd field spells "RsOC".
    OC_INIT = 0x434F7352


CMD_RESP = 0x10000
CMD_OOB = 0x20000
ERR_CONN_BROKEN = 0x42


class Dt(enum.IntEnum):
    """Parameter types of a message payload (Rsrv.h DT_*)."""

    INT = 1
    STRING = 4
    BYTESTREAM = 5
    SEXP = 10
    LARGE = 64  # flag: the parameter header is 8 bytes with a 56-bit length


class Xt(enum.IntEnum):
    """R expression types (Rsrv.h XT_*) used by forward itself."""

    NULL = 0
    STR = 3
    S4 = 7
    VECTOR = 16
    CLOS = 18
    SYMNAME = 19
    LIST_NOTAG = 20
    LIST_TAG = 21
    LANG_NOTAG = 22
    LANG_TAG = 23
    VECTOR_EXP = 26
    ARRAY_INT = 32
    ARRAY_DOUBLE = 33
    ARRAY_STR = 34
    ARRAY_BOOL = 36
    RAW = 37
    ARRAY_CPLX = 38
    UNKNOWN = 48
    LARGE = 64  # flag
    HAS_ATTR = 128  # flag


class Mode(enum.Enum):
    """What the first bytes from Rserve say about the session."""

    QAP = "QAP"  # classic: a 32-byte ID string, then request/response
    OCAP = "OCAP"  # object capabilities: strictly QAP messages from the first byte


class QAPError(Exception):
    """A protocol violation. `close_code` is the WebSocket close code it maps to."""

    close_code = CloseReason.PROTOCOL_ERROR

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GreetingError(QAPError):
    """Rserve's first bytes are not a greeting forward can relay."""

    close_code = CloseReason.INTERNAL_ERROR


class MessageTooLarge(QAPError):
    close_code = CloseReason.MESSAGE_TOO_BIG


@dataclass(frozen=True, slots=True)
class Header:
    cmd: int
    length: int  # payload length, 64-bit
    msg_id: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Header:
        cmd, lo, msg_id, hi = HEADER.unpack(data)
        return cls(cmd, lo | (hi << 32), msg_id)

    def encode(self) -> bytes:
        return HEADER.pack(
            self.cmd, self.length & 0xFFFFFFFF, self.msg_id, (self.length >> 32) & 0xFFFFFFFF
        )


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one QAP message, in stream order.

    `first` marks the chunk that starts with the 16 header bytes, `last` the one that completes
    the message. A small message arriving whole is a single chunk with both set.
    """

    header: Header
    data: bytes | memoryview
    first: bool
    last: bool


@dataclass(frozen=True, slots=True)
class Greeting:
    """The session's mode, decided by Rserve's first bytes.

    `data` is the classic-mode ID string, which the browser must get as one text frame; it is
    empty in OCAP mode, where the greeting is an ordinary QAP message that follows as chunks.
    """

    mode: Mode
    data: bytes


def is_response(cmd: int) -> bool:
    """A reply, not a request: RESP_OK/RESP_ERR from R (an error code may sit in the top byte),
    or the browser's answer to an OOB_MSG (its cmd with RESP_OK or RESP_ERR added)."""
    return bool(cmd & CMD_RESP)


def is_oob(cmd: int) -> bool:
    """An out-of-band message from R: OOB_SEND or OOB_MSG, whose low 12 bits are the
    application's own code (Rsrv.h: CMD_OOB)."""
    return cmd & 0xFFFF0000 == CMD_OOB


def is_oob_send(cmd: int) -> bool:
    """An OOB_SEND: R tells the client something and expects no answer."""
    return cmd & 0xFFFFF000 == Cmd.OOB_SEND


def error_code(cmd: int) -> int | None:
    """The Rserve error code of a RESP_ERR response (in the top byte, Rsrv.h: CMD_STAT; 0 when
    R gave none), or None when `cmd` is not an error response."""
    return cmd >> 24 if cmd & 0xFFFFFF == Cmd.RESP_ERR else None


def conn_broken(msg_id: int) -> bytes:
    """The answer to a request that can no longer reach R (forward.c: SET_STAT(RESP_ERR, ...))."""
    return Header(Cmd.RESP_ERR | (ERR_CONN_BROKEN << 24), 0, msg_id).encode()


# A bare OOB_SEND header: the C forward's notice that it is shutting the session down.
SHUTDOWN_NOTICE = Header(Cmd.OOB_SEND, 0, 0).encode()


def _par(ptype: int, length: int) -> int:
    return ptype | (length << 8)


# list("idle") as an OOB_SEND message, byte for byte what forward.c's heartbeat thread sends:
# DT_SEXP(16) > XT_VECTOR(12) > XT_ARRAY_STR(8) "idle\0" padded with \1.
IDLE_MESSAGE = Header(Cmd.OOB_SEND, 20, 0).encode() + struct.pack(
    "<III8s", _par(Dt.SEXP, 16), _par(Xt.VECTOR, 12), _par(Xt.ARRAY_STR, 8), b"idle\0\1\1\1"
)


def classify_greeting(first: bytes | bytearray | memoryview) -> Mode:
    """Decide the session mode from Rserve's first 16 bytes (forward.c: qap_stage 0)."""
    tag = bytes(first[:4])
    if tag == b"Rsrv" and bytes(first[8:12]) == b"QAP1":
        return Mode.QAP
    if tag == b"RsOC":
        return Mode.OCAP
    if tag == b"RSpx":
        raise GreetingError("Rserve speaks the RSpx proxy protocol, which forward does not relay")
    raise GreetingError(f"not an Rserve greeting: {bytes(first[:16])!r}")


class _Framer:
    """Splits a byte stream into QAP messages; shared core of both directions.

    Only an incomplete header is buffered (at most 15 bytes); payload bytes are passed through as
    slices of the input. `max_size` bounds the announced payload length.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self._max_size = max_size
        self._head = bytearray()
        self._header: Header | None = None
        self._remaining = 0
        self.messages = 0

    @property
    def in_message(self) -> bool:
        """True between a message's first and last byte (a partial header counts)."""
        return self._header is not None or bool(self._head)

    def snapshot(self) -> dict[str, object]:
        """Where the stream is, as JSON-able values (a hand-over to another process)."""
        header = self._header
        return {
            "head": self._head.hex(),
            "header": header.encode().hex() if header is not None else None,
            "remaining": self._remaining,
            "messages": self.messages,
        }

    def restore(self, state: dict[str, object]) -> None:
        """Carry on where `snapshot` was taken (its values checked: they come from outside)."""
        head = bytes.fromhex(str(state["head"]))
        header = state["header"]
        remaining = state["remaining"]
        messages = state["messages"]
        if len(head) >= HEADER_SIZE or type(remaining) is not int or type(messages) is not int:
            raise ValueError("not a stream state")
        self._head = bytearray(head)
        self._header = Header.parse(bytes.fromhex(str(header))) if header is not None else None
        if (self._header is None) != (remaining == 0) or remaining < 0:
            raise ValueError("not a stream state")
        self._remaining = remaining
        self.messages = messages

    def _check(self, header: Header) -> Header:
        if self._max_size is not None and header.length > self._max_size:
            raise MessageTooLarge(
                f"message of {header.length} bytes exceeds the limit of {self._max_size}"
            )
        return header

    def whole(self, data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
        """(cmd, msg_id) when `data` is exactly one whole message starting where a message
        starts, within the limit, and then taken as `feed` would take it; otherwise None and
        nothing taken (use `feed`). A small message arriving in one read is the common case,
        and this costs no generator, header or chunk object."""
        if self._header is not None or self._head or len(data) < HEADER_SIZE:
            return None
        cmd, length, msg_id, high = HEADER.unpack_from(data)
        if high or HEADER_SIZE + length != len(data):
            return None
        if self._max_size is not None and length > self._max_size:
            return None  # `feed` raises, with every detail
        self.messages += 1
        return cmd, msg_id

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Chunk]:
        """Chunks of `data` in order. A header over the limit raises `MessageTooLarge` right
        where it stands, after every chunk before it was taken, and nothing of it is passed on."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            header = self._header
            if header is None:
                if not self._head and end - pos >= HEADER_SIZE:
                    # The usual case: the whole header is in this input, so header and payload
                    # leave as one slice of it, without a copy.
                    header = self._check(Header.parse(view[pos : pos + HEADER_SIZE]))
                    piece: bytes | memoryview
                    take = min(header.length, end - pos - HEADER_SIZE)
                    piece = view[pos : pos + HEADER_SIZE + take]
                    pos += HEADER_SIZE + take
                else:
                    need = HEADER_SIZE - len(self._head)
                    self._head += view[pos : pos + need]
                    pos += min(need, end - pos)
                    if len(self._head) < HEADER_SIZE:
                        break
                    header = self._check(Header.parse(self._head))
                    piece = bytes(self._head)
                    self._head.clear()
                    take = 0  # the payload follows as chunks of its own
                last = take == header.length
                yield Chunk(header, piece, True, last)
                if last:
                    self.messages += 1
                else:
                    self._header, self._remaining = header, header.length - take
            else:
                take = min(self._remaining, end - pos)
                self._remaining -= take
                last = self._remaining == 0
                pos += take
                yield Chunk(header, view[pos - take : pos], False, last)
                if last:
                    self._header = None
                    self.messages += 1


class ClientStream(_Framer):
    """Browser -> Rserve: the browser's WebSocket data is one byte stream of QAP messages."""


class ServerStream:
    """Rserve -> browser: the greeting, then QAP messages.

    `feed` yields a `Greeting` once, as soon as the mode is known, then message chunks.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self.mode: Mode | None = None
        self._pending = bytearray()
        self._framer = _Framer(max_size)

    @property
    def in_message(self) -> bool:
        return self.mode is None or self._framer.in_message

    @property
    def messages(self) -> int:
        return self._framer.messages

    def snapshot(self) -> dict[str, object]:
        return {
            "mode": self.mode.value if self.mode is not None else None,
            "pending": self._pending.hex(),
            "framer": self._framer.snapshot(),
        }

    def restore(self, state: dict[str, object]) -> None:
        mode = state["mode"]
        framer = state["framer"]
        if not isinstance(framer, dict):
            raise ValueError("not a stream state")
        self.mode = Mode(mode) if mode is not None else None
        self._pending = bytearray.fromhex(str(state["pending"]))
        self._framer.restore(framer)

    def whole(self, data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
        """As `_Framer.whole`, once the greeting is past."""
        return self._framer.whole(data) if self.mode is not None else None

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Greeting | Chunk]:
        if self.mode is not None:
            yield from self._framer.feed(data)
            return
        self._pending += data
        if len(self._pending) < HEADER_SIZE:
            return
        mode = classify_greeting(self._pending)
        if mode is Mode.QAP and len(self._pending) < ID_STRING_SIZE:
            return
        self.mode = mode
        rest = bytes(self._pending)
        self._pending.clear()
        if mode is Mode.QAP:
            yield Greeting(mode, rest[:ID_STRING_SIZE])
            rest = rest[ID_STRING_SIZE:]
        else:
            yield Greeting(mode, b"")
        if rest:
            yield from self._framer.feed(rest)
