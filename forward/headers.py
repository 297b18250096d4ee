"""The headers forward puts on every HTTP response it makes, whoever answers the request.

One `ResponseHeaders` is built from the settings at start (`response_headers` is pure and says
in one sentence what is wrong with a value) and applied by one `on_response_prepare` hook, which
aiohttp runs for every response of an application: static files (FileResponse, 304, 206),
`.R` answers, redirects, and the errors handlers raise as HTTPException or fail with (500).
Putting them anywhere else would leave some answer without them.

What is sent (docs/static.md):
- framing (clickjacking), as RStudio's `www-frame-origin`: `none` (default) sends
  `X-Frame-Options: DENY` and `Content-Security-Policy: frame-ancestors 'none'`, `same` sends
  SAMEORIGIN and 'self', `any` sends neither, and origins are named in frame-ancestors only
  (X-Frame-Options' ALLOW-FROM is ignored by every current browser, and a browser that knows
  frame-ancestors ignores X-Frame-Options anyway);
- `X-Content-Type-Options: nosniff` and `Referrer-Policy: same-origin`: a page's address (and
  the query a `.R` page was called with) never goes to another site;
- `Strict-Transport-Security` with TLS (docs/tls.md);
- what `--add-header NAME:VALUE` adds, which replaces forward's value of the same name.

A header of the same name set by an `.R` script is replaced, except Content-Security-Policy,
which is added beside the script's own: a browser enforces every policy it receives.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import hdrs, web

if TYPE_CHECKING:
    from .config import Config


class HeaderError(ValueError):
    """A value of --frame-origin or --add-header that cannot be sent; the message says why."""


CSP = "Content-Security-Policy"
REFERRER_POLICY = "same-origin"

# RFC 9110 token characters: what a header name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# An origin as CSP names it: scheme, host (a name, `*.` before one, an address) and a port.
_ORIGIN = re.compile(
    r"https?://(?:(?:\*\.)?[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?"
)

# Headers that describe one response's framing or content, or that forward manages itself:
# the same value on every response would break them.
_NOT_ADDABLE = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION,
        hdrs.CONTENT_ENCODING,
        hdrs.CONTENT_LENGTH,
        hdrs.CONTENT_RANGE,
        hdrs.CONTENT_TYPE,
        hdrs.DATE,
        hdrs.ETAG,
        hdrs.KEEP_ALIVE,
        hdrs.LAST_MODIFIED,
        hdrs.LOCATION,
        hdrs.SERVER,
        hdrs.TRAILER,
        hdrs.TRANSFER_ENCODING,
        hdrs.UPGRADE,
        "Proxy-Connection",
    )
)


def frame_headers(value: str) -> list[tuple[str, str]]:
    """The framing headers for a --frame-origin value."""
    if value == "none":
        return [(hdrs.X_FRAME_OPTIONS, "DENY"), (CSP, "frame-ancestors 'none'")]
    if value == "same":
        return [(hdrs.X_FRAME_OPTIONS, "SAMEORIGIN"), (CSP, "frame-ancestors 'self'")]
    if value == "any":
        return []
    origins = value.replace(",", " ").split()
    for origin in origins:
        found = _ORIGIN.fullmatch(origin)
        if not found or int(found.group("port") or 1) > 65535:
            raise HeaderError(
                f"--frame-origin {origin!r}: use none, same, any, or origins such as "
                "https://portal.example.com (scheme, host and an optional port)"
            )
    if not origins:
        raise HeaderError("--frame-origin is empty: use none, same, any or an origin")
    return [(CSP, "frame-ancestors " + " ".join(o.lower() for o in origins))]


def added_header(spec: str) -> tuple[str, str]:
    """`NAME:VALUE` of --add-header, checked so that no response can be split or broken."""
    name, colon, value = spec.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.fullmatch(name):
        raise HeaderError(f"--add-header {spec!r}: use NAME:VALUE, NAME a header name")
    if any(c in value for c in "\r\n\0") or not value.isprintable():
        raise HeaderError(f"--add-header {name}: the value has a control character")
    if name.lower() in _NOT_ADDABLE:
        raise HeaderError(f"--add-header {name}: forward sets this header itself for each response")
    if name.lower() == hdrs.STRICT_TRANSPORT_SECURITY.lower():
        raise HeaderError(
            "--add-header Strict-Transport-Security: use --hsts and --hsts-include-subdomains"
        )
    return name, value


def hsts_value(max_age: int, include_subdomains: bool) -> str | None:
    if max_age <= 0:
        return None
    return f"max-age={max_age}" + ("; includeSubDomains" if include_subdomains else "")


@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    """(name, value) pairs set on every response, in order; a name repeated is sent twice."""

    pairs: tuple[tuple[str, str], ...]
    # Worked out once: whether each pair is added beside a header of the same name or replaces
    # it (this runs for every response, static files at thousands a second among them).
    _plan: tuple[tuple[str, str, bool], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        plan = []
        for name, value in self.pairs:
            key = name.lower()
            plan.append((name, value, key in seen or key == CSP.lower()))
            seen.add(key)
        object.__setattr__(self, "_plan", tuple(plan))

    def apply(self, response: web.StreamResponse) -> None:
        out = response.headers
        for name, value, add in self._plan:
            if add:
                out.add(name, value)
            else:
                out[name] = value

    def without_hsts(self) -> ResponseHeaders:
        """For the plain listeners (redirect, admin): HSTS belongs to the TLS answer only."""
        sts = hdrs.STRICT_TRANSPORT_SECURITY.lower()
        return ResponseHeaders(tuple(p for p in self.pairs if p[0].lower() != sts))


def response_headers(
    frame_origin: str,
    add_header: Iterable[str],
    hsts_max_age: int,
    hsts_include_subdomains: bool,
) -> ResponseHeaders:
    """What every response carries, from the settings; a bad value is a HeaderError."""
    pairs = frame_headers(frame_origin)
    pairs += [
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", REFERRER_POLICY),
    ]
    sts = hsts_value(hsts_max_age, hsts_include_subdomains)
    if sts is not None:
        pairs.append((hdrs.STRICT_TRANSPORT_SECURITY, sts))
    added = [added_header(spec) for spec in add_header]
    replaced = {name.lower() for name, _ in added}
    pairs = [p for p in pairs if p[0].lower() not in replaced] + added
    return ResponseHeaders(tuple(pairs))


def for_config(config: Config) -> ResponseHeaders:
    """The headers of the -p and -w listeners (Config.validate has checked the values)."""
    return response_headers(
        config.frame_origin,
        config.add_header,
        config.hsts_max_age,
        config.hsts_include_subdomains,
    )


Hook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def hook(headers: ResponseHeaders) -> Hook:
    """The `on_response_prepare` callback that puts `headers` on a response."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        headers.apply(response)

    return add_headers
