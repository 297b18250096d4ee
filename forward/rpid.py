"""Which R process is at the other end of a unix connection to Rserve, and ending it.

SO_PEERCRED on forward's end names the process that *listens* on the socket: Rserve's parent,
which forks one R process per connection after accepting it. Ending that pid would end every
session, so it is only the start. The R process is the child of it that holds the other end of
this connection: the kernel's sock_diag netlink interface (what `ss -xp` uses) gives the inode of
the peer socket, and the child whose /proc/PID/fd has `socket:[that inode]` is the one. Reading
another process's /proc/PID/fd needs the same user or root, as signalling it does; where that is
not allowed the pid is unknown and nothing is signalled (docs/static.md).

The netlink request and reply are packed and parsed by pure functions; the rest is a few
system calls, fast enough for every session (a fraction of a millisecond, measured next to an
R fork of several). Only a child of the listener, and never forward itself, is ever returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import struct
from dataclasses import dataclass

log = logging.getLogger(__name__)

# linux/netlink.h, linux/sock_diag.h, linux/unix_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
UDIAG_SHOW_PEER = 0x04
UNIX_DIAG_PEER = 2
ALL_STATES = 0xFFFFFFFF
NO_COOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie
_RTATTR = struct.Struct("=HH")  # length, type

# After SIGTERM, how long R gets before SIGKILL.
KILL_GRACE = 5.0
# The pid is looked up at R's greeting, when the fork for this connection is among the newest
# children; looking further would cost a directory listing per open session.
MAX_CANDIDATES = 128
# A process just forked for one connection holds a handful of descriptors; one holding more
# serves many connections (a pre-forked server, not Rserve) and is not listed fd by fd.
MAX_FDS = 256


def diag_request(inode: int, seq: int = 1) -> bytes:
    """A sock_diag request for the unix socket `inode`, asking for its peer's inode."""
    body = _UNIX_DIAG_REQ.pack(
        socket.AF_UNIX, 0, 0, ALL_STATES, inode, UDIAG_SHOW_PEER, NO_COOKIE, NO_COOKIE
    )
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
        + body
    )


def peer_from_reply(data: bytes) -> int | None:
    """The peer inode in a sock_diag reply; None for an error reply, a socket without a peer,
    or anything short or malformed."""
    if len(data) < _NLMSGHDR.size + _UNIX_DIAG_MSG.size:
        return None
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    if kind != SOCK_DIAG_BY_FAMILY or length > len(data):
        return None
    pos = _NLMSGHDR.size + _UNIX_DIAG_MSG.size
    while pos + _RTATTR.size <= length:
        size, attr = _RTATTR.unpack_from(data, pos)
        if size < _RTATTR.size or pos + size > length:
            return None
        if attr == UNIX_DIAG_PEER and size >= _RTATTR.size + 4:
            return int(struct.unpack_from("=I", data, pos + _RTATTR.size)[0])
        pos += (size + 3) & ~3
    return None


def children_of(pid: int, proc: str = "/proc") -> list[int]:
    """The children `pid`'s main thread forked (Rserve forks there), newest first: the R
    process of a connection just made is almost always the last one forked."""
    try:
        with open(f"{proc}/{pid}/task/{pid}/children") as f:
            return sorted((int(k) for k in f.read().split()), reverse=True)
    except (OSError, ValueError):
        return []


def _holds(pid: int, link: str, proc: str = "/proc") -> bool:
    fd_dir = f"{proc}/{pid}/fd"
    try:
        # The size of /proc/PID/fd is its number of descriptors (Linux 6.2; 0 before).
        if os.stat(fd_dir).st_size > MAX_FDS:
            return False
        fds = os.listdir(fd_dir)
    except OSError:  # gone, or not ours to look at
        return False
    if len(fds) > MAX_FDS:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{fd}") == link:
                return True
    return False


def listener_pid(sock: socket.socket) -> int:
    """SO_PEERCRED: the pid that listens on the socket `sock` is connected to (0 if unknown,
    as for a listener in another pid namespace)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


def peer_inode(sock: socket.socket) -> int | None:
    """The inode of the other end of the connected unix socket `sock`, from sock_diag."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)  # the kernel answers at once; this only bounds a surprise
            nl.send(diag_request(os.fstat(sock.fileno()).st_ino))
            return peer_from_reply(nl.recv(8192))
    except OSError:
        return None


def find_r_pid(sock: socket.socket) -> int | None:
    """The pid of the R process serving the connection `sock`, or None when it cannot be told
    (another user's processes, no sock_diag, a server that does not fork)."""
    try:
        parent = listener_pid(sock)
    except OSError:
        return None
    me = os.getpid()
    # A listener in this process (a test's fake Rserve) has no R children of its own.
    peer = peer_inode(sock) if parent > 0 and parent != me else None
    if peer is None:
        return None
    link = f"socket:[{peer}]"
    for child in children_of(parent)[:MAX_CANDIDATES]:
        if child != me and _holds(child, link):
            return child
    return None


@dataclass(slots=True)
class RProcess:
    """One R process, held by a pidfd so that a signal can never reach a recycled pid
    (-1 when the process had ended before it could be opened)."""

    pid: int
    pidfd: int

    @classmethod
    def of(cls, sock: socket.socket) -> RProcess | None:
        pid = find_r_pid(sock)
        if pid is None:
            return None
        try:
            return cls(pid, os.pidfd_open(pid))
        except OSError:
            return cls(pid, -1)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def ended(self) -> bool:
        """A pidfd becomes readable when its process has ended (even before it is reaped)."""
        return self.pidfd < 0 or bool(select.select([self.pidfd], [], [], 0)[0])

    def end(self, grace: float = KILL_GRACE) -> str:
        """SIGTERM now, SIGKILL after `grace` seconds if it is still there; the pidfd is closed
        then. Returns what was done, for the log line."""
        if self.ended():
            self.close()
            return "it had already ended"
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)
        except ProcessLookupError:
            self.close()
            return "it had already ended"
        except PermissionError:
            self.close()
            return "forward may not signal it (another user): it runs until R is done"
        asyncio.get_running_loop().call_later(grace, self._kill)
        return "ended with SIGTERM"

    def _kill(self) -> None:
        if not self.ended():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                log.warning("R process %d did not end at SIGTERM: sent SIGKILL", self.pid)
        self.close()
