"""Wiring: the aiohttp applications on their listeners (listeners.py), ordered start and shutdown.

`-p` gets the HTTP application (a WebSocket upgrade on any path becomes a session, anything else
is an HTTP request), `-w` the WebSocket-only one. Both share one `Sessions` set owned by the
`Server`, so shutdown can reach every open session whichever port it came in on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from aiohttp import HttpVersion10, HttpVersion11, hdrs, web

from . import accesslog, headers, health, resume, tls, wsconn
from .aiohttp_private import SERVER, WrappingRunner
from .config import Config, ConfigError
from .guard import (
    Authority,
    Guard,
    GuardSettings,
    HeaderDeadline,
    IpRule,
    Refused,
    browser_authority,
    parse_ip_rules,
    parse_networks,
    valid_host,
)
from .health import Status
from .listeners import bind_listeners, show_address
from .proxysite import proxy_site
from .relay import RelaySettings, Session
from .resumable import ResumableSession
from .stats import Stat, Stats
from .warm import WarmPool
from .wsframe import CloseReason

log = logging.getLogger(__name__)


class Sessions(set[Session]):
    """The open sessions; `emptied()` lets a graceful drain wait for the last one to end.

    A plain set: every session removes itself when its connection ends, and a WeakSet entry
    costs more memory than the rest of the bookkeeping (measured: 0.8 KB a session)."""

    def __init__(self) -> None:
        super().__init__()
        self._waiters: list[asyncio.Future[None]] = []
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def discard(self, item: object) -> None:
        super().discard(item)
        if not self:
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def emptied(self) -> None:
        if self:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


SESSIONS = web.AppKey("sessions", Sessions)
STATUS = web.AppKey("status", Status)
# Resumable sessions by the name in their ticket, live and parked; shared by -p and -w.
RESUMABLE = web.AppKey("resumable", dict[str, ResumableSession])
RELAY = web.AppKey("relay", RelaySettings)
LISTENER = web.AppKey("listener", str)
POLICY = web.AppKey("client_policy", tls.ClientPolicy)
GUARD = web.AppKey("guard", Guard)
WS_PING = web.AppKey("ws_ping", float)
# The shared receive buffers of the relay (browser -> R, R -> browser); one pair per process.
BUFFERS = web.AppKey("read_buffers", tuple[wsconn.ReadBuffer, wsconn.ReadBuffer])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def wants_upgrade(request: web.BaseRequest) -> bool:
    """`Connection: upgrade` (a token of it), whatever it asks for."""
    tokens = request.headers.get(hdrs.CONNECTION, "").split(",")
    return "upgrade" in (token.strip().lower() for token in tokens)


def is_upgrade(request: web.Request) -> bool:
    return (
        request.method == "GET"
        and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
        and wants_upgrade(request)
    )


async def websocket_session(request: web.Request) -> web.StreamResponse:
    app = request.app
    guard = app[GUARD]
    client = guard.client(
        request.remote, request.headers.get("X-Forwarded-For"), request.headers.get("X-Real-IP")
    )
    try:
        guard.check_origin(request.headers.get(hdrs.ORIGIN), guard_authority(request, guard))
    except Refused as refused:
        log.warning("refused WebSocket from %s on %s: %s", client, app[LISTENER], refused.reason)
        # The browser never shows this body; the log line above says what to change.
        raise web.HTTPForbidden(text="Forbidden: this page's origin is not allowed.\n") from None
    relay = app[RELAY]
    offered = wsconn.subprotocols(request)
    offer = resume.parse_offer(offered)
    try:
        hosts = request.headers.getall(hdrs.HOST, ())
        if len(hosts) != 1 or not valid_host(hosts[0]):
            raise web.HTTPBadRequest(text="Bad WebSocket handshake: invalid Host.\n")
        if offer.resume and relay.resume_grace > 0:
            answer = wsconn.handshake(request, resume.PROTOCOL)
        else:
            # A ticket is never echoed; otherwise the first offer, as always.
            plain = [p for p in offered if not p.startswith(resume.TICKET_PREFIX)]
            answer = wsconn.handshake(request, plain[0] if plain else "")
            offer = resume.Offer(False)
    except web.HTTPClientError as refused:
        # The body says what was wrong, with the client's text made printable and cut.
        why = (refused.text or refused.reason).strip()
        log.warning("refused WebSocket from %s on %s: %s", client, app[LISTENER], why)
        raise
    if offer.resuming:
        return await _resume_session(request, client, offer, answer)
    if app[STATUS].draining:
        # Before the upgrade: a proxy may try another instance (nginx: proxy_next_upstream
        # http_503); resumes of the sessions still here are served until they end.
        log.warning("refused WebSocket from %s on %s: draining", client, app[LISTENER])
        raise web.HTTPServiceUnavailable(
            text="This forward is draining: no new sessions. Try again.\n",
            headers={hdrs.RETRY_AFTER: "5"},
        )
    subject = _verified_subject(request) if offer.resume else None  # before the take-over
    refusal = None
    try:
        guard.admit(client)
    except Refused as refused:
        # Told after the upgrade, so that the browser sees the reason (a failed handshake
        # hides it).
        log.warning("refused WebSocket from %s on %s: %s", client, app[LISTENER], refused.reason)
        refusal = f"{refused.reason}; try again later"
    try:
        transport, tail = wsconn.take_over(request, answer)
    except ConnectionResetError:  # the browser left before its upgrade was answered
        if refusal is None:
            guard.release(client)
        return wsconn.Detached()
    from_browser, from_r = app[BUFFERS]
    if refusal is not None:
        ws = wsconn.ServerWebSocket(transport, wsconn.NullHandler(), from_browser)
        ws.start(tail)
        ws.close(CloseReason.TRY_AGAIN_LATER, refusal)
        return wsconn.Detached()
    sessions = app[SESSIONS]
    label = f"{client} on {app[LISTENER]}"
    session: Session
    if offer.resume:
        registry = app[RESUMABLE]

        session = resumable = ResumableSession(
            relay,
            label,
            from_r,
            sessions.next_id(),
            resumable_end(sessions, guard),
            registry,
            client,
            subject,
        )
        ws = wsconn.ServerWebSocket(transport, session, from_browser, app[WS_PING], split_text=True)
        session.ws = ws
        sessions.add(session)
        ws.start(tail, wsconn.HOLD_CONNECTING)
        resumable.hello()
    else:

        def end(session: Session) -> None:
            sessions.discard(session)
            guard.release(client)

        session = Session(relay, label, from_r, sessions.next_id(), end)
        session.ws = ws = wsconn.ServerWebSocket(transport, session, from_browser, app[WS_PING])
        sessions.add(session)
        ws.start(tail, wsconn.HOLD_CONNECTING)
    await session.start()
    return wsconn.Detached()


def resumable_end(sessions: Sessions, guard: Guard) -> Callable[[Session], None]:
    """What a resumable session's end does: it leaves the open sessions and is no longer
    counted for the client it moved to last (not the one it opened from)."""

    def end(session: Session) -> None:
        sessions.discard(session)
        assert isinstance(session, ResumableSession)
        guard.release(session.client)

    return end


async def _resume_session(
    request: web.Request, client: str, offer: resume.Offer, answer: bytes
) -> web.StreamResponse:
    """A client presenting a ticket: its session carries on over this connection, or the
    connection is closed with the code that tells the client why not (docs/resume.md). R is
    never reached for a refused one."""
    app = request.app
    guard = app[GUARD]
    session = app[RESUMABLE].get(offer.key or "")
    failure: tuple[int, str] | None = None
    instance = app[RELAY].instance
    if offer.instance is not None and offer.instance != instance:
        # A proxy sent it to the wrong instance: the session is not here, and never will be.
        session = None
        failure = (
            resume.ResumeClose.GONE,
            f"the ticket is for instance {offer.instance}; this is "
            f"{'instance ' + instance if instance else 'a forward without --instance-id'}",
        )
    elif session is None:
        failure = (resume.ResumeClose.GONE, "unknown, expired or used ticket")
    else:
        try:
            session.check_resume(offer.secret or "", _verified_subject(request), offer.received)
            guard.move(session.client, client)
        except resume.ResumeError as exc:
            failure = (exc.code, exc.reason)
        except Refused as refused:
            failure = (CloseReason.TRY_AGAIN_LATER, f"{refused.reason}; try again later")
    try:
        transport, tail = wsconn.take_over(request, answer)
    except ConnectionResetError:
        if failure is None and session is not None:
            guard.move(client, session.client)
        return wsconn.Detached()
    from_browser, _ = app[BUFFERS]
    if failure is not None or session is None:
        code, reason = failure or (resume.ResumeClose.GONE, "no session")
        app[RELAY].stats.add(Stat.RESUMES_REFUSED)
        log.warning("refused resume from %s on %s: %s", client, app[LISTENER], reason)
        ws = wsconn.ServerWebSocket(transport, wsconn.NullHandler(), from_browser)
        ws.start(tail)
        ws.close(code, reason)
        return wsconn.Detached()
    ws = wsconn.ServerWebSocket(transport, session, from_browser, app[WS_PING], split_text=True)
    session.resume_on(ws, tail, offer.received, f"{client} on {app[LISTENER]}", client)
    return wsconn.Detached()


def _verified_subject(request: web.Request) -> str | None:
    """The subject of the client certificate verified in the TLS handshake, if there is one."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    return tls.subject_text(cert) if cert else None


