"""`-u`: log lines as RFC 5424 syslog messages to a unix datagram socket, UDP or TCP.

The rule it keeps: logging never stops or slows the server. Records are formatted in the caller
(cheap) and put on a bounded queue (the standard library's `QueueHandler`); one
`QueueListener` thread sends them. A missing socket, a full
collector or an unreachable host costs a dropped line, counted, and a note on stderr when the
state changes (never once per line). Lines look like the C forward's:
`<30>1 2026-11-23T02:36:09.123456+00:00 HOST forward PID - - text` (daemon facility; the severity
follows the record's level, so 30 is daemon.info). Over TCP each line ends with LF
(RFC 6587 non-transparent framing, what rsyslog and syslog-ng read by default); newlines inside a
message are written as `#012`, as rsyslog escapes them.

The standard library's SysLogHandler is not used as it is: it sends from `emit`, in the thread
that logs (the event loop), blocks on a full unix datagram socket or a slow TCP peer, and frames
TCP with NUL bytes.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import queue
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

DEFAULT_PORT = 514
FACILITY_DAEMON = 3
QUEUE_SIZE = 10_000
# How long a send may take before the line is given up (TCP connect or a blocked write).
SEND_TIMEOUT = 1.0
# After a failed TCP connection, wait this long (doubling, capped) before trying again.
RETRY_MIN, RETRY_MAX = 0.5, 30.0


class ULogError(ValueError):
    """A -u target that cannot be understood (not one that cannot be reached)."""


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "unix", "udp" or "tcp"
    address: str
    port: int = 0

    def __str__(self) -> str:
        return self.address if self.kind == "unix" else f"{self.kind}://{self.address}:{self.port}"


def parse_target(text: str) -> Target | None:
    """`-u` value -> Target; "" or "none" disables it."""
    if text in ("", "none", "off"):
        return None
    for kind in ("udp", "tcp"):
        prefix = kind + "://"
        if text.startswith(prefix):
            rest = text[len(prefix) :]
            host, port = split_host_port(rest, DEFAULT_PORT)
            if not host:
                raise ULogError(f"-u {text}: no host after {prefix}")
            return Target(kind, host, port)
    return Target("unix", text)


def split_host_port(text: str, default: int) -> tuple[str, int]:
    """`host[:port]` or `[v6]:port`; also what -S takes. A bad port is a ValueError."""
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ULogError(f"{text}: the port must be a number between 1 and 65535")
    return host, int(port_text)


def host_port(host: str, port: int) -> str:
    """The other way: `host:port`, with an IPv6 address in brackets (`[::1]:8088`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def severity(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    for level in (logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _SEVERITY[level]
    return 7


def format_line(
    text: str, levelno: int, created: float, host: str, pid: int, app: str = "forward"
) -> bytes:
    """One RFC 5424 message: `<PRI>1 TIMESTAMP HOST APP PID - - text`."""
    pri = FACILITY_DAEMON * 8 + severity(levelno)
    stamp = datetime.fromtimestamp(created, UTC).isoformat(timespec="microseconds")
    stamp = stamp.replace("+00:00", "Z")
    body = text.replace("\r", "").replace("\n", "#012")
    return f"<{pri}>1 {stamp} {host or '-'} {app} {pid} - - {body}".encode(errors="replace")


class _Sender:
    """Runs in the ulog thread: owns the socket, reconnects TCP with backoff."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sock: socket.socket | None = None
        self.retry_at = 0.0
        self.retry_delay = RETRY_MIN
        self.failing: str | None = None
        self.dropped = 0

    def send(self, line: bytes) -> None:
        now = time.monotonic()
        if now < self.retry_at:
            # The collector failed a moment ago: drop without a system call. The default
            # `-u ulog_socket` is usually absent, and trying (a socket, a failed send) for every
            # line cost more CPU than relaying the session the line is about.
            self.dropped += 1
            return
        try:
            self._send(line)
        except OSError as exc:
            if self.target.kind == "tcp":
                self._close()
            self.retry_at = now + self.retry_delay
            self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
            self.dropped += 1
            self._note_failure(exc.strerror or str(exc) or type(exc).__name__)
            return
        self.retry_delay = RETRY_MIN
        if self.failing is not None:
            _stderr(f"ulog: sending to {self.target} works again ({self.dropped} line(s) dropped)")
            self.failing = None

    def _send(self, line: bytes) -> None:
        t = self.target
        if t.kind == "tcp":
            if self.sock is None:
                self.sock = socket.create_connection((t.address, t.port), SEND_TIMEOUT)
            self.sock.sendall(line + b"\n")
            return
        if self.sock is None:
            family = socket.AF_UNIX if t.kind == "unix" else _family(t.address)
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.settimeout(SEND_TIMEOUT)
        where: str | tuple[str, int] = t.address if t.kind == "unix" else (t.address, t.port)
        self.sock.sendto(line, where)

    def _note_failure(self, why: str) -> None:
        if self.failing != why:
            self.failing = why
            _stderr(f"ulog: cannot send to {self.target}: {why}; dropping log lines until it works")

    def _close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _stderr(text: str) -> None:
    # Not through logging: these lines are about the log channel itself.
    with contextlib.suppress(OSError, ValueError):
        print(f"forward: {text}", file=sys.stderr, flush=True)


class _Sending(logging.Handler):
    """The handler the queue listener's thread calls: hands each line to the `_Sender`."""

    def __init__(self, sender: _Sender) -> None:
        super().__init__()
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        line = record.msg
        assert isinstance(line, bytes)  # made by ULogHandler.prepare
        self.sender.send(line)


class _Listener(logging.handlers.QueueListener):
    def __init__(self, lines: queue.Queue[logging.LogRecord | None], handler: _Sending) -> None:
        super().__init__(lines, handler)
        self.lines = lines

    def enqueue_sentinel(self) -> None:
        # A full queue must not make stopping fail (QueueListener uses put_nowait).
        with contextlib.suppress(queue.Full):
            self.lines.put(None, timeout=SEND_TIMEOUT * 2)


class ULogHandler(logging.handlers.QueueHandler):
    """Formats each record as a syslog line in the thread that logs and puts it on a bounded
    queue; the standard library's `QueueListener` thread sends it. A full queue drops the line."""

    queue: queue.Queue[logging.LogRecord | None]

    def __init__(self, target: Target, *, quiet_when_missing: bool = False) -> None:
        super().__init__(queue.Queue(QUEUE_SIZE))
        self.target = target
        self.host = socket.gethostname().split(".")[0] or "-"
        self._sender = _Sender(target)
        self._skipped = 0  # lines dropped here, in the logging thread: backing off, queue full
        if quiet_when_missing:
            # The C forward's default (-u ulog_socket) is usually absent: do not complain.
            self._sender.failing = "No such file or directory"
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._listener = _Listener(self.queue, _Sending(self._sender))
        self._listener.start()

    @property
    def dropped(self) -> int:
        return self._sender.dropped + self._skipped

    def emit(self, record: logging.LogRecord) -> None:
        if time.monotonic() < self._sender.retry_at:
            self._skipped += 1  # backing off: not even worth formatting the line
            return
        super().emit(record)  # prepare, enqueue; a bad %-format is logging's usual report

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        line = format_line(
            self.format(record),
            record.levelno,
            record.created,
            self.host,
            record.process or os.getpid(),
        )
        return logging.makeLogRecord({"msg": line, "levelno": record.levelno})

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self._skipped += 1

    def flush(self, timeout: float = 2.0) -> None:
        """Wait (a little) until the queued lines have been handed to the socket."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks > 0 and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        self._listener.stop()
        self._sender._close()
        super().close()


def handler_for(value: str, default: str) -> ULogHandler | None:
    """The handler for a `-u` value, or None when it is disabled."""
    target = parse_target(value)
    if target is None:
        return None
    return ULogHandler(target, quiet_when_missing=(value == default))
