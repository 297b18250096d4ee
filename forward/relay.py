"""One WebSocket <-> Rserve session: the asyncio shell around `session.SessionCore`.

The core (session.py) holds the session's state and decides what is relayed and how each end's
failure maps to the other; this module does the I/O it asks for and nothing else: the unix
connection to Rserve, flow control, timers, counters and the log.

Both directions run in transport callbacks, with no task per session. Rserve -> browser: what the
backend protocol reads goes to the core, whose frames are written at once to the browser (a whole
message as one frame, a long one as one fragmented message); reading from Rserve pauses while the
browser's transport is over its high-water mark. Browser -> Rserve: the `ServerWebSocket`
(wsconn.py) hands over frame payloads as they arrive, the core cuts them into QAP chunks and they
are written to Rserve; reading from the browser pauses while Rserve's socket is full. Reads from
both ends go into receive buffers shared by every session; a frame's payload is written from it
without a copy, unless the browser's transport would keep the view.

When the browser closes or goes away, the Rserve stream is closed, which ends that R process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from . import qap, rpid
from .session import SessionCore, State
from .stats import Slot, Stat
from .wsconn import (
    HOLD_BACKEND_FULL,
    HOLD_CONNECTING,
    HOLD_HANDOVER,
    ReadBuffer,
    ServerWebSocket,
)
from .wsframe import CloseReason, frame_header

if TYPE_CHECKING:
    from .warm import Warm

log = logging.getLogger(__name__)

# Below this size header and payload are joined into one write; above it they go as two buffers.
JOIN_LIMIT = 16 * 1024


@dataclass(frozen=True, slots=True)
class RelaySettings:
    socket: str
    heartbeat: float
    max_message_size: int
    backend_timeout: float
    max_result_size: int = 0
    idle_timeout: float = 0.0
    max_lifetime: float = 0.0
    # Session resume (resumable.py): seconds a broken session stays parked (0: no resume), and
    # the bytes of R's stream kept until the client acknowledges them.
    resume_grace: float = 0.0
    resume_buffer: int = 1024 * 1024
    # Leads every ticket, so that a proxy can route a resume to this instance ("": none).
    instance: str = ""
    # Where the session's counters go (/metrics); a private row when nobody reads them.
    stats: Slot = field(default_factory=Slot.private)
    # The --warm pool's `take` (warm.py): asked first for a greeted connection.
    warm: Callable[[], Warm | None] | None = None


class _Backend(asyncio.BufferedProtocol):
    """The unix-socket end: hands bytes and flow control to the session.

    Reads go into a buffer shared by every session (`ReadBuffer`); `Session._write_frame` takes
    care that no transport is left holding a view of it."""

    __slots__ = ("_buffer", "_greeting", "_session", "transport")

    def __init__(self, session: Session, buffer: ReadBuffer, greeting: bytes = b"") -> None:
        self._session = session
        self._buffer = buffer
        self._greeting = greeting  # what a pooled connection's R already said
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self._greeting:
            # Replayed before the transport reads anything, so R's stream keeps its order.
            greeting, self._greeting = self._greeting, b""
            self._session.from_backend(greeting, self.transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self._session.from_backend(self._buffer.view[:nbytes], self.transport)

    def eof_received(self) -> bool:
        return False  # close our side too: Rserve does not half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._session.backend_writing(False)
        self._session.backend_lost(exc)

    def pause_writing(self) -> None:
        self._session.backend_writing(True)

    def resume_writing(self) -> None:
        self._session.backend_writing(False)


class Session:
    """The I/O shell of one relayed session; the app keeps these in a set, nothing else is shared.

    What is relayed, and how each end's failure maps to the other, is decided by the session's
    `SessionCore`; this owns the transports, flow control, timers, counters and the log. No
    task runs for a session once it is open: both directions are transport callbacks."""

    # Thousands of these live at once: no per-instance dict.
    __slots__ = (
        "_backend",
        "_buffer",
        "_counted",
        "_greeting_timer",
        "_heartbeat",
        "_last_activity",
        "_on_end",
        "_reading_paused",
        "_settings",
        "_started",
        "_stats",
        "_timers",
        "bytes_from_r",
        "bytes_to_r",
        "core",
        "ended",
        "id",
        "label",
        "ws",
    )

    def __init__(
        self,
        settings: RelaySettings,
        label: str,
        buffer: ReadBuffer,
        session_id: int = 0,
        on_end: Callable[[Session], None] | None = None,
    ) -> None:
        self.id = session_id
        self._buffer = buffer  # R's answers are read into this shared buffer
        self.label = label  # "peer on listener", for the log
        self.ws: ServerWebSocket | None = None
        self._on_end = on_end
        self._settings = settings
        self.core = SessionCore(
            self._write_frame, settings.max_message_size or None, settings.max_result_size or None
        )
        self._backend: _Backend | None = None
        self._reading_paused = False  # reading from R paused: the browser is not keeping up
        self._heartbeat: asyncio.TimerHandle | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._greeting_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._started = time.monotonic()
        self._stats = settings.stats
        self._counted = False
        self.ended = ""  # why the session ended, for the log: the first reason given wins
        self.bytes_from_r = 0
        self.bytes_to_r = 0

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def mode(self) -> str:
        mode = self.core.mode
        return mode.value if mode else "-"

    # -- the session's life ------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Rserve; the browser's frames wait (HOLD_CONNECTING) until this is done."""
        ws = self.ws
        assert ws is not None
        loop = asyncio.get_running_loop()
        path = self._settings.socket
        warm = self._settings.warm() if self._settings.warm is not None else None
        greeting = warm.greeting if warm is not None else b""
        try:
            # A unix connect completes at once or (listen queue full) is retried until this
            # deadline; a connected socket needs no timeout. R's greeting has its own timer.
            if warm is not None:
                sock = warm.sock
            else:
                sock = await connect_unix(path, loop.time() + self._settings.backend_timeout)
            _, backend = await loop.create_unix_connection(
                lambda: _Backend(self, self._buffer, greeting), sock=sock
            )
        except asyncio.CancelledError:
            self.close(
                CloseReason.GOING_AWAY, "forward is shutting down", ended="cancelled at shutdown"
            )
            raise
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            log.warning(
                "session %d from %s: cannot reach Rserve at %s: %s", self.id, self.label, path, why
            )
            self._stats.add(Stat.BACKEND_FAILURES)
            self.close(
                CloseReason.INTERNAL_ERROR, f"Rserve unavailable: {why}", ended="Rserve unreachable"
            )
            return
        if self.core.state is not State.CONNECTING:
            # The browser left while we connected, or R's first bytes already ended the session.
            if backend.transport is not None:
                backend.transport.close()
            return
        self._backend = backend
        self.core.connected()
        self._stats.add(Stat.SESSIONS_TOTAL)
        self._stats.add(Stat.SESSIONS_OPEN)
        self._counted = True
        settings = self._settings
        self._last_activity = loop.time()
        self._arm_timers(loop, 0.0, 0.0)
        if self.core.awaiting_greeting:  # the greeting may already be in
            self._greeting_timer = loop.call_later(settings.backend_timeout, self._check_greeting)
        ws.release(HOLD_CONNECTING)
        if backend.transport is None:  # R closed before it was taken: as if it closed now
            self.backend_lost(None)

    def _finish(self) -> None:
        if self._counted:
            self._counted = False
            self._stats.add(Stat.SESSIONS_OPEN, -1)
        self._cancel_timers()
        self._drop_backend()
        log.info(
            "session %d from %s closed: mode %s, %d bytes to R, %d bytes from R, %.1f s, %s",
            self.id,
            self.label,
            self.mode,
            self.bytes_to_r,
            self.bytes_from_r,
            time.monotonic() - self._started,
            self.ended,
        )

    def close(
        self,
        code: CloseReason,
        reason: str,
        *,
        notice: bool = False,
        ended: str | None = None,
    ) -> None:
        """End the session: the close handshake with the browser, and Rserve's connection
        closed at once (nothing more can be relayed either way). With `notice`, the browser gets
        the OOB_SEND shutdown notice first."""
        if self.core.close(notice):
            self._end(code, reason, ended)

    def _end(self, code: CloseReason, reason: str, ended: str | None = None) -> None:
        """Carry out a close the core has entered CLOSING for."""
        if not self.ended:
            self.ended = ended or reason
        if self.ws is not None:
            self.ws.close(code, reason)
        self._drop_backend()

    def _drop_backend(self) -> None:
        """Close R's connection on our side; its `connection_lost` is then ignored."""
        backend, self._backend = self._backend, None
        if backend is not None and backend.transport is not None:
            # Bytes still queued for an R that is not reading would keep the socket (and R's
            # process) past the session: drop them.
            if backend.transport.get_write_buffer_size() > 0:
                backend.transport.abort()
            else:
                backend.transport.close()

    def _abort_backend(self) -> None:
        """R is broken: drop its connection and whatever is still queued for it."""
        backend, self._backend = self._backend, None
        if backend is not None and backend.transport is not None:
            backend.transport.abort()  # its connection_lost releases HOLD_BACKEND_FULL

    def abort(self) -> None:
        """Drop the browser's connection without a close handshake (its end follows)."""
        if self.ws is not None:
            self.ws.abort()

    # -- a hand-over to another process (handover.py) ---------------------------------------

    def quiesce(self) -> None:
        """Stop both streams and every timer, so that the session's state stays as it is until
        it is handed over: nothing is read from either end, nothing is sent of forward's own."""
        self._cancel_timers()
        if self.ws is not None:
            self.ws.hold(HOLD_HANDOVER)
        backend = self._backend
        if backend is not None and backend.transport is not None:
            backend.transport.pause_reading()

    def unquiesce(self) -> None:
        """Carry on after `quiesce` (a hand-over that did not take this session)."""
        loop = asyncio.get_running_loop()
        timings = self.timings()
        self._arm_timers(loop, timings["age"], timings["quiet"])
        if self.ws is not None:
            self.ws.release(HOLD_HANDOVER)
        if not self._reading_paused:
            self.ws_resume_writing()

    def _cancel_timers(self) -> None:
        for timer in (self._heartbeat, self._greeting_timer, *self._timers):
            if timer is not None:
                timer.cancel()
        self._heartbeat = self._greeting_timer = None
        self._timers = []

    def _arm_timers(self, loop: asyncio.AbstractEventLoop, age: float, quiet: float) -> None:
        settings = self._settings
        if settings.heartbeat > 0:
            self._heartbeat = loop.call_later(settings.heartbeat, self._beat)
        if settings.idle_timeout > 0:
            self._timers.append(
                loop.call_later(max(0.0, settings.idle_timeout - quiet), self._check_idle)
            )
        if settings.max_lifetime > 0:
            self._timers.append(
                loop.call_later(max(0.0, settings.max_lifetime - age), self._expire)
            )

    @property
    def backend_queued(self) -> int | None:
        """Bytes written to R and not taken by its socket yet; None when R is not connected."""
        backend = self._backend
        if backend is None or backend.transport is None:
            return None
        return backend.transport.get_write_buffer_size()

    def backend_fd(self) -> int:
        """A duplicate of R's socket, to pass to another process (it stays connected there when
        this process lets go of its own)."""
        backend = self._backend
        sock = backend.transport.get_extra_info("socket") if backend and backend.transport else None
        if sock is None:
            raise OSError("R is not connected")
        return os.dup(sock.fileno())

    def timings(self) -> dict[str, float]:
        """How long the session has lived and been quiet, for its timers in the next process."""
        now = asyncio.get_running_loop().time()
        return {
            "age": time.monotonic() - self._started,
            "quiet": now - self._last_activity if self._last_activity else 0.0,
        }

    async def adopt_backend(self, sock: socket.socket, age: float, quiet: float) -> None:
        """Take R's connection handed over by another process, with the session's timers
        where they stood there (`age` since the session opened, `quiet` since its last
        message). The core was restored first."""
        loop = asyncio.get_running_loop()
        _, backend = await loop.create_unix_connection(
            lambda: _Backend(self, self._buffer), sock=sock
        )
        self._backend = backend
        self._stats.add(Stat.SESSIONS_OPEN)
        self._counted = True
        self._started = time.monotonic() - age
        self._last_activity = loop.time() - quiet
        self._arm_timers(loop, age, quiet)
        if backend.transport is None:
            self.backend_lost(None)

    # -- what the browser's WebSocket reports ------------------------------------------------

    def ws_data(self, data: bytearray) -> None:
        self._to_backend(data)

    def ws_text(self, data: bytearray, final: bool) -> None:
        self._to_backend(data)  # text is QAP bytes too (never split off for a plain session)

    def ws_error(self, code: CloseReason, reason: str) -> None:
        log.warning("session %d from %s: %s", self.id, self.label, reason)
        self.close(code, reason, ended=f"WebSocket error: {reason}")

    def ws_pause_writing(self) -> None:
        # The browser is not keeping up: stop reading from R, so that TCP pushes back on R.
        backend = self._backend
        if backend is not None and backend.transport is not None:
            backend.transport.pause_reading()
            self._reading_paused = True

    def ws_resume_writing(self) -> None:
        backend = self._backend
        self._reading_paused = False
        if backend is not None and backend.transport is not None:
            backend.transport.resume_reading()

    def ws_closed(self, why: str) -> None:
        if not self.ended:
            self.ended = why
        self.core.closed()
        self._finish()
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)

    def backend_writing(self, paused: bool) -> None:
        ws = self.ws
        if ws is not None:
            if paused:
                ws.hold(HOLD_BACKEND_FULL)
            else:
                ws.release(HOLD_BACKEND_FULL)

    # -- timers ------------------------------------------------------------------------------

    def _check_greeting(self) -> None:
        self._greeting_timer = None
        end = self.core.no_greeting(self._settings.backend_timeout)
        if end is not None:
            log.warning("session %d from %s: %s", self.id, self.label, end.reason)
            self._abort_backend()
            self._end(end.code, end.reason)

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._last_activity
        timeout = self._settings.idle_timeout
        if quiet >= timeout:
            log.info("session %d from %s: idle for %.0f s", self.id, self.label, quiet)
            self.close(CloseReason.GOING_AWAY, f"session idle for {timeout:g} s", notice=True)
        else:
            self._timers = [t for t in self._timers if not t.cancelled() and t.when() > loop.time()]
            self._timers.append(loop.call_later(timeout - quiet, self._check_idle))

    def _expire(self) -> None:
        limit = self._settings.max_lifetime
        log.info("session %d from %s: lifetime of %g s reached", self.id, self.label, limit)
        self.close(CloseReason.GOING_AWAY, f"session lifetime of {limit:g} s reached", notice=True)

    def _beat(self) -> None:
        self.core.heartbeat()
        self._heartbeat = asyncio.get_running_loop().call_later(
            self._settings.heartbeat, self._beat
        )

    # -- browser -> Rserve -------------------------------------------------------------------

    def _to_backend(self, data: bytearray) -> None:
        if self._settings.idle_timeout:
            self._last_activity = asyncio.get_running_loop().time()
        core = self.core
        counted = core.messages_to_r
        try:
            out = core.from_browser(data)
        except qap.QAPError as exc:
            log.warning(
                "session %d from %s: refused browser data: %s", self.id, self.label, exc.reason
            )
            self._end(exc.close_code, exc.reason)
            return
        if not out:
            return
        messages = core.messages_to_r - counted
        backend = self._backend
        if backend is None or backend.transport is None:
            if messages:
                self._stats.to_r(0, messages)
            return
        try:
            if len(out) == 1:
                backend.transport.write(out[0])
            else:
                backend.transport.writelines(out)
        except (OSError, RuntimeError) as exc:
            log.warning("session %d from %s: write to Rserve failed: %s", self.id, self.label, exc)
            end = core.r_write_failed()
            if end is not None:
                self._end(end.code, end.reason)
            else:
                self._abort_backend()
            return
        sent = len(out[0]) if len(out) == 1 else sum(map(len, out))
        self.bytes_to_r += sent
        self._stats.to_r(sent, messages)

    # -- Rserve -> browser -------------------------------------------------------------------

    def from_backend(
        self, data: bytes | memoryview, transport: asyncio.Transport | None = None
    ) -> None:
        nbytes = len(data)
        self.bytes_from_r += nbytes
        if self._settings.idle_timeout:
            self._last_activity = asyncio.get_running_loop().time()
        core = self.core
        counted = core.messages_from_r
        try:
            mode = core.from_r(data)
        except qap.QAPError as exc:
            self._stats.from_r(nbytes, core.messages_from_r - counted)
            reason = exc.reason
            if isinstance(exc, qap.MessageTooLarge):
                reason = f"R's answer is too large: {reason}"
            log.warning("session %d from %s: %s", self.id, self.label, reason)
            self._abort_backend()
            self._end(exc.close_code, reason)
            return
        self._stats.from_r(nbytes, core.messages_from_r - counted)
        if mode is not None:
            if self._greeting_timer is not None:
                self._greeting_timer.cancel()
                self._greeting_timer = None
            # One line when the session is open, at R's greeting, not two: thousands of
            # sessions can open per second, and each log line costs (R's pid too: looked up
            # only when the line is written).
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "session %d from %s opened: Rserve in %s mode, R pid %s",
                    self.id,
                    self.label,
                    mode.value,
                    _r_pid(transport),
                )

    def backend_lost(self, exc: Exception | None) -> None:
        if self._backend is None:
            return  # we dropped it ourselves (or `start` has not taken it yet, and will look)
        self._backend = None
        pending = len(self.core.pending)
        end = self.core.r_lost()
        if end is not None:
            log.warning("session %d from %s: %s", self.id, self.label, end.reason)
            self._end(end.code, end.reason)
            return
        log.info(
            "session %d from %s: Rserve closed the session%s; answering %d pending "
            "request(s) with ERR_conn_broken",
            self.id,
            self.label,
            f" ({exc})" if exc else "",
            pending,
        )

    # -- frames ------------------------------------------------------------------------------

    def _write_frame(self, opcode: int, data: bytes | memoryview, fin: bool = True) -> None:
        # The core sends nothing once the session is closing; a browser that is closing the
        # connection itself has a closing transport, which `ws.write` leaves alone.
        ws = self.ws
        if ws is None:
            return
        transport = ws.transport
        if transport is None:
            return
        head = frame_header(opcode, fin, len(data))
        if len(data) <= JOIN_LIMIT:
            ws.write(head + data)
            return
        # `data` may be a view of the shared read buffer. A transport that cannot send it all at
        # once keeps the view: then the next read must go to a new buffer. Once data is queued,
        # further chunks are copied, so a stalled browser holds its bytes, not whole buffers.
        if transport.get_write_buffer_size() > 0:
            ws.writelines((head, bytes(data)))
            return
        ws.writelines((head, data))
        if transport.get_write_buffer_size() > 0:
            self._buffer.renew()


def _r_pid(transport: asyncio.Transport | None) -> int | str:
    """The pid of the R process at the other end, for the log: what an operator greps for
    (rpid.py). The transport comes with the bytes: R's greeting may arrive before `start`
    has taken the connection over."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    pid = rpid.find_r_pid(sock) if sock is not None else None
    return "unknown" if pid is None else pid


async def connect_unix(path: str, deadline: float | None = None) -> socket.socket:
    """Connect to a unix stream socket, waiting while its listen queue is full.

    A non-blocking connect to a unix socket whose backlog is full fails with EAGAIN, which (unlike
    EINPROGRESS on TCP) means "not connected": asyncio and uvloop would wait for writability and
    then use a socket that never connected. Rserve listens with a small backlog and forks for every
    connection, so a burst of sessions hits this; retry with a short backoff until it accepts.
    """
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            if deadline is not None and asyncio.get_running_loop().time() + delay > deadline:
                raise TimeoutError from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            continue
        except BaseException:
            sock.close()
            raise
        return sock