def guard_authority(request: web.Request, guard: Guard) -> Authority | None:
    """The host the browser addressed: Host, or what a trusted proxy says it was."""
    trusted = guard.trusts(request.remote)
    return browser_authority(
        request.headers.get(hdrs.HOST), request.secure, request.headers if trusted else None
    )


@web.middleware
async def http11_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An upgrade below HTTP/1.1 is refused (RFC 6455 section 4.1), and so is every HTTP/0.9
    request: a raw CR LF in a request target reads as HTTP/0.9 whose next lines become headers
    (an upgrade, once). A plain HTTP/1.0 GET for a file or a `.R` page on -p is still served:
    nginx speaks HTTP/1.0 to its upstreams unless told `proxy_http_version 1.1`, and so do
    health checkers and `curl -0`."""
    version = request.version
    if version >= HttpVersion11:
        return await handler(request)
    if (
        version == HttpVersion10
        and request.app[LISTENER] != "ws"
        and hdrs.UPGRADE not in request.headers
        and "upgrade" not in request.headers.get(hdrs.CONNECTION, "").lower()
    ):
        return await handler(request)
    log.warning(
        "refused HTTP/%d.%d request from %s on %s",
        version.major,
        version.minor,
        request.remote or "unix",
        request.app[LISTENER],
    )
    if version < HttpVersion10:  # a malformed request line, in practice
        raise web.HTTPBadRequest(text="Bad request line.\n")
    raise web.HTTPVersionNotSupported(text="A WebSocket upgrade needs HTTP/1.1.\n")


@web.middleware
async def ip_rules(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app[GUARD]
    client = guard.client(
        request.remote, request.headers.get("X-Forwarded-For"), request.headers.get("X-Real-IP")
    )
    try:
        guard.check_address(client)
    except Refused as refused:
        log.warning("refused %s %s: %s", request.method, request.path, refused.reason)
        raise web.HTTPForbidden(text="Forbidden.\n") from None
    return await handler(request)


class GuardedRunner(WrappingRunner):
    """An AppRunner whose connections must send a complete request header in time."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    def wrap_server(self, server: web.Server) -> web.Server:
        return cast(web.Server, HeaderDeadline(server, self._header_timeout))


