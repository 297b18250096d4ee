"""Session resume, sans I/O: the offer at the upgrade, tickets, control messages, and what R sent
that the client has not acknowledged yet.

The protocol is written down in docs/resume.md. The rule this module keeps: every byte of either
stream is counted from the start of the session, a count is the only thing the two ends exchange
about data, and R's bytes are kept until the client's count passes them, so a resume replays
exactly what the client is missing and nothing else. Nothing here knows about transports, timers
or asyncio; `ResumeState` is everything a session needs to be resumed, in one object that could be
handed to another process.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

PROTOCOL = "rserve-resume.v1"
TICKET_PREFIX = "rserve-ticket."
_KEY_HEX = 16  # 64 bits naming the session
_SECRET_HEX = 32  # 128 bits of secret
_HEX = frozenset("0123456789abcdef")
# The largest count JSON carries exactly (2**53), far beyond any session's bytes.
MAX_COUNT = 2**53
MAX_CONTROL = 4096  # bytes of one control message from a client
# An instance's name (--instance-id): what leads its tickets, and what a proxy routes on.
MAX_INSTANCE = 32
_INSTANCE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class ResumeClose(enum.IntEnum):
    """Close codes of the resume protocol (private-use range, RFC 6455 section 7.4.2)."""

    RESUME = 4100  # reconnect now and resume
    GONE = 4101  # unknown, expired or used ticket: start a new session
    REFUSED = 4102  # this client may not use the ticket (another client certificate)
    RETIRED = 4103  # another connection took the session over


class ResumeError(Exception):
    """A resume that cannot proceed; `code` is the close code the client is told."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Offer:
    """What a client offered in Sec-WebSocket-Protocol, resume tokens taken apart."""

    resume: bool  # rserve-resume.v1 was offered
    key: str | None = None  # the ticket's session name, to resume
    secret: str | None = None
    received: int = 0  # bytes of R's stream the client has
    instance: str | None = None  # the forward instance the ticket names, if it names one
    others: tuple[str, ...] = ()  # the application's own subprotocols, in order

    @property
    def resuming(self) -> bool:
        return self.key is not None


def parse_offer(protocols: Sequence[str]) -> Offer:
    """Split the offered subprotocols. A malformed ticket token is a ticket that matches no
    session (the client is told GONE), not an error of the handshake."""
    resume = False
    key = secret = instance = None
    received = 0
    others = []
    for p in protocols:
        if p == PROTOCOL:
            resume = True
        elif p.startswith(TICKET_PREFIX):
            parsed = _parse_ticket_token(p[len(TICKET_PREFIX) :])
            key, secret, received, instance = parsed if parsed else ("", "", 0, None)
        else:
            others.append(p)
    if not resume:
        key = secret = instance = None
        received = 0
    return Offer(resume, key, secret, received, instance, tuple(others))


def valid_instance(name: str) -> bool:
    """An instance name as it may lead a ticket: what a proxy's pattern can match simply."""
    return 0 < len(name) <= MAX_INSTANCE and set(name) <= _INSTANCE_CHARS and name[0] != "-"


def _parse_ticket_token(text: str) -> tuple[str, str, int, str | None] | None:
    ticket, _, count = text.partition(".")
    instance, underscore, ticket = ticket.rpartition("_")
    if underscore and not valid_instance(instance):
        return None
    if len(ticket) != _KEY_HEX + _SECRET_HEX or not set(ticket) <= _HEX:
        return None
    if not count.isdigit() or len(count) > 16 or int(count) > MAX_COUNT:
        return None
    return ticket[:_KEY_HEX], ticket[_KEY_HEX:], int(count), instance if underscore else None


def ticket_token(ticket: str, received: int) -> str:
    """The subprotocol a client offers to resume (what its wrapper sends; tests use it too)."""
    return f"{TICKET_PREFIX}{ticket}.{received}"


