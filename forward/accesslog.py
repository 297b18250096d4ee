"""The HTTP access log and the client address behind a proxy.

One line per HTTP request (the WebSocket upgrade included: status 101, logged when the session
ends; the relay logs its own line with the session's figures): client, method, path, status,
response size, time. The client is the peer address, unless the peer is a trusted proxy
(`--trusted-proxy`, loopback and unix-socket peers by default); then `X-Real-IP`, or else the
right-most address in `X-Forwarded-For` that is not itself a trusted proxy. A header from any other
peer is ignored: anyone can send one. The same hook counts requests by status for /metrics.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .stats import Slot

log = logging.getLogger("forward.access")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")

TRUSTED = web.AppKey("trusted_proxies", tuple)
STATS_ROW = web.AppKey("stats_row", Slot)


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings (or single addresses) -> networks; ValueError names the bad one."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"--trusted-proxy {v}: not an IP address or network") from exc
    return tuple(out)


def _trusted(addr: str | None, networks: tuple[Network, ...]) -> bool:
    if not addr:
        return True  # a unix-socket peer: only local processes can connect
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_address(request: web.BaseRequest, networks: tuple[Network, ...]) -> str:
    peer = request.remote
    if not _trusted(peer, networks):
        return peer or "-"
    real = request.headers.get("X-Real-IP", "").strip()
    if real:
        return real
    chain = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(chain):
        if not _trusted(hop, networks):
            return hop
    return chain[0] if chain else (peer or "unix")


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook: one line per request, and the per-status counter."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        app = request.match_info.current_app if request.match_info else None
        networks: tuple[Network, ...] = ()
        if app is not None:
            networks = app.get(TRUSTED, ())
            row = app.get(STATS_ROW)
            if row is not None:
                row.http(response.status)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d %.3fs',
            client_address(request, networks), request.method, request.path_qs,
            request.version.major, request.version.minor, response.status,
            response.body_length, time,
        )

    @property
    def enabled(self) -> bool:
        return True  # the status counter runs even when the log line is filtered out
