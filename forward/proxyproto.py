"""The PROXY protocol (HAProxy's specification, versions 1 and 2) as pure code: bytes in, a
header, "not yet" or an error out.

A TCP load balancer (nginx `stream` with `proxy_protocol on;`, HAProxy `send-proxy[-v2]`, an AWS
Network Load Balancer, Envoy, Traefik) writes one of these headers before the client's first byte,
so that the server learns the client's address. `parse` looks at the start of a connection's
stream and answers as early as it can: bytes that cannot begin either version are an error at
once (a browser speaking TLS or HTTP straight to the port); v1's line is refused once its 107
bytes hold no CR LF; v2's declared length is checked against `V2_MAX_LENGTH` before a byte of it
is waited for. So the caller never buffers more than `MAX_HEADER` bytes, whatever the peer sends.
It keeps no state: the caller passes what it has read so far, and calls again with more.

No socket, no event loop, no logging here (forward/proxysite.py does the reading).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
# "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n" is the longest line (section 2.1).
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family and transport, length
# The specification allows 65535 bytes of addresses and TLVs; what load balancers send (an IPv6
# pair, AWS's VPC endpoint id, HAProxy's TLS details) fits many times over in 4 KiB.
V2_MAX_LENGTH = 4096
MAX_HEADER = V2_FIXED + V2_MAX_LENGTH


class Command(enum.IntEnum):
    """v2's command, the low nibble of byte 13 (section 2.2)."""

    LOCAL = 0x0  # the proxy's own connection (a health check): no client behind it
    PROXY = 0x1


class Family(enum.IntEnum):
    """v2's address family, the high nibble of byte 14."""

    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    """v2's transport protocol, the low nibble of byte 14."""

    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


# Bytes of source and destination address and port, by family (section 2.2).
_ADDRESS_BLOCK = {Family.INET: 12, Family.INET6: 36}


class ProxyProtocolError(Exception):
    """Bytes that are not an acceptable PROXY header; the message says why, for a log line."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header. `source` is the client's (address, port); None for v1 `UNKNOWN`, v2
    `LOCAL` and v2 `UNSPEC`, where the connection's own peer stays the client."""

    version: int
    length: int  # bytes the header takes at the start of the stream
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None
    # v2's type-length-value extensions, in order: (type, value).
    tlvs: tuple[tuple[int, bytes], ...] = ()


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """The header at the start of `data`; None when `data` is the beginning of one (read more).

    Raises ProxyProtocolError for anything else. Bytes after the header are the client's and
    are not looked at."""
    data = bytes(data[:MAX_HEADER])
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyProtocolError(f"no PROXY header: the connection begins with {_start(data)}")


def take(buffered: bytes, available: bytes) -> tuple[ProxyHeader | None, int]:
    """One read of a connection's start, for a reader that peeks before it consumes: `buffered`
    is what it has consumed so far (all of it header), `available` what the socket holds after
    that, peeked. Returns the header once it is complete, and how many bytes of `available` to
    consume: the rest of the header then, and all of them before (they are all header bytes),
    so that the client's first byte stays unread for whoever takes the connection next."""
    available = available[: MAX_HEADER - len(buffered)]
    header = parse(buffered + available)
    if header is None:
        return None, len(available)
    return header, header.length - len(buffered)


def _start(data: bytes) -> str:
    return repr(data[:12])


# -- version 1: one text line ------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyProtocolError(f"no PROXY header: the connection begins with {_start(data)}")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        line = data[:V1_MAX]
        if line.endswith(b"\r"):
            line = line[:-1]
        if any(not 0x20 <= b <= 0x7E for b in line):
            raise ProxyProtocolError("PROXY v1 line holds a byte that is not printable ASCII")
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line has no CR LF within {V1_MAX} bytes")
        return None
    line = data[len(V1_PREFIX) : end]
    if any(not 0x20 <= b <= 0x7E for b in line):
        raise ProxyProtocolError("PROXY v1 line holds a byte that is not printable ASCII")
    words = line.decode("ascii").split(" ")
    length = end + 2
    if words[0] == "UNKNOWN":
        # The rest of the line is to be ignored (section 2.1).
        return ProxyHeader(1, length, None)
    if words[0] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1 protocol {words[0][:16]!r} is not TCP4, TCP6 or UNKNOWN"
        )
    if len(words) != 5:
        raise ProxyProtocolError(
            "PROXY v1 line is not 'PROXY TCP4|TCP6 SOURCE DESTINATION SPORT DPORT'"
        )
    source = (_v1_address(words[0], words[1]), _v1_port(words[3]))
    destination = (_v1_address(words[0], words[2]), _v1_port(words[4]))
    return ProxyHeader(1, length, source, destination)


