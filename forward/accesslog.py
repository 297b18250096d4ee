"""The HTTP access log, and the per-status request counter for /metrics.

One line per HTTP request on the logger `forward.access` (the WebSocket upgrade included: status
101, logged once the session is open; the relay logs its own line with the session's figures when
it ends):
client, method, path, status, response size, time. The client is the guard's answer: the peer,
or, when the peer is a `--trusted-proxy`, the address it forwarded (`X-Forwarded-For`, else
`X-Real-IP`); a header from any other peer is ignored, since anyone can send one.
"""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .guard import Guard, shown
from .stats import Slot

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
