"""`.R` scripts (`-R`): an HTTP request rendered by R through an OCAP-mode Rserve (SPEC section 4).

The wire work is pure and tested with byte literals: `pack_call` builds the one `CMD_OCcall`
message (the capability from the `RsOC` greeting, byte for byte, applied to a raw vector
`url \\0 query \\0 headers \\0 body`), `unpack_answer` turns Rserve's reply into an `Answer` or a
`Refusal` with a clear text, and `request_headers` builds the header block R sees, with the
client's address (and verified certificate subject) added by forward and never taken from the
client. `call_r` is the thin async layer: connect to the `-R` socket, read the greeting, send,
read the answer, close. One connection per request, as the C forward does: each is a fresh R
process, so no state leaks from one caller to the next.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import stat
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict

from . import rexp
from .config import Config
from .guard import client_address
from .qap import CMD_OOB, HEADER_SIZE, Cmd, Dt, Header, Xt
from .rexp import RexpError, RObj
from .static import DocRoot, Refusal, Target

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A greeting is a capability and its class attribute: a few hundred bytes. Anything near this
# limit is not an RsOC greeting worth reading.
MAX_GREETING = 1 << 20
# Headers forward sets for R and therefore never passes on from a client.
OWN_HEADERS = frozenset(
    h.lower()
    for h in (
        "Request-Method",
        "X-Real-IP",
        "X-Forwarded-For",
        "X-SSL-Client-S-DN",
        "X-SSL-Client-CN",
    )
)
# Header lines R may not set: forward frames the response itself (SPEC, http.c's contract).
RESERVED_ANSWER_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "content-type")
)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def is_rscript(path: bytes) -> bool:
    """Does this decoded URL path belong to R (SPEC 4: `.R`, `.R/...`, `/library/`, `/doc/`)?"""
    return (
        path.endswith(b".R")
        or b".R/" in path
        or path.startswith(b"/library/")
        or path.startswith(b"/doc/")
    )


def _fail(text: str) -> Refusal:
    return Refusal(500, text)


# -- greeting ------------------------------------------------------------------------------------


def parse_greeting(header: Header, payload: bytes) -> bytes:
    """The capability (its SEXP bytes, as sent) from an RsOC greeting. Raises `Refusal`."""
    if header.cmd != Cmd.OC_INIT:
        raise _fail("R services are not running in OCAP mode.")
    try:
        kind, body = next(iter(rexp.params(payload)))
        if kind != Dt.SEXP:
            raise RexpError("the greeting holds no R value")
        cap = rexp.decode(body)
    except (RexpError, StopIteration, struct.error, ValueError) as exc:
        raise _fail(f"R services sent a malformed greeting ({exc}).") from None
    if cap.xt != Xt.ARRAY_STR or not cap.attrs or len(cap.value) != 1:
        raise _fail("R services' oc.init must return a single capability (ocap(fun)).")
    return bytes(body)


def check_greeting_header(header: Header) -> None:
    if header.cmd != Cmd.OC_INIT:
        raise _fail("R services are not running in OCAP mode.")
    if header.length > MAX_GREETING:
        raise _fail("R services sent a greeting that is far too large.")


# -- request ---------------------------------------------------------------------------------------


def pack_call(
    capability: bytes, msg_id: int, url: bytes, query: bytes, headers: bytes, body: bytes
) -> list[bytes]:
    """The CMD_OCcall message as chunks (the body is not copied): DT_SEXP > XT_LANG_NOTAG
    [capability, XT_RAW(url \\0 query \\0 headers \\0 body)]. Lengths past 24 bits switch that
    level to the large (64-bit) header form, as Rserve's decoder accepts at each level."""
    raw_len = len(url) + len(query) + len(headers) + len(body) + 3
    pad = b"\0" * (-raw_len % 4)
    raw_size = 4 + raw_len + len(pad)
    raw_head = rexp.item_header(Xt.RAW, raw_size, Xt.LARGE)
    lang_size = len(capability) + len(raw_head) + raw_size
    lang_head = rexp.item_header(Xt.LANG_NOTAG, lang_size, Xt.LARGE)
    sexp_size = len(lang_head) + lang_size
    dt_head = rexp.item_header(Dt.SEXP, sexp_size, Dt.LARGE)
    total = len(dt_head) + sexp_size
    head = b"".join(
        (
            Header(Cmd.OC_CALL, total, msg_id).encode(),
            dt_head,
            lang_head,
            capability,
            raw_head,
            struct.pack("<I", raw_len & 0xFFFFFFFF),
            url,
            b"\0",
            query,
            b"\0",
            headers,
            b"\0",
        )
    )
    return [head, body, pad] if body else [head, pad]


