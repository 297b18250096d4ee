"""The hand-over's I/O: a running forward gives its listeners and resumable sessions to a new one.

The records and their rules are in handover.py; this module moves them over a unix
SOCK_SEQPACKET socket with their descriptors (SCM_RIGHTS), on the event loop of each process.
`Predecessor` listens at `--handover-socket` in the running forward; `take_over` is what a
forward started with `--takeover` does before it serves. docs/operations.md says how to use it.

What each side guarantees:
- The predecessor stops accepting only when the successor serves on the same sockets, so no
  connection is refused; a successor that refuses the offer, fails or dies before it is ready
  leaves the predecessor serving as before.
- A session is handed over at rest: reading from both ends stopped, every byte meant for R
  taken by R's socket, no timer running. The successor holds R's socket and the session's state
  before the predecessor tells the client to resume (close 4100), so the client's resume finds
  it. Sessions that did not ask for resume get the shutdown notice and 1001, as at any stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from . import __version__, handover
from .app import Server
from .config import Config, ConfigError
from .handover import HandoverError, Record
from .listeners import wait_ready
from .resumable import ResumableSession
from .session import State

log = logging.getLogger("forward")

HELLO_TIMEOUT = 10.0  # for each record of the conversation, except:
START_TIMEOUT = 60.0  # the successor loads its certificates and starts serving
DRAIN_STEP = 0.01  # how often the predecessor looks whether R took every byte meant for it
BATCH = 64  # sessions sent before their `taken` answers are read


class Channel:
    """One SOCK_SEQPACKET connection: a record a packet, descriptors attached."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def _ready(self, write: bool, within: float) -> None:
        async with asyncio.timeout(within):
            await wait_ready(self.sock, write)

    async def send(
        self, record: bytes, fds: Sequence[int] = (), within: float = HELLO_TIMEOUT
    ) -> None:
        while True:
            try:
                socket.send_fds(self.sock, [record], list(fds))
                return
            except BlockingIOError:
                await self._ready(True, within)

    async def recv(self, within: float = HELLO_TIMEOUT) -> tuple[Record, list[int]]:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self.sock, handover.MAX_RECORD, handover.MAX_FDS
                )
            except BlockingIOError:
                await self._ready(False, within)
                continue
            if flags & socket.MSG_CTRUNC:
                _close_fds(fds)
                raise HandoverError("a record with more descriptors than allowed")
            if not data:
                _close_fds(fds)
                raise HandoverError("the other process closed the hand-over")
            try:
                return handover.decode(data), fds
            except HandoverError:
                _close_fds(fds)
                raise

    async def expect(self, *kinds: str, within: float = HELLO_TIMEOUT) -> tuple[Record, list[int]]:
        record, fds = await self.recv(within)
        if record.kind not in kinds:
            _close_fds(fds)
            if record.kind == "refuse":
                raise Refusal(str(record.meta.get("reason", "no reason given")))
            raise HandoverError(f"expected {' or '.join(kinds)}, got {record.kind}")
        return record, fds

    def close(self) -> None:
        self.sock.close()


class Refusal(Exception):
    """The other process said no, and why."""


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _describe(row: int, name: str, sock: socket.socket) -> dict[str, Any]:
    if sock.family == socket.AF_UNIX:
        return handover.Listener(name, str(sock.getsockname()), row).describe()
    return handover.Listener(name, str(sock.getsockname()[1]), row).describe()


Listeners = dict[str, list[socket.socket]]


class Holder(Protocol):
    """What a hand-over needs of the process that holds the listeners: a single forward's
    `Server` (ServerHolder) or the `--workers` parent (workers.Supervisor)."""

    config: Config

    def listening(self) -> list[tuple[int, str, socket.socket]]:
        """Every listening socket once, with the row (worker) it serves in and its name."""
        ...

    async def stop_accepting(self) -> None: ...

    async def accept_again(self, rows: list[Listeners]) -> None: ...

    def resumable(self) -> list[ResumableSession]: ...

    def others(self) -> int:
        """Sessions this process still holds that are not handed over."""
        ...


