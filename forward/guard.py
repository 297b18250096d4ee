"""Who may open a session: origin and address rules, session counts, slow-client deadlines.

The rules are pure functions of their inputs (an Origin and a Host, an address and a rule list),
so they are tested on their own; `Guard` holds the few counters a running server needs, and is
owned by the `Server`. A refusal is a `Refused` carrying its HTTP status or WebSocket close code,
turned into an answer in one place (app.py).

Semantics follow RStudio Server's, which people already know: IP rules are ordered
`allow`/`deny` lines, the first match wins; allowed origins are host names where `*` matches any
characters, dots included.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .aiohttp_private import requests_started
from .config import ConfigError

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """A request or session that policy turns away; `status` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- IP rules --


@dataclass(frozen=True, slots=True)
class IpRule:
    allow: bool
    network: Network | None  # None: "all"

    def matches(self, addr: Address) -> bool:
        if self.network is None:
            return True
        addr = unmapped(addr)
        return addr.version == self.network.version and addr in self.network


def parse_ip_rules(text: str, source: str = "ip rules") -> tuple[IpRule, ...]:
    """`allow|deny ADDRESS|CIDR|all` per line; `#` starts a comment."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or words[0] not in ("allow", "deny"):
            raise ConfigError(f"{source}, line {number}: expected 'allow|deny ADDRESS|CIDR|all'")
        verb, what = words
        if what == "all":
            network = None
        else:
            try:
                network = ipaddress.ip_network(what, strict=False)
            except ValueError:
                raise ConfigError(f"{source}, line {number}: {what!r} is not an address") from None
        rules.append(IpRule(verb == "allow", network))
    return tuple(rules)


def ip_allowed(rules: Sequence[IpRule], address: str) -> bool:
    """First matching rule decides; an address no rule matches is allowed (RStudio's rule)."""
    if not rules:
        return True
    addr = ip_of(address)
    if addr is None:
        return False  # a peer that is not an IP address cannot match any allow rule
    for rule in rules:
        if rule.matches(addr):
            return rule.allow
    return True


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def client_address(
    peer: str | None,
    forwarded_for: str | None,
    trusted: Sequence[Network],
    real_ip: str | None = None,
) -> str:
    """The calling client's address: the peer, or, when the peer is a trusted proxy, the last
    X-Forwarded-For entry that is not itself a trusted proxy (or, without X-Forwarded-For, the
    proxy's X-Real-IP).

    A peer on the unix-socket listener has no address; only a local process allowed to open
    that socket (mode 0660: nginx, a sidecar) can be one, so it is trusted like a listed proxy.
    """
    if peer is None:
        return "-"
    local = peer == ""
    if not local and (not trusted or not _in(peer, trusted)):
        return peer
    peer = peer or "unix"
    if not forwarded_for:
        real = (real_ip or "").strip()
        return real if real and _valid(real) else peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if hop and not _in(hop, trusted):
            return hop
    return peer


def _valid(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _in(address: str, networks: Sequence[Network]) -> bool:
    addr = ip_of(address)
    return addr is not None and any(addr.version == n.version and addr in n for n in networks)


def unmapped(addr: Address) -> Address:
    """The IPv4 address behind an IPv4-mapped one: a dual-stack listener shows IPv4 peers as
    ::ffff:a.b.c.d, and rules and proxies are written with the IPv4 address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_of(text: str) -> Address | None:
    """The address in `text` (a peer, a header entry; an IPv6 zone such as %eth0 is kept),
    unmapped; None when it is not an IP address."""
    try:
        return unmapped(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def _without_port(text: str) -> str:
    """`[v6]:port` -> `v6`, `v4:port` -> `v4`; anything else as it is."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        return text[1 : text.index("]")]
    if text.count(":") == 1:
        return text.split(":", 1)[0]
    return text


def _show_ip(text: str) -> str:
    ip = ip_of(_without_port(text))
    return str(ip) if ip is not None else text


def client_identity(
    peer: str | None,
    forwarded_for: str | None,
    real_ip: str | None,
    trusted: Sequence[Network],
    subject: str | None = None,
    common_name: str | None = None,
) -> list[tuple[str, str]]:
    """The header lines forward adds for R (`.R` scripts): who is calling.

    A peer that is not a trusted proxy is the client: its address is X-Real-IP and the whole of
    X-Forwarded-For, whatever it sent. A trusted proxy's X-Forwarded-For is kept and the proxy's
    own address appended; X-Real-IP is then the nearest address in that chain that is not a
    trusted proxy (`client_address`), or, when the proxy sent no chain, its own X-Real-IP
    (nginx: `proxy_set_header X-Real-IP $remote_addr;`, Rserve's example).
    """
    peer = _show_ip(peer) if peer else "unknown"
    out: list[tuple[str, str]] = []
    if trusted and _in(_without_port(peer), trusted):
        chain = [a.strip() for a in (forwarded_for or "").split(",") if a.strip()]
        client = client_address(peer, forwarded_for, trusted) if chain else peer
        if client == peer and not chain and real_ip and ip_of(_without_port(real_ip)):
            client = real_ip.strip()
        out.append(("X-Real-IP", client))
        out.append(("X-Forwarded-For", ", ".join([*chain, peer])))
    else:
        out.append(("X-Real-IP", peer))
        out.append(("X-Forwarded-For", peer))
    if subject is not None:
        out.append(("X-SSL-Client-S-DN", subject))
    if common_name is not None:
        out.append(("X-SSL-Client-CN", common_name))
    return out


# -- Origin --

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _host_port(authority: str, scheme: str) -> str:
    parts = urlsplit(f"{scheme}://{authority}")
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        return ""
    host = (parts.hostname or "").lower()
    return f"{host}:{port}"


def origin_allowed(
    origin: str | None, host: str | None, allowed: Sequence[str], scheme: str = "http"
) -> bool:
    """Cross-site WebSocket hijacking protection.

    No Origin (not a browser): allowed. `*` in `allowed`: any origin. An origin whose host
    matches an allowed pattern (`app.example.com`, `*.example.com`, or a full
    `https://app.example.com[:port]`): allowed. Otherwise the origin's host and port must be the
    Host the request was sent to (the same-origin default).
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    parts = urlsplit(origin.strip())
    if not parts.scheme or not parts.hostname:
        return False  # "null" (sandboxed frames, file:) and garbage
    origin_host = parts.hostname.lower()
    origin_full = origin.strip().lower().rstrip("/")
    for pattern in allowed:
        p = pattern.lower().rstrip("/")
        if fnmatch.fnmatchcase(origin_full if "://" in p else origin_host, p):
            return True
    if host is None:
        return False
    return _host_port(origin.split("://", 1)[1], parts.scheme) == _host_port(host, scheme)


# -- the running guard --


@dataclass(frozen=True, slots=True)
class GuardSettings:
    allow_origin: tuple[str, ...] = ()
    ip_rules: tuple[IpRule, ...] = ()
    trusted: tuple[Network, ...] = ()
    max_sessions: int = 0
    max_sessions_per_client: int = 0


class Guard:
    """Admission for new sessions; counts what is open, per client address."""

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.open = 0
        self.by_client: Counter[str] = Counter()

    def client(
        self, peer: str | None, forwarded_for: str | None, real_ip: str | None = None
    ) -> str:
        return client_address(peer, forwarded_for, self.settings.trusted, real_ip)

    def check_address(self, client: str) -> None:
        if not ip_allowed(self.settings.ip_rules, client):
            raise Refused(403, f"address {client} is not allowed")

    def check_origin(self, origin: str | None, host: str | None, scheme: str) -> None:
        if not origin_allowed(origin, host, self.settings.allow_origin, scheme):
            raise Refused(403, f"origin {origin} is not allowed")

    def admit(self, client: str) -> None:
        s = self.settings
        if s.max_sessions and self.open >= s.max_sessions:
            raise Refused(503, f"server at capacity ({self.open} sessions open)")
        if s.max_sessions_per_client and self.by_client[client] >= s.max_sessions_per_client:
            raise Refused(503, f"too many sessions from {client}")
        self.open += 1
        self.by_client[client] += 1

    def release(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


class HeaderDeadline:
    """Protocol factory wrapper: a connection that has not sent one complete request header
    within `timeout` seconds of being accepted is closed (slowloris). After the first request,
    aiohttp's keep-alive timeout bounds the wait for the next one."""

    def __init__(self, server: Any, timeout: float) -> None:
        self._server = server
        self._timeout = timeout

    def __call__(self) -> Any:
        handler = self._server()
        if self._timeout > 0:
            # RequestHandler has __slots__ and no weak references: the timer holds it at most
            # `timeout` seconds, which a connection would anyway.
            asyncio.get_running_loop().call_later(self._timeout, self._expire, handler)
        return handler

    # A TLS handshake still running at the deadline has its own timeout (tls.HANDSHAKE_TIMEOUT,
    # 30 s); the header deadline is checked again after it, so that a slow handshake does not
    # buy a connection unlimited time for its header.
    RECHECKS = 4

    def _expire(self, handler: Any, rechecks: int = RECHECKS) -> None:
        # aiohttp counts a request once its header is complete.
        if requests_started(handler) > 0:
            return
        if handler.transport is None:  # not connected yet: the TLS handshake is still running
            if rechecks > 0:
                asyncio.get_running_loop().call_later(
                    self._timeout, self._expire, handler, rechecks - 1
                )
            return
        peer = handler.transport.get_extra_info("peername")
        log.warning(
            "closed connection from %s: no complete request header within %.0f s",
            peer[0] if peer else "?",
            self._timeout,
        )
        handler.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