def _v1_address(proto: str, text: str) -> str:
    kind = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    try:
        return str(kind(text))
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1 address {text[:45]!r} is not an IPv{proto[3]} address"
        ) from None


def _v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyProtocolError(f"PROXY v1 port {text[:8]!r} is not a number from 0 to 65535")
    return int(text)


# -- version 2: binary -------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        raise ProxyProtocolError(f"no PROXY header: the connection begins with {_start(data)}")
    if len(data) < V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY header of version {version}, not 2")
    if command not in (Command.LOCAL, Command.PROXY):
        raise ProxyProtocolError(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    declared = int.from_bytes(data[14:16], "big")
    if declared > V2_MAX_LENGTH:
        raise ProxyProtocolError(
            f"PROXY v2 header declares {declared} bytes, more than the {V2_MAX_LENGTH} accepted"
        )
    length = V2_FIXED + declared
    if len(data) < length:
        return None
    if command == Command.LOCAL:
        # The proxy speaking for itself: family, addresses and TLVs are to be ignored.
        return ProxyHeader(2, length, None)
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family == Family.UNSPEC:
        # An unknown protocol behind the proxy; the specification lets the receiver keep the
        # connection's own addresses, as for LOCAL.
        return ProxyHeader(2, length, None)
    if family not in _ADDRESS_BLOCK:
        raise ProxyProtocolError(
            f"PROXY v2 address family {_name(Family, family)} is not supported (only INET, "
            "INET6 and UNSPEC)"
        )
    if transport != Transport.STREAM:
        raise ProxyProtocolError(
            f"PROXY v2 transport {_name(Transport, transport)} is not supported (only STREAM)"
        )
    block = _ADDRESS_BLOCK[Family(family)]
    if declared < block:
        raise ProxyProtocolError(
            f"PROXY v2 header declares {declared} bytes, too few for its {block} bytes of addresses"
        )
    body = data[V2_FIXED:length]
    size = 4 if family == Family.INET else 16
    source_ip = ipaddress.ip_address(body[:size])
    destination_ip = ipaddress.ip_address(body[size : 2 * size])
    source_port = int.from_bytes(body[2 * size : 2 * size + 2], "big")
    destination_port = int.from_bytes(body[2 * size + 2 : 2 * size + 4], "big")
    return ProxyHeader(
        2,
        length,
        (str(source_ip), source_port),
        (str(destination_ip), destination_port),
        _tlvs(body[block:]),
    )


def _name(kind: type[enum.IntEnum], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(value)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 3:
            raise ProxyProtocolError("PROXY v2 TLV is cut short")
        kind, size = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
        pos += 3
        if len(data) - pos < size:
            raise ProxyProtocolError(f"PROXY v2 TLV 0x{kind:02x} runs past the header")
        out.append((kind, data[pos : pos + size]))
        pos += size
    return tuple(out)


def v1(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v1 header, as a load balancer writes it (for tests and tools); None: UNKNOWN."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    destination = destination or (("::" if ":" in source[0] else "0.0.0.0"), 0)
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None = None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """A v2 header, as a load balancer writes it (for tests and tools); None: LOCAL."""
    extra = b"".join(bytes([kind]) + len(value).to_bytes(2, "big") + value for kind, value in tlvs)
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + len(extra).to_bytes(2, "big") + extra
    src = ipaddress.ip_address(source[0])
    if destination is None:
        destination = ("::" if src.version == 6 else "0.0.0.0", 0)
    dst = ipaddress.ip_address(destination[0])
    family = Family.INET if src.version == 4 else Family.INET6
    body = (
        src.packed
        + dst.packed
        + source[1].to_bytes(2, "big")
        + destination[1].to_bytes(2, "big")
        + extra
    )
    return (
        V2_SIGNATURE
        + bytes([0x20 | Command.PROXY, family << 4 | Transport.STREAM])
        + len(body).to_bytes(2, "big")
        + body
    )