def request_headers(
    method: str, raw_headers: Iterable[tuple[bytes, bytes]], added: Sequence[tuple[str, str]]
) -> bytes:
    """The header block R gets: `Request-Method`, then the client's header lines as received
    (names and values unaltered, in order), then forward's own lines. Copies of forward's own
    headers sent by the client are left out, so R can trust them."""
    lines = [b"Request-Method: " + method.encode("ascii")]
    for name, value in raw_headers:
        if name.decode("latin-1").lower() in OWN_HEADERS:
            continue
        lines.append(name + b": " + value)
    lines.extend(f"{name}: {value}".encode() for name, value in added)
    block = b"\n".join(lines) + b"\n"
    if b"\0" in block:
        raise Refusal(400, "Bad request: NUL in a header.")
    return block


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _show_ip(text: str) -> str:
    ip = _parse_ip(text)
    return str(ip) if ip is not None else text


def _trusted(addr: str, trusted: Sequence[IPNetwork]) -> bool:
    ip = _parse_ip(addr)
    return ip is not None and any(ip in net for net in trusted)


def client_identity(
    peer: str | None,
    forwarded_for: str | None,
    real_ip: str | None,
    trusted: Sequence[IPNetwork],
    subject: str | None = None,
    common_name: str | None = None,
) -> list[tuple[str, str]]:
    """Forward's own header lines for R: who is calling.

    A peer that is not a trusted proxy is the client: its address is X-Real-IP and the whole of
    X-Forwarded-For, whatever it sent. A trusted proxy's X-Forwarded-For is kept and the proxy's
    own address appended; X-Real-IP is then the nearest address in that chain that is not a
    trusted proxy (the guard's rule, guard.client_address), or, when the proxy sent no chain,
    its own X-Real-IP (nginx: `proxy_set_header X-Real-IP $remote_addr;`, Rserve's example).
    """
    peer = _show_ip(peer) if peer else "unknown"
    out: list[tuple[str, str]] = []
    if trusted and _trusted(peer, trusted):
        chain = [a.strip() for a in (forwarded_for or "").split(",") if a.strip()]
        client = client_address(peer, forwarded_for, trusted) if chain else peer
        if client == peer and not chain and real_ip and _parse_ip(real_ip):
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
    rdns: list[str] = []
    cn = None
    for rdn in peercert["subject"]:
        parts = []
        for key, value in rdn:
            parts.append(f"{_SHORT.get(key, key)}={_dn_escape(str(value))}")
            if key == "commonName" and cn is None:
                cn = str(value)
        rdns.append("+".join(parts))
    return ",".join(reversed(rdns)), cn


# -- answer --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What R rendered: the HTTP response to send."""

    body: bytes
    content_type: str = "text/html"
    headers: tuple[tuple[str, str], ...] = ()
    status: int = 200
    dropped: tuple[str, ...] = ()  # header names R set that forward sets itself


