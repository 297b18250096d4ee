"""The hand-over between two forward processes, sans I/O: its records and the rules for reading
them (docs/operations.md, "Upgrades without losing sessions").

A running forward (the predecessor) gives a new one (the successor) its listening sockets and
every resumable session's connection to R with the session's state, over a unix SOCK_SEQPACKET
socket: one record per packet, descriptors attached with SCM_RIGHTS. The conversation:

    successor    hello    {versions, forward, pid}
    predecessor  offer    {version, forward, pid, listeners}      + the listening sockets
    successor    accept | refuse {reason}
    successor    ready                                     (serving on the same sockets)
    predecessor  session  {state}                          + R's socket, then `data` records
    successor    taken    {key}                            (once it holds the session)
    predecessor  done     {sessions}
    successor    bye

The state is versioned: `VERSION` is what this forward writes, `READABLE` what it can read. A
successor that cannot read the offered version refuses, and the predecessor serves on as if
nothing had happened: it stops accepting only once the successor is ready.

A record is a 4-byte length, that many bytes of JSON (an object with "kind"), then a binary
payload (the bytes R sent that the client has not acknowledged, in `data` records).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

FORMAT = "forward-handover"
VERSION = 1
READABLE = frozenset({1})
# One record per packet: well below the unix socket's send buffer, so a packet is never refused
# for its size.
MAX_RECORD = 60 * 1024
MAX_FDS = 64  # descriptors in one record (the listening sockets come in one)
_LENGTH = struct.Struct(">I")

KINDS = frozenset(
    {"hello", "offer", "accept", "refuse", "ready", "session", "data", "taken", "done", "bye"}
)


class HandoverError(Exception):
    """The other process said something this one cannot follow; the message says what."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: str
    meta: dict[str, Any]
    payload: bytes = b""


def encode(kind: str, payload: bytes = b"", **meta: Any) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"no record kind {kind!r}")
    head = json.dumps({"kind": kind, **meta}, separators=(",", ":")).encode()
    record = _LENGTH.pack(len(head)) + head + payload
    if len(record) > MAX_RECORD:
        raise ValueError(f"{kind} record of {len(record)} bytes is over {MAX_RECORD}")
    return record


def decode(packet: bytes) -> Record:
    if len(packet) < _LENGTH.size:
        raise HandoverError("a record shorter than its length field")
    (size,) = _LENGTH.unpack_from(packet)
    if _LENGTH.size + size > len(packet):
        raise HandoverError("a record shorter than its header says")
    try:
        head = json.loads(packet[_LENGTH.size : _LENGTH.size + size])
    except ValueError:
        raise HandoverError("a record header that is not JSON") from None
    if not isinstance(head, dict) or head.get("kind") not in KINDS:
        raise HandoverError("a record of no known kind")
    kind = head.pop("kind")
    return Record(kind, head, packet[_LENGTH.size + size :])


def hello(forward: str, pid: int) -> bytes:
    return encode("hello", versions=sorted(READABLE), forward=forward, pid=pid)


def offer(forward: str, pid: int, listeners: list[dict[str, Any]]) -> bytes:
    return encode(
        "offer", format=FORMAT, version=VERSION, forward=forward, pid=pid, listeners=listeners
    )


def readable(offered: Record) -> str | None:
    """Why this forward cannot take over what `offered` describes, or None if it can."""
    version = offered.meta.get("version")
    if offered.meta.get("format") != FORMAT:
        return "the offer is not a forward hand-over"
    if version not in READABLE:
        return (
            f"the running forward {offered.meta.get('forward', '?')} hands over state version "
            f"{version}; this forward reads version {', '.join(map(str, sorted(READABLE)))}"
        )
    return None


# -- the listening sockets ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listener:
    """One listening socket as the records describe it: which listener, and where."""

    name: str  # "http", "ws", "redirect", "admin"
    address: str  # the port, or a unix socket's path
    row: int = 0  # the --workers process it serves in (its sockets of the shared ones: 0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "row": self.row}


def listeners_of(offered: Record, fds: int) -> list[Listener]:
    items = offered.meta.get("listeners")
    if not isinstance(items, list) or len(items) != fds:
        raise HandoverError(f"the offer names {len(items or [])} listeners and carries {fds}")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise HandoverError("a listener that is not described")
        row = item.get("row", 0)
        if type(row) is not int or not 0 <= row < 1024:
            raise HandoverError("a listener of no worker")
        out.append(Listener(str(item.get("name")), str(item.get("address")), row))
    return out


def compare_rows(handed: list[Listener], workers: int) -> str | None:
    """Why a forward with `workers` processes (1: no --workers) cannot serve on sockets bound
    for the handed ones' processes, or None. Each worker has its own SO_REUSEPORT sockets, so
    the number of processes stays what it was."""
    rows = len({x.row for x in handed}) if handed else 1
    if rows == workers:
        return None

    def show(n: int) -> str:
        return f"--workers {n}" if n > 1 else "a single process"

    return (
        f"the running forward serves with {show(rows)}; this one is configured for "
        f"{show(workers)}: a hand-over keeps the processes' sockets, so give the same number "
        f"(or restart)"
    )


def wanted_listeners(ports: dict[str, int], unix: str | None, admin_port: int) -> list[Listener]:
    """The listeners a configuration asks for (ports by listener name; 0: none)."""
    out = [Listener(name, str(port)) for name, port in ports.items() if port > 0]
    if unix:
        out.append(Listener("http", unix))
    if admin_port > 0:
        out.append(Listener("admin", str(admin_port)))
    return out


def compare_listeners(handed: list[Listener], wanted: list[Listener]) -> str | None:
    """Why the handed sockets are not the ones this forward's configuration asks for, or None.

    A successor serves on what its predecessor bound: a port it would have to bind anew could be
    taken, and one the predecessor had and it would not serve would refuse connections. So a
    change of listeners is a restart, not a hand-over."""
    have = sorted({(x.name, x.address) for x in handed})
    want = sorted({(x.name, x.address) for x in wanted})
    if have == want:
        return None

    def show(items: list[tuple[str, str]]) -> str:
        return ", ".join(f"{a} ({n})" for n, a in items) or "nothing"

    return (
        f"the running forward listens on {show(have)}; this one is configured for "
        f"{show(want)}: a hand-over keeps the listeners, so give the same ones (or restart)"
    )


# -- sessions -------------------------------------------------------------------------------------


def chunks(data: bytes, size: int = MAX_RECORD - 256) -> list[bytes]:
    """`data` cut to fit `data` records."""
    return [data[i : i + size] for i in range(0, len(data), size)] or []
