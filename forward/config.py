"""forward's settings: one frozen `Config`, each setting declared once.

A setting is a dataclass field whose metadata names its command-line flags (the C program's short
flag first, so existing command lines keep working), its help text, and the values it allows
(`choices`, `min`, `max`, with the sentence to say when they are not met); `kind` tells the
command line (cli.py) and the configuration file (configfile.py) what the setting holds.
`Config.validate` checks those declarations and the combinations of settings, turning any
problem into a `ConfigError` with one human sentence, before anything is bound or served.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from .resume import MAX_INSTANCE, valid_instance


class ConfigError(Exception):
    """A setting that cannot work; the message is shown to the user as it is."""


def _opt(default: Any, *flags: str, help: str, metavar: str | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"flags": flags, "help": help, "metavar": metavar, **kw})


# Trusted as proxies unless --trusted-proxy says otherwise (uvicorn and gunicorn do the same).
LOOPBACK = ("127.0.0.0/8", "::1")


@dataclass(frozen=True, slots=True)
class Config:
    http_port: int = _opt(
        8088,
        "-p",
        "--http-port",
        metavar="PORT",
        help="HTTP(S) port: static files, .R scripts and WebSocket upgrade on any path; "
        "0 or negative disables it (default 8088)",
    )
    ws_port: int = _opt(
        0,
        "-w",
        "--ws-port",
        metavar="PORT",
        help="WebSocket-only port, any path (default: off)",
    )
    socket: str = _opt(
        "Rserve_socket",
        "-s",
        "--socket",
        metavar="PATH",
        help="unix socket of the QAP Rserve each WebSocket session is relayed to "
        "(default Rserve_socket)",
    )
    rscript_socket: str = _opt(
        "Rscript_socket",
        "-R",
        "--rscript-socket",
        metavar="PATH",
        help="unix socket of an OCAP-mode Rserve that renders .R URLs (default Rscript_socket)",
    )
    doc_root: str = _opt(
        ".", "-r", "--doc-root", metavar="DIR", help="document root for static files (default .)"
    )
    tls_key: str | None = _opt(
        None,
        "-k",
        "--tls-key",
        metavar="FILE",
        help="TLS private key (PEM); with it both ports speak TLS only",
    )
    tls_cert: str | None = _opt(
        None, "-c", "--tls-cert", metavar="FILE", help="TLS certificate (PEM), required with -k"
    )
    tls_ca: str | None = _opt(
        None,
        "-C",
        "--tls-ca",
        metavar="FILE",
        help="CA chain (PEM): sent after the certificate, trust store for client certificates",
    )
    tls_client: tuple[str, ...] = _opt(
        (),
        "--tls-client",
        metavar="POLICY",
        help="client certificates, as Rserve's tls.client: none (default), request, require, "
        "match:NAME[,NAME...], prefix:TEXT, suffix:TEXT; repeatable, name rules are or-ed "
        "and imply require; anything but none needs -C",
    )
    tls_passphrase_file: str | None = _opt(
        None,
        "--tls-passphrase-file",
        metavar="FILE",
        help="file holding the passphrase of an encrypted -k key (or set FORWARD_TLS_PASSPHRASE)",
    )
    tls_min_version: str = _opt(
        "1.2",
        "--tls-min-version",
        metavar="VERSION",
        choices=("1.2", "1.3"),
        help="oldest TLS version accepted: 1.2 (default) or 1.3",
    )
    tls_ciphers: str | None = _opt(
        None,
        "--tls-ciphers",
        metavar="LIST",
        help="OpenSSL cipher list for TLS 1.2 (default: Mozilla's intermediate profile, ECDHE "
        "with AES-GCM or ChaCha20-Poly1305 only; TLS 1.3 suites are OpenSSL's)",
    )
    hsts: int | None = _opt(
        None,
        "--hsts",
        metavar="SECONDS",
        help="with TLS, the max-age of Strict-Transport-Security (default 86400, one day, as "
        "RStudio Server; 0: not sent)",
        min=0,
        rule="{flag} must be 0 (off) or a number of seconds",
    )
    hsts_include_subdomains: bool = _opt(
        False,
        "--hsts-include-subdomains",
        help="add includeSubDomains to Strict-Transport-Security (every subdomain must then "
        "have HTTPS)",
    )
    redirect_port: int = _opt(
        0,
        "--redirect-port",
        metavar="PORT",
        help="with TLS, a plain-HTTP port that only redirects to https:// on the -p port "
        "(default: off)",
    )
    ulog: str = _opt(
        "ulog_socket",
        "-u",
        "--ulog",
        metavar="TARGET",
        help="where log lines are also sent: a unix datagram socket path, udp://IP[:port] or "
        "tcp://IP[:port] (default ulog_socket; a missing socket is ignored)",
    )
    server_manager: str | None = _opt(
        None,
        "-S",
        "--server-manager",
        metavar="HOST[:PORT]",
        help="send ADD to HOST:PORT (port 40 by default) once listening and DEL at shutdown",
    )
    bind: tuple[str, ...] = _opt(
        (),
        "-b",
        "--bind",
        metavar="ADDR",
        help="address to listen on, IPv4 or IPv6; repeatable (default: all interfaces; "
        "127.0.0.1 behind a local nginx)",
    )
    heartbeat: float = _opt(
        600.0,
        "--heartbeat",
        metavar="SECONDS",
        help="interval of the OOB 'idle' message sent on quiet sessions so that proxies keep "
        "them; 0 disables it (default 600, as the C forward)",
        min=0,
        rule="{flag} must be 0 (off) or a positive number of seconds",
    )
    max_message_size: int = _opt(
        256 * 1024 * 1024,
        "--max-message-size",
        metavar="BYTES",
        help="largest QAP message a browser may send to R, and largest answer R may give to a "
        ".R request (default 256 MiB; 0: no limit)",
        min=0,
        rule="{flag} must be 0 (no limit) or a number of bytes",
    )
    max_result_size: int = _opt(
        0,
        "--max-result-size",
        metavar="BYTES",
        help="largest QAP message R may send to a browser; a larger one closes the session "
        "with 1009 (default 0: no limit; results are streamed, not held in memory)",
        min=0,
        rule="{flag} must be 0 (no limit) or a positive number",
    )
    frame_origin: str = _opt(
        "none",
        "--frame-origin",
        metavar="ORIGIN",
        help="which pages may show forward's pages in a frame (X-Frame-Options and CSP "
        "frame-ancestors): none (default), same (this site), any, or origins such as "
        "https://portal.example.com, separated by spaces",
    )
    add_header: tuple[str, ...] = _opt(
        (),
        "--add-header",
        metavar="NAME:VALUE",
        help="a header added to every HTTP response (as RStudio's server-add-header); "
        "repeatable; replaces forward's own value of that header",
    )
    allow_origin: tuple[str, ...] = _opt(
        (),
        "--allow-origin",
        metavar="ORIGIN",
        help="a browser Origin allowed to open sessions besides this server's own site: a "
        "host name where * matches anything (*.example.com), a full https://host[:port], or * "
        "for any; repeatable (default: pages from the host the browser addressed, on that port "
        "or on -p's; see docs/security.md)",
    )
    ip_rules: str | None = _opt(
        None,
        "--ip-rules",
        metavar="FILE",
        help="ordered 'allow|deny ADDRESS|CIDR|all' lines, first match wins (RStudio's "
        "ip-rules format); a denied address gets 403",
    )
    max_sessions: int = _opt(
        10000,
        "--max-sessions",
        metavar="N",
        help="open WebSocket sessions in total; more are closed with 1013 (default 10000; 0: "
        "no limit)",
        min=0,
        rule="{flag} must be 0 (no limit) or a positive number",
    )
    max_sessions_per_client: int = _opt(
        256,
        "--max-sessions-per-client",
        metavar="N",
        help="open sessions per client address (default 256; 0: no limit)",
        min=0,
        rule="{flag} must be 0 (no limit) or a positive number",
    )
    header_timeout: float = _opt(
        10.0,
        "--header-timeout",
        metavar="SECONDS",
        help="a new connection must complete its TLS handshake and first request header "
        "within this time (slowloris; default 10)",
        min=0,
        rule="{flag} must not be negative",
    )
    keepalive_timeout: float = _opt(
        75.0,
        "--keepalive-timeout",
        metavar="SECONDS",
        help="idle time before an HTTP keep-alive connection is closed (default 75)",
        min=0,
        rule="{flag} must not be negative",
    )
    ws_ping: float = _opt(
        30.0,
        "--ws-ping",
        metavar="SECONDS",
        help="WebSocket ping interval; a peer that does not answer within half of it is "
        "dropped (default 30, under the 60 s idle timeout of common proxies; 0: off)",
        min=0,
        rule="{flag} must not be negative",
    )
    idle_timeout: float = _opt(
        0.0,
        "--idle-timeout",
        metavar="SECONDS",
        help="close a session after this long without a message either way; heartbeats do "
        "not count (default 0: off)",
        min=0,
        rule="{flag} must not be negative",
    )
    max_lifetime: float = _opt(
        0.0,
        "--max-lifetime",
        metavar="SECONDS",
        help="close any session this long after it opened (default 0: off)",
        min=0,
        rule="{flag} must not be negative",
    )
    warm: int = _opt(
        0,
        "--warm",
        metavar="N",
        help="keep N connections to Rserve open and greeted (oc.init done) ahead of demand, "
        "one handed to each new session; each holds an idle R process (default 0: off; per "
        "worker with --workers)",
        min=0,
        max=1000,
        rule="{flag} must be between 0 (off) and 1000",
    )
    resume_grace: float = _opt(
        120.0,
        "--resume-grace",
        metavar="SECONDS",
        help="how long a session whose connection broke stays parked for a client that asked "
        "for resume to come back (docs/resume.md; default 120; 0: no resume)",
        min=0,
        max=86400,
        rule="{flag} must be between 0 and 86400 seconds",
    )
    resume_buffer: int = _opt(
        1024 * 1024,
        "--resume-buffer",
        metavar="BYTES",
        help="bytes from R kept per resumable session until the client acknowledges them; when "
        "full, forward stops reading from R (default 1 MiB)",
        min=4096,
        max=1 << 30,
        rule="{flag} must be between 4096 and 1073741824 bytes",
    )
    instance_id: str = _opt(
        "",
        "--instance-id",
        metavar="NAME",
        help="this instance's name, leading every resume ticket, so that a proxy in front of "
        "several forwards routes a resume to the one holding its session (docs/operations.md; "
        "lower-case letters, digits and -, up to 32)",
    )
    handover_socket: str | None = _opt(
        None,
        "--handover-socket",
        metavar="PATH",
        help="unix socket where this forward hands its listeners and resumable sessions to a "
        "new forward started with --takeover (or at SIGUSR2, which starts one); "
        "docs/operations.md",
    )
    takeover: bool = _opt(
        False,
        "--takeover",
        help="take over the listeners and resumable sessions of the forward running at "
        "--handover-socket, which then exits (an upgrade without ending sessions)",
    )
    backend_timeout: float = _opt(
        10.0,
        "--backend-timeout",
        metavar="SECONDS",
        help="how long to wait for the Rserve socket to accept a session (default 10)",
        min=0,
        rule="{flag} must not be negative",
    )
    shutdown_timeout: float = _opt(
        10.0,
        "--shutdown-timeout",
        metavar="SECONDS",
        help="at SIGTERM/SIGINT, how long open sessions get to answer their close, and "
        "requests in progress to end (default 10, at most 10: a WebSocket close handshake is "
        "never waited for longer; --drain-timeout lets sessions run on before that)",
        min=0,
        max=10,
        rule="{flag} must be between 0 and 10 seconds (longer for open sessions: --drain-timeout)",
    )
    follow_symlinks: bool = _opt(
        False,
        "--follow-symlinks",
        help="serve files through symbolic links that lead out of the document root "
        "(default: refused with 403; links that stay inside are always followed)",
    )
    serve_dotfiles: bool = _opt(
        False,
        "--serve-dotfiles",
        help="serve files and directories whose name starts with a dot (.git, .env); by "
        "default they are answered as missing, except .well-known",
    )
    max_body_size: int = _opt(
        64 * 1024 * 1024,
        "--max-body-size",
        metavar="BYTES",
        help="largest request body passed to a .R script; larger ones get 413 "
        "(default 64 MiB; 0: no limit)",
        min=0,
        rule="{flag} must be 0 (no limit) or a number of bytes",
    )
    rscript_timeout: float = _opt(
        300.0,
        "--rscript-timeout",
        metavar="SECONDS",
        help="longest time R may take to render a .R request: past it the browser gets 504, "
        "R's connection is closed and its process ended where forward may signal it "
        "(default 300; 0: no limit)",
        min=0,
        rule="{flag} must be 0 (no limit) or a number of seconds",
    )
    trusted_proxy: tuple[str, ...] = _opt(
        (),
        "--trusted-proxy",
        metavar="ADDR[/BITS]",
        help="a proxy (address or network) whose X-Forwarded-For, X-Real-IP and forwarded host "
        "headers are believed; repeatable, replaces the default; 'none' believes no peer "
        "(default: loopback, 127.0.0.0/8 and ::1, as a proxy on this host is; such headers "
        "from other clients are replaced)",
    )
    proxy_protocol: bool = _opt(
        False,
        "--proxy-protocol",
        help="connections on -p, -w and --listen-unix begin with a PROXY protocol header (v1 or "
        "v2, from a TCP load balancer: nginx stream's proxy_protocol, HAProxy's send-proxy, an "
        "AWS NLB), read before TLS; its source address is the client's. Only --trusted-proxy "
        "peers may connect; any other, or a connection without a valid header, is closed",
    )
    drain_timeout: float = _opt(
        0.0,
        "--drain-timeout",
        metavar="SECONDS",
        help="at SIGTERM/SIGINT, stop accepting and let open sessions finish for up to this "
        "long before they are closed with the shutdown notice (default 0: close at once)",
        min=0,
        rule="{flag} must be 0 (off) or a number of seconds",
    )
    listen_unix: str | None = _opt(
        None,
        "--listen-unix",
        metavar="PATH",
        help="also serve the -p application on this unix socket (for nginx or a container in "
        "front); the file is replaced at start and removed at exit",
    )
    admin_port: int = _opt(
        0,
        "--admin-port",
        metavar="PORT",
        help="port of the admin listener with /healthz, /livez and /metrics (default: off)",
        min=0,
        max=65535,
        rule="{flag} {value}: 0 (off) or a port up to 65535",
    )
    admin_bind: str = _opt(
        "127.0.0.1",
        "--admin-bind",
        metavar="ADDR",
        help="address of the admin listener (default 127.0.0.1: keep it off the public side)",
    )
    workers: int = _opt(
        1,
        "--workers",
        metavar="N",
        help="worker processes sharing the listeners, supervised and restarted by the parent "
        "(default 1: no parent)",
        min=1,
        max=256,
        rule="{flag} {value}: between 1 and 256",
    )
    pid_file: str | None = _opt(
        None, "--pid-file", metavar="FILE", help="write the (parent's) process id to FILE"
    )
    log_level: str = _opt(
        "info",
        "--log-level",
        metavar="LEVEL",
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default info)",
    )

    @property
    def tls(self) -> bool:
        return self.tls_key is not None

    @property
    def hsts_max_age(self) -> int:
        """Seconds of Strict-Transport-Security: one day with TLS unless --hsts says otherwise,
        never without TLS (browsers ignore it over plain HTTP)."""
        if not self.tls:
            return 0
        return 86400 if self.hsts is None else self.hsts

    @property
    def trusted_proxies(self) -> tuple[str, ...]:
        """The networks --trusted-proxy means: loopback when none is named (nginx or a sidecar
        on this host, as in the README: every browser would otherwise be one client, capped by
        --max-sessions-per-client), nothing for `none`."""
        if not self.trusted_proxy:
            return LOOPBACK
        if "none" in self.trusted_proxy:
            return ()
        return self.trusted_proxy

    @property
    def hosts(self) -> tuple[str, ...] | None:
        """Addresses to bind, or None for all interfaces (aiohttp's and the C program's default)."""
        return self.bind or None

    def validate(self) -> Config:
        """This Config if every setting can work, else a `ConfigError` naming the flag."""
        for f in settings():
            _check_declared(f, getattr(self, f.name))
        for name in ("http_port", "ws_port"):
            port = getattr(self, name)
            if port > 65535:
                flag = _field(name).metadata["flags"][0]
                raise ConfigError(f"{flag} {port}: a port must be between 1 and 65535")
        if self.http_port <= 0 and self.ws_port <= 0 and not self.listen_unix:
            raise ConfigError("nothing to listen on: both -p and -w are disabled")
        if self.http_port > 0 and self.http_port == self.ws_port:
            raise ConfigError(f"-p and -w are both {self.http_port}: give them different ports")
        if self.tls_key and not self.tls_cert:
            raise ConfigError(
                "-k <key> requires a corresponding certificate to be supplied with -c <cert>"
            )
        if self.tls_cert and not self.tls_key:
            raise ConfigError("-c <cert> needs the private key that goes with it: add -k <key>")
        if not self.tls:
            for name, value in (
                ("--tls-client", self.tls_client),
                ("--hsts", self.hsts),
                ("--hsts-include-subdomains", self.hsts_include_subdomains),
                ("--tls-ciphers", self.tls_ciphers),
                ("--redirect-port", self.redirect_port),
            ):
                if value:
                    raise ConfigError(f"{name} needs TLS: add -k <key> -c <cert>")
        if self.redirect_port > 0 and self.http_port <= 0:
            raise ConfigError("--redirect-port redirects to the -p port: -p must be enabled")
        if self.redirect_port > 65535 or (
            self.redirect_port > 0 and self.redirect_port in (self.http_port, self.ws_port)
        ):
            raise ConfigError(f"--redirect-port {self.redirect_port}: give a free port (1-65535)")
        if "none" in self.trusted_proxy and len(self.trusted_proxy) > 1:
            raise ConfigError("--trusted-proxy none cannot be given with other proxies")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"--trusted-proxy {proxy}: not an IP address or network"
                ) from None
        if self.proxy_protocol and not self.trusted_proxies and not self.listen_unix:
            raise ConfigError(
                "--proxy-protocol with --trusted-proxy none would close every connection: name "
                "the load balancer with --trusted-proxy ADDR[/BITS]"
            )
        if not self.socket:
            raise ConfigError("-s needs the path of the Rserve unix socket")
        if self.instance_id and not valid_instance(self.instance_id):
            raise ConfigError(
                f"--instance-id {self.instance_id}: use lower-case letters, digits and - "
                f"(not first), up to {MAX_INSTANCE}"
            )
        if self.takeover and not self.handover_socket:
            raise ConfigError("--takeover needs --handover-socket: the running forward's socket")
        self._validate_ops()
        return self

    def _validate_ops(self) -> None:
        # Imported here: these modules parse their own option values and must not import config.
        from .srvmgr import ServerManagerError
        from .srvmgr import parse as parse_manager
        from .ulog import ULogError, parse_target

        try:
            parse_target(self.ulog)
            if self.server_manager:
                parse_manager(self.server_manager)
        except (ULogError, ServerManagerError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
        if self.admin_port and self.admin_port in (self.http_port, self.ws_port):
            raise ConfigError(f"--admin-port {self.admin_port} is already used by -p or -w")
        if self.tls_ciphers:
            import ssl

            from .tls import set_ciphers

            set_ciphers(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self.tls_ciphers)
        from .headers import HeaderError, response_headers

        try:
            response_headers(self.frame_origin, self.add_header, 0, False)
        except HeaderError as exc:
            raise ConfigError(str(exc)) from None


def _check_declared(f: dataclasses.Field[Any], value: Any) -> None:
    """The rules a field declares for itself: `choices`, `min`, `max` (with its `rule` text)."""
    meta = f.metadata
    flag = meta["flags"][0]
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{flag} {value}: must be one of {', '.join(choices)}")
    low, high = meta.get("min"), meta.get("max")
    if value is None:  # an optional setting left to its default
        return
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else f"at least {low}"
            if low is not None
            else f"at most {high}"
        )
        rule = meta.get("rule", "{flag} {value}: must be {bounds}")
        raise ConfigError(rule.format(flag=flag, value=value, bounds=bounds))


def kind(f: dataclasses.Field[Any]) -> str:
    """What a setting holds, for the command line and the configuration file alike: "list"
    (repeatable), "flag" (on/off), "int", "float" or "str"."""
    t = str(f.type)
    if t.startswith("tuple"):
        return "list"
    if t == "bool":
        return "flag"
    if t in ("int", "float"):
        return t
    if t == "int | None":
        return "int"
    return "str"


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(Config) if f.name == name)


def settings() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Config)