def new_key() -> str:
    return secrets.token_hex(_KEY_HEX // 2)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


# -- control messages ----------------------------------------------------------------------------


def control(kind: str, **members: object) -> bytes:
    """A control message (a text WebSocket message) as UTF-8 JSON."""
    return json.dumps({"t": kind, **members}, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Ack:
    received: int


def parse_control(payload: bytes | bytearray) -> Ack:
    """A client's control message. The only one a client sends is `ack`; anything else,
    malformed JSON or a count that is not a non-negative integer is an error (close 1008)."""
    if len(payload) > MAX_CONTROL:
        raise ResumeError(1008, "control message too long")
    try:
        message = json.loads(bytes(payload))
    except ValueError:
        raise ResumeError(1008, "control message is not JSON") from None
    if not isinstance(message, dict) or message.get("t") != "ack":
        raise ResumeError(1008, "unknown control message")
    received = message.get("received")
    if type(received) is not int or not 0 <= received <= MAX_COUNT:
        raise ResumeError(1008, "ack without a valid count")
    return Ack(received)


# -- R's bytes the client has not acknowledged ---------------------------------------------------


class Outbox:
    """R's stream from the client's acknowledged count on: kept (as copies) until acknowledged,
    at most `limit` bytes before the caller should stop reading from R (`full`)."""

    __slots__ = ("_chunks", "acked", "limit", "sent")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.acked = 0  # the client has every byte before this count
        self.sent = 0  # bytes of R's stream so far (acked + what is kept)
        self._chunks: deque[bytes] = deque()

    @property
    def kept(self) -> int:
        return self.sent - self.acked

    @property
    def full(self) -> bool:
        return self.kept >= self.limit

    def append(self, data: bytes | bytearray | memoryview) -> bytes:
        """Keep a copy of `data` (it may be a view of a shared read buffer); the copy is
        returned so the caller can send it without copying again."""
        chunk = bytes(data)
        if chunk:
            self._chunks.append(chunk)
            self.sent += len(chunk)
        return chunk

    def ack(self, received: int) -> None:
        """The client has every byte before `received`: drop them."""
        if not self.acked <= received <= self.sent:
            raise ResumeError(1008, f"ack of {received} bytes outside {self.acked}..{self.sent}")
        drop = received - self.acked
        chunks = self._chunks
        while drop and chunks:
            first = chunks[0]
            if len(first) <= drop:
                chunks.popleft()
                drop -= len(first)
            else:
                chunks[0] = first[drop:]
                drop = 0
        self.acked = received

    def kept_bytes(self) -> bytes:
        """Every byte kept, in order (a hand-over sends them to the next process)."""
        return b"".join(self._chunks)

    def restore(self, acked: int, kept: bytes) -> None:
        """Hold `kept` as the bytes after `acked`, as another process's outbox held them."""
        if not 0 <= acked <= MAX_COUNT:
            raise ValueError("count out of range")
        self.acked = acked
        self.sent = acked + len(kept)
        self._chunks = deque((kept,) if kept else ())

    def replay(self, received: int) -> list[bytes]:
        """What the client is missing when it has `received` bytes (acknowledging them)."""
        self.ack(received)
        return list(self._chunks)


# -- one session's resume state ------------------------------------------------------------------


@dataclass(slots=True)
class ResumeState:
    """Everything needed to resume one session: its ticket, the counts of both streams and the
    unacknowledged bytes of R's, and who may resume it."""

    window: int
    key: str = field(default_factory=new_key)
    subject: str | None = None  # the verified client certificate's subject at open
    outbox: Outbox = field(init=False)
    received: int = 0  # bytes of the client's stream forward has taken
    told: int = 0  # the `received` count last sent to the client
    _current: bytes = b""
    _previous: bytes | None = None  # the ticket before the last resume, until the client acks

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.window)

    def issue(self) -> str:
        """A new ticket (key and secret, hex); the current one becomes the previous one."""
        secret = secrets.token_hex(_SECRET_HEX // 2)
        self._previous = self._current or None
        self._current = _digest(secret)
        return self.key + secret

    def settled(self) -> None:
        """The client acknowledged on the new connection: it has the new ticket, so the
        previous one is withdrawn."""
        self._previous = None

    def check(self, secret: str, subject: str | None) -> None:
        """Raise ResumeError unless `secret` is the current or still-valid previous ticket and
        `subject` may resume this session."""
        digest = _digest(secret)
        ok = hmac.compare_digest(digest, self._current)
        if self._previous is not None:
            ok |= hmac.compare_digest(digest, self._previous)
        if not ok:
            raise ResumeError(ResumeClose.GONE, "unknown or used ticket")
        if self.subject is not None and subject != self.subject:
            raise ResumeError(ResumeClose.REFUSED, "the session belongs to another certificate")

    def snapshot(self) -> dict[str, object]:
        """The state as JSON-able values; the outbox's bytes travel apart (`outbox.kept_bytes`).
        Only digests of the tickets leave: the secrets were never kept."""
        return {
            "key": self.key,
            "window": self.window,
            "subject": self.subject,
            "received": self.received,
            "told": self.told,
            "acked": self.outbox.acked,
            "current": self._current.hex(),
            "previous": self._previous.hex() if self._previous is not None else None,
        }

    @classmethod
    def restored(cls, state: dict[str, object], kept: bytes) -> ResumeState:
        """The state `snapshot` describes, holding `kept`; ValueError (or KeyError, TypeError)
        if it is not one."""
        key, window, subject = state["key"], state["window"], state["subject"]
        received, told, acked = state["received"], state["told"], state["acked"]
        previous = state["previous"]
        if not isinstance(key, str) or len(key) != _KEY_HEX or not set(key) <= _HEX:
            raise ValueError("not a session name")
        if (
            type(window) is not int
            or window <= 0
            or not (subject is None or isinstance(subject, str))
        ):
            raise ValueError("bad window or subject")
        if type(received) is not int or type(told) is not int or type(acked) is not int:
            raise ValueError("counts are not numbers")
        if not 0 <= told <= received <= MAX_COUNT:
            raise ValueError("counts out of range")
        new = cls(window, key, subject)
        new.received, new.told = received, told
        new.outbox.restore(acked, kept)
        new._current = bytes.fromhex(str(state["current"]))
        new._previous = bytes.fromhex(previous) if isinstance(previous, str) else None
        return new

    def opened(self, ticket: str, grace: float) -> bytes:
        return control("open", ticket=ticket, window=self.window, grace=grace)

    def resumed(self, ticket: str, grace: float) -> bytes:
        self.told = self.received
        return control(
            "resumed", ticket=ticket, window=self.window, grace=grace, received=self.received
        )

    def ack_due(self) -> bool:
        """Whether a quarter window of the client's bytes has arrived since the last ack."""
        return self.received - self.told >= self.window // 4

    def ack(self) -> bytes:
        self.told = self.received
        return control("ack", received=self.received)
