"""TLS for both listeners: the SSLContext built from Config, the client-certificate policy, reload.

`build_context` is a free function (tests call it) that loads key, certificate and CA once and
turns every way that can fail into one `ConfigError` sentence. `ClientPolicy` is Rserve's
`tls.client` option; `refusal` applies it to a peer certificate as a pure function. `Contexts`
holds the context that new connections get and swaps it on reload, keeping the old one when the
new files do not load. `TLSSite` accepts plain TCP and runs each handshake itself with the current
context, so a rotated certificate reaches the next connection without re-binding, open sessions
keep the context they started with, and a failed handshake is logged with the peer's address.

Nothing here ever falls back to plain text: a listener with TLS configured speaks only TLS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .aiohttp_private import AcceptingSite
from .config import Config, ConfigError
from .ulog import host_port

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "FORWARD_TLS_PASSPHRASE"
HANDSHAKE_TIMEOUT = 30.0
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# Mozilla's "intermediate" profile for TLS 1.2 (ssl-config.mozilla.org, version 5.7) without
# its DHE suites, which need DH parameters forward does not load: forward secrecy and AEAD only.
# OpenSSL's defaults add CBC suites with SHA-2 MACs (LUCKY13 and friends). TLS 1.3 suites are
# all AEAD and are set apart from this list by OpenSSL.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)

# A peer certificate as `SSLSocket.getpeercert()` returns it (empty when none was verified).
PeerCert = Mapping[str, Any]


# -- the client-certificate policy (pure) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """Rserve's `tls.client`: whether a certificate is asked for, required, and which names pass.

    `match`, `prefix` and `suffix` rules are or-ed together and imply `require`; with none of them
    any certificate that chains to the CA passes. Comparisons are case-sensitive, as in Rserve.
    """

    mode: str = "none"  # "none" | "request" | "require"
    match: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()

    @property
    def has_rules(self) -> bool:
        return bool(self.match or self.prefixes or self.suffixes)

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return {
            "none": ssl.CERT_NONE,
            "request": ssl.CERT_OPTIONAL,
            "require": ssl.CERT_REQUIRED,
        }[self.mode]


def parse_policy(specs: tuple[str, ...] | list[str]) -> ClientPolicy:
    """Combine `--tls-client` values; a bad one is a ConfigError naming it."""
    modes: list[str] = []
    match: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for spec in specs:
        kind, colon, rest = spec.partition(":")
        if not colon and kind in ("none", "request", "require"):
            modes.append(kind)
            continue
        names = rest.split(",") if kind == "match" else [rest]
        if kind not in ("match", "prefix", "suffix") or not colon or not all(names):
            raise ConfigError(
                f"--tls-client {spec!r}: use none, request, require, match:NAME[,NAME...], "
                "prefix:TEXT or suffix:TEXT"
            )
        {"match": match.update, "prefix": prefixes.extend, "suffix": suffixes.extend}[kind](names)
    rules = bool(match or prefixes or suffixes)
    if len(set(modes)) > 1:
        raise ConfigError(f"--tls-client: {' and '.join(sorted(set(modes)))} exclude each other")
    mode = modes[0] if modes else ("require" if rules else "none")
    if rules and mode != "require":
        raise ConfigError(f"--tls-client {mode} contradicts match:/prefix:/suffix: (they require)")
    return ClientPolicy(mode, frozenset(match), tuple(prefixes), tuple(suffixes))


def common_name(cert: PeerCert) -> str | None:
    """The certificate's subject common name; the first one if there are several, as in Rserve
    (OpenSSL's X509_NAME_get_text_by_NID)."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def subject_text(cert: PeerCert | None) -> str:
    if not cert:
        return "no certificate"
    parts = [f"{key}={value}" for rdn in cert.get("subject", ()) for key, value in rdn]
    return ",".join(parts) or "empty subject"


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
    "domainComponent": "DC",
    "userId": "UID",
}


