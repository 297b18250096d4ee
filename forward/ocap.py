"""The OCAP call behind a `.R` URL, as pure code: Rserve's greeting in, one call out, its answer in.

`parse_greeting` takes the capability from the `RsOC` greeting, byte for byte as sent (it is
passed back unchanged); `pack_call` builds the one `CMD_OCcall` message applying it to a raw
vector `url \\0 query \\0 headers \\0 body`; `request_headers` is the header block R sees, with
forward's own lines (who is calling) added and never taken from the client; `unpack_answer` turns
Rserve's reply into an `Answer` or a `Refusal` (500) with a clear text. No socket, no event loop:
the tests use byte literals, and rscript.py does the I/O. The contract R's side keeps is in
docs/static.md.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import qap, rexp
from .qap import Cmd, Dt, Header, Xt
from .rexp import RexpError, RObj
from .static import Refusal

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
# Header lines R may not set: forward frames the response itself (as Rserve's http.c does).
RESERVED_ANSWER_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "content-type")
)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def fail(text: str) -> Refusal:
    """What every failure of R's side is: a 500 with this text."""
    return Refusal(500, text)


# -- greeting ------------------------------------------------------------------------------------


def parse_greeting(header: Header, payload: bytes) -> bytes:
    """The capability (its SEXP bytes, as sent) from an RsOC greeting. Raises `Refusal`."""
    if header.cmd != Cmd.OC_INIT:
        raise fail("R services are not running in OCAP mode.")
    try:
        kind, body = next(iter(rexp.params(payload)), (None, b""))
        if kind != Dt.SEXP:
            raise RexpError("the greeting holds no R value")
        cap = rexp.decode(body)
    except RexpError as exc:
        raise fail(f"R services sent a malformed greeting ({exc}).") from None
    if cap.xt != Xt.ARRAY_STR or not cap.attrs or len(cap.value) != 1:
        raise fail("R services' oc.init must return a single capability (ocap(fun)).")
    return bytes(body)


def check_greeting_header(header: Header) -> None:
    if header.cmd != Cmd.OC_INIT:
        raise fail("R services are not running in OCAP mode.")
    if header.length > MAX_GREETING:
        raise fail("R services sent a greeting that is far too large.")


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
            raise fail(f"R returned a malformed header line: {line[:200]!r}")
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise fail(f"R returned a header with control characters: {name}")
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
    raise fail("R returned an invalid status code (an integer from 200 to 599 is needed).")


def interpret(obj: RObj) -> Answer:
    """The R value returned by the script: list(body, [content-type, [headers, [status]]]), or a
    string, which is an error message."""
    if obj.xt == Xt.ARRAY_STR:
        text = _single_string(obj)
        raise fail(text if text else "R returned an empty error.")
    if obj.xt != Xt.VECTOR:
        raise fail(f"R returned neither a list nor a character string (expression type {obj.xt}).")
    items: list[RObj] = obj.value
    if not items:
        raise fail("R returned an empty list: the body is missing.")
    first = items[0]
    if first.xt == Xt.RAW:
        body = bytes(first.value)
    elif (text := _single_string(first)) is not None:
        body = text.encode("utf-8")
    else:
        raise fail("R returned a body that is neither a raw vector nor a string.")
    ctype = "text/html"
    if len(items) > 1 and items[1].xt != Xt.NULL:
        given = _single_string(items[1])
        if not given or any(ord(c) < 0x20 or ord(c) == 0x7F for c in given):
            raise fail("R returned an invalid content type.")
        ctype = given
    headers: list[tuple[str, str]] = []
    dropped: list[str] = []
    if len(items) > 2 and items[2].xt != Xt.NULL:
        if items[2].xt != Xt.ARRAY_STR or any(v is None for v in items[2].value):
            raise fail("R returned headers that are not a character vector.")
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
    except RexpError:
        pass
    return None


def unpack_answer(header: Header, payload: bytes) -> Answer:
    """Rserve's reply to the OCcall -> `Answer`; a failure -> `Refusal` (500) with clear text."""
    cmd = header.cmd
    code = qap.error_code(cmd)
    if code is not None:
        message = _error_text(payload)
        if message:
            raise fail(f"R failed while rendering this page: {message}")
        raise fail(
            f"R failed while rendering this page (Rserve error code 0x{code:02x}); "
            "the R error message is in Rserve's output."
        )
    if cmd != Cmd.RESP_OK:
        raise fail(f"R services sent an unexpected message (0x{cmd:x}) instead of an answer.")
    try:
        for kind, body in rexp.params(payload):
            if kind == Dt.SEXP:
                return interpret(rexp.decode(body))
    except RexpError as exc:
        raise fail(f"R services sent a malformed answer ({exc}).") from None
    raise fail("R services sent an answer without an R value.")
