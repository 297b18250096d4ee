"""Warm R sessions (`--warm N`): connections to Rserve opened and greeted ahead of demand.

Rserve forks a new R for every connection and, in OCAP mode, runs `oc.init` before it greets; an
application that loads data or packages there makes every page wait for it. The pool keeps up to
N connections whose greeting has arrived, hands one to each new session (which replays the
greeting it holds, as if R had just sent it) and opens a replacement in the background.

The rules, kept here: a connection is handed out once and never returns to the pool, so every
session gets an R nobody else held; one that R closed, or that sent anything after its greeting,
is dropped, never handed out (checked when R's end becomes readable, and again with a
non-blocking peek at the moment it is taken); connections held plus connections being opened
never exceed N; when Rserve refuses or is missing, or pooled R processes die, opening waits with
a doubling backoff, which only a connection handed to a session resets.

`GreetingReader`, `Backoff` and `wanted` are pure; `WarmPool` is the asyncio shell around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from dataclasses import dataclass

from . import qap
from .relay import connect_unix
from .stats import Slot, Stat

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Warm:
    """A connected, greeted Rserve connection: the socket and every byte R has sent on it."""

    sock: socket.socket
    greeting: bytes


class GreetingReader:
    """Collects R's first bytes until its greeting is complete: the 32-byte ID string in QAP
    mode, the whole first message (oc.init's answer) in OCAP mode. Bytes that are not a greeting,
    or a greeting over `max_size`, raise `qap.QAPError`."""

    __slots__ = ("_stream", "data", "done")

    def __init__(self, max_size: int | None = None) -> None:
        self._stream = qap.ServerStream(max_size)
        self.data = bytearray()
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Take the next bytes from R; True once the greeting is complete."""
        self.data += data
        for event in self._stream.feed(data):
            if isinstance(event, qap.Greeting):
                if event.mode is qap.Mode.QAP:
                    self.done = True
            elif event.last:
                self.done = True
        return self.done


class Backoff:
    """How long to wait before the next attempt after consecutive failures: `first`, doubling,
    at most `cap`; a success starts over."""

    __slots__ = ("_next", "cap", "first")

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def failed(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def succeeded(self) -> None:
        self._next = self.first

    @property
    def next(self) -> float:
        """The wait after the next failure."""
        return self._next


def wanted(size: int, held: int, opening: int) -> int:
    """How many more connections to open now so that held + opening reaches `size`."""
    return max(0, size - held - opening)


def alive(sock: socket.socket) -> bool:
    """A pooled connection can be handed out: open, and nothing from R since its greeting."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # EOF, or bytes R was not asked for


class WarmPool:
    """Up to `size` greeted connections to the Rserve at `path`, refilled in the background.

    `take()` is synchronous: the session asks it first and connects by itself on a miss."""

    def __init__(
        self,
        path: str,
        size: int,
        timeout: float,
        stats: Slot,
        max_result_size: int = 0,
    ) -> None:
        self.path = path
        self.size = size
        self._timeout = timeout
        self._stats = stats
        self._max_result_size = max_result_size or None
        self._held: deque[Warm] = deque()
        self._opening: set[asyncio.Task[None]] = set()
        self._backoff = Backoff()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = True
        self._failing = False  # logged once per outage, not once per attempt

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def opening(self) -> int:
        return len(self._opening)

    def next_delay(self) -> float:
        """How long the pool would wait after its next failure or loss."""
        return self._backoff.next

    def start(self) -> None:
        self._closed = False
        log.info("warm pool: keeping %d R session(s) greeted at %s", self.size, self.path)
        self._fill()

    def take(self) -> Warm | None:
        """A greeted connection of R's own, or None (a miss: the session connects itself)."""
        while self._held:
            warm = self._held.popleft()
            self._unhold(warm)
            if alive(warm.sock):
                self._stats.add(Stat.WARM_HANDED)
                self._backoff.succeeded()  # a connection that served: R works
                self._fill()
                return warm
            self._discard(warm, "closed while pooled")
        self._stats.add(Stat.WARM_MISSES)
        self._fill()
        return None

    async def close(self) -> None:
        """Close every pooled connection (each ends its R) and stop opening new ones."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        tasks = list(self._opening)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._held:
            warm = self._held.popleft()
            self._unhold(warm)
            warm.sock.close()

    # -- filling -----------------------------------------------------------------------------

    def _fill(self) -> None:
        if self._closed or self._retry is not None:
            return
        for _ in range(wanted(self.size, len(self._held), len(self._opening))):
            task = asyncio.get_running_loop().create_task(self._open())
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _retry_later(self) -> None:
        self._retry = None
        self._fill()

    async def _open(self) -> None:
        try:
            warm = await self._connect()
        except asyncio.CancelledError:
            raise
        except (OSError, TimeoutError, qap.QAPError) as exc:
            self._done_opening()
            if self._closed:
                return
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            why = why or type(exc).__name__
            if not self._failing:
                self._failing = True
                log.warning("warm pool: cannot open an R session at %s: %s", self.path, why)
            self._stats.add(Stat.WARM_FAILURES)
            self._back_off()  # one wait for the connections that failed together
            return
        self._done_opening()
        if self._closed or len(self._held) >= self.size:
            warm.sock.close()
            return
        if self._failing:
            self._failing = False
            log.info("warm pool: Rserve at %s answers again", self.path)
        self._held.append(warm)
        self._stats.add(Stat.WARM_IDLE)
        # R's end becoming readable means it closed (or spoke unasked): drop it at once.
        asyncio.get_running_loop().add_reader(warm.sock.fileno(), self._readable, warm)

    def _done_opening(self) -> None:
        # At once, not in the task's done callback: held + opening must never count it twice.
        task = asyncio.current_task()
        if task is not None:
            self._opening.discard(task)

    async def _connect(self) -> Warm:
        loop = asyncio.get_running_loop()
        sock = await connect_unix(self.path, loop.time() + self._timeout)
        try:
            reader = GreetingReader(self._max_result_size)
            async with asyncio.timeout(self._timeout):
                while True:
                    data = await loop.sock_recv(sock, 65536)
                    if not data:
                        raise ConnectionResetError("Rserve closed before its greeting")
                    if reader.feed(data):
                        return Warm(sock, bytes(reader.data))
        except BaseException:
            sock.close()
            raise

    def _readable(self, warm: Warm) -> None:
        if alive(warm.sock):
            return  # a spurious wake-up
        with contextlib.suppress(ValueError):
            self._held.remove(warm)
            self._unhold(warm)
        self._discard(warm, "R closed it")

    def _discard(self, warm: Warm, why: str) -> None:
        log.info("warm pool: dropped a pooled R session (%s)", why)
        self._stats.add(Stat.WARM_DISCARDED)
        warm.sock.close()
        # Replaced after the backoff, which only a connection handed to a session resets: an R
        # that greets and then quits at once must not make the pool fork in a tight loop.
        self._back_off()

    def _unhold(self, warm: Warm) -> None:
        """`warm` has left `_held`: no longer counted idle, no longer watched."""
        self._stats.add(Stat.WARM_IDLE, -1)
        asyncio.get_running_loop().remove_reader(warm.sock.fileno())

    def _back_off(self) -> None:
        """Open the next connections only after the backoff (one wait at a time)."""
        if self._retry is None and not self._closed:
            delay = self._backoff.failed()
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_later)
