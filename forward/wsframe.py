"""WebSocket framing (RFC 6455 section 5) for the server end of a session, as pure code.

`frame_header` and `close_frame` build what the relay writes: server frames are unmasked, so a
payload goes out as the very bytes Rserve sent, and a large QAP message streams through as one
fragmented message (first frame, continuations, FIN on the last) without being collected first.

`FrameParser` reads what a browser sends: bytes in, events out, no I/O. Data frame payloads are
handed on as they arrive, unmasked, even a part of a frame at a time: the relay only needs the
byte stream (QAP has its own message boundaries), so nothing is buffered but a partial frame
header or a partial control frame. Text and binary frames both carry QAP bytes, as in the C
forward; a text message must still be valid UTF-8 (1007 otherwise).
"""

from __future__ import annotations

import codecs
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

_MEDIUM = struct.Struct("!BBH")
_LARGE = struct.Struct("!BBQ")
_CODE = struct.Struct("!H")


def _mask_python(mask: bytes, data: bytearray) -> None:
    # One XOR over the whole payload as a big integer: far faster than a loop over bytes.
    n = len(data)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        data[:] = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
            n, "little"
        )


def _find_mask() -> Callable[[bytes, bytearray], None]:
    # aiohttp ships a compiled XOR (several GB/s); it is not public API, so fall back to ours.
    from .aiohttp_private import websocket_mask

    return websocket_mask() or _mask_python


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseReason(enum.IntEnum):
    """WebSocket close codes (RFC 6455 section 7.4.1; 1012-1014 registered with IANA since)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001  # forward shuts down, or the session's idle time or lifetime is over
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # reported when a close frame has no code; never sent
    ABNORMAL_CLOSURE = 1006  # reported only, never sent
    INVALID_FRAME_PAYLOAD_DATA = 1007  # text that is not UTF-8
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXT = 1010
    INTERNAL_ERROR = 1011  # Rserve unreachable, silent, or broken
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013  # refused at admission: at capacity, too many from one client
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE_FAILED = 1015  # reported only, never sent


def frame_header(opcode: int, fin: bool, length: int) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return _MEDIUM.pack(first, 126, length)
    return _LARGE.pack(first, 127, length)


def control_frame(opcode: int, payload: bytes = b"") -> bytes:
    return frame_header(opcode, True, len(payload)) + payload


# Close reasons are limited so that code and reason fit a control frame's 125 bytes.
REASON_MAX = 123


def close_frame(code: int, reason: str = "") -> bytes:
    raw = reason.encode()
    if len(raw) > REASON_MAX:
        # Cut on a character boundary: a close reason must be valid UTF-8.
        raw = raw[: REASON_MAX - 3].decode(errors="ignore").encode() + b"..."
    return control_frame(Opcode.CLOSE, _CODE.pack(code) + raw)


class ProtocolError(Exception):
    """The browser broke RFC 6455: close with `code` and `reason`."""

    def __init__(self, code: CloseReason, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int | None  # None: the close frame had no status code (reported as 1005)
    reason: str


@dataclass(frozen=True, slots=True)
class Text:
    """A piece of a text message, for parsers asked to keep text apart (`split_text`); `final`
    marks the piece that ends the message."""

    payload: bytearray
    final: bool


# Data payloads are plain bytearrays: the common case stays a type check, not an attribute.
Event = bytearray | Ping | Pong | Close | Text

# Close codes a peer may send: 1004-1006 and 1015 are reserved for reporting and never go on
# the wire.
_SENDABLE = frozenset(CloseReason) - {
    CloseReason.NO_STATUS_RCVD,
    CloseReason.ABNORMAL_CLOSURE,
    CloseReason.TLS_HANDSHAKE_FAILED,
}


def _valid_close_code(code: int) -> bool:
    return code in _SENDABLE or 3000 <= code <= 4999


class FrameParser:
    """Client-to-server frames of one connection."""

    __slots__ = (
        "_buf",
        "_fin",
        "_in_message",
        "_mask",
        "_mask_xor",
        "_offset",
        "_remaining",
        "_split_text",
        "_text",
    )

    def __init__(
        self, mask: Callable[[bytes, bytearray], None] | None = None, split_text: bool = False
    ) -> None:
        self._mask_xor = mask or _find_mask()
        self._buf = b""  # a partial frame header or control frame
        self._remaining = 0  # payload bytes still to come in the current data frame
        self._mask = b""
        self._offset = 0  # payload bytes of the current frame already seen (mask phase)
        self._fin = False
        self._in_message = False  # between the first and the FIN frame of a data message
        # UTF-8 check of the text message being received (None: binary or no message).
        self._text: codecs.IncrementalDecoder | None = None
        # Text payloads as `Text` events (a resumable session's control messages) rather than
        # as data, which is what they are otherwise: bytes of the QAP stream, as in the C forward.
        self._split_text = split_text

    @property
    def in_frame(self) -> bool:
        return self._remaining > 0

    def feed(self, data: bytes | memoryview) -> list[Event]:
        """Events from `data`; nothing keeps a reference to `data` afterwards (a caller may
        reuse its buffer)."""
        if not self._buf and not self._remaining and not self._in_message:
            whole = self._whole_binary(data)
            if whole is not None:
                return [whole]
        events: list[Event] = []
        buf: bytes | memoryview = self._buf + data if self._buf else data
        self._buf = b""
        end = len(buf)
        pos = 0
        view = memoryview(buf)
        while pos < end:
            if self._remaining:
                take = min(self._remaining, end - pos)
                payload = bytearray(view[pos : pos + take])
                pos += take
                self._unmask(payload)
                self._remaining -= take
                if self._text is not None:
                    final = self._fin and not self._remaining
                    self._check_text(payload, final=final)
                    if self._split_text:
                        events.append(Text(payload, final))
                        if final:
                            self._in_message = False
                        continue
                events.append(payload)
                if not self._remaining and self._fin:
                    self._in_message = False
                continue
            header = self._header(buf, pos, end)
            if header is None:
                self._buf = bytes(view[pos:])
                break
            fin, opcode, length, size = header
            if opcode >= 8:
                if end - pos - size < length:
                    self._buf = bytes(view[pos:])
                    break
                payload = bytearray(view[pos + size : pos + size + length])
                self._mask_xor(bytes(view[pos + size - 4 : pos + size]), payload)
                pos += size + length
                events.append(self._control(opcode, bytes(payload)))
                continue
            self._begin(fin, opcode, length, bytes(view[pos + size - 4 : pos + size]))
            pos += size
            if length == 0 and fin:
                if self._text is not None:
                    self._check_text(bytearray(), final=True)
                    if self._split_text:
                        events.append(Text(bytearray(), True))
                self._in_message = False
        return events

    def _whole_binary(self, data: bytes | memoryview) -> bytearray | None:
        """The unmasked payload when `data` is exactly one whole, final, non-empty binary frame
        (the common case: a request that arrived in one read); None for anything else, which
        `feed` then parses in full. Starts and ends a message, so it leaves no state behind."""
        n = len(data)
        if n < 7 or data[0] != 0x82:  # FIN, no reserved bits, binary
            return None
        b1 = data[1]
        if b1 < 0x80:  # unmasked: `feed` refuses it
            return None
        length = b1 & 0x7F
        size = 6
        if length == 126:
            if n < 8:
                return None
            length = (data[2] << 8) | data[3]
            size = 8
        elif length == 127 or length == 0:
            return None
        if size + length != n:
            return None
        # One copy, which unmasking needs anyway (slicing `bytes` would make another).
        payload = bytearray(memoryview(data)[size:])
        self._mask_xor(bytes(data[size - 4 : size]), payload)
        return payload

    def _header(
        self, buf: bytes | memoryview, pos: int, end: int
    ) -> tuple[bool, int, int, int] | None:
        if end - pos < 2:
            return None
        b0 = buf[pos]
        b1 = buf[pos + 1]
        if b0 & 0x70:
            raise ProtocolError(
                CloseReason.PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)"
            )
        if not b1 & 0x80:
            raise ProtocolError(CloseReason.PROTOCOL_ERROR, "frame from the browser is not masked")
        opcode = b0 & 0x0F
        length = b1 & 0x7F
        size = 6
        if length == 126:
            size = 8
            if end - pos < size:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        elif length == 127:
            size = 14
            if end - pos < size:
                return None
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length >> 63:
                raise ProtocolError(CloseReason.PROTOCOL_ERROR, "frame length out of range")
        if end - pos < size:
            return None
        fin = bool(b0 & 0x80)
        if opcode >= 8:
            if opcode > Opcode.PONG:
                raise ProtocolError(CloseReason.PROTOCOL_ERROR, f"unknown opcode {opcode}")
            if not fin:
                raise ProtocolError(CloseReason.PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                raise ProtocolError(
                    CloseReason.PROTOCOL_ERROR, "control frame longer than 125 bytes"
                )
        elif opcode > Opcode.BINARY:
            raise ProtocolError(CloseReason.PROTOCOL_ERROR, f"unknown opcode {opcode}")
        return fin, opcode, length, size

    def _begin(self, fin: bool, opcode: int, length: int, mask: bytes) -> None:
        if opcode == Opcode.CONTINUATION:
            if not self._in_message:
                raise ProtocolError(
                    CloseReason.PROTOCOL_ERROR, "continuation frame outside a message"
                )
        else:
            if self._in_message:
                raise ProtocolError(
                    CloseReason.PROTOCOL_ERROR, "new message before the previous one ended"
                )
            self._text = codecs.getincrementaldecoder("utf-8")() if opcode == Opcode.TEXT else None
        self._in_message = True
        self._fin = fin
        self._remaining = length
        self._mask = mask
        self._offset = 0

    def _unmask(self, payload: bytearray) -> None:
        shift = self._offset & 3
        mask = self._mask if not shift else self._mask[shift:] + self._mask[:shift]
        self._mask_xor(mask, payload)
        self._offset += len(payload)

    def _check_text(self, payload: bytearray, *, final: bool) -> None:
        assert self._text is not None
        try:
            self._text.decode(payload, final)
        except UnicodeDecodeError:
            raise ProtocolError(
                CloseReason.INVALID_FRAME_PAYLOAD_DATA, "text message is not valid UTF-8"
            ) from None
        if final:
            self._text = None

    @staticmethod
    def _control(opcode: int, payload: bytes) -> Event:
        if opcode == Opcode.PING:
            return Ping(payload)
        if opcode == Opcode.PONG:
            return Pong(payload)
        if not payload:
            return Close(None, "")
        if len(payload) == 1:
            raise ProtocolError(CloseReason.PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = _CODE.unpack_from(payload)[0]
        if not _valid_close_code(code):
            raise ProtocolError(CloseReason.PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            raise ProtocolError(
                CloseReason.INVALID_FRAME_PAYLOAD_DATA, "close reason is not valid UTF-8"
            ) from None
        return Close(code, reason)