def _dn_escape(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return "".join(c if c.isprintable() else f"\\{ord(c):02x}" for c in out)


def certificate_subject(peercert: object) -> tuple[str | None, str | None]:
    """(RFC 4514 subject, common name) of a verified peer certificate as `getpeercert()` gives
    it; (None, None) when there is none (not asked for, not sent, or not verified)."""
    if not isinstance(peercert, dict) or not peercert.get("subject"):
        return None, None
    rdns = [
        "+".join(f"{_SHORT.get(key, key)}={_dn_escape(str(value))}" for key, value in rdn)
        for rdn in peercert["subject"]
    ]
    return ",".join(reversed(rdns)), common_name(peercert)


def refusal(policy: ClientPolicy, cert: PeerCert | None) -> str | None:
    """Why this peer is refused, or None to let it through.

    `cert` is what `getpeercert()` gives after the handshake: OpenSSL has already checked the
    chain against the CA (a certificate that does not chain never gets this far), so this only
    adds the presence and name rules.
    """
    if policy.mode != "require":
        return None
    if not cert:
        return "a client certificate is required"
    if not policy.has_rules:
        return None
    cn = common_name(cert)
    if cn is not None and (
        cn in policy.match
        or any(cn.startswith(p) for p in policy.prefixes)
        or any(cn.endswith(s) for s in policy.suffixes)
    ):
        return None
    return f"common name {cn!r} is not allowed by --tls-client"


# -- certificate dates (pure DER walk: the standard library does not parse certificates) -------


def not_after(pem: str) -> dt.datetime:
    """The notAfter date of the first certificate in `pem` (RFC 5280 TBSCertificate.validity)."""
    der = ssl.PEM_cert_to_DER_cert(pem[pem.index("-----BEGIN CERTIFICATE-----") :])

    def tlv(data: bytes, pos: int) -> tuple[int, int, int]:  # tag, start of value, end
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        return tag, pos, pos + length

    _, cert, _ = tlv(der, 0)
    _, pos, _ = tlv(der, cert)  # tbsCertificate: walk its fields
    tag, _, end = tlv(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        pos = tlv(der, pos)[2]
    _, validity, _ = tlv(der, pos)
    pos = tlv(der, validity)[2]  # skip notBefore
    tag, start, end = tlv(der, pos)
    text = der[start:end].decode("ascii")
    fmt = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime / GeneralizedTime
    return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)


# -- building the context ----------------------------------------------------------------------


def _read(path: str, what: str, flag: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path} ({flag}): {exc.strerror or exc}") from exc


def _passphrase(config: Config, environ: Mapping[str, str]) -> bytes | None:
    if config.tls_passphrase_file:
        text = _read(config.tls_passphrase_file, "passphrase file", "--tls-passphrase-file")
        return text.rstrip("\r\n").encode()
    value = environ.get(PASSPHRASE_ENV)
    return value.encode() if value is not None else None


def build_context(config: Config, environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """A server context for `config` (which must have -k/-c); every failure is one ConfigError."""
    assert config.tls_key and config.tls_cert
    environ = os.environ if environ is None else environ
    policy = parse_policy(config.tls_client)
    if policy.mode != "none" and not config.tls_ca:
        raise ConfigError(
            f"--tls-client {policy.mode} needs -C <CA file> to check client certificates against"
        )
    key_pem = _read(config.tls_key, "TLS key", "-k")
    cert_pem = _read(config.tls_cert, "TLS certificate", "-c")
    if "-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ConfigError(f"no PEM certificate in {config.tls_cert} (-c)")
    if "PRIVATE KEY-----" not in key_pem:
        raise ConfigError(f"no PEM private key in {config.tls_key} (-k)")
    encrypted = "ENCRYPTED" in key_pem
    passphrase = _passphrase(config, environ)
    if encrypted and passphrase is None:
        raise ConfigError(
            f"the key {config.tls_key} is encrypted: give its passphrase in a file with "
            f"--tls-passphrase-file or in the environment variable {PASSPHRASE_ENV}"
        )

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[config.tls_min_version]
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    set_ciphers(ctx, config.tls_ciphers)
    if config.tls_ca:
        # Before the certificate: a -c holding only the leaf gets its chain from this store.
        try:
            ctx.load_verify_locations(cafile=config.tls_ca)
        except OSError as exc:
            raise ConfigError(
                f"cannot load CA file {config.tls_ca} (-C): {_ssl_reason(exc)}"
            ) from exc
    try:
        # The password callable keeps OpenSSL from prompting on a terminal for a key we did
        # not recognise as encrypted.
        ctx.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: passphrase or b"")
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in reason:
            raise ConfigError(
                f"the key {config.tls_key} (-k) does not belong to the certificate "
                f"{config.tls_cert} (-c)"
            ) from exc
        if encrypted or "bad decrypt" in reason:
            raise ConfigError(
                f"cannot decrypt the key {config.tls_key} (-k): wrong passphrase?"
            ) from exc
        raise ConfigError(
            f"cannot load {config.tls_cert} (-c) with {config.tls_key} (-k): {reason}"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
    ctx.verify_mode = policy.verify_mode
    _warn_expiry(config.tls_cert, cert_pem)
    return ctx


def set_ciphers(ctx: ssl.SSLContext, ciphers: str | None) -> None:
    """The TLS 1.2 cipher list: --tls-ciphers, or Mozilla's intermediate profile."""
    try:
        ctx.set_ciphers(ciphers or INTERMEDIATE_CIPHERS)
    except ssl.SSLError:
        raise ConfigError(
            f"--tls-ciphers {ciphers!r}: OpenSSL selects no cipher from this list"
        ) from None


def _ssl_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc.strerror or exc)


def _warn_expiry(path: str, pem: str) -> None:
    try:
        end = not_after(pem)
    except (ValueError, IndexError, UnicodeDecodeError):
        return  # OpenSSL accepted it; a date we cannot read is not worth refusing to start for
    now = dt.datetime.now(dt.UTC)
    if end <= now:
        log.warning(
            "the certificate %s (-c) expired on %s: clients will refuse it",
            path,
            end.date().isoformat(),
        )
    elif end - now < dt.timedelta(days=14):
        log.warning("the certificate %s (-c) expires on %s", path, end.isoformat())


# -- reload ------------------------------------------------------------------------------------


class Contexts:
    """The context new connections are handed; `reload` re-reads the files."""

    def __init__(self, config: Config, context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.current = context if context is not None else build_context(config)
        self.generation = 0
        self._hooks: list[Callable[[ssl.SSLContext], None]] = []

    def get(self) -> ssl.SSLContext:
        return self.current

    __call__ = get  # a ContextSource itself

    def on_build(self, hook: Callable[[ssl.SSLContext], None]) -> None:
        """Run `hook` on the current context and on every one a reload builds (metrics)."""
        self._hooks.append(hook)
        hook(self.current)

    def reload(self) -> bool:
        """Load key, certificate and CA again; on any failure keep serving the old ones."""
        try:
            fresh = build_context(self.config)
        except ConfigError as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        for hook in self._hooks:
            hook(fresh)
        self.current = fresh
        self.generation += 1
        log.info(
            "TLS reload: key, certificate and CA loaded again (generation %d)", self.generation
        )
        return True


# -- the listener ------------------------------------------------------------------------------


ContextSource = Callable[[], ssl.SSLContext]
ACCEPT_RETRY_DELAY = 1.0  # as asyncio's own servers, after EMFILE and the like


class TLSSite(AcceptingSite):
    """A SockSite that hands each accepted connection the TLS context of the moment.

    asyncio's `create_server(ssl=...)` fixes the context for the listener's life and drops
    handshake errors silently; here each connection goes through `connect_accepted_socket` with
    `contexts()` as it is now, and a refused handshake (no or untrusted client certificate, plain
    HTTP, an old TLS version) is logged with the peer's address.
    """

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, contexts: ContextSource, listener: str
    ) -> None:
        super().__init__(runner, sock, ssl_context=contexts())
        self._contexts = contexts
        self._listener = listener

    def accept(
        self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]
    ) -> asyncio.AbstractServer:
        async def connect(conn: socket.socket) -> None:
            await handshake(factory, conn, self._contexts(), self._listener, peer(conn)[1])

        return Acceptor(sock, connect, self._listener)


