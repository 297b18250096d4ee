"""The benchmark's wire helpers: QAP echo requests as pre-masked WebSocket frames, and a counter
of the payload bytes in the frames a server sends back.

The client must never be what is measured, so a request frame is built (and masked) once and its
bytes are sent again for every call, and replies are not decoded: the counter walks the frame
headers in whatever `recv_into` delivered and only adds up data payload lengths. An echoed
request of n payload bytes comes back as 16 + n bytes of data frames, however a relay splits it.
"""

from __future__ import annotations

import base64
import os
import struct

QAP_HEADER = struct.Struct("<IIII")
CMD_EVAL = 0x003
RESP_OK = 0x10001
# The classic Rserve ID string every relay passes on first (as a text or binary frame).
GREETING = b"Rsrv0103QAP1\r\n\r\n--------------\r\n"
assert len(GREETING) == 32


def qap_message(cmd: int, msg_id: int, payload_len: int, fill: bytes = b"x") -> bytes:
    head = QAP_HEADER.pack(cmd, payload_len & 0xFFFFFFFF, msg_id, payload_len >> 32)
    return head + (fill * payload_len)[:payload_len]


def _mask(data: bytes, key: bytes) -> bytes:
    # One big-integer XOR: fast enough to run once per distinct frame, and no numpy needed.
    n = len(data)
    if n == 0:
        return data
    keystream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(keystream, "little")).to_bytes(
        n, "little"
    )


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A masked, final client frame (RFC 6455 5.2), ready to be sent any number of times."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def echo_request(size: int, msg_id: int = 1) -> tuple[bytes, int]:
    """(frame bytes, reply payload bytes) for a QAP request with `size` payload bytes."""
    return client_frame(qap_message(CMD_EVAL, msg_id, size)), 16 + size


# forward's session resume (docs/resume.md): offered by `handshake(..., resume=True)`.
RESUME_PROTOCOL = "rserve-resume.v1"


def handshake(
    host: str, port: int, secure: bool = False, path: str = "/", protocols: str = ""
) -> bytes:
    # The Origin of a page served by the relay itself: forward only lets same-origin pages in.
    origin = f"{'https' if secure else 'http'}://{host}:{port}"
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Protocol: {protocols}\r\n" if protocols else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {origin}\r\n{offer}\r\n"
    ).encode()


def ack_frame(received: int) -> bytes:
    """A resume client's acknowledgement (a masked text frame)."""
    return client_frame(b'{"t":"ack","received":%d}' % received, opcode=0x1)


class HandshakeError(Exception):
    pass


def check_response(head: bytes) -> None:
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise HandshakeError(f"no WebSocket upgrade: {status.decode(errors='replace')}")


class FrameCounter:
    """Counts data-frame payload bytes in a server's byte stream, keeping at most one partial
    frame header (14 bytes) between calls."""

    __slots__ = ("_data", "_head", "_last", "_left", "closed")

    def __init__(self, text_is_data: bool = True) -> None:
        self._head = bytearray()
        self._left = 0
        self._data = True
        # Under resume, text messages are forward's control messages, not data.
        self._last = 0x2 if text_is_data else 0x0
        self.closed = False  # the server sent a close frame: no answer will come

    def feed(self, view: memoryview | bytes) -> int:
        got = 0
        pos, end = 0, len(view)
        while pos < end:
            left = self._left
            if left:
                take = left if left < end - pos else end - pos
                self._left = left - take
                pos += take
                if self._data:
                    got += take
                continue
            head = self._head
            if head or end - pos < 14:
                before = len(head)
                head += view[pos : pos + 14 - before]
                parsed = _parse(head, 0, len(head))
                if parsed is None:
                    pos = end
                    break
                hlen, length, opcode = parsed
                pos += hlen - before
                head.clear()
            else:
                parsed = _parse(view, pos, end - pos)
                assert parsed is not None
                hlen, length, opcode = parsed
                pos += hlen
            self._left = length
            self._data = opcode <= self._last or opcode == 0x2
            if opcode == 0x8:
                self.closed = True
        return got


def _parse(
    buf: memoryview | bytes | bytearray, off: int, avail: int
) -> tuple[int, int, int] | None:
    if avail < 2:
        return None
    b0, b1 = buf[off], buf[off + 1]
    length = b1 & 0x7F
    hlen = 2
    if length == 126:
        if avail < 4:
            return None
        length = int.from_bytes(buf[off + 2 : off + 4], "big")
        hlen = 4
    elif length == 127:
        if avail < 10:
            return None
        length = int.from_bytes(buf[off + 2 : off + 10], "big")
        hlen = 10
    if b1 & 0x80:  # a masked server frame is a protocol error, but skip the key all the same
        hlen += 4
    if avail < hlen:
        return None
    return hlen, length, b0 & 0x0F
