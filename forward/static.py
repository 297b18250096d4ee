"""The document root (`-r`): URL paths resolved safely to files, served by aiohttp's FileResponse.

The rule this module keeps: nothing outside the root is ever opened. A request target is split
into segments *before* percent-decoding, so an encoded slash can never create a segment; each
decoded segment is then refused if it is `.`/`..`, or holds a slash, a backslash, NUL or another
control character. What is left is walked one `lstat` at a time below the root (resolved once,
at start-up); a symlink is followed only when its target is inside the root, unless the operator
allows symlinks out (`--follow-symlinks`). A file that passes is handed to FileResponse, which
does conditional GET, Range and sendfile; this module only adds the precompressed sibling choice
(`.br`/`.gz`, never older than the file), a fixed MIME table, `Cache-Control: no-cache`, and a
`Last-Modified` that is never in the future.

Resolution runs in the event loop: a few `lstat`s of metadata the kernel has cached cost less than
the thread hop aiohttp's own stat takes, and the static path is the one that must be fast.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from .aiohttp_private import ChosenFileResponse

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A request answered without a file or R: an HTTP error (or the directory redirect);
    `text` is the short body the client gets. Converted to a response in one place
    (dispatch.py)."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=self.text + "\n", headers=self.headers)


# Types by extension. A fixed table rather than the system's mime.types, so that what a browser
# gets does not depend on the machine (a wrong type for .js or .wasm breaks modules).
MIME_TYPES: dict[str, str] = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/markdown; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".tsv": "text/tab-separated-values; charset=utf-8",
    ".xml": "application/xml",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".ico": "image/vnd.microsoft.icon",
    ".bmp": "image/bmp",
    ".wasm": "application/wasm",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".ttf": "font/ttf",
    ".otf": "font/otf",
    ".pdf": "application/pdf",
    ".zip": "application/zip",
    ".gz": "application/gzip",
    ".tar": "application/x-tar",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".wav": "audio/wav",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
    ".R": "text/plain; charset=utf-8",
    ".Rmd": "text/markdown; charset=utf-8",
    ".rds": "application/octet-stream",
}
DEFAULT_TYPE = "application/octet-stream"
INDEX = "index.html"
# Precompressed siblings in order of preference, with the token a client must accept.
ENCODINGS = ((".br", "br"), (".gz", "gzip"))
STATIC_METHODS = ("GET", "HEAD")
SMALL_FILE = 64 * 1024


def content_type(name: str) -> str:
    ext = os.path.splitext(name)[1]
    return MIME_TYPES.get(ext) or MIME_TYPES.get(ext.lower(), DEFAULT_TYPE)


# -- request target -> path segments (pure) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A request target made safe: the decoded path (bytes, as R gets it), its segments (str,
    non-empty, none of them `.`/`..`), whether it ended in a slash, and the raw query."""

    path: bytes
    segments: tuple[str, ...]
    slash: bool
    query: str


def _unquote(segment: str) -> bytes:
    if "%" not in segment:
        return segment.encode("utf-8", "surrogateescape")
    out = bytearray()
    raw = segment.encode("utf-8", "surrogateescape")
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == 0x25:  # '%'
            hexpair = raw[i + 1 : i + 3]
            try:
                if len(hexpair) != 2:
                    raise ValueError
                out.append(int(hexpair, 16))
            except ValueError:
                raise Refusal(400, "Bad request: malformed percent-encoding in the path.") from None
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _bad_byte(data: bytes) -> bool:
    return any(b < 0x20 or b == 0x7F or b == 0x5C for b in data)


def parse_target(raw: str) -> Target:
    """Split and decode a raw request target (`request.raw_path`). Raises `Refusal`."""
    if not raw.startswith("/"):
        # absolute-form (GET http://host/path): keep only the path.
        scheme, sep, rest = raw.partition("://")
        if not sep or not scheme.isalpha() or "/" not in rest:
            raise Refusal(400, "Bad request: the target must be an absolute path.")
        raw = rest[rest.index("/") :]
    raw_path, _, query = raw.partition("?")
    raw_path = raw_path.partition("#")[0]
    decoded: list[bytes] = []
    segments: list[str] = []
    for part in raw_path.split("/"):
        seg = _unquote(part)
        decoded.append(seg)
        if not seg:
            continue
        if seg in (b".", b"..") or b"/" in seg or _bad_byte(seg):
            raise Refusal(
                403,
                "Forbidden: the path leaves the document root or holds "
                "characters that are not allowed.",
            )
        segments.append(os.fsdecode(seg))
    return Target(b"/".join(decoded), tuple(segments), raw_path.endswith("/"), query)


# -- segments -> a file inside the root --------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


