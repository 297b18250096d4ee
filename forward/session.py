"""The rules of one relayed session, as pure code: bytes in, frames and bytes out.

`relay.Session` owns the transports, flow control, timers, counters and the log; everything it
must decide about the bytes is asked of a `SessionCore` here, which imports no event loop and no
socket (as h11 is to its users). The core keeps the session's one `State` and makes every
transition itself, in `_enter`:

    CONNECTING --> OPEN --> R_GONE
         \\          \\        \\
          +----------+--------+--> CLOSING --> CLOSED   (and any state --> CLOSED)

- CONNECTING: the browser is upgraded, Rserve's connection is being made. R's first bytes may
  already arrive (and are relayed); the browser's bytes wait, held back by the shell.
- OPEN: relaying both ways. `from_browser` gives what goes to R; `from_r` sends frames.
- R_GONE: R closed between two messages, or a write to it failed. The browser stays: every
  request still waiting for an answer, and every later one, is answered with ERR_conn_broken and
  its own msg_id, so that the client can unwind its callbacks.
- CLOSING: forward sent the browser a close frame; nothing more is relayed either way.
- CLOSED: the browser's connection is gone.

Frames go to the browser through the `send(opcode, payload, fin)` callable the shell hands in, one
call per frame and without a copy: a payload may be a view of the shell's receive buffer. Only
between two of R's messages may a frame of forward's own (heartbeat, shutdown notice,
ERR_conn_broken) go out: inside one it would corrupt R's fragmented message.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from . import qap
from .wsframe import CloseReason, Opcode

# One WebSocket frame to the browser: opcode, payload, FIN.
Send = Callable[[int, bytes | memoryview, bool], None]


class State(enum.Enum):
    """Where a session is in its life (see the module's docstring for each state)."""

    CONNECTING = "connecting"
    OPEN = "open"
    R_GONE = "R gone"
    CLOSING = "closing"
    CLOSED = "closed"


# Looked up once: an enum member's attribute look-up costs as much as the rest of a small
# message's path (profiled: issue 18).
_CONNECTING, _OPEN, _R_GONE = State.CONNECTING, State.OPEN, State.R_GONE
_BINARY, _CONTINUATION, _TEXT = int(Opcode.BINARY), int(Opcode.CONTINUATION), int(Opcode.TEXT)
_CMD_RESP = qap.CMD_RESP

# Every transition there is; anything else is a bug in the shell.
_NEXT: dict[State, frozenset[State]] = {
    State.CONNECTING: frozenset((State.OPEN, State.R_GONE, State.CLOSING, State.CLOSED)),
    State.OPEN: frozenset((State.R_GONE, State.CLOSING, State.CLOSED)),
    State.R_GONE: frozenset((State.CLOSING, State.CLOSED)),
    State.CLOSING: frozenset((State.CLOSED,)),
    State.CLOSED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class End:
    """The session must end: close the browser's WebSocket with `code` and `reason`."""

    code: CloseReason
    reason: str


class SessionCore:
    """One session's state and the relay's rules; `relay.Session` does the I/O."""

    # One per session, thousands at once: no per-instance dict.
    __slots__ = (
        "_client",
        "_send",
        "_server",
        "messages_from_r",
        "messages_to_r",
        "pending",
        "state",
    )

    def __init__(
        self, send: Send, max_message_size: int | None = None, max_result_size: int | None = None
    ) -> None:
        self._send = send
        self._client = qap.ClientStream(max_message_size)
        self._server = qap.ServerStream(max_result_size)
        self.state = State.CONNECTING
        # msg_ids of the requests relayed to R and not answered yet, oldest first.
        self.pending: list[int] = []
        self.messages_to_r = 0
        self.messages_from_r = 0

    def _enter(self, state: State) -> None:
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"session cannot go from {self.state.value} to {state.value}")
        self.state = state

    @property
    def mode(self) -> qap.Mode | None:
        return self._server.mode

    @property
    def awaiting_greeting(self) -> bool:
        """R is connected and has not said yet which protocol it speaks."""
        return self.state is State.OPEN and self._server.mode is None

    @property
    def in_r_message(self) -> bool:
        """Between the first and the last byte of one of R's messages (or before its greeting)."""
        return self._server.in_message

    # -- the session's life ------------------------------------------------------------------

    def connected(self) -> None:
        """Rserve's connection is made: the browser's bytes may flow."""
        self._enter(State.OPEN)

    def close(self, notice: bool = False) -> bool:
        """Forward closes the session. With `notice`, the browser is first sent the OOB_SEND
        shutdown notice, if that can go between two of R's messages. False: it was closing
        already, there is nothing more to do."""
        if self.state is State.CLOSING or self.state is State.CLOSED:
            return False
        if notice and not self._server.in_message:
            self._send(Opcode.BINARY, qap.SHUTDOWN_NOTICE, True)
        self._enter(State.CLOSING)
        return True

    def closed(self) -> None:
        """The browser's connection is gone."""
        if self.state is not State.CLOSED:
            self._enter(State.CLOSED)

    def snapshot(self) -> dict[str, object]:
        """The session's state as JSON-able values, for a hand-over to another process (the
        shell has stopped both streams first)."""
        return {
            "state": self.state.value,
            "pending": list(self.pending),
            "to_r": self.messages_to_r,
            "from_r": self.messages_from_r,
            "client": self._client.snapshot(),
            "server": self._server.snapshot(),
        }

    def restore(self, state: dict[str, object]) -> None:
        """Carry on from `snapshot` (a new core, still CONNECTING). ValueError (or a KeyError,
        TypeError) if `state` is not one."""
        pending, client, server = state["pending"], state["client"], state["server"]
        to_r, from_r = state["to_r"], state["from_r"]
        if not isinstance(pending, list) or not all(type(i) is int for i in pending):
            raise ValueError("pending requests are not msg_ids")
        if not isinstance(client, dict) or not isinstance(server, dict):
            raise ValueError("no stream states")
        if type(to_r) is not int or type(from_r) is not int:
            raise ValueError("message counts are not numbers")
        self._client.restore(client)
        self._server.restore(server)
        self._enter(State(state["state"]))
        self.pending = pending
        self.messages_to_r, self.messages_from_r = to_r, from_r

    # -- browser -> Rserve -------------------------------------------------------------------

    def from_browser(
        self, data: bytes | bytearray | memoryview
    ) -> list[bytes | bytearray | memoryview]:
        """What of the browser's byte stream goes to R, in order (slices of `data`).

        Requests are remembered as pending until R answers; the browser's answers to R's
        OOB_MSG are not requests, R owes nothing for them. Once R is gone, every message that
        completes is answered with ERR_conn_broken and its msg_id instead. A header the limit
        refuses raises `QAPError`: the session is then CLOSING and nothing of this call, or of
        any later one, goes to R."""
        state = self.state
        if state is _OPEN:
            whole = self._client.whole(data)
            if whole is not None:
                # One whole request in one read: the common case, without the generator.
                self.messages_to_r += 1
                if not whole[0] & _CMD_RESP:
                    self.pending.append(whole[1])
                return [data]
        out: list[bytes | bytearray | memoryview] = []
        if state is not _OPEN and state is not _R_GONE:
            return out  # the shell holds the browser's bytes back until R is connected
        try:
            if state is _OPEN:
                pending = self.pending
                for chunk in self._client.feed(data):
                    out.append(chunk.data)
                    if chunk.first:
                        self.messages_to_r += 1
                        # qap.is_response, inline: this runs for every message.
                        if not chunk.header.cmd & _CMD_RESP:
                            pending.append(chunk.header.msg_id)
            else:
                for chunk in self._client.feed(data):
                    if chunk.last:
                        self._send(_BINARY, qap.conn_broken(chunk.header.msg_id), True)
        except qap.QAPError:
            self._enter(State.CLOSING)
            raise
        return out

    # -- Rserve -> browser -------------------------------------------------------------------

    def from_r(self, data: bytes | memoryview) -> qap.Mode | None:
        """Send R's bytes on as frames: the classic greeting as one text frame, each QAP message
        as one binary message (fragmented as its bytes arrive). Returns the session's mode when
        this call decided it. A greeting that is none, or a message over the limit, raises
        `QAPError`: the requests still pending are answered with ERR_conn_broken and the session
        is CLOSING."""
        state = self.state
        if state is not _OPEN and state is not _CONNECTING:
            return None
        send = self._send
        whole = self._server.whole(data)
        if whole is not None:
            # One whole answer in one read: the common case, without the generator.
            self.messages_from_r += 1
            if whole[0] & _CMD_RESP and self.pending:
                self._settle(whole[1])
            send(_BINARY, data, True)
            return None
        mode = None
        try:
            for item in self._server.feed(data):
                if isinstance(item, qap.Greeting):
                    mode = item.mode
                    if item.data:
                        send(_TEXT, item.data, True)
                    continue
                if item.first:
                    self.messages_from_r += 1
                    # An answer settles the newest request with its msg_id (Rserve echoes it):
                    # nested OCAP calls unwind like a stack, and a client that sent several
                    # requests before reading keeps the ones still owed. (qap.is_response,
                    # inline: this runs for every message.)
                    if item.header.cmd & _CMD_RESP and self.pending:
                        self._settle(item.header.msg_id)
                    send(_BINARY, item.data, item.last)
                else:
                    send(_CONTINUATION, item.data, item.last)
        except qap.QAPError:
            self._r_gone()
            self._enter(State.CLOSING)
            raise
        return mode

    def _settle(self, msg_id: int) -> None:
        pending = self.pending
        if pending[-1] == msg_id:
            pending.pop()
            return
        for i in range(len(pending) - 2, -1, -1):
            if pending[i] == msg_id:
                del pending[i]
                return
        pending.pop()  # an answer with no matching request: the newest, as before

    def r_lost(self) -> End | None:
        """R closed its connection. Between two messages the browser stays (R_GONE, the pending
        requests are answered); before its greeting or inside a message the session must end
        (an answer of ours inside R's message would corrupt it). Once R is gone or the session
        is closing there is nothing more to decide."""
        if self.state is not State.OPEN and self.state is not State.CONNECTING:
            return None
        if self._server.mode is None:
            why = "Rserve closed the connection before its greeting"
        elif self._server.in_message:
            why = "Rserve closed the connection in the middle of a message"
        else:
            self._r_gone()
            return None
        self._enter(State.CLOSING)
        return End(CloseReason.INTERNAL_ERROR, why)

    def no_greeting(self, within: float) -> End | None:
        """R's greeting is overdue (`within` seconds): unless it came, R is given up and the
        session must end."""
        if not self.awaiting_greeting:
            return None
        self._r_gone()
        self._enter(State.CLOSING)
        return End(CloseReason.INTERNAL_ERROR, f"Rserve sent no greeting within {within:g} s")

    def r_write_failed(self) -> End | None:
        """A write to R failed: the browser gets the OOB_SEND shutdown notice and stays, as when
        R closes, unless R is in the middle of a message (then the session must end)."""
        if self._server.in_message:
            self._enter(State.CLOSING)
            return End(
                CloseReason.INTERNAL_ERROR, "write to Rserve failed in the middle of R's answer"
            )
        self._send(Opcode.BINARY, qap.SHUTDOWN_NOTICE, True)
        self._r_gone()
        return None

    def _r_gone(self) -> None:
        """R is of no more use to this session: R_GONE, and every request still pending is
        answered with ERR_conn_broken, newest first."""
        if self.state is State.CONNECTING or self.state is State.OPEN:
            self._enter(State.R_GONE)
        pending = self.pending
        while pending:
            self._send(Opcode.BINARY, qap.conn_broken(pending.pop()), True)

    def heartbeat(self) -> bool:
        """Send the idle OOB message if it can go now: R is there and between two messages
        (inside one it would corrupt it, and a message in flight keeps proxies awake anyway)."""
        if self.state is State.OPEN and not self._server.in_message:
            self._send(Opcode.BINARY, qap.IDLE_MESSAGE, True)
            return True
        return False
