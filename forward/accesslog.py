"""The HTTP access log, and the per-status request counter for /metrics.

One line per HTTP request on the logger `forward.access` (the WebSocket upgrade included: status
101, logged once the session is open; the relay logs its own line with the session's figures when
it ends):
client, method, path, status, response size, time. The client is the guard's answer: the peer,
or, when the peer is a `--trusted-proxy`, the address it forwarded (`X-Forwarded-For`, else
`X-Real-IP`); a header from any other peer is ignored, since anyone can send one.

A request aiohttp's parser refuses (no Host, two Content-Lengths, bytes that are not HTTP) is
one WARNING line and a count in /metrics (`MalformedRequests`), not aiohttp's traceback: any
anonymous client can send one, so they are rate-limited too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import aiohttp_private
from .guard import Guard, shown
from .stats import Slot, Stat

log = logging.getLogger("forward.access")

STATS_ROW = web.AppKey("stats_row", Slot)
GUARD = web.AppKey("access_guard", Guard)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook: one line per request, and the per-status counter."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        client = request.remote or "-"
        app = None
        if isinstance(request, web.Request):
            # A request aiohttp could not parse (its own 400) was never routed: it has no app.
            with contextlib.suppress(AssertionError, AttributeError):
                app = request.app
        if app is not None:
            row = app.get(STATS_ROW)
            if row is not None:
                row.http(response.status)
            guard = app.get(GUARD)
            if guard is not None:
                headers = request.headers
                client = guard.client(
                    request.remote, headers.get("X-Forwarded-For"), headers.get("X-Real-IP")
                )
        client = client or "-"  # a unix-socket peer has no address
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs',
            client,
            shown(request.method, 20),
            shown(request.path_qs),
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return True  # the status counter runs even when the log line is filtered out


malformed_log = logging.getLogger(__name__)


class MalformedRequests:
    """aiohttp's server logger for one listener (`AppRunner(logger=...)`).

    A request its parser refused is one WARNING line (the peer, what was wrong, printable and
    cut) and a count in /metrics, instead of a nine-line ERROR traceback; at most `BURST`
    lines every `WINDOW` seconds, then one line saying how many were left out. Anything else
    aiohttp logs (a handler's unhandled exception) reaches aiohttp's logger unchanged."""

    BURST = 10
    WINDOW = 60.0

    def __init__(
        self, listener: str, stats: Slot, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._listener = listener
        self._stats = stats
        self._clock = clock
        self._window_start = -self.WINDOW
        self._lines = 0
        self._left_out = 0
        self._server_log = logging.getLogger("aiohttp.server")

    def exception(self, msg: str, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        if not self._malformed(args, exc_info):
            self._server_log.exception(msg, *args, exc_info=exc_info, **kw)

    def debug(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        # aiohttp reports bytes that are not HTTP at all (TLS on a plain port) at debug level.
        if not self._malformed(args, exc_info):
            self._server_log.debug(msg, *args, exc_info=exc_info, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server_log, name)

    def _malformed(self, args: tuple[Any, ...], exc_info: Any) -> bool:
        failure = aiohttp_private.parse_failure(
            exc_info if isinstance(exc_info, BaseException) else None
        )
        if failure is None:
            return False
        self._stats.add(Stat.MALFORMED_REQUESTS)
        now = self._clock()
        if now - self._window_start >= self.WINDOW:
            if self._left_out:
                malformed_log.warning(
                    "%d more malformed request(s) not logged in %g s",
                    self._left_out,
                    self.WINDOW,
                )
            self._window_start, self._lines, self._left_out = now, 0, 0
        if self._lines >= self.BURST:
            self._left_out += 1
            return True
        self._lines += 1
        peer = args[0] if args and args[0] else "unix"
        malformed_log.warning(
            "malformed request from %s on %s: %d, %s",
            shown(str(peer), 64),
            self._listener,
            failure[0],
            shown(failure[1], 160),
        )
        return True
