"""QAP framing, pure: byte literals, every split at every offset, and generated streams."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forward import qap
from forward.qap import Chunk, ClientStream, Cmd, Header, Mode, ServerStream

ID_STRING = b"Rsrv0103QAP1\r\n\r\n--------------\r\n"


def msg(cmd: int, payload: bytes, msg_id: int = 0) -> bytes:
    return Header(cmd, len(payload), msg_id).encode() + payload


def reassemble(chunks: list[Chunk]) -> list[bytes]:
    """Whole messages from chunks, checking the first/last flags on the way."""
    out: list[bytes] = []
    current: bytearray | None = None
    for c in chunks:
        if c.first:
            assert current is None, "a message started inside another"
            current = bytearray()
        assert current is not None, "a continuation without a first chunk"
        current += c.data
        if c.last:
            assert len(current) == qap.HEADER_SIZE + c.header.length
            out.append(bytes(current))
            current = None
    return out


def test_header_is_little_endian_with_64_bit_length() -> None:
    h = Header(Cmd.RESP_OK, (5 << 32) | 7, 0x01020304)
    raw = h.encode()
    assert raw == struct.pack("<IIII", 0x10001, 7, 0x01020304, 5)
    assert Header.parse(raw) == h


def test_idle_message_matches_the_c_forward_byte_for_byte() -> None:
    assert (
        bytes.fromhex(
            "00100200"
            "14000000"
            "00000000"
            "00000000"  # OOB_SEND, len 20
            "0a100000"  # DT_SEXP | 16 << 8
            "100c0000"  # XT_VECTOR | 12 << 8
            "22080000"  # XT_ARRAY_STR | 8 << 8
        )
        + b"idle\x00\x01\x01\x01"
        == qap.IDLE_MESSAGE
    )


def test_conn_broken_and_shutdown_notice() -> None:
    assert qap.conn_broken(0xABCD) == struct.pack("<IIII", 0x42010002, 0, 0xABCD, 0)
    assert struct.pack("<IIII", 0x21000, 0, 0, 0) == qap.SHUTDOWN_NOTICE


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (0x10001, True),
        (0x42010002, True),
        (0x10002, True),
        (0x21000, False),
        (0x22000, False),
        (0x003, False),
        (0x22001 | 0x10001, True),  # the browser answering an OOB_MSG
    ],
)
def test_is_response(cmd: int, expected: bool) -> None:
    assert qap.is_response(cmd) is expected


def test_classify_greeting() -> None:
    assert qap.classify_greeting(ID_STRING[:16]) is Mode.QAP
    assert qap.classify_greeting(b"RsOC" + bytes(12)) is Mode.OCAP
    with pytest.raises(qap.GreetingError, match="RSpx"):
        qap.classify_greeting(b"RSpx" + bytes(12))
    with pytest.raises(qap.GreetingError, match="not an Rserve greeting"):
        qap.classify_greeting(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(qap.GreetingError):
        qap.classify_greeting(b"Rsrv0103XXXX" + bytes(4))  # QAP1 must be at offset 8


STREAM = [
    msg(Cmd.EVAL, b"\x04\x08\x00\x001+1\x00\x00\x00\x00", 1),
    msg(Cmd.RESP_OK, b"", 2),
    msg(Cmd.OOB_SEND, bytes(range(256)) * 3, 3),
    msg(Cmd.SET_SEXP, b"x" * 17, 4),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 15, 16, 17, 31, 100, 10_000])
def test_client_stream_every_chunk_size(size: int) -> None:
    data = b"".join(STREAM)
    framer = ClientStream()
    chunks = [c for i in range(0, len(data), size) for c in framer.feed(data[i : i + size])]
    assert reassemble(chunks) == STREAM
    assert b"".join(bytes(c.data) for c in chunks) == data
    assert framer.messages == len(STREAM) and not framer.in_message


def test_client_stream_split_at_every_offset_into_three() -> None:
    data = b"".join(STREAM[:3])
    for i in range(len(data) + 1):
        for j in range(i, min(len(data), i + 40) + 1):
            framer = ClientStream()
            chunks = [c for part in (data[:i], data[i:j], data[j:]) for c in framer.feed(part)]
            assert reassemble(chunks) == STREAM[:3], (i, j)


def test_whole_message_in_one_feed_is_one_chunk_without_copy() -> None:
    data = bytearray(b"".join(STREAM))
    chunks = list(ClientStream().feed(data))
    assert len(chunks) == len(STREAM)
    assert all(c.first and c.last for c in chunks)
    assert all(isinstance(c.data, memoryview) and c.data.obj is data for c in chunks)


def test_huge_announced_length_buffers_nothing() -> None:
    framer = ClientStream()
    head = Header(Cmd.EVAL, 100 * 2**30, 9).encode()
    chunks = list(framer.feed(head + b"abc"))
    assert [(c.first, c.last, bytes(c.data)) for c in chunks] == [(True, False, head + b"abc")]
    chunk = next(iter(framer.feed(b"defg")))
    assert (chunk.first, chunk.last, bytes(chunk.data)) == (False, False, b"defg")
    assert framer.in_message


def test_limit_is_checked_on_the_header_before_any_payload() -> None:
    framer = ClientStream(max_size=10)
    ok = msg(Cmd.EVAL, b"0123456789", 1)
    big = Header(Cmd.EVAL, 11, 2).encode()
    taken = []
    with pytest.raises(qap.MessageTooLarge) as info:
        for c in framer.feed(ok + big + b"x" * 11):
            taken.append(c)
    assert info.value.close_code == 1009
    assert [bytes(c.data) for c in taken] == [ok]  # the good message before it got through


def test_server_stream_classic_greeting_split_everywhere() -> None:
    reply = msg(Cmd.RESP_OK, b"\x0a\x04\x00\x00" + b"\x00" * 4, 0)
    data = ID_STRING + reply
    for i in range(len(data) + 1):
        stream = ServerStream()
        items = [*stream.feed(data[:i]), *stream.feed(data[i:])]
        greeting = items[0]
        assert isinstance(greeting, qap.Greeting)
        assert (greeting.mode, greeting.data) == (Mode.QAP, ID_STRING)
        chunks = [x for x in items[1:] if isinstance(x, Chunk)]
        assert reassemble(chunks) == [reply], i


def test_server_stream_ocap_greeting_is_a_message() -> None:
    greet = msg(Cmd.OC_INIT, b"\x0a\x08\x00\x00caps" + b"\x00" * 4)
    stream = ServerStream()
    items = list(stream.feed(greet))
    assert isinstance(items[0], qap.Greeting) and items[0].mode is Mode.OCAP
    assert items[0].data == b""
    assert reassemble([x for x in items[1:] if isinstance(x, Chunk)]) == [greet]


def test_server_stream_rejects_bad_greeting() -> None:
    with pytest.raises(qap.GreetingError):
        list(ServerStream().feed(b"garbage garbage garbage"))


messages = st.lists(
    st.tuples(
        st.sampled_from([Cmd.EVAL, Cmd.OC_CALL, Cmd.RESP_OK, Cmd.OOB_MSG | Cmd.RESP_OK, 0x7FFF]),
        st.binary(max_size=300),
        st.integers(0, 2**32 - 1),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(messages, st.lists(st.integers(0, 4000), max_size=20))
def test_any_split_reassembles(msgs: list[tuple[int, bytes, int]], cuts: list[int]) -> None:
    wire = [msg(c, p, i) for c, p, i in msgs]
    data = b"".join(wire)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    framer = ClientStream()
    chunks = [c for a, b in itertools.pairwise(points) for c in framer.feed(data[a:b])]
    assert reassemble(chunks) == wire
    assert [(c.header.cmd, c.header.msg_id) for c in chunks if c.first] == [
        (c, i) for c, _, i in msgs
    ]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_garbage_raises_only_the_framers_error(data: bytes, step: int) -> None:
    framer = ClientStream(max_size=1000)
    try:
        for i in range(0, len(data), step):
            for chunk in framer.feed(data[i : i + step]):
                assert len(chunk.data) <= qap.HEADER_SIZE + 1000
    except qap.QAPError:
        pass
    stream = ServerStream(max_size=1000)
    try:
        for i in range(0, len(data), step):
            list(stream.feed(data[i : i + step]))
    except qap.QAPError:
        pass


def test_oob_and_error_code() -> None:
    assert qap.is_oob(Cmd.OOB_SEND) and qap.is_oob(Cmd.OOB_MSG | 0x123)
    assert qap.is_oob_send(Cmd.OOB_SEND | 0x7) and not qap.is_oob_send(Cmd.OOB_MSG)
    assert not qap.is_oob(Cmd.RESP_OK) and not qap.is_oob(Cmd.OOB_MSG | Cmd.RESP_OK)
    assert qap.error_code(Cmd.RESP_ERR | (0x42 << 24)) == 0x42
    assert qap.error_code(Cmd.RESP_ERR) == 0
    assert qap.error_code(Cmd.RESP_OK) is None
    assert qap.error_code(Cmd.OOB_MSG | Cmd.RESP_ERR) is None


def test_whole_takes_exactly_one_whole_message_at_a_boundary() -> None:
    framer = ClientStream()
    one = msg(Cmd.EVAL, b"abcd", 7)
    assert framer.whole(one) == (Cmd.EVAL, 7)
    assert framer.messages == 1 and not framer.in_message
    # Anything else is left to `feed`, and nothing is taken.
    assert framer.whole(one + one) is None
    assert framer.whole(one[:-1]) is None
    assert framer.whole(one[:15]) is None
    assert framer.messages == 1
    # Inside a message, the next bytes are payload, whatever they look like.
    assert list(framer.feed(one[:18]))
    assert framer.whole(one) is None
    rest = list(framer.feed(one[18:] + one))
    assert reassemble(rest[1:]) == [one] and framer.messages == 3
    # Over the limit: `feed` is the one that refuses it.
    limited = ClientStream(max_size=3)
    assert limited.whole(one) is None
    with pytest.raises(qap.MessageTooLarge):
        list(limited.feed(one))


def test_whole_on_rs_side_waits_for_the_greeting() -> None:
    server = ServerStream()
    answer = msg(Cmd.RESP_OK, b"", 1)
    assert server.whole(answer) is None  # no greeting yet: not a message
    list(server.feed(ID_STRING))
    assert server.whole(answer) == (Cmd.RESP_OK, 1)
    assert server.messages == 1
