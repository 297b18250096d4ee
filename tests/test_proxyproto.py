"""The PROXY protocol parser (forward/proxyproto.py), with byte literals written from HAProxy's
specification: v1 and v2, TCP4, TCP6, LOCAL and UNKNOWN, every split across reads, TLVs, and
headers that are too long, truncated or not PROXY headers at all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forward import proxyproto
from forward.proxyproto import MAX_HEADER, ProxyHeader, ProxyProtocolError, parse, take

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
# What follows a header on a real connection: a TLS ClientHello's first bytes, an HTTP request.
TAILS = [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET / HTTP/1.1\r\n\r\n"]

GOOD: list[tuple[bytes, ProxyHeader]] = [
    (
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n",
        ProxyHeader(1, 45, ("192.0.2.7", 56324), ("198.51.100.1", 443)),
    ),
    (
        b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 8443\r\n",
        ProxyHeader(1, 47, ("2001:db8::7", 65535), ("2001:db8::1", 8443)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, 15, None)),
    # UNKNOWN: the rest of the line is ignored, whatever it holds.
    (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyHeader(1, 59, None),
    ),
    # The longest line the specification allows: 107 bytes.
    (b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", ProxyHeader(1, 107, None)),
    (
        SIG + b"\x21\x11\x00\x0c" + b"\xc0\x00\x02\x07" + b"\xc6\x33\x64\x01" + b"\xdc\x04\x01\xbb",
        ProxyHeader(2, 28, ("192.0.2.7", 56324), ("198.51.100.1", 443)),
    ),
    (
        SIG
        + b"\x21\x21\x00\x24"
        + bytes.fromhex("20010db8000000000000000000000007")
        + bytes.fromhex("20010db8000000000000000000000001")
        + b"\xff\xff\x20\xfb",
        ProxyHeader(2, 52, ("2001:db8::7", 65535), ("2001:db8::1", 8443)),
    ),
    # LOCAL (a health check by the balancer itself): family and addresses are ignored.
    (SIG + b"\x20\x00\x00\x00", ProxyHeader(2, 16, None)),
    (SIG + b"\x20\x11\x00\x0c" + b"\x00" * 12, ProxyHeader(2, 28, None)),
    # PROXY with UNSPEC: the connection's own addresses stay.
    (SIG + b"\x21\x00\x00\x03" + b"abc", ProxyHeader(2, 19, None)),
    # TLVs: ALPN "h2", AUTHORITY "r.example.com", NOOP (empty), AWS's VPC endpoint id (0xEA).
    (
        SIG
        + b"\x21\x11\x00\x3e"
        + b"\x0a\x00\x00\x01\x0a\x00\x00\x02\x30\x39\x01\xbb"
        + b"\x01\x00\x02h2"
        + b"\x02\x00\x0dr.example.com"
        + b"\x04\x00\x00"
        + b"\xea\x00\x17\x01vpce-0123456789abcdef0",
        ProxyHeader(
            2,
            78,
            ("10.0.0.1", 12345),
            ("10.0.0.2", 443),
            (
                (0x01, b"h2"),
                (0x02, b"r.example.com"),
                (0x04, b""),
                (0xEA, b"\x01vpce-0123456789abcdef0"),
            ),
        ),
    ),
]


@pytest.mark.parametrize(("raw", "header"), GOOD, ids=[repr(g[0][:24]) for g in GOOD])
@pytest.mark.parametrize("tail", TAILS, ids=["alone", "tls", "http"])
def test_a_header_and_what_follows(raw: bytes, header: ProxyHeader, tail: bytes) -> None:
    assert header.length == len(raw)
    assert parse(raw + tail) == header


@pytest.mark.parametrize(("raw", "header"), GOOD, ids=[repr(g[0][:24]) for g in GOOD])
def test_every_prefix_asks_for_more(raw: bytes, header: ProxyHeader) -> None:
    for cut in range(len(raw)):
        assert parse(raw[:cut]) is None, cut


@pytest.mark.parametrize(("raw", "header"), GOOD, ids=[repr(g[0][:24]) for g in GOOD])
def test_every_split_in_two_reads_consumes_exactly_the_header(
    raw: bytes, header: ProxyHeader
) -> None:
    stream = raw + TAILS[1]
    for cut in range(1, len(raw)):
        got, used = take(b"", stream[:cut])
        assert (got, used) == (None, cut)
        got, used = take(stream[:cut], stream[cut:])
        assert got == header
        assert cut + used == len(raw)


@given(
    st.sampled_from(GOOD),
    st.sampled_from(TAILS),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=120),
)
def test_any_reads_consume_the_header_and_not_a_byte_more(
    good: tuple[bytes, ProxyHeader], tail: bytes, arrivals: list[int]
) -> None:
    """A reader that peeks what has arrived, consumes what `take` says and reads again."""
    raw, header = good
    stream = raw + tail
    consumed = b""
    arrived = 0
    for size in [*arrivals, len(stream)]:
        arrived = min(len(stream), arrived + size)
        got, used = take(consumed, stream[len(consumed) : arrived])
        consumed += stream[len(consumed) : len(consumed) + used]
        if got is not None:
            assert got == header
            assert consumed == raw
            return
        assert len(consumed) < len(raw)
    pytest.fail("the header never completed")


def test_encoders_write_what_parse_reads() -> None:
    for source in (("192.0.2.7", 1), ("2001:db8::7", 65535), None):
        for encode in (proxyproto.v1, proxyproto.v2):
            raw = encode(source, None)
            got = parse(raw)
            assert got is not None and got.source == source and got.length == len(raw)
    tlvs = ((0x02, b"r.example.com"), (0xEA, b"\x01vpce-1"))
    got = parse(proxyproto.v2(("192.0.2.7", 1), ("192.0.2.1", 2), tlvs))
    assert got is not None and got.tlvs == tlvs


BAD = [
    # Not a PROXY header at all: known at the first byte that differs.
    (b"GET / HTTP/1.1\r\n", "no PROXY header"),
    (b"\x16\x03\x01\x02\x00", "no PROXY header"),
    (b"PUT", "no PROXY header"),
    (b"proxy TCP4", "no PROXY header"),
    (b"PROXY\tTCP4", "no PROXY header"),
    # Wrong v2 signature.
    (SIG[:7] + b"X", "no PROXY header"),
    (b"\r\n\r\nGET", "no PROXY header"),
    (SIG[:-1] + b"\r" + b"\x21\x11\x00\x0c", "no PROXY header"),
    # v1: too long, not one line, not the format.
    (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CR LF within 107 bytes"),
    (b"PROXY TCP4 " + b"1" * 200, "no CR LF within 107 bytes"),
    (b"PROXY TCP4 192.0.2.7\n", "not printable"),
    (b"PROXY TCP4 192.0.2.7 \x00", "not printable"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r", None),  # not an error yet: needs more
    (b"PROXY TCP5 192.0.2.7 198.51.100.1 1 2\r\n", "is not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n", "is not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n", "is not 'PROXY TCP4"),
    (b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n", "is not 'PROXY TCP4"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 \r\n", "is not 'PROXY TCP4"),
    (b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n", "is not an IPv4 address"),
    (b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n", "is not an IPv6 address"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n", "is not an IPv4 address"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "is not a number from 0 to 65535"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n", "is not a number"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 +2\r\n", "is not a number"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 1 \xd9\xa3\r\n", "not printable"),
    # v2: version, command, families, transports, lengths, TLVs.
    (SIG + b"\x11\x11\x00\x0c", "version 1, not 2"),
    (SIG + b"\x31\x11\x00\x0c", "version 3, not 2"),
    (SIG + b"\x22\x11\x00\x0c", "command 2 is neither LOCAL nor PROXY"),
    (SIG + b"\x21\x31\x00\xd8" + b"\x00" * 216, "family UNIX is not supported"),
    (SIG + b"\x21\x41\x00\x0c" + b"\x00" * 12, "family 4 is not supported"),
    (SIG + b"\x21\x12\x00\x0c" + b"\x00" * 12, "transport DGRAM is not supported"),
    (SIG + b"\x21\x10\x00\x0c" + b"\x00" * 12, "transport UNSPEC is not supported"),
    (SIG + b"\x21\x22\x00\x24" + b"\x00" * 36, "transport DGRAM is not supported"),
    (SIG + b"\x21\x11\x00\x08" + b"\x00" * 8, "too few for its 12 bytes"),
    (SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12, "too few for its 36 bytes"),
    (SIG + b"\x21\x11\x10\x01", "declares 4097 bytes, more than the 4096"),
    (SIG + b"\x20\x00\xff\xff", "declares 65535 bytes"),
    (SIG + b"\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x04\x00", "TLV is cut short"),
    (SIG + b"\x21\x11\x00\x10" + b"\x00" * 12 + b"\x02\x00\x05x", "TLV 0x02 runs past"),
]


@pytest.mark.parametrize(("raw", "why"), BAD, ids=[repr(b[0][:24]) for b in BAD])
def test_refused(raw: bytes, why: str | None) -> None:
    if why is None:
        assert parse(raw) is None
        return
    with pytest.raises(ProxyProtocolError, match=why.replace("+", r"\+").replace("(", r"\(")):
        parse(raw)
    # More bytes never turn a refusal into a header.
    with pytest.raises(ProxyProtocolError):
        parse(raw + b"\r\n" + b"\x00" * 64)


def test_the_declared_length_is_refused_before_its_bytes_arrive() -> None:
    """A v2 header's 16 fixed bytes are enough to refuse a hostile length: nothing more is
    waited for, so nothing more is buffered."""
    with pytest.raises(ProxyProtocolError, match="declares 65535 bytes"):
        take(b"", SIG + b"\x21\x11\xff\xff")


def test_a_reader_never_holds_more_than_max_header() -> None:
    """v2 at its largest accepted length; and a peek larger than that is cut there."""
    body = b"\x00" * 12 + b"\x04" + (4096 - 15).to_bytes(2, "big") + b"\x00" * (4096 - 15)
    raw = SIG + b"\x21\x11\x10\x00" + body
    assert len(raw) == MAX_HEADER
    header, used = take(b"", raw + b"x" * 10_000)
    assert header is not None and used == MAX_HEADER and header.source == ("0.0.0.0", 0)
    assert take(b"", raw[:-1])[1] == MAX_HEADER - 1


def test_a_cut_peer_asks_for_more_then_the_reader_decides() -> None:
    """Truncated: a header whose peer stops sending is only ever "need more" here; the reader
    turns the end of the stream or its deadline into the refusal."""
    for raw, _ in GOOD:
        assert parse(raw[:-1]) is None