class ServerHolder:
    """A single forward as the holder of its listeners and sessions."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config

    def listening(self) -> list[tuple[int, str, socket.socket]]:
        return [(0, name, s) for name, socks in self.server.listening.items() for s in socks]

    async def stop_accepting(self) -> None:
        await self.server.stop_accepting()

    async def accept_again(self, rows: list[Listeners]) -> None:
        await self.server.accept_again(rows[0])

    def resumable(self) -> list[ResumableSession]:
        return list(self.server.resumable.values())

    def others(self) -> int:
        return len(self.server.sessions)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


# -- the running forward -----------------------------------------------------------------------


class Predecessor:
    """The running forward's end: a successor connects to `--handover-socket` and takes over.

    `handed` is set once everything went to a successor: the process then ends its sessions
    that could not be handed over and exits, leaving the listeners (and the unix socket file) to
    the successor."""

    def __init__(self, holder: Holder, path: str) -> None:
        self.holder = holder
        self.path = path
        self.handed = asyncio.Event()
        self.handed_callbacks: list[Callable[[], None]] = []
        self.successor = 0  # its pid, once handed
        self._spawned: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._busy = False

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old = os.umask(0o177)  # only this user (or root) may take the sessions over
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            sock.listen(4)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen on --handover-socket {self.path}: {exc.strerror or exc}"
            ) from None
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        log.info("hand-over: a successor started with --takeover connects at %s", self.path)

    def close(self, unlink: bool = True) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        uid = _peer_uid(conn)
        if uid not in (os.getuid(), 0):
            log.warning(
                "hand-over: refused a process of user %d (only user %d or root)", uid, os.getuid()
            )
            conn.close()
            return
        if self._busy or self.handed.is_set():
            log.warning("hand-over: a second successor while one is taking over: refused")
            with contextlib.suppress(OSError):
                conn.send(handover.encode("refuse", reason="a hand-over is under way"))
            conn.close()
            return
        self._busy = True
        asyncio.get_running_loop().create_task(self._converse(Channel(conn)))

    async def _converse(self, channel: Channel) -> None:
        try:
            await self._hand_over(channel)
        except Refusal as exc:
            log.warning("hand-over refused by the new process: %s; serving on", exc)
        except (HandoverError, OSError, TimeoutError) as exc:
            log.warning("hand-over failed: %s; serving on", exc or type(exc).__name__)
        finally:
            channel.close()
            self._busy = False

    async def _hand_over(self, channel: Channel) -> None:
        holder = self.holder
        hello, fds = await channel.expect("hello")
        _close_fds(fds)
        pid = int(hello.meta.get("pid", 0))
        log.info(
            "hand-over: process %d (forward %s) asks to take over",
            pid,
            hello.meta.get("forward", "?"),
        )
        named = holder.listening()
        await channel.send(
            handover.offer(__version__, os.getpid(), [_describe(*x) for x in named]),
            [s.fileno() for _, _, s in named],
        )
        await channel.expect("accept", within=START_TIMEOUT)
        await channel.expect("ready", within=START_TIMEOUT)
        # Our copies of the listening sockets close with the sites; these keep them for a
        # successor that dies before it holds every session.
        spare: list[Listeners] = []
        for row, name, sock in named:
            while len(spare) <= row:
                spare.append({})
            spare[row].setdefault(name, []).append(socket.socket(fileno=os.dup(sock.fileno())))
        await holder.stop_accepting()
        log.info("hand-over: process %d accepts on the listeners now; handing over sessions", pid)
        try:
            handed, left = await self._hand_sessions(channel, pid)
            await channel.send(handover.encode("done", sessions=handed))
            await channel.expect("bye")
        except BaseException:
            await holder.accept_again(spare)
            for session in holder.resumable():
                session.unquiesce()
            log.error("hand-over broke off half-way: accepting again, keeping the sessions left")
            raise
        for listeners in spare:
            for socks in listeners.values():
                for sock in socks:
                    sock.close()
        log.info(
            "hand-over to process %d done: %d resumable session(s) handed over, %d other(s) "
            "end with the shutdown notice",
            pid,
            handed,
            left,
        )
        self.successor = pid
        self.handed.set()
        for callback in self.handed_callbacks:
            callback()

    def start_successor(self) -> None:
        """SIGUSR2: start a new forward, from the same command line and the code installed now,
        that takes over from this one (an upgrade is: install, then this signal)."""
        if self._busy or self.handed.is_set():
            log.warning("SIGUSR2: a hand-over is under way already")
            return
        if self._spawned is not None and self._spawned.poll() is None:
            log.warning(
                "SIGUSR2: the successor started before (pid %d) still runs", self._spawned.pid
            )
            return
        args = [a for a in sys.argv[1:] if a != "--takeover"]
        command = [sys.executable, "-m", "forward", *args, "--takeover"]
        log.info("SIGUSR2: starting a successor: %s", " ".join(command))
        try:
            # Its own session, so that a terminal's Ctrl-C meant for us does not reach it; it
            # inherits stdout and stderr, and outlives us.
            self._spawned = subprocess.Popen(command, start_new_session=True)
        except OSError as exc:
            log.error("SIGUSR2: cannot start a successor: %s", exc.strerror or exc)
            return
        log.info("SIGUSR2: successor started, pid %d", self._spawned.pid)

    async def _hand_sessions(self, channel: Channel, pid: int) -> tuple[int, int]:
        """Hand every resumable session over; (handed, left). Sessions still opening (their
        upgrade reached us just before the sites stopped) are waited for, up to the shutdown
        timeout, and so is R taking every byte meant for it. Sessions go in batches: each is
        at rest from its batch's start until the client is told to resume, so a batch is
        what one client waits for, not the whole hand-over."""
        holder = self.holder
        loop = asyncio.get_running_loop()
        deadline = loop.time() + holder.config.shutdown_timeout
        handed = 0
        while True:
            candidates: list[ResumableSession] = []
            waiting = 0
            for session in holder.resumable():
                state = session.core.state
                if state is State.OPEN and session.core.mode is not None:
                    candidates.append(session)
                elif state is State.CONNECTING or state is State.OPEN:
                    waiting += 1  # R's greeting not in yet
            for start in range(0, len(candidates), BATCH):
                batch = []
                for session in candidates[start : start + BATCH]:
                    session.quiesce()
                    if session.backend_queued == 0:
                        batch.append(session)
                    else:
                        waiting += 1  # R has not taken the client's last bytes yet
                for session in batch:
                    await self._send_one(channel, session)
                for session in batch:
                    taken, _ = await channel.expect("taken")
                    if taken.meta.get("key") != session.resume.key:
                        raise HandoverError("the successor took another session than the one sent")
                    log.info(
                        "session %d from %s: handed over to process %d",
                        session.id,
                        session.label,
                        pid,
                    )
                    session.handed_over(pid)
                    handed += 1
            if not waiting or loop.time() >= deadline:
                break
            await asyncio.sleep(DRAIN_STEP)
        return handed, holder.others()

    async def _send_one(self, channel: Channel, session: ResumableSession) -> None:
        state, kept = session.handover_state()
        fd = session.backend_fd()
        try:
            await channel.send(handover.encode("session", state=state, kept=len(kept)), [fd])
        finally:
            os.close(fd)
        for piece in handover.chunks(kept):
            await channel.send(handover.encode("data", piece))


# -- the new forward ---------------------------------------------------------------------------


async def receive_listeners(config: Config) -> tuple[Channel, int, list[Listeners]]:
    """Get the listening sockets of the forward at `--handover-socket`, by row (one row a
    worker process; one row without --workers), and accept them: the caller serves on them,
    then says `ready`. A ConfigError, the predecessor still serving, when this forward cannot
    take over (what it said to the predecessor says why)."""
    path = config.handover_socket
    assert path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"--takeover: cannot reach the running forward at {path}: {exc.strerror or exc}"
        ) from None
    channel = Channel(sock)
    try:
        await channel.send(handover.hello(__version__, os.getpid()))
        offer, fds = await channel.expect("offer")
        try:
            why = handover.readable(offer)
            handed = handover.listeners_of(offer, len(fds)) if why is None else []
        except HandoverError:
            _close_fds(fds)
            raise
        if why is None:
            ports = {
                "http": config.http_port,
                "ws": config.ws_port,
                "redirect": config.redirect_port,
            }
            wanted = handover.wanted_listeners(ports, config.listen_unix, config.admin_port)
            why = handover.compare_rows(handed, max(1, config.workers)) or (
                handover.compare_listeners(handed, wanted)
            )
        if why is not None:
            _close_fds(fds)
            await channel.send(handover.encode("refuse", reason=why))
            raise ConfigError(f"--takeover: {why}; the running forward serves on")
        rows: list[Listeners] = [{} for _ in range(max(1, config.workers))]
        for listener, fd in zip(handed, fds, strict=True):
            rows[listener.row].setdefault(listener.name, []).append(socket.socket(fileno=fd))
        await channel.send(handover.encode("accept"))
    except BaseException as exc:
        raise _given_up(channel, exc) from None
    return channel, int(offer.meta.get("pid", 0)), rows


def _given_up(channel: Channel, exc: BaseException) -> BaseException:
    """The take-over cannot go on: the predecessor hears nothing more (it serves on), and the
    user gets one line for what went wrong on the way; anything else is raised as it is."""
    channel.close()
    if isinstance(exc, HandoverError | Refusal | OSError | TimeoutError):
        return ConfigError(
            f"--takeover: {exc or type(exc).__name__}; the running forward serves on"
        )
    return exc


async def serve_on(channel: Channel, start: Awaitable[None]) -> None:
    """Serve on the received listeners (`start`), then tell the predecessor; if starting
    fails, the predecessor hears nothing more and serves on."""
    try:
        await start
        await channel.send(handover.encode("ready"))
    except BaseException as exc:
        raise _given_up(channel, exc) from None


async def take_over(config: Config, server: Server) -> tuple[Channel, int]:
    """A single forward's take-over, before it serves: the listeners, then `take_sessions`."""
    channel, pid, rows = await receive_listeners(config)
    await serve_on(channel, server.start(rows[0]))
    return channel, pid


