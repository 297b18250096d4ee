"""Random bytes at forward's HTTP port, as a whole request and inside a WebSocket handshake:
never a 5xx, never a traceback in the log, and the server goes on serving (issue 15).

forward runs as its command line, so that its whole log can be read afterwards; hypothesis
drives a plain blocking client, in a thread."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Rserve, StartCli
from .rclient import RClient

STATUS = re.compile(rb"HTTP/\d\.\d (\d{3}) ")
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

# Text a header value may hold on the wire: anything but CR and LF.
value = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
line = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r\n", b""])


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    """An upgrade request with some of its parts replaced by random bytes."""
    parts = [
        (b"GET ", st.sampled_from([b"GET ", b"POST ", b"G\x00T "]) | value),
        (b"/", st.sampled_from([b"/", b"/a\r\nX-Injected: yes", b"*"]) | value),
        (b" HTTP/1.1", st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b"", b" HTTP/2.0"])),
        (b"\r\nHost: 127.0.0.1", value.map(lambda v: b"\r\nHost: " + v)),
        (b"\r\nUpgrade: websocket", value.map(lambda v: b"\r\nUpgrade: " + v)),
        (b"\r\nConnection: Upgrade", value.map(lambda v: b"\r\nConnection: " + v)),
        (b"\r\nSec-WebSocket-Key: " + KEY, value.map(lambda v: b"\r\nSec-WebSocket-Key: " + v)),
        (b"\r\nSec-WebSocket-Version: 13", value.map(lambda v: b"\r\nSec-WebSocket-Version: " + v)),
        (b"", value.map(lambda v: b"\r\nOrigin: " + v)),
        (b"", value.map(lambda v: b"\r\nSec-WebSocket-Protocol: " + v)),
        (b"", value.map(lambda v: b"\r\nX-Forwarded-For: " + v)),
    ]
    out = b"".join(draw(st.just(good) | bad) for good, bad in parts)
    return out + draw(line) + draw(line) + draw(st.binary(max_size=20))


# Behind whatever was thrown, a request that ends the connection: a half-close would make
# aiohttp drop the connection without answering, and a request the bytes left incomplete is
# completed (or refused) by it.
END = b"\r\n\r\nGET /end HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


def exchange(port: int, request: bytes) -> bytes:
    """Send `request`, then END, and read until forward closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request + END)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass  # a WebSocket closed for a protocol error drops what it did not read
        return got


@pytest.mark.rserve
async def test_random_bytes_never_get_a_5xx_nor_a_traceback(
    rserve_qap: Rserve, forward_cli: StartCli, tmp_path: Path
) -> None:
    empty = tmp_path / "www"
    empty.mkdir()
    fwd = await forward_cli("-s", str(rserve_qap.socket), "-r", str(empty), ports=("-p", "-w"))
    ports = (fwd.ports["-p"], fwd.ports["-w"])
    answers: list[bytes] = []

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.one_of(st.binary(min_size=1, max_size=300), handshakes()))
    def throw(request: bytes) -> None:
        for port in ports:
            got = exchange(port, request)
            answers.append(got)
            for status in STATUS.findall(got):
                assert not status.startswith(b"5"), (port, request, got[:300])

    # In a thread: the event loop goes on copying forward's log, whose pipe would fill.
    await asyncio.to_thread(throw)
    # The server answered, not only hung up.
    seen = {status for a in answers for status in STATUS.findall(a)}
    assert b"400" in seen, seen
    for port in ports:
        async with await RClient.connect(f"ws://127.0.0.1:{port}/") as c:
            assert (await c.eval("6 * 7")).value == [42.0]
    await fwd.stop()
    assert "Traceback" not in fwd.log() and " ERROR " not in fwd.log(), fwd.log()[-3000:]