def parse_header_lines(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """R's header lines -> (name, value) pairs and the reserved names left out."""
    pairs: list[tuple[str, str]] = []
    dropped: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        value = value.strip(" \t")
        if not sep or not _TOKEN.match(name):
            raise _fail(f"R returned a malformed header line: {line[:200]!r}")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise _fail(f"R returned a header with control characters: {name}")
        if name.lower() in RESERVED_ANSWER_HEADERS:
            dropped.append(name)
            continue
        pairs.append((name, value))
    return pairs, dropped


def _single_string(obj: RObj) -> str | None:
    if obj.xt == Xt.ARRAY_STR and len(obj.value) >= 1 and obj.value[0] is not None:
        return str(obj.value[0])
    if obj.xt == Xt.STR:
        return str(obj.value)
    return None


def _status(obj: RObj) -> int:
    if obj.xt in (Xt.ARRAY_INT, Xt.ARRAY_DOUBLE) and len(obj.value) == 1:
        value = obj.value[0]
        if value is not None and float(value).is_integer() and 200 <= value <= 599:
            return int(value)
    raise _fail("R returned an invalid status code (an integer from 200 to 599 is needed).")


def interpret(obj: RObj) -> Answer:
    """The R value returned by the script: list(body, [content-type, [headers, [status]]]), or a
    string, which is an error message."""
    if obj.xt == Xt.ARRAY_STR:
        text = _single_string(obj)
        raise _fail(text if text else "R returned an empty error.")
    if obj.xt != Xt.VECTOR:
        raise _fail(f"R returned neither a list nor a character string (expression type {obj.xt}).")
    items: list[RObj] = obj.value
    if not items:
        raise _fail("R returned an empty list: the body is missing.")
    first = items[0]
    if first.xt == Xt.RAW:
        body = bytes(first.value)
    elif (text := _single_string(first)) is not None:
        body = text.encode("utf-8")
    else:
        raise _fail("R returned a body that is neither a raw vector nor a string.")
    ctype = "text/html"
    if len(items) > 1 and items[1].xt != Xt.NULL:
        given = _single_string(items[1])
        if not given or any(ord(c) < 0x20 or ord(c) == 0x7F for c in given):
            raise _fail("R returned an invalid content type.")
        ctype = given
    headers: list[tuple[str, str]] = []
    dropped: list[str] = []
    if len(items) > 2 and items[2].xt != Xt.NULL:
        if items[2].xt != Xt.ARRAY_STR or any(v is None for v in items[2].value):
            raise _fail("R returned headers that are not a character vector.")
        headers, dropped = parse_header_lines("\n".join(items[2].value))
    status = _status(items[3]) if len(items) > 3 and items[3].xt != Xt.NULL else 200
    return Answer(body, ctype, tuple(headers), status, tuple(dropped))


def _error_text(payload: bytes) -> str | None:
    """The message an error response carries, if any (Rserve's OCAP path sends none today)."""
    try:
        for kind, body in rexp.params(payload):
            if kind == Dt.STRING:
                return bytes(body).split(b"\0", 1)[0].decode("utf-8", "replace") or None
            if kind == Dt.SEXP:
                return _single_string(rexp.decode(body))
    except (RexpError, struct.error, ValueError, IndexError, TypeError):
        pass
    return None


def unpack_answer(header: Header, payload: bytes) -> Answer:
    """Rserve's reply to the OCcall -> `Answer`; a failure -> `Refusal` (500) with clear text."""
    cmd = header.cmd
    if cmd & 0xFFFFFF == Cmd.RESP_ERR:
        code = cmd >> 24
        message = _error_text(payload)
        if message:
            raise _fail(f"R failed while rendering this page: {message}")
        raise _fail(
            f"R failed while rendering this page (Rserve error code 0x{code:02x}); "
            "the R error message is in Rserve's output."
        )
    if cmd != Cmd.RESP_OK:
        raise _fail(f"R services sent an unexpected message (0x{cmd:x}) instead of an answer.")
    try:
        for kind, body in rexp.params(payload):
            if kind == Dt.SEXP:
                return interpret(rexp.decode(body))
    except (RexpError, struct.error, ValueError, IndexError, TypeError) as exc:
        raise _fail(f"R services sent a malformed answer ({exc}).") from None
    raise _fail("R services sent an answer without an R value.")


# -- the I/O layer ---------------------------------------------------------------------------------


async def _read_message(
    reader: asyncio.StreamReader, limit: int, what: str
) -> tuple[Header, bytes]:
    try:
        header = Header.parse(await reader.readexactly(HEADER_SIZE))
        if limit and header.length > limit:
            raise _fail(f"R services announced {what} of {header.length} bytes, over the limit.")
        return header, await reader.readexactly(header.length)
    except asyncio.IncompleteReadError:
        raise _fail(f"R services closed the connection before {what} was complete.") from None


Build = Callable[[bytes, int], list[bytes]]


async def call_r(
    socket_path: str, build: Build, connect_timeout: float, max_answer: int
) -> tuple[Header, bytes]:
    """Connect to the OCAP Rserve, read its greeting, send the call `build(capability, msg_id)`
    returns, and read the answer (OOB_SEND messages R may send first are skipped)."""
    try:
        async with asyncio.timeout(connect_timeout or None):
            reader, writer = await asyncio.open_unix_connection(socket_path)
    except (OSError, TimeoutError) as exc:
        log.error("cannot connect to R services at %s: %s", socket_path, exc)
        raise _fail("Cannot connect to R services.") from None
    try:
        try:
            head = Header.parse(await reader.readexactly(HEADER_SIZE))
        except asyncio.IncompleteReadError:
            raise _fail("R services closed the connection before the greeting.") from None
        check_greeting_header(head)
        try:
            payload = await reader.readexactly(head.length)
        except asyncio.IncompleteReadError:
            raise _fail("R services closed the connection in the greeting.") from None
        capability = parse_greeting(head, payload)
        writer.writelines(build(capability, head.msg_id))
        await writer.drain()
        while True:
            header, payload = await _read_message(reader, max_answer, "the answer")
            if header.cmd & 0xFFFFF000 == Cmd.OOB_SEND:
                log.debug("R sent an OOB message during a .R request; ignored")
                continue
            if header.cmd & 0xFFFF0000 == CMD_OOB:
                raise _fail("R asked the client a question (OOB_MSG): a web page cannot answer.")
            return header, payload
    except (ConnectionError, OSError) as exc:
        raise _fail(f"Lost the connection to R services ({exc}).") from None
    finally:
        writer.close()


# -- the handler -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RScripts:
    """Renders `.R` URLs through the `-R` socket."""

    docroot: DocRoot
    socket_path: str
    connect_timeout: float
    max_body: int
    max_answer: int
    trusted: tuple[IPNetwork, ...]

    @classmethod
    def from_config(cls, config: Config, docroot: DocRoot) -> RScripts:
        return cls(
            docroot,
            config.rscript_socket,
            config.backend_timeout,
            config.max_body_size,
            config.max_message_size,
            tuple(ipaddress.ip_network(p, strict=False) for p in config.trusted_proxy),
        )

    def find_script(self, target: Target) -> tuple[str, str]:
        """(script file, path info): the longest prefix ending in `.R` that is a regular file
        under the root. 404 if there is none, 403 if it cannot be read."""
        segs = target.segments
        for i in range(len(segs), 0, -1):
            if not segs[i - 1].endswith(".R"):
                continue
            try:
                path, st = self.docroot.walk(segs[:i])
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                raise Refusal(403, "Forbidden: the R script cannot be read.") from None
            if not stat.S_ISREG(st.st_mode):
                continue
            if not os.access(path, os.R_OK):
                raise Refusal(403, "Forbidden: the R script cannot be read.")
            return path, "/".join(segs[i:])
        raise Refusal(404, "R script not found.")

    async def read_body(self, request: web.Request) -> bytes:
        limit = self.max_body
        too_big = Refusal(413, f"Request body too large (the limit is {limit} bytes).")
        if limit and request.content_length is not None and request.content_length > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if limit and len(data) > limit:
                raise too_big
        return bytes(data)

    async def handle(self, request: web.Request, target: Target) -> web.StreamResponse:
        if not target.path.startswith((b"/library/", b"/doc/")):
            script, info = self.find_script(target)
            log.debug("R script %s (path info %r)", script, info)
        body = await self.read_body(request)
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport else None
        subject, cn = certificate_subject(peercert)
        added = client_identity(
            request.remote,
            ", ".join(request.headers.getall(hdrs.X_FORWARDED_FOR, [])) or None,
            request.headers.get("X-Real-IP"),
            self.trusted,
            subject,
            cn,
        )
        block = request_headers(request.method, request.raw_headers, added)
        query = request.raw_path.partition("?")[2].partition("#")[0].encode("latin-1")

        def build(capability: bytes, msg_id: int) -> list[bytes]:
            return pack_call(capability, msg_id, target.path, query, block, body)

        try:
            header, payload = await call_r(
                self.socket_path, build, self.connect_timeout, self.max_answer
            )
            answer = unpack_answer(header, payload)
        except Refusal as refusal:
            log.warning(
                "%s %s: %s", request.method, target.path.decode("utf-8", "replace"), refusal.text
            )
            raise
        if answer.dropped:
            log.warning(
                "%s: R set header(s) %s, which forward sets itself; left out",
                target.path.decode("utf-8", "replace"),
                ", ".join(answer.dropped),
            )
        headers: CIMultiDict[str] = CIMultiDict(answer.headers)
        headers[hdrs.CONTENT_TYPE] = answer.content_type
        empty = answer.status in (204, 304)
        return web.Response(
            status=answer.status, body=None if empty else answer.body, headers=headers
        )
