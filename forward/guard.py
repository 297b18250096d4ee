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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .aiohttp_private import peer_of, requests_started
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
            return shown(hop, 64)  # the proxy's word: counted, logged, never trusted as text
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
#
# The check stops cross-site WebSocket hijacking: a page from another site driving a user's
# browser (inside the intranet, holding a client certificate) into a session with R. Browsers
# always send Origin on an upgrade and a page's script cannot set it, nor Host, Forwarded or
# X-Forwarded-*; clients that are not browsers send no Origin and are not what this guards
# against. The rule, in docs/security.md's words: a page may open a session when it comes from
# the host the browser addressed for the upgrade, on the port it addressed or on forward's own
# HTTP port (the page from -p, its socket on -w), and is not a plain-http page opening an https
# session; or when --allow-origin names it.

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SECURE = {"https": "https", "wss": "https", "http": "http", "ws": "http"}


def shown(text: str, limit: int = 200) -> str:
    """Client-supplied text made safe for a log line, a header or a response body: printable
    ASCII only (anything else escaped), cut to `limit` characters."""
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Authority:
    """The scheme, host and port the browser addressed, as far as forward can tell."""

    scheme: str  # "http" or "https"
    host: str  # lower case, IPv6 without brackets
    port: int | None  # None: the header named no port (a proxy may have dropped it)
    source: str  # the header it was read from, for the log line

    def text(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def _split_authority(value: str) -> tuple[str, int | None] | None:
    """`host[:port]` -> (lower-case host, port or None); None when it is not one."""
    value = value.strip()
    if not value or any(c in value for c in "/?#@ \t"):
        return None
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").rstrip(".")
    return (host, port) if host else None


def valid_host(value: str) -> bool:
    """Whether a Host header names a host (RFC 9112 section 3.2: otherwise 400)."""
    return _split_authority(value) is not None


def _last(value: str | None) -> str | None:
    """The last entry of a comma-separated header: the one the nearest proxy wrote."""
    if value is None:
        return None
    last = value.rsplit(",", 1)[-1].strip()
    return last or None


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """RFC 7239 `Forwarded`: one dict per element, keys lower case, quoted values unquoted.
    Garbage is skipped, never raised: `for=a;proto=https, host="x:1";` -> two elements."""
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    key, buf, quoted, escaped = None, [], False, False
    for c in value + ",":
        if quoted:
            if escaped:
                buf.append(c)
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
            else:
                buf.append(c)
        elif c == '"' and key is not None:
            quoted = True
        elif c == "=" and key is None:
            key, buf = "".join(buf).strip().lower(), []
        elif c in ";,":
            if key:
                pairs[key] = "".join(buf).strip()
            key, buf = None, []
            if c == ",":
                if pairs:
                    elements.append(pairs)
                pairs = {}
        else:
            buf.append(c)
    return elements


def browser_authority(
    host: str | None,
    secure: bool,
    proxy_headers: Mapping[str, str] | None = None,
) -> Authority | None:
    """What the browser addressed. `proxy_headers` are given only for a trusted proxy's
    request: its RFC 7239 `Forwarded` (last element), else `X-Forwarded-Host` with
    `X-Forwarded-Port` and `X-Forwarded-Proto`, override `Host` and the listener's scheme."""
    scheme = "https" if secure else "http"
    source = "Host"
    if proxy_headers:
        forwarded = parse_forwarded(proxy_headers.get("Forwarded", ""))
        element = forwarded[-1] if forwarded else {}
        proto = element.get("proto") or _last(proxy_headers.get("X-Forwarded-Proto"))
        if proto and proto.lower() in _SECURE:
            scheme = _SECURE[proto.lower()]
        if element.get("host"):
            host, source = element["host"], "Forwarded"
        elif _last(proxy_headers.get("X-Forwarded-Host")):
            host, source = _last(proxy_headers.get("X-Forwarded-Host")), "X-Forwarded-Host"
            port = _last(proxy_headers.get("X-Forwarded-Port"))
            split = _split_authority(host or "")
            if split is not None and split[1] is None and port and port.isdigit():
                host = f"{host}:{port}"
    split = _split_authority(host or "")
    if split is None:
        return None
    return Authority(scheme, split[0], split[1], source)


def origin_refusal(
    origin: str | None,
    authority: Authority | None,
    allowed: Sequence[str] = (),
    own_ports: Sequence[int] = (),
) -> str | None:
    """None when `origin` may open a session, else why not (one line, client text escaped,
    saying what to change when the cause is probably a proxy that hides the browser's host).

    No Origin (not a browser): allowed. `*` in `allowed`: any origin. An origin whose host
    matches an allowed pattern (`app.example.com`, `*.example.com`, or a full
    `https://app.example.com[:port]`): allowed. Otherwise the rule above, with `own_ports` the
    ports of forward's own HTTP listener."""
    if origin is None or "*" in allowed:
        return None
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port
    except ValueError:
        return f"origin {shown(origin)} is not a URL"
    scheme = (parts.scheme or "").lower()
    if not scheme or not parts.hostname or scheme not in _SECURE:
        return f"origin {shown(origin)} is not a web page's"  # "null" (sandboxed, file:)
    origin_host = parts.hostname.lower().rstrip(".")
    origin_full = origin.strip().lower().rstrip("/")
    for pattern in allowed:
        p = pattern.lower().rstrip("/")
        if fnmatch.fnmatchcase(origin_full if "://" in p else origin_host, p):
            return None
    fix = f"--allow-origin {shown(origin.strip())}"
    if authority is None:
        return f"origin {shown(origin)} refused: the request names no host; if it is yours: {fix}"
    seen = f"{authority.source} {shown(authority.text())!r}"
    if origin_host != authority.host:
        hint = (
            "a proxy in front of forward seems not to pass the browser's host (nginx: "
            "proxy_set_header Host $http_host; or X-Forwarded-Host $http_host with "
            f"--trusted-proxy), or the page is another site's; if it is yours: {fix}"
        )
        return f"origin {shown(origin)} is not this server's ({seen}): {hint}"
    port = origin_port or _DEFAULT_PORTS[scheme]
    addressed = authority.port or _DEFAULT_PORTS[scheme]
    if port != addressed and port not in own_ports:
        if authority.port is None:
            hint = (
                "a proxy in front of forward seems to drop the port (nginx: $http_host "
                f"instead of $host), or the page is another server's; if it is yours: {fix}"
            )
        else:
            hint = f"the page is another server's on this host; if it is yours: {fix}"
        return f"origin {shown(origin)} is another port than {seen}: {hint}"
    if _SECURE[scheme] == "http" and authority.scheme == "https":
        return f"origin {shown(origin)} is a plain-http page and this is an https site"
    return None


# -- the running guard --


@dataclass(frozen=True, slots=True)
class GuardSettings:
    allow_origin: tuple[str, ...] = ()
    ip_rules: tuple[IpRule, ...] = ()
    trusted: tuple[Network, ...] = ()
    max_sessions: int = 0
    max_sessions_per_client: int = 0
    # forward's own HTTP port (-p): a page from it may open its session on -w.
    own_ports: tuple[int, ...] = ()


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

    def trusts(self, peer: str | None) -> bool:
        """Whether `peer` is a trusted proxy (the unix-socket listener's peers are)."""
        return peer == "" or (peer is not None and _in(peer, self.settings.trusted))

    def check_origin(self, origin: str | None, authority: Authority | None) -> None:
        s = self.settings
        why = origin_refusal(origin, authority, s.allow_origin, s.own_ports)
        if why is not None:
            raise Refused(403, why)

    def admit(self, client: str) -> None:
        s = self.settings
        if s.max_sessions and self.open >= s.max_sessions:
            raise Refused(503, f"server at capacity ({self.open} sessions open)")
        if s.max_sessions_per_client and self.by_client[client] >= s.max_sessions_per_client:
            raise Refused(503, f"too many sessions from {client}")
        self.open += 1
        self.by_client[client] += 1

    def count(self, client: str) -> None:
        """Count a session that exists already (handed over by another process): no cap
        refuses it, it only counts towards them."""
        self.open += 1
        self.by_client[client] += 1

    def move(self, old: str, new: str) -> None:
        """A session resumed from another address: count it there (the per-client cap
        applies), no longer at `old`."""
        if old == new:
            return
        s = self.settings
        if s.max_sessions_per_client and self.by_client[new] >= s.max_sessions_per_client:
            raise Refused(503, f"too many sessions from {new}")
        self.by_client[new] += 1
        self.by_client[old] -= 1
        if self.by_client[old] <= 0:
            del self.by_client[old]

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
        peer = peer_of(handler)  # a PROXY header's source (proxysite.py), if there was one
        log.warning(
            "closed connection from %s: no complete request header within %.0f s",
            peer[0] if peer else "?",
            self._timeout,
        )
        handler.transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
