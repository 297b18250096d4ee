"""Counters the relay and the HTTP layer keep, readable by /metrics from any worker.

The counters live in one anonymous shared memory map of 64-bit integers, one row (`Slot`) per
worker process. A process only ever writes its own row, so increments need no lock and cost a
list-style index add; any process can sum the rows for /metrics, and a parent that forked the
workers keeps the totals of a worker that died (it only zeroes that worker's open-session gauge).
Nothing here does I/O or knows about aiohttp or Prometheus.
"""

from __future__ import annotations

import enum
import mmap

# The HTTP statuses counted on their own; any other goes to "other".
HTTP_STATUSES = (
    101,
    200,
    206,
    301,
    302,
    304,
    400,
    401,
    403,
    404,
    405,
    408,
    413,
    414,
    416,
    426,
    429,
    431,
    500,
    501,
    502,
    503,
    504,
)
_STATUS_INDEX = {code: i for i, code in enumerate(HTTP_STATUSES)}


class Stat(enum.IntEnum):
    SESSIONS_OPEN = 0  # a gauge: +1 at open, -1 at close
    SESSIONS_TOTAL = 1
    BYTES_TO_R = 2
    BYTES_FROM_R = 3
    MESSAGES_TO_R = 4
    MESSAGES_FROM_R = 5
    BACKEND_FAILURES = 6
    TLS_HANDSHAKE_FAILURES = 7
    # Session resume (docs/resume.md).
    SESSIONS_PARKED = 8  # a gauge: parked right now
    PARKS = 9
    RESUMES = 10
    TAKEOVERS = 11
    PARKS_EXPIRED = 12
    REPLAYED_BYTES = 13
    RESUME_STALLS = 14  # reading from R paused because the client's window was full
    RESUMES_REFUSED = 15
    MALFORMED_REQUESTS = 16  # refused by the HTTP parser (accesslog.MalformedRequests)
    # The warm pool (warm.py).
    WARM_IDLE = 17  # a gauge: greeted connections waiting in the pool
    WARM_HANDED = 18
    WARM_MISSES = 19  # a session found the pool empty and connected itself
    WARM_DISCARDED = 20  # R closed a pooled connection (or spoke unasked) before it was used
    WARM_FAILURES = 21  # opening a pooled connection failed (Rserve missing, refusing, slow)


_HTTP_BASE = len(Stat)
# Plain ints for the per-message counters: an enum member's look-up costs more than the add.
_BYTES_TO_R, _BYTES_FROM_R = int(Stat.BYTES_TO_R), int(Stat.BYTES_FROM_R)
_MESSAGES_TO_R, _MESSAGES_FROM_R = int(Stat.MESSAGES_TO_R), int(Stat.MESSAGES_FROM_R)
ROW = _HTTP_BASE + len(HTTP_STATUSES) + 1  # +1: "other"
_WORD = 8


class Slot:
    """One process's row of counters."""

    __slots__ = ("_base", "_mem")

    def __init__(self, mem: memoryview, row: int) -> None:
        self._mem = mem
        self._base = row * ROW

    @classmethod
    def private(cls) -> Slot:
        """A row nobody else reads: the default when a server is built without a Stats."""
        return Stats(1).slot(0)

    def add(self, stat: Stat, n: int = 1) -> None:
        self._mem[self._base + stat] += n

    def to_r(self, nbytes: int, messages: int) -> None:
        """Bytes and messages relayed to R, in one call: this runs for every message."""
        mem, base = self._mem, self._base
        mem[base + _BYTES_TO_R] += nbytes
        if messages:
            mem[base + _MESSAGES_TO_R] += messages

    def from_r(self, nbytes: int, messages: int) -> None:
        mem, base = self._mem, self._base
        mem[base + _BYTES_FROM_R] += nbytes
        if messages:
            mem[base + _MESSAGES_FROM_R] += messages

    def http(self, status: int) -> None:
        i = _STATUS_INDEX.get(status, len(HTTP_STATUSES))
        self._mem[self._base + _HTTP_BASE + i] += 1

    def get(self, stat: Stat) -> int:
        return int(self._mem[self._base + stat])

    def reset_gauges(self) -> None:
        self._mem[self._base + Stat.SESSIONS_OPEN] = 0
        self._mem[self._base + Stat.SESSIONS_PARKED] = 0
        self._mem[self._base + Stat.WARM_IDLE] = 0


class Stats:
    """`slots` rows of counters in memory that stays shared with processes forked later."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        # An anonymous MAP_SHARED map: after fork, parent and children see the same pages.
        self._map = mmap.mmap(-1, max(1, slots * ROW * _WORD))
        self._mem = memoryview(self._map).cast("q")

    def slot(self, row: int) -> Slot:
        if not 0 <= row < self.slots:
            raise IndexError(f"no stats row {row} (have {self.slots})")
        return Slot(self._mem, row)

    def total(self, stat: Stat) -> int:
        return sum(int(self._mem[r * ROW + stat]) for r in range(self.slots))

    def per_row(self, stat: Stat) -> list[int]:
        return [int(self._mem[r * ROW + stat]) for r in range(self.slots)]

    def http_totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        labels = [str(c) for c in HTTP_STATUSES] + ["other"]
        for i, label in enumerate(labels):
            n = sum(int(self._mem[r * ROW + _HTTP_BASE + i]) for r in range(self.slots))
            if n:
                out[label] = n
        return out