async def take_sessions(
    channel: Channel, server: Server | None, pid: int, on_done: Callable[[], None]
) -> int:
    """Receive the predecessor's sessions until it is done; returns how many were taken.
    `on_done` runs before the predecessor is told it may go (systemd hears of the new main
    process then)."""
    taken = 0
    try:
        while True:
            record, fds = await channel.expect("session", "done", within=START_TIMEOUT)
            if record.kind == "done":
                _close_fds(fds)
                on_done()
                await channel.send(handover.encode("bye"))
                break
            if len(fds) != 1 or server is None:
                _close_fds(fds)
                raise HandoverError(
                    "a session record without R's socket"
                    if server is not None
                    else "a session for a forward with --workers, which has no resume"
                )
            sock = socket.socket(fileno=fds[0])
            try:
                kept = await _receive_kept(channel, int(record.meta.get("kept", 0)))
                session = await server.adopt(record.meta["state"], kept, sock)
            except (KeyError, TypeError, ValueError) as exc:
                sock.close()
                raise HandoverError(f"a session this forward cannot read: {exc}") from None
            except BaseException:
                sock.close()
                raise
            log.info(
                "session %d from %s: taken over from process %d, parked until its client resumes",
                session.id,
                session.label,
                pid,
            )
            await channel.send(handover.encode("taken", key=session.resume.key))
            taken += 1
    except (HandoverError, OSError, TimeoutError) as exc:
        log.error("hand-over from process %d broke off: %s", pid, exc or type(exc).__name__)
    finally:
        channel.close()
    log.info("took over from process %d: %d resumable session(s)", pid, taken)
    return taken


async def _receive_kept(channel: Channel, size: int) -> bytes:
    if size < 0:
        raise HandoverError("a negative byte count")
    parts: list[bytes] = []
    have = 0
    while have < size:
        record, fds = await channel.expect("data")
        _close_fds(fds)
        parts.append(record.payload)
        have += len(record.payload)
    if have != size:
        raise HandoverError(f"{have} bytes of R's stream where {size} were announced")
    return b"".join(parts)