async def ws_only(request: web.Request) -> web.StreamResponse:
    if is_upgrade(request):
        return await websocket_session(request)
    raise web.HTTPUpgradeRequired(
        text="This port serves WebSocket sessions only.\n", headers={hdrs.UPGRADE: "websocket"}
    )


def http_entry(fallback: Handler) -> Handler:
    async def entry(request: web.Request) -> web.StreamResponse:
        if is_upgrade(request):
            return await websocket_session(request)
        return await fallback(request)

    return entry


async def not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound(text="Not found.\n")


@web.middleware
async def client_certificate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The name rules of --tls-client, applied before any handler can open a backend connection
    (the chain itself was checked in the handshake)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    why = tls.refusal(request.app[POLICY], cert)
    if why is not None:
        log.warning(
            "refused %s on %s (%s): %s",
            request.remote,
            request.app[LISTENER],
            tls.subject_text(cert),
            why,
        )
        raise web.HTTPForbidden(text=f"Client certificate refused: {why}.\n")
    return await handler(request)


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No Python or aiohttp version for anyone to read; and a request that asked for an upgrade
    and is answered without one ends its connection: aiohttp's parser reads nothing more on a
    connection after `Connection: upgrade`, so it would stay open, unread, for ever."""
    response.headers[hdrs.SERVER] = SERVER
    if response.status != 101 and wants_upgrade(request):
        response.force_close()


def redirect_to_https(https_port: Callable[[], int]) -> Handler:
    """The --redirect-port handler: every request goes to the same path over https on -p."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        port = https_port()
        host = request.url.raw_host or "localhost"
        location = request.url.with_scheme("https").with_host(host)
        location = location.with_port(None if port == 443 else port)
        # 301 is what every client follows for GET; 308 keeps the method and body of the rest.
        status = (
            web.HTTPMovedPermanently
            if request.method in ("GET", "HEAD")
            else (web.HTTPPermanentRedirect)
        )
        raise status(location)

    return redirect


