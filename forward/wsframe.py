"""WebSocket frame headers (RFC 6455 §5.2) for frames a server writes itself.

The relay writes data frames straight to the transport so that a large QAP message can stream
through as one fragmented WebSocket message (first frame, continuations, FIN on the last) without
being collected in memory first; aiohttp's writer always sets FIN. Server frames are unmasked, so a
payload goes out as the very bytes Rserve sent. Control frames stay with aiohttp; they may legally
fall between the fragments of a message, and each of our frames is written in one synchronous step.
"""

from __future__ import annotations

import enum
import struct

_MEDIUM = struct.Struct("!BBH")
_LARGE = struct.Struct("!BBQ")


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2


def frame_header(opcode: int, fin: bool, length: int) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return _MEDIUM.pack(first, 126, length)
    return _LARGE.pack(first, 127, length)
