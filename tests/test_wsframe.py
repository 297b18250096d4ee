"""The WebSocket frame parser: bytes in, events out, against frames built here by the book."""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forward.wsframe import (
    Close,
    FrameParser,
    Opcode,
    Ping,
    Pong,
    ProtocolError,
    _mask_python,
    close_frame,
    frame_header,
)


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0
) -> bytes:
    """A frame as a browser sends it: masked (RFC 6455 section 5.3)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def data_of(events: Sequence[object]) -> bytes:
    return b"".join(bytes(e) for e in events if isinstance(e, bytearray))


def feed_split(parser: FrameParser, raw: bytes, cuts: list[int]) -> list[object]:
    events: list[object] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        events += parser.feed(raw[last:cut])
        last = cut
    return events


def test_one_binary_frame() -> None:
    assert FrameParser().feed(client_frame(Opcode.BINARY, b"hello")) == [bytearray(b"hello")]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_every_length_encoding(size: int) -> None:
    payload = os.urandom(size)
    events = FrameParser().feed(client_frame(Opcode.BINARY, payload))
    assert data_of(events) == payload


def test_fragmented_message_with_a_ping_between_fragments() -> None:
    raw = (
        client_frame(Opcode.BINARY, b"abc", fin=False)
        + client_frame(Opcode.PING, b"are you there")
        + client_frame(Opcode.CONTINUATION, b"def", fin=False)
        + client_frame(Opcode.CONTINUATION, b"ghi")
    )
    events = FrameParser().feed(raw)
    assert events == [
        bytearray(b"abc"),
        Ping(b"are you there"),
        bytearray(b"def"),
        bytearray(b"ghi"),
    ]


def test_control_frames() -> None:
    p = FrameParser()
    assert p.feed(client_frame(Opcode.PONG, b"x")) == [Pong(b"x")]
    assert p.feed(client_frame(Opcode.CLOSE, b"")) == [Close(None, "")]
    assert p.feed(client_frame(Opcode.CLOSE, struct.pack("!H", 1000) + "bye ✓".encode())) == [
        Close(1000, "bye ✓")
    ]
    assert p.feed(client_frame(Opcode.CLOSE, struct.pack("!H", 4001))) == [Close(4001, "")]


def test_text_bytes_are_passed_on_as_they_are() -> None:
    text = "café ✓".encode()
    assert data_of(FrameParser().feed(client_frame(Opcode.TEXT, text))) == text


def test_utf8_split_across_fragments_and_reads_is_fine() -> None:
    text = "✓✓".encode()  # 6 bytes, split inside a character twice
    raw = client_frame(Opcode.TEXT, text[:2], fin=False) + client_frame(
        Opcode.CONTINUATION, text[2:]
    )
    p = FrameParser()
    assert data_of(feed_split(p, raw, list(range(len(raw))))) == text


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (client_frame(Opcode.BINARY, b"x", rsv=0x40), 1002, "reserved bits"),
        (frame_header(Opcode.BINARY, True, 3) + b"abc", 1002, "not masked"),
        (client_frame(0x3, b"x"), 1002, "unknown opcode 3"),
        (client_frame(0xB, b"x"), 1002, "unknown opcode 11"),
        (client_frame(Opcode.PING, b"x", fin=False), 1002, "fragmented control"),
        (client_frame(Opcode.PING, b"x" * 126), 1002, "longer than 125"),
        (client_frame(Opcode.CONTINUATION, b"x"), 1002, "outside a message"),
        (
            client_frame(Opcode.BINARY, b"x", fin=False) + client_frame(Opcode.BINARY, b"y"),
            1002,
            "before the previous one ended",
        ),
        (client_frame(Opcode.CLOSE, b"\x03"), 1002, "1-byte payload"),
        (client_frame(Opcode.CLOSE, struct.pack("!H", 1005)), 1002, "invalid close code 1005"),
        (client_frame(Opcode.CLOSE, struct.pack("!H", 999)), 1002, "invalid close code 999"),
        (client_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007, "not valid UTF-8"),
        (client_frame(Opcode.TEXT, b"ok \xc3\x28"), 1007, "not valid UTF-8"),
        (client_frame(Opcode.TEXT, b"\xe2\x9c"), 1007, "not valid UTF-8"),  # truncated at FIN
        (bytes((0x82, 0xFF)) + b"\x80" + b"\0" * 7 + b"mask", 1002, "out of range"),
    ],
)
def test_protocol_errors(raw: bytes, code: int, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        FrameParser().feed(raw)
    assert caught.value.code == code and words in caught.value.reason


def test_partial_header_and_control_frame_are_kept_until_complete() -> None:
    p = FrameParser()
    raw = client_frame(Opcode.PING, b"12345")
    for i in range(len(raw) - 1):
        assert p.feed(raw[i : i + 1]) == []
    assert p.feed(raw[-1:]) == [Ping(b"12345")]


@pytest.mark.parametrize("reason", ["é" * 200, "x" + "é" * 100, "✓" * 60])
def test_close_frame_reason_is_cut_to_fit_a_control_frame(reason: str) -> None:
    frame = close_frame(1011, reason)
    # Still valid UTF-8 when the cut falls inside a character.
    assert len(frame) <= 2 + 125 and frame[4:].decode().endswith("...")


def test_python_mask_matches_the_compiled_one() -> None:
    from aiohttp._websocket.helpers import websocket_mask

    mask = os.urandom(4)
    for n in (0, 1, 3, 4, 5, 1000, 65537):
        data = os.urandom(n)
        a, b = bytearray(data), bytearray(data)
        _mask_python(mask, a)
        websocket_mask(mask, b)
        assert a == b


frames = st.lists(
    st.tuples(
        st.sampled_from([Opcode.BINARY, Opcode.TEXT]),
        st.lists(st.binary(max_size=300), min_size=1, max_size=4),
        st.booleans(),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(messages=frames, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_any_split_of_any_frame_sequence_gives_the_same_bytes(
    messages: list[tuple[Opcode, list[bytes], bool]], cuts: list[int]
) -> None:
    raw = bytearray()
    expected = bytearray()
    for opcode, parts, ping in messages:
        if opcode is Opcode.TEXT:
            parts = [p.decode("latin-1").encode() for p in parts]  # valid UTF-8 as a whole
            # a fragment may end inside a character: only the whole message must be valid
        for i, part in enumerate(parts):
            first = i == 0
            raw += client_frame(
                opcode if first else Opcode.CONTINUATION, part, fin=i == len(parts) - 1
            )
            if ping:
                raw += client_frame(Opcode.PING, b"p")
            expected += part
    p = FrameParser()
    events = feed_split(p, bytes(raw), [c for c in cuts if c <= len(raw)])
    assert data_of(events) == bytes(expected)
    assert sum(isinstance(e, Ping) for e in events) == sum(
        len(parts) for _, parts, ping in messages if ping
    )
    assert not p.in_frame


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=400), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_the_parser_keeps_nothing_of_a_reused_read_buffer(
    parts: list[bytes], cuts: list[int]
) -> None:
    """forward reads every connection into one shared buffer: each read is fed as a view of it,
    then the buffer is overwritten by the next read. The parser must copy what it keeps."""
    raw = bytearray()
    for i, part in enumerate(parts):
        opcode = Opcode.BINARY if i == 0 else Opcode.CONTINUATION
        raw += client_frame(opcode, part, fin=i == len(parts) - 1)
        raw += client_frame(Opcode.PING, part[:10])
    shared = bytearray(4096)
    p = FrameParser()
    events: list[object] = []
    last = 0
    for cut in [*sorted({c for c in cuts if c <= len(raw)}), len(raw)]:
        piece = raw[last:cut]
        shared[: len(piece)] = piece
        events += p.feed(memoryview(shared)[: len(piece)])
        shared[:] = b"\xee" * len(shared)  # the next read lands here
        last = cut
    assert data_of(events) == b"".join(parts)
    assert [e for e in events if isinstance(e, Ping)] == [Ping(part[:10]) for part in parts]


@pytest.mark.parametrize("size", [1, 125, 126, 65535])
def test_a_whole_binary_frame_in_one_read_is_the_same_either_way(size: int) -> None:
    payload = os.urandom(size)
    raw = client_frame(Opcode.BINARY, payload)
    whole = FrameParser().feed(memoryview(bytearray(raw)))
    assert whole == [bytearray(payload)]
    # The same frame split, and the same frame inside a fragmented message, parse alike.
    assert data_of(feed_split(FrameParser(), raw, [3])) == payload
    parser = FrameParser()
    parser.feed(client_frame(Opcode.BINARY, b"x", fin=False))
    with pytest.raises(ProtocolError):
        parser.feed(raw)  # a new message before the previous one ended
    # An unmasked frame is refused, not taken as data.
    with pytest.raises(ProtocolError):
        FrameParser().feed(bytes((0x82, 1)) + b"x" * 5)