def build_app(
    relay: RelaySettings,
    sessions: Sessions,
    listener: str,
    handler: Handler,
    guard: Guard | None = None,
    ws_ping: float = 0.0,
    config: Config | None = None,
    buffers: tuple[wsconn.ReadBuffer, wsconn.ReadBuffer] | None = None,
    resumable: dict[str, ResumableSession] | None = None,
    status: Status | None = None,
) -> web.Application:
    guard = guard or Guard(GuardSettings())
    middlewares = [http11_only]
    if guard.settings.ip_rules:
        middlewares.append(ip_rules)
    if config is not None and config.tls and tls.parse_policy(config.tls_client).mode == "require":
        middlewares.append(client_certificate)
    app = web.Application(handler_args={"max_field_size": 16384}, middlewares=middlewares)
    app.on_response_prepare.append(server_header)
    app[GUARD] = guard
    app[WS_PING] = ws_ping
    if config is not None:
        app[POLICY] = tls.parse_policy(config.tls_client)
        app.on_response_prepare.append(headers.hook(headers.for_config(config)))
    app[RELAY] = relay
    app[SESSIONS] = sessions
    app[RESUMABLE] = resumable if resumable is not None else {}
    app[STATUS] = status or Status()
    if buffers is not None:
        app[BUFFERS] = buffers
    app[LISTENER] = listener
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@dataclass
class Server:
    """The running listeners of one forward process."""

    config: Config
    # A fixed context, or a callable giving the current one for each new connection (reload).
    ssl_context: ssl.SSLContext | tls.ContextSource | None = None
    http_handler: Handler = not_found
    sessions: Sessions = field(default_factory=Sessions)
    resumable: dict[str, ResumableSession] = field(default_factory=dict)
    runners: dict[str, web.AppRunner] = field(default_factory=dict)
    # Counters for /metrics; with --workers the parent's shared Stats and this worker's row.
    stats: Stats = field(default_factory=Stats)
    row: int = 0
    warm: WarmPool | None = None
    # What start() made and a hand-over needs again: the relay's settings, the guard, the shared
    # read buffers, and every listening socket by listener name.
    status: Status = field(default_factory=Status)
    _relay: RelaySettings | None = None
    _guard: Guard | None = None
    _buffers: tuple[wsconn.ReadBuffer, wsconn.ReadBuffer] | None = None
    listening: dict[str, list[socket.socket]] = field(default_factory=dict)

    def relay_settings(self) -> RelaySettings:
        c = self.config
        return RelaySettings(
            c.socket,
            c.heartbeat,
            c.max_message_size,
            c.backend_timeout,
            c.max_result_size,
            c.idle_timeout,
            c.max_lifetime,
            # Sessions live in one worker and a resume may reach any: with --workers, most
            # would be refused, so resume is off (the start-up log says so).
            c.resume_grace if c.workers <= 1 else 0.0,
            c.resume_buffer,
            c.instance_id,
            self.stats.slot(self.row),
            self.warm.take if self.warm is not None else None,
        )

    def guard(self) -> Guard:
        c = self.config
        rules: tuple[IpRule, ...] = ()
        if c.ip_rules:
            try:
                with open(c.ip_rules, encoding="utf-8") as f:
                    text = f.read()
            except OSError as exc:
                raise ConfigError(f"--ip-rules {c.ip_rules}: {exc.strerror}") from None
            rules = parse_ip_rules(text, c.ip_rules)
        trusted = parse_networks(c.trusted_proxies)
        capacity = session_capacity(c.max_sessions, c.warm)
        return Guard(
            GuardSettings(c.allow_origin, rules, trusted, capacity, c.max_sessions_per_client)
        )

    async def start(self, listeners: dict[str, list[socket.socket]] | None = None) -> None:
        """Serve on every listener or on none: a bind failure stops what was started and raises
        ConfigError. `listeners` ("http", "ws" -> bound sockets) replaces binding by the config;
        tests pass sockets bound to port 0, a supervisor passes inherited ones."""
        c = self.config
        if c.warm > 0 and self.warm is None:
            self.warm = WarmPool(
                c.socket, c.warm, c.backend_timeout, self.stats.slot(self.row), c.max_result_size
            )
        relay = self._relay = self.relay_settings()
        guard = self._guard = self.guard()
        apps: dict[str, web.Application] = {}
        buffers = self._buffers = (wsconn.ReadBuffer(), wsconn.ReadBuffer())
        if c.http_port > 0 or c.listen_unix:
            entry = http_entry(self.http_handler)
            apps["http"] = build_app(
                *(relay, self.sessions, "http", entry, guard, c.ws_ping),
                config=c,
                buffers=buffers,
                resumable=self.resumable,
                status=self.status,
            )
        if c.ws_port > 0:
            apps["ws"] = build_app(
                *(relay, self.sessions, "ws", ws_only, guard, c.ws_ping),
                config=c,
                buffers=buffers,
                resumable=self.resumable,
                status=self.status,
            )
        if c.redirect_port > 0:
            apps["redirect"] = build_app(
                relay, self.sessions, "redirect", redirect_to_https(lambda: self.port("http"))
            )
            plain = headers.for_config(c).without_hsts()
            apps["redirect"].on_response_prepare.append(headers.hook(plain))
        for app in apps.values():
            app[accesslog.STATS_ROW] = relay.stats
            app[accesslog.GUARD] = guard
        if c.admin_port > 0:
            admin = health.Admin(c.socket, self.stats, c.workers, self.status)
            apps["admin"] = health.build_admin_app(admin)
            apps["admin"].on_response_prepare.append(server_header)
            apps["admin"].on_response_prepare.append(
                headers.hook(headers.for_config(c).without_hsts())
            )
        stats_row = relay.stats
        if isinstance(self.ssl_context, ssl.SSLContext):
            health.count_tls_failures(self.ssl_context, stats_row)
        elif isinstance(self.ssl_context, tls.Contexts):
            self.ssl_context.on_build(lambda ctx: health.count_tls_failures(ctx, stats_row))
        try:
            socks = listeners if listeners is not None else bind_listeners(c)
            self.listening = socks
            # A page from -p may open its session on -w: the origin rule needs -p's real port.
            own_ports = tuple(
                int(sock.getsockname()[1])
                for sock in socks.get("http", ())
                if sock.family in (socket.AF_INET, socket.AF_INET6)
            )
            guard.settings = replace(guard.settings, own_ports=own_ports)
            for name, app in apps.items():
                runner: web.AppRunner = GuardedRunner(
                    app,
                    header_timeout=c.header_timeout,
                    keepalive_timeout=c.keepalive_timeout,
                    access_log_class=accesslog.AccessLogger,
                    # Health checks and scrapes every few seconds would drown the access log.
                    access_log=accesslog.log if name != "admin" else None,
                    logger=accesslog.MalformedRequests(name, relay.stats),
                    shutdown_timeout=c.shutdown_timeout,
                )
                await runner.setup()
                self.runners[name] = runner
                for sock in socks.get(name, ()):
                    site = self._site(runner, sock, name)
                    await site.start()
        except BaseException:
            await self.stop()
            raise
        for name, runner in self.runners.items():
            for addr in runner.addresses:
                log.info("listening on %s (%s)", show_address(addr), name)
        if self.warm is not None:
            self.warm.start()

    def _site(self, runner: web.AppRunner, sock: socket.socket, name: str) -> web.BaseSite:
        source = self.ssl_context
        if isinstance(source, ssl.SSLContext):
            fixed = source
            source = lambda: fixed  # noqa: E731
        # The admin port (probes, Prometheus on 127.0.0.1), the redirect port and the unix
        # socket (nginx or a sidecar on the same host) stay plain; -p and -w are TLS-only.
        if name in ("redirect", "admin") or sock.family == socket.AF_UNIX:
            source = None
        if self.config.proxy_protocol and name in ("http", "ws"):
            assert self._guard is not None, "start() first"
            trusts, timeout = self._guard.trusts, self.config.header_timeout
            return proxy_site(runner, sock, name, trusts, timeout, source)
        if source is None:
            return web.SockSite(runner, sock)
        return tls.TLSSite(runner, sock, source, name)

    async def stop_accepting(self) -> None:
        """Stop every listener's sites (the sockets close in this process only: a successor
        holding them goes on accepting)."""
        for runner in self.runners.values():
            for site in list(runner.sites):
                await site.stop()

    async def accept_again(self, listeners: dict[str, list[socket.socket]]) -> None:
        """Serve on `listeners` again after `stop_accepting` (a hand-over that failed half-way)."""
        for name, socks in listeners.items():
            runner = self.runners.get(name)
            if runner is not None:
                for sock in socks:
                    await self._site(runner, sock, name).start()
        self.listening = listeners

    async def adopt(
        self, state: dict[str, Any], kept: bytes, sock: socket.socket
    ) -> ResumableSession:
        """A resumable session handed over by another process, parked here until its client
        resumes. ValueError (KeyError, TypeError) if `state` is not one."""
        guard, buffers, relay = self._guard, self._buffers, self._relay
        assert guard is not None and buffers is not None and relay is not None, "start() first"
        restored = resume.ResumeState.restored(state["resume"], kept)
        client, label = str(state["client"]), str(state["label"])
        sessions = self.sessions

        session = ResumableSession(
            relay,
            label,
            buffers[1],
            sessions.next_id(),
            resumable_end(sessions, guard),
            self.resumable,
            client,
            state=restored,
        )
        session.core.restore(state["core"])
        session.bytes_to_r = int(state["bytes_to_r"])
        session.bytes_from_r = int(state["bytes_from_r"])
        guard.count(client)
        sessions.add(session)
        grace_left = state["grace_left"]
        timings = {"age": float(state["age"]), "quiet": float(state["quiet"])}
        await session.adopt(sock, timings, None if grace_left is None else float(grace_left))
        return session

    def port(self, name: str) -> int:
        """The port a listener is bound to ("http" or "ws"), useful after binding port 0."""
        return int(self.runners[name].addresses[0][1])

    async def _close_sessions(self) -> None:
        for session in list(self.sessions):
            session.close(CloseReason.GOING_AWAY, "forward is shutting down", notice=True)
        # Sessions are not aiohttp's handlers, so no runner waits for their close handshakes:
        # wait here, once, then drop whatever has not answered.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(self.config.shutdown_timeout, wsconn.CLOSE_TIMEOUT)):
                await self.sessions.emptied()
        for session in list(self.sessions):
            session.abort()

    async def drain(self, grace: float) -> None:
        """Give open sessions up to `grace` seconds to end by themselves; `stop()` closes those
        still open, with the shutdown notice. While it drains, forward answers new sessions
        with 503 and /healthz with 503, and goes on serving resumes (a parked session comes
        back here) and files; without a grace it stops accepting at once."""
        if self.warm is not None:
            await self.warm.close()  # no new session will come for them
        if grace <= 0 or not self.sessions:
            await self.stop_accepting()
            return
        self.status.draining = True
        log.info("draining: waiting up to %g s for %d open session(s)", grace, len(self.sessions))
        try:
            async with asyncio.timeout(grace):
                await self.sessions.emptied()
        except TimeoutError:
            log.info("drain time over: closing %d session(s)", len(self.sessions))
        else:
            log.info("drained: every session has ended")

    async def stop(self) -> None:
        # Every listener first (no new session can start), then the open sessions, once, then
        # aiohttp's cleanup, which waits up to shutdown_timeout for request handlers (sessions
        # still connecting to R among them) before cancelling them.
        runners, self.runners = self.runners, {}
        for runner in runners.values():
            for site in list(runner.sites):
                await site.stop()
        if self.warm is not None:
            await self.warm.close()
        await self._close_sessions()
        # Together, not one after the other: each waits up to shutdown_timeout for requests
        # still in progress, and a stop must stay within what the service manager allows.
        await asyncio.gather(*(old.cleanup() for old in reversed(runners.values())))


# Descriptors a forward process holds besides its sessions: stdio, the event loop, listeners,
# log sockets, files being served.
FD_RESERVE = 24


def session_capacity(max_sessions: int, warm: int = 0) -> int:
    """`--max-sessions`, lowered to what the open-file limit allows (two descriptors a session).

    Refusing a session with a reason beats running out of descriptors, where the event loop can
    only drop new connections without a word. The `--warm` pool holds a descriptor for each of
    its connections: they take the room of half as many sessions."""
    held = (warm + 1) // 2
    if max_sessions > 0:
        max_sessions = max(1, max_sessions - held)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_sessions
    fit = max(1, (soft - FD_RESERVE - warm) // 2)
    if max_sessions == 0 or max_sessions > fit:
        # Worth a warning when the limit is low (the usual soft limit of 1024 gives ~500); a
        # generous limit just below the default --max-sessions is only information.
        level = logging.WARNING if fit < 1000 else logging.INFO
        log.log(
            level,
            "the open-file limit (%d) leaves room for about %d sessions: sessions are capped "
            "there (raise the limit, e.g. LimitNOFILE= or ulimit -n, for more)",
            soft,
            fit,
        )
        return fit
    return max_sessions