@dataclass(frozen=True, slots=True)
class DocRoot:
    """The document root, resolved once; `resolve` finds a file below it or raises `Refusal`."""

    root: str
    follow_symlinks: bool = False
    dotfiles: bool = False

    @classmethod
    def open(cls, directory: str, follow_symlinks: bool = False, dotfiles: bool = False) -> DocRoot:
        root = os.path.realpath(directory)
        if not os.path.isdir(root):
            raise NotADirectoryError(directory)
        return cls(root, follow_symlinks, dotfiles)

    def _step(self, path: str) -> os.stat_result:
        """lstat one component; through a symlink only if it stays inside (or that is allowed)."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not self.follow_symlinks and not _inside(os.path.realpath(path), self.root):
                log.info("refused %s: a symlink that leads out of the document root", path)
                raise Refusal(403, "Forbidden: a symbolic link leads out of the document root.")
            st = os.stat(path)
        return st

    def walk(self, segments: tuple[str, ...]) -> tuple[str, os.stat_result]:
        """The path and stat of `segments` below the root; FileNotFoundError/NotADirectoryError
        when a component is missing."""
        if not segments:
            return self.root, os.stat(self.root)
        path = self.root
        st: os.stat_result | None = None  # the root is a directory: checked at start-up
        for seg in segments:
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(path)
            path = os.path.join(path, seg)
            st = self._step(path)
        assert st is not None
        return path, st

    def resolve(self, target: Target) -> tuple[str, os.stat_result]:
        """A regular file to serve for `target`: the file itself, or a directory's index.html."""
        if not self.dotfiles and any(
            seg.startswith(".") and seg != ".well-known" for seg in target.segments
        ):
            # .git/, .env, .htpasswd: a document root copied from a checkout often has them.
            # Answered as missing, so that their presence is not disclosed either.
            raise Refusal(404, "Not found.")
        try:
            path, st = self.walk(target.segments)
            if stat.S_ISDIR(st.st_mode):
                index = os.path.join(path, INDEX)
                try:
                    ist = self._step(index)
                except (FileNotFoundError, NotADirectoryError):
                    raise Refusal(403, "Forbidden: directory listings are not offered.") from None
                if not target.slash:
                    # Relative links in the index page need the slash; send the browser there.
                    location = quote(target.path + b"/")
                    if target.query:
                        location += "?" + target.query
                    raise Refusal(301, "Moved.", {hdrs.LOCATION: location})
                path, st = index, ist
        except (FileNotFoundError, NotADirectoryError):
            raise Refusal(404, "Not found.") from None
        except PermissionError:
            raise Refusal(403, "Forbidden.") from None
        except OSError as exc:  # e.g. ELOOP, ENAMETOOLONG
            raise Refusal(404, f"Not found ({exc.strerror or exc}).") from None
        if not stat.S_ISREG(st.st_mode):
            raise Refusal(403, "Forbidden: not a regular file.")
        return path, st


def sibling(
    path: str, st: os.stat_result, accept_encoding: str
) -> tuple[str, os.stat_result, str | None]:
    """The precompressed sibling to send instead of `path`, if the client takes it and it is a
    regular file (not a symlink) at least as new as the file; else the file itself."""
    if accept_encoding:
        tokens = {t.split(";", 1)[0].strip() for t in accept_encoding.lower().split(",")}
        for suffix, token in ENCODINGS:
            if token not in tokens:
                continue
            try:
                cst = os.lstat(path + suffix)
            except OSError:
                continue
            if stat.S_ISREG(cst.st_mode) and cst.st_mtime_ns >= st.st_mtime_ns:
                return path + suffix, cst, token
    return path, st, None


class StaticFile(ChosenFileResponse):
    """aiohttp's FileResponse for a file this module has already resolved and stat'ed.

    Two steps are replaced (see aiohttp_private.ChosenFileResponse): the choice of file and
    encoding, so that the resolved path (and the sibling chosen here) is what gets opened and no
    second search happens, and the send of a small file without `sendfile`.
    """

    def __init__(
        self, path: str, st: os.stat_result, encoding: str | None, headers: dict[str, str]
    ) -> None:
        super().__init__(path, headers=headers)
        self._resolved = (Path(path), st, encoding)

    def choose_file(self, accept_encoding: str) -> tuple[Path | None, os.stat_result, str | None]:
        return self._resolved

    async def send_fallback(
        self, writer: AbstractStreamWriter, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        # uvloop has no loop.sendfile, so every file takes this path, which reads each chunk in
        # a worker thread. A small file is one read from the page cache: doing it here saves a
        # thread round trip per request (the static path's main cost).
        if count > SMALL_FILE:
            return await super().send_fallback(writer, fobj, offset, count)
        fobj.seek(offset)
        await writer.write(fobj.read(count))
        await writer.drain()
        return writer

    @property
    def last_modified(self) -> Any:
        return super().last_modified

    @last_modified.setter
    def last_modified(self, value: Any) -> None:
        # A file stamped in the future (clock skew, a tarball) would otherwise stay "fresh" in
        # caches until that date; the C forward clamps to now as well.
        if isinstance(value, int | float):
            # floor: aiohttp rounds the stamp up to a whole second.
            value = min(value, math.floor(time.time()))
        web.FileResponse.last_modified.fset(self, value)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class StaticFiles:
    """The doc-root handler for GET/HEAD requests whose target is already parsed."""

    docroot: DocRoot

    async def handle(self, request: web.Request, target: Target) -> web.StreamResponse:
        if request.method not in STATIC_METHODS:
            raise Refusal(
                405,
                f"Method {request.method} is not allowed here.",
                {hdrs.ALLOW: ", ".join(STATIC_METHODS)},
            )
        path, st = self.docroot.resolve(target)
        served, sst, encoding = sibling(path, st, request.headers.get(hdrs.ACCEPT_ENCODING, ""))
        headers: dict[str, str] = {
            hdrs.CONTENT_TYPE: content_type(path),
            hdrs.CACHE_CONTROL: "no-cache",
            # Set on every answer, not only the compressed ones: a cache must not hand the
            # identity body to a client that asked for gzip, nor the reverse.
            hdrs.VARY: hdrs.ACCEPT_ENCODING,
        }
        return StaticFile(served, sst, encoding, headers)
