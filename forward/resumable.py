"""A session that outlives its connection: the I/O shell of session resume (docs/resume.md).

`ResumableSession` is a `relay.Session` whose browser end can go and come back. What differs is
only what the protocol asks for, so a plain session's path is untouched:

- R's bytes go out as binary messages exactly as the core hands them over, and a copy of each
  stays in the session's `Outbox` until the client acknowledges it; once `--resume-buffer` bytes
  are unacknowledged, reading from R stops (R blocks in its write: nothing is dropped).
- The client's bytes are counted as the core takes them, and acknowledged in quarters of the
  window or after `ACK_DELAY`.
- When the connection ends without a close frame from the client, the session is parked: R's
  connection stays, a grace timer runs, and `resume_on` gives it a new connection, which first
  gets the `resumed` message and then what the client is missing of R's stream.

Everything that a resume needs is in `self.resume` (a `resume.ResumeState`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from .relay import JOIN_LIMIT, RelaySettings, Session
from .resume import MAX_CONTROL, ResumeClose, ResumeError, ResumeState, parse_control
from .session import State
from .stats import Stat
from .wsconn import HOLD_BACKEND_FULL, ReadBuffer, ServerWebSocket
from .wsframe import CloseReason, Opcode, frame_header

log = logging.getLogger(__name__)

ACK_DELAY = 0.25  # seconds a received byte waits at most for its acknowledgement


class ResumableSession(Session):
    __slots__ = (
        "_ack_timer",
        "_backend_full",
        "_control",
        "_grace_timer",
        "_handing",
        "_quarter",
        "_registry",
        "_stalled",
        "client",
        "grace",
        "resume",
    )

    def __init__(
        self,
        settings: RelaySettings,
        label: str,
        buffer: ReadBuffer,
        session_id: int,
        on_end: Callable[[Session], None] | None,
        registry: dict[str, ResumableSession],
        client: str,
        subject: str | None = None,
        state: ResumeState | None = None,
    ) -> None:
        """A new resumable session, or (`state`) one another process handed over."""
        super().__init__(settings, label, buffer, session_id, on_end)
        self.resume = state or ResumeState(settings.resume_buffer, subject=subject)
        self.grace = settings.resume_grace
        self._quarter = settings.resume_buffer // 4
        self.client = client  # the address its per-client count is held under
        self._registry = registry
        registry[self.resume.key] = self
        self._ack_timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._control = bytearray()  # a control message arriving in pieces
        self._stalled = False  # reading from R paused: the client's window is full
        self._backend_full = False
        self._handing = False  # quiesced for a hand-over

    @property
    def parked(self) -> bool:
        return self.ws is None and self.core.state is not State.CLOSED

    def hello(self) -> None:
        """The first message on the session's first connection: its ticket."""
        self._control_frame(self.resume.opened(self._ticket(), self.grace))

    def _ticket(self) -> str:
        # The instance's name leads the ticket, so that a proxy in front of several forwards
        # can route a resume to the one that holds the session (docs/operations.md).
        instance = self._settings.instance
        ticket = self.resume.issue()
        # "_" is a token character (the ticket travels as a subprotocol) that no name holds.
        return f"{instance}_{ticket}" if instance else ticket

    # -- R -> client ---------------------------------------------------------------------------

    def _write_frame(self, opcode: int, data: bytes | memoryview, fin: bool = True) -> None:
        # Every piece of R's stream (the classic greeting included) is data: a binary message
        # of its own, kept until acknowledged. Message boundaries are the client's business.
        outbox = self.resume.outbox
        chunk = outbox.append(data)
        ws = self.ws
        if ws is not None and ws.transport is not None:
            head = frame_header(Opcode.BINARY, True, len(chunk))
            if len(chunk) <= JOIN_LIMIT:
                ws.write(head + chunk)
            else:
                ws.writelines((head, chunk))
        if outbox.sent - outbox.acked >= outbox.limit and not self._stalled:  # outbox.full
            self._stalled = True
            self._stats.add(Stat.RESUME_STALLS)
            self._pause_r()

    def _pause_r(self) -> None:
        backend = self._backend
        if backend is not None and backend.transport is not None:
            backend.transport.pause_reading()

    def _resume_r(self) -> None:
        if self._stalled or self._reading_paused:
            return
        backend = self._backend
        if backend is not None and backend.transport is not None:
            backend.transport.resume_reading()

    def ws_resume_writing(self) -> None:
        self._reading_paused = False
        self._resume_r()  # unless the client's window is what holds R

    def backend_writing(self, paused: bool) -> None:
        self._backend_full = paused
        super().backend_writing(paused)

    def _beat(self) -> None:
        if self.ws is None:  # parked: nobody to keep awake, and the window is for R's bytes
            self._heartbeat = asyncio.get_running_loop().call_later(
                self._settings.heartbeat, self._beat
            )
            return
        super()._beat()

    # -- client -> R ---------------------------------------------------------------------------

    def ws_data(self, data: bytearray) -> None:
        state = self.resume
        state.received += len(data)
        self._to_backend(data)
        if state.received - state.told >= self._quarter:  # state.ack_due(), inline: per message
            self._send_ack()
        elif self._ack_timer is None and self.ws is not None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack_later)

    def _ack_later(self) -> None:
        self._ack_timer = None
        if self.resume.received != self.resume.told:
            self._send_ack()

    def _send_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._control_frame(self.resume.ack())

    def ws_text(self, data: bytearray, final: bool) -> None:
        control = self._control
        if len(control) + len(data) > MAX_CONTROL:
            self._refuse(ResumeError(CloseReason.POLICY_VIOLATION, "control message too long"))
            return
        control += data
        if not final:
            return
        try:
            ack = parse_control(control)
            self.resume.outbox.ack(ack.received)
        except ResumeError as exc:
            self._refuse(exc)
            return
        finally:
            control.clear()
        self.resume.settled()  # it acknowledged on this connection: it has this ticket
        if self._stalled and not self.resume.outbox.full:
            self._stalled = False
            self._resume_r()

    def _refuse(self, exc: ResumeError) -> None:
        log.warning("session %d from %s: %s", self.id, self.label, exc.reason)
        self.close(CloseReason.POLICY_VIOLATION, exc.reason, ended=f"resume protocol: {exc.reason}")

    def _control_frame(self, payload: bytes) -> None:
        ws = self.ws
        if ws is not None:
            ws.write(frame_header(Opcode.TEXT, True, len(payload)) + payload)

    # -- the connection's end, parking and resuming ------------------------------------------

    def ws_closed(self, why: str) -> None:
        ws = self.ws
        if (
            ws is None
            or ws.peer_closed
            or self.grace <= 0
            or self.core.state in (State.CLOSING, State.CLOSED)
        ):
            super().ws_closed(why)
            return
        self.ws = None
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._control.clear()
        self._stats.add(Stat.PARKS)
        self._stats.add(Stat.SESSIONS_PARKED)
        log.info(
            "session %d from %s parked (%s): kept %g s for its client to resume",
            self.id,
            self.label,
            why,
            self.grace,
        )
        self._grace_timer = asyncio.get_running_loop().call_later(self.grace, self._expire_park)
        # The browser's back-pressure left with it: R is read until the window is full.
        self._reading_paused = False
        self._resume_r()

    def _expire_park(self) -> None:
        self._grace_timer = None
        self._stats.add(Stat.PARKS_EXPIRED)
        log.info(
            "parked session %d from %s expired after %g s without a resume",
            self.id,
            self.label,
            self.grace,
        )
        self._drop_backend()
        super().ws_closed(f"parked, not resumed within {self.grace:g} s")

    def _end(self, code: CloseReason, reason: str, ended: str | None = None) -> None:
        super()._end(code, reason, ended)
        if self.ws is None:  # parked: there is no connection whose end would finish it
            super().ws_closed(reason)

    def _finish(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if self.ws is None:
            self._stats.add(Stat.SESSIONS_PARKED, -1)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._registry.get(self.resume.key) is self:
            del self._registry[self.resume.key]
        super()._finish()

    def check_resume(self, secret: str, subject: str | None, received: int) -> None:
        """Raise ResumeError unless a client holding `secret` and `subject`, having `received`
        bytes of R's stream, may take this session."""
        self.resume.check(secret, subject)
        outbox = self.resume.outbox
        if not outbox.acked <= received <= outbox.sent:
            raise ResumeError(
                ResumeClose.GONE,
                f"the client has {received} bytes of R's stream; forward has "
                f"{outbox.acked}..{outbox.sent}",
            )
        if self.core.state in (State.CLOSING, State.CLOSED):
            raise ResumeError(ResumeClose.GONE, "the session is ending")

    def resume_on(
        self, ws: ServerWebSocket, tail: bytes, received: int, label: str, client: str
    ) -> None:
        """Carry on over `ws` (check_resume passed): the `resumed` message with a new ticket,
        then what the client is missing of R's stream, then whatever the client sends."""
        old = self.ws
        if old is not None:
            old.retire(ResumeClose.RETIRED, "another connection resumed this session")
            self._stats.add(Stat.TAKEOVERS)
            how = "taken over from a live connection"
        else:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
            self._stats.add(Stat.SESSIONS_PARKED, -1)
            how = "resumed"
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._control.clear()
        self.ws = ws
        self.label, self.client = label, client
        state = self.resume
        self._control_frame(state.resumed(self._ticket(), self.grace))
        replay = state.outbox.replay(received)
        replayed = 0
        for chunk in replay:
            head = frame_header(Opcode.BINARY, True, len(chunk))
            ws.writelines((head, chunk))
            replayed += len(chunk)
        self._stats.add(Stat.RESUMES)
        self._stats.add(Stat.REPLAYED_BYTES, replayed)
        log.info(
            "session %d %s by %s: %d bytes of R's sent again, %d of the client's taken so far",
            self.id,
            how,
            label,
            replayed,
            state.received,
        )
        ws.start(tail, HOLD_BACKEND_FULL if self._backend_full else 0)
        self._reading_paused = False
        if self._stalled and not state.outbox.full:
            self._stalled = False
        self._resume_r()

    # -- a hand-over to another process (handover.py, succession.py) -------------------------

    def quiesce(self) -> None:
        if self._handing:
            return
        self._handing = True
        super().quiesce()
        self._stalled = True  # nothing, parking included, may read from R again here
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def unquiesce(self) -> None:
        if not self._handing:
            return
        self._handing = False
        self._stalled = self.resume.outbox.full
        super().unquiesce()

    def handover_state(self) -> tuple[dict[str, object], bytes]:
        """The session's state for the next process (quiesced first), and the bytes of R's
        stream the client has not acknowledged."""
        grace_left = None
        if self._grace_timer is not None:
            grace_left = max(0.0, self._grace_timer.when() - asyncio.get_running_loop().time())
        state: dict[str, object] = {
            "resume": self.resume.snapshot(),
            "core": self.core.snapshot(),
            "client": self.client,
            "label": self.label,
            "grace_left": grace_left,
            "bytes_to_r": self.bytes_to_r,
            "bytes_from_r": self.bytes_from_r,
            **self.timings(),
        }
        return state, self.resume.outbox.kept_bytes()

    def handed_over(self, to: int) -> None:
        """The next process holds the session now: a live client is told to resume at once
        (there), and this process lets the session go without a word to R."""
        ws = self.ws
        if ws is not None:
            ws.retire(ResumeClose.RESUME, "forward is restarting: resume")
        self.ended = f"handed over to process {to}"
        self.core.closed()
        self._finish()
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(self)

    async def adopt(
        self, sock: socket.socket, timings: dict[str, float], grace_left: float | None
    ) -> None:
        """Carry on as the session another process handed over (made with its `state`, the
        core restored), with R's connection `sock`: parked, for `grace_left` seconds, or this
        process's whole grace if it was live there."""
        grace = self.grace if grace_left is None else min(grace_left, self.grace)
        self._stats.add(Stat.SESSIONS_PARKED)
        self._grace_timer = asyncio.get_running_loop().call_later(grace, self._expire_park)
        await self.adopt_backend(sock, timings["age"], timings["quiet"])
        if self.resume.outbox.full:
            self._stalled = True
            self._pause_r()