class Acceptor(asyncio.AbstractServer):
    """The accept loop of one listener, in the place of an asyncio.Server: each accepted
    connection goes to `connect` in a task of its own (a TLS handshake; a PROXY header first,
    proxysite.py), which owns the socket from then on. Closing it cancels those still running."""

    def __init__(
        self,
        sock: socket.socket,
        connect: Callable[[socket.socket], Coroutine[Any, Any, None]],
        listener: str,
    ) -> None:
        self._sock = sock
        self._connect = connect
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self._task: asyncio.Task[None] | None = self._loop.create_task(self._accept())

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._task is not None else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._task is not None

    async def start_serving(self) -> None:
        """Serving starts at construction."""

    async def serve_forever(self) -> None:
        if self._task is not None:
            await self._task

    def close(self) -> None:
        # Stop accepting and drop handshakes in progress; established connections belong to
        # the aiohttp server now, which the runner shuts down in order.
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        for task in list(self._handshakes):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.wait(list(self._handshakes))

    async def _accept(self) -> None:
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                log.error(
                    "accepting on %s failed, retrying in %.0f s: %s",
                    self._listener,
                    ACCEPT_RETRY_DELAY,
                    exc,
                )
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            task = self._loop.create_task(self._connect(conn))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)


async def handshake(
    factory: Callable[[], asyncio.Protocol],
    conn: socket.socket,
    context: ssl.SSLContext,
    listener: str,
    peer: str,
) -> None:
    """Run the TLS handshake on an accepted connection, then hand it to `factory`'s protocol;
    a refused one is logged with `peer` and closed."""
    try:
        await asyncio.get_running_loop().connect_accepted_socket(
            factory, conn, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
    except (OSError, TimeoutError) as exc:
        log.info("TLS handshake from %s on %s refused: %s", peer, listener, _handshake_reason(exc))
        conn.close()
    except asyncio.CancelledError:
        conn.close()
        raise


def peer(conn: socket.socket) -> tuple[str | None, str]:
    """(the address `--trusted-proxy` is checked against, the peer for a log line); a peer on
    a unix socket has the address "" (trusted as local), one that already left None."""
    try:
        addr = conn.getpeername()
    except OSError:
        return None, "a peer that left"
    if conn.family == socket.AF_UNIX:
        return "", f"the unix socket {conn.getsockname() or ''}".rstrip()
    return str(addr[0]), host_port(str(addr[0]), int(addr[1]))


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no handshake within {HANDSHAKE_TIMEOUT:.0f} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "HTTP_REQUEST":
            return "plain HTTP on a TLS port"
        return str(exc.reason or exc).lower().replace("_", " ")
    return str(exc) or type(exc).__name__
