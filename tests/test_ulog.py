"""-u: RFC 5424 lines to a unix datagram socket, UDP and TCP collectors; never blocking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from forward import ulog
from forward.ulog import Target, ULogHandler, format_line, parse_target

from .conftest import Rserve, StartCli

LINE = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) forward (?P<pid>\d+) - - (?P<text>.*)$"
)


def check_line(raw: bytes) -> re.Match[bytes]:
    m = LINE.match(raw)
    assert m, raw
    stamp = datetime.fromisoformat(m["ts"].decode())
    assert stamp.tzinfo is not None
    assert m["host"] == socket.gethostname().split(".")[0].encode()
    return m


def test_format_is_rfc5424_like_the_c_forward() -> None:
    raw = format_line("hello\nworld", logging.INFO, 1_700_000_000.25, "box", 42)
    assert raw == b"<30>1 2023-11-14T22:13:20.250000Z box forward 42 - - hello#012world"
    assert format_line("x", logging.WARNING, 0, "h", 1).startswith(b"<28>1 ")
    assert format_line("x", logging.ERROR, 0, "h", 1).startswith(b"<27>1 ")
    epoch = b"<31>1 1970-01-01T00:00:00.000000Z - "
    assert format_line("x", logging.DEBUG, 0, "", 1).startswith(epoch)


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("ulog_socket", Target("unix", "ulog_socket")),
        ("/run/x.sock", Target("unix", "/run/x.sock")),
        ("udp://10.0.0.1", Target("udp", "10.0.0.1", 514)),
        ("udp://10.0.0.1:1514", Target("udp", "10.0.0.1", 1514)),
        ("tcp://[::1]:601", Target("tcp", "::1", 601)),
        ("tcp://::1", Target("tcp", "::1", 514)),
        ("", None),
        ("none", None),
    ],
)
def test_parse_target(text: str, target: Target | None) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("bad", ["udp://", "tcp://host:99999", "udp://h:x"])
def test_bad_targets_are_config_errors(bad: str) -> None:
    with pytest.raises(ulog.ULogError):
        parse_target(bad)


@contextlib.contextmanager
def dgram_collector(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()


def emit(logger: logging.Logger, handler: logging.Handler, text: str) -> None:
    logger.addHandler(handler)
    try:
        logger.warning("%s", text)
    finally:
        logger.removeHandler(handler)


def test_unix_datagram_collector_receives_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    logger = logging.getLogger("forward.test.ulog")
    with dgram_collector(path) as coll:
        handler = ULogHandler(Target("unix", str(path)))
        try:
            emit(logger, handler, "first line")
            emit(logger, handler, "second line")
            got = [coll.recv(65536), coll.recv(65536)]
        finally:
            handler.close()
    for raw, text in zip(got, ["first line", "second line"], strict=True):
        m = check_line(raw)
        assert m["pri"] == b"28" and int(m["pid"]) == os.getpid()
        assert m["text"] == f"WARNING forward.test.ulog: {text}".encode()


def test_udp_collector_receives_lines() -> None:
    logger = logging.getLogger("forward.test.ulog")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as coll:
        coll.bind(("127.0.0.1", 0))
        coll.settimeout(10)
        handler = ULogHandler(Target("udp", "127.0.0.1", coll.getsockname()[1]))
        try:
            emit(logger, handler, "over udp")
            raw = coll.recv(65536)
        finally:
            handler.close()
    assert check_line(raw)["text"].endswith(b"over udp")


def test_tcp_collector_receives_lf_framed_lines() -> None:
    logger = logging.getLogger("forward.test.ulog")
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        handler = ULogHandler(Target("tcp", "127.0.0.1", server.getsockname()[1]))
        try:
            emit(logger, handler, "one")
            emit(logger, handler, "two\nlines")
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while data.count(b"\n") < 2:
                    chunk = conn.recv(65536)
                    assert chunk, "collector connection closed early"
                    data += chunk
        finally:
            handler.close()
    lines = data.split(b"\n")[:2]
    assert [check_line(x)["text"].split(b": ", 1)[1] for x in lines] == [b"one", b"two#012lines"]


def test_missing_socket_or_dead_collector_drops_lines_without_blocking(tmp_path: Path) -> None:
    logger = logging.getLogger("forward.test.ulog")
    # A port nobody listens on: connection refused, then backoff; the unix path does not exist.
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead_port = s.getsockname()[1]
    for target in (
        Target("unix", str(tmp_path / "absent.sock")),
        Target("tcp", "127.0.0.1", dead_port),
    ):
        handler = ULogHandler(target)
        try:
            for i in range(200):
                emit(logger, handler, f"line {i}")
            handler.flush()
            assert handler.dropped == 200
        finally:
            handler.close()


def test_missing_collector_is_retried_with_backoff_not_per_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every line used to try the socket again: with the default `-u` (usually absent) that was
    a third of forward's CPU while sessions opened. Now a failure waits RETRY_MIN, then longer."""
    attempts = 0
    real_send = ulog._Sender._send

    def counting(self: ulog._Sender, line: bytes) -> None:
        nonlocal attempts
        attempts += 1
        real_send(self, line)

    monkeypatch.setattr(ulog._Sender, "_send", counting)
    monkeypatch.setattr(ulog, "RETRY_MIN", 0.3)
    path = tmp_path / "late.sock"
    logger = logging.getLogger("forward.test.ulog")
    handler = ULogHandler(Target("unix", str(path)))
    try:
        for i in range(500):
            emit(logger, handler, f"line {i}")
        handler.flush()
        assert handler.dropped == 500 and attempts == 1
        with dgram_collector(path) as coll:
            time.sleep(0.4)  # past the first retry delay
            emit(logger, handler, "back")
            handler.flush()
            coll.settimeout(5)
            assert coll.recv(65536).endswith(b"back")
            assert attempts == 2
    finally:
        handler.close()


def test_full_queue_drops_instead_of_growing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The sender is held inside its first line: one more fits the queue, the rest are dropped.
    sending, release = threading.Event(), threading.Event()
    real_send = ulog._Sender.send

    def held(self: ulog._Sender, line: bytes) -> None:
        sending.set()
        release.wait(10)
        real_send(self, line)

    monkeypatch.setattr(ulog._Sender, "send", held)
    monkeypatch.setattr(ulog, "QUEUE_SIZE", 1)
    path = tmp_path / "slow.sock"
    logger = logging.getLogger("forward.test.ulog")
    with dgram_collector(path) as coll:
        handler = ULogHandler(Target("unix", str(path)))
        try:
            emit(logger, handler, "first")
            assert sending.wait(10)
            for i in range(5):
                emit(logger, handler, f"overflow {i}")
            assert handler.dropped == 4
            release.set()
            handler.flush()
            coll.settimeout(5)
            assert coll.recv(65536).endswith(b"first")
            assert coll.recv(65536).endswith(b"overflow 0")
        finally:
            release.set()
            handler.close()


async def test_forward_sends_its_log_to_the_u_socket(
    rserve_qap: Rserve, tmp_path: Path, forward_cli: StartCli
) -> None:
    path = tmp_path / "ulog.sock"
    with dgram_collector(path) as coll:
        fwd = await forward_cli("-s", str(rserve_qap.socket), "-u", str(path))
        texts: list[bytes] = []
        while not any(b"listening on" in t for t in texts):
            m = check_line(await asyncio.to_thread(coll.recv, 65536))
            assert int(m["pid"]) == fwd.pid
            texts.append(m["text"])
        assert await fwd.stop() == 0
        while not any(b"shutting down" in t for t in texts):
            texts.append(check_line(await asyncio.to_thread(coll.recv, 65536))["text"])
