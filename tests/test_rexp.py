"""R value encodings, pure: round trips, and every malformed input is one `RexpError`."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forward import rexp
from forward.qap import Dt, Xt
from forward.rexp import RexpError, RObj


def test_round_trip() -> None:
    obj = RObj(
        Xt.VECTOR,
        [rexp.strings(["a", None]), rexp.raw(b"\0\1"), rexp.doubles([1.5, None])],
        {"names": rexp.strings(["s", "r", "d"])},
    )
    assert rexp.decode(rexp.encode(obj)) == obj


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x20\x03\x00\x00\x01\x02\x03", "malformed R value"),  # 3 bytes of int32s
        (b"\x25\x02\x00\x00\x01\x00", "malformed R value"),  # a raw vector without its count
        (b"\x90\x04\x00\x00\x00\x00\x00\x00", "not a tagged pairlist"),
        (b"\x20\x08\x00\x00\x01\x00\x00\x00", "runs past the end"),
        (b"\x00\x00", "truncated header"),
    ],
)
def test_malformed_values_are_rexp_errors(data: bytes, message: str) -> None:
    with pytest.raises(RexpError, match=message):
        rexp.decode(data)


def test_deep_nesting_is_an_rexp_error() -> None:
    data = b""
    for _ in range(rexp.MAX_DEPTH + 5):
        data = struct.pack("<I", Xt.VECTOR | (len(data) << 8)) + data
    with pytest.raises(RexpError, match="nested"):
        rexp.decode(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=96))
def test_any_bytes_decode_or_raise_rexp_error(data: bytes) -> None:
    try:
        for kind, body in rexp.params(data):
            if kind == Dt.SEXP:
                rexp.decode(body)
        rexp.decode(data)
    except RexpError:
        pass
