"""The R value encodings (REXP, Rserve's QAP1 "SEXP" parameters) that forward itself needs.

Pure code. The `.R` handler sends an OCAP call (a language object holding the capability and a raw
vector) and reads back a list; the tests use the same functions to talk to a real Rserve. Every
object is `RObj(xt, value, attrs)`: `xt` the expression type without flags, `value` a Python
list/bytes/str or a list of `RObj`, `attrs` a dict of attributes when the object has any.

Reference: Rserve's src/Rsrv.h and REXP encoding (lengths in 24 bits, or 56 with XT_LARGE).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .qap import Dt, Xt

NA_INT = -(2**31)
# R's NA_real_ is a NaN with this payload (1954 in the low word).
NA_REAL_BITS = 0x7FF00000000007A2
_NA_STRING = b"\xff"


class RexpError(ValueError):
    """Bytes that are not a well-formed R value: every way `params` and `decode` can fail."""


# Deeper nesting than this is not an R value forward has a use for, and would exhaust the stack.
MAX_DEPTH = 200


@dataclass(frozen=True, slots=True)
class RObj:
    xt: int
    value: Any
    attrs: dict[str, RObj] | None = field(default=None)

    def attr(self, name: str) -> RObj | None:
        return self.attrs.get(name) if self.attrs else None

    @property
    def names(self) -> list[str | None] | None:
        names = self.attr("names")
        return list(names.value) if names is not None else None

    def as_dict(self) -> dict[str, RObj]:
        """A named list as a dict (unnamed elements are left out)."""
        names = self.names or []
        return {n: v for n, v in zip(names, self.value, strict=False) if n}


@dataclass(frozen=True, slots=True)
class Verbatim:
    """An R value already in wire form, passed on byte for byte by `encode` (an OCAP capability
    exactly as Rserve sent it: re-encoding it could change its padding or length form)."""

    data: bytes


# -- parameter (DT_*) level ----------------------------------------------------------------------


def item_header(kind: int, length: int, large_flag: int) -> bytes:
    """The 4-byte header of a parameter or value, or 8 bytes with `large_flag` for lengths that
    do not fit in 24 bits."""
    return _head(kind, length, large_flag)


def _head(kind: int, length: int, large_flag: int) -> bytes:
    if length < 0xFFFFFF:
        return struct.pack("<I", kind | (length << 8))
    return struct.pack("<II", kind | large_flag | ((length & 0xFFFFFF) << 8), length >> 24)


def _pad4(data: bytes, fill: bytes = b"\0") -> bytes:
    return data + fill * (-len(data) % 4)


def param(dt: int, body: bytes) -> bytes:
    return _head(dt, len(body), Dt.LARGE) + body


def string_param(text: str) -> bytes:
    """A DT_STRING parameter (CMD_eval, CMD_setSEXP's name): NUL-terminated, padded to 4."""
    return param(Dt.STRING, _pad4(text.encode() + b"\0"))


def sexp_param(obj: RObj) -> bytes:
    return param(Dt.SEXP, encode(obj))


def params(payload: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """The (type, body) parameters of a message payload."""
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        kind, length, pos = _read_head(view, pos, Dt.LARGE)
        if pos + length > len(view):
            raise RexpError("parameter runs past the end of the message")
        yield kind, view[pos : pos + length]
        pos += length


def _read_head(view: memoryview, pos: int, large_flag: int) -> tuple[int, int, int]:
    if pos + 4 > len(view):
        raise RexpError("truncated header")
    (word,) = struct.unpack_from("<I", view, pos)
    kind, length = word & 0xFF, word >> 8
    pos += 4
    if kind & large_flag:
        if pos + 4 > len(view):
            raise RexpError("truncated large header")
        (hi,) = struct.unpack_from("<I", view, pos)
        length |= hi << 24
        kind &= ~large_flag
        pos += 4
    return kind, length, pos


# -- SEXP level ----------------------------------------------------------------------------------


def decode(data: bytes | memoryview) -> RObj:
    """One R value; anything malformed raises `RexpError`, never another exception."""
    view = memoryview(data)
    try:
        obj, end = _decode(view, 0, 0)
    except RexpError:
        raise
    except (struct.error, ValueError, IndexError, TypeError, AttributeError) as exc:
        # A length that does not fit its type (struct), attributes that are no pairlist...
        raise RexpError(f"malformed R value: {exc}") from None
    if end != len(view):
        raise RexpError(f"{len(view) - end} stray bytes after the value")
    return obj


def _decode(view: memoryview, pos: int, depth: int) -> tuple[RObj, int]:
    if depth > MAX_DEPTH:
        raise RexpError(f"values nested more than {MAX_DEPTH} deep")
    kind, length, pos = _read_head(view, pos, Xt.LARGE)
    end = pos + length
    if end > len(view):
        raise RexpError("value runs past the end of its container")
    attrs = None
    if kind & Xt.HAS_ATTR:
        kind &= ~Xt.HAS_ATTR
        attr_obj, pos = _decode(view, pos, depth + 1)
        attrs = _pairs(attr_obj)
    body = view[pos:end]
    return RObj(kind, _body(kind, body, depth), attrs), end


def _pairs(obj: RObj) -> dict[str, RObj]:
    if obj.xt != Xt.LIST_TAG:
        raise RexpError("attributes are not a tagged pairlist")
    return {str(tag.value): value for value, tag in obj.value}


def _body(kind: int, body: memoryview, depth: int) -> Any:
    n = len(body)
    if kind == Xt.NULL:
        return None
    if kind == Xt.ARRAY_INT:
        return [None if v == NA_INT else v for v in struct.unpack(f"<{n // 4}i", body)]
    if kind == Xt.ARRAY_DOUBLE:
        out = []
        for (bits,) in struct.iter_unpack("<Q", body):
            out.append(
                None if bits == NA_REAL_BITS else struct.unpack("<d", bits.to_bytes(8, "little"))[0]
            )
        return out
    if kind == Xt.ARRAY_STR:
        parts = bytes(body).split(b"\0")[:-1]
        return [
            None if p == _NA_STRING else p.lstrip(b"\x01").decode("utf-8", "replace") for p in parts
        ]
    if kind in (Xt.SYMNAME, Xt.STR):
        return bytes(body).split(b"\0", 1)[0].decode("utf-8", "replace")
    if kind == Xt.ARRAY_BOOL:
        (count,) = struct.unpack_from("<i", body)
        return [None if b == 2 else bool(b) for b in bytes(body[4 : 4 + count])]
    if kind == Xt.RAW:
        (count,) = struct.unpack_from("<i", body)
        return bytes(body[4 : 4 + count])
    if kind in (Xt.VECTOR, Xt.VECTOR_EXP, Xt.LIST_NOTAG, Xt.LANG_NOTAG):
        items, pos = [], 0
        while pos < n:
            item, pos = _decode(body, pos, depth + 1)
            items.append(item)
        return items
    if kind in (Xt.LIST_TAG, Xt.LANG_TAG):
        pairs, pos = [], 0
        while pos < n:
            value, pos = _decode(body, pos, depth + 1)
            tag, pos = _decode(body, pos, depth + 1)
            pairs.append((value, tag))
        return pairs
    return bytes(body)  # closures, S4, complex...: kept opaque


def encode(obj: RObj | Verbatim) -> bytes:
    if isinstance(obj, Verbatim):
        return obj.data
    kind = obj.xt
    attr = b""
    if obj.attrs:
        kind |= Xt.HAS_ATTR
        pairs = [(v, RObj(Xt.SYMNAME, k)) for k, v in obj.attrs.items()]
        attr = encode(RObj(Xt.LIST_TAG, pairs))
    body = attr + _encode_body(obj.xt, obj.value)
    return _head(kind, len(body), Xt.LARGE) + body


def _encode_body(kind: int, value: Any) -> bytes:
    if kind == Xt.NULL:
        return b""
    if kind == Xt.ARRAY_INT:
        return struct.pack(f"<{len(value)}i", *(NA_INT if v is None else v for v in value))
    if kind == Xt.ARRAY_DOUBLE:
        return b"".join(
            NA_REAL_BITS.to_bytes(8, "little") if v is None else struct.pack("<d", v) for v in value
        )
    if kind == Xt.ARRAY_STR:
        raw = b"".join(_NA_STRING + b"\0" if s is None else s.encode() + b"\0" for s in value)
        return _pad4(raw, b"\x01")
    if kind in (Xt.SYMNAME, Xt.STR):
        return _pad4(str(value).encode() + b"\0")
    if kind == Xt.ARRAY_BOOL:
        flags = bytes(2 if v is None else int(bool(v)) for v in value)
        return struct.pack("<i", len(flags)) + _pad4(flags, b"\xff")
    if kind == Xt.RAW:
        return struct.pack("<i", len(value)) + _pad4(bytes(value))
    if kind in (Xt.VECTOR, Xt.LIST_NOTAG, Xt.LANG_NOTAG):
        return b"".join(encode(v) for v in value)
    if kind in (Xt.LIST_TAG, Xt.LANG_TAG):
        return b"".join(encode(v) + encode(t) for v, t in value)
    raise RexpError(f"cannot encode expression type {kind}")


# -- constructors for the common cases -----------------------------------------------------------


def strings(values: Sequence[str | None]) -> RObj:
    return RObj(Xt.ARRAY_STR, list(values))


def raw(data: bytes) -> RObj:
    return RObj(Xt.RAW, bytes(data))


def doubles(values: Sequence[float | None]) -> RObj:
    return RObj(Xt.ARRAY_DOUBLE, list(values))


def call(*items: RObj | Verbatim) -> RObj:
    """An unnamed call: the function (or an OCAP reference) followed by its arguments."""
    return RObj(Xt.LANG_NOTAG, list(items))


def is_na(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
