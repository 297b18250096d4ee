"""`.R` scripts (`-R`): an HTTP request rendered by R through an OCAP-mode Rserve.

`RScripts.handle` finds the script under the document root, reads the body, and has R render
the page; `call_r` is the thin async layer around the pure call in ocap.py: connect to the `-R`
socket, read the greeting, send the call, read the answer, close. One connection per request, as
the C forward does: each is a fresh R process, so no state leaks from one caller to the next.
Every failure is a `Refusal` (500 with a clear text), logged; the server goes on serving.

R gets `--rscript-timeout` seconds to answer. Past it the browser gets 504, R's connection is
closed, and the R process is ended (rpid.py: SIGTERM, then SIGKILL), because an R busy in a loop
does not notice a closed socket and would run on, holding its memory and a CPU, for ever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import hdrs, web
from multidict import CIMultiDict

from . import qap
from .config import Config
from .guard import Network, client_identity, parse_networks
from .ocap import (
    check_greeting_header,
    fail,
    pack_call,
    parse_greeting,
    request_headers,
    unpack_answer,
)
from .qap import HEADER_SIZE, Header
from .rpid import RProcess
from .static import DocRoot, Refusal, Target
from .tls import certificate_subject

log = logging.getLogger(__name__)


def is_rscript(path: bytes) -> bool:
    """Does this decoded URL path belong to R: `.R`, `.R/...` (path info), `/library/`, `/doc/`?"""
    return (
        path.endswith(b".R")
        or b".R/" in path
        or path.startswith(b"/library/")
        or path.startswith(b"/doc/")
    )


# -- the I/O layer ---------------------------------------------------------------------------------


async def _read_message(
    reader: asyncio.StreamReader, limit: int, what: str
) -> tuple[Header, bytes]:
    try:
        header = Header.parse(await reader.readexactly(HEADER_SIZE))
        if limit and header.length > limit:
            raise fail(f"R services announced {what} of {header.length} bytes, over the limit.")
        return header, await reader.readexactly(header.length)
    except asyncio.IncompleteReadError:
        raise fail(f"R services closed the connection before {what} was complete.") from None


Build = Callable[[bytes, int], list[bytes]]


@dataclass(slots=True)
class RCall:
    """What one call learnt about the R process that serves it, once R has greeted."""

    process: RProcess | None = None

    @property
    def pid(self) -> int | str:
        return self.process.pid if self.process is not None else "unknown"


async def call_r(
    socket_path: str,
    build: Build,
    connect_timeout: float,
    max_answer: int,
    call: RCall | None = None,
) -> tuple[Header, bytes]:
    """Connect to the OCAP Rserve, read its greeting, send the call `build(capability, msg_id)`
    returns, and read the answer (OOB_SEND messages R may send first are skipped). `call`
    is told which R process answers, as soon as it is known."""
    try:
        async with asyncio.timeout(connect_timeout or None):
            reader, writer = await asyncio.open_unix_connection(socket_path)
    except (OSError, TimeoutError) as exc:
        log.error("cannot connect to R services at %s: %s", socket_path, exc)
        raise fail("Cannot connect to R services.") from None
    try:
        try:
            head = Header.parse(await reader.readexactly(HEADER_SIZE))
        except asyncio.IncompleteReadError:
            raise fail("R services closed the connection before the greeting.") from None
        check_greeting_header(head)
        try:
            payload = await reader.readexactly(head.length)
        except asyncio.IncompleteReadError:
            raise fail("R services closed the connection in the greeting.") from None
        capability = parse_greeting(head, payload)
        sock = writer.get_extra_info("socket")
        if call is not None and sock is not None:
            # R has greeted: the process Rserve forked for this connection exists.
            call.process = RProcess.of(cast(socket.socket, sock))
        writer.writelines(build(capability, head.msg_id))
        await writer.drain()
        while True:
            header, payload = await _read_message(reader, max_answer, "the answer")
            if qap.is_oob_send(header.cmd):
                log.debug("R sent an OOB message during a .R request; ignored")
                continue
            if qap.is_oob(header.cmd):
                raise fail("R asked the client a question (OOB_MSG): a web page cannot answer.")
            return header, payload
    except (ConnectionError, OSError) as exc:
        raise fail(f"Lost the connection to R services ({exc}).") from None
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
    trusted: tuple[Network, ...]
    timeout: float = 0.0

    @classmethod
    def from_config(cls, config: Config, docroot: DocRoot) -> RScripts:
        return cls(
            docroot,
            config.rscript_socket,
            config.backend_timeout,
            config.max_body_size,
            config.max_message_size,
            parse_networks(config.trusted_proxies),
            config.rscript_timeout,
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
        script = "-"
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

        url = target.path.decode("utf-8", "replace")
        call = RCall()
        try:
            async with asyncio.timeout(self.timeout or None):
                header, payload = await call_r(
                    self.socket_path, build, self.connect_timeout, self.max_answer, call
                )
            answer = unpack_answer(header, payload)
        except TimeoutError:
            # call_r has closed R's connection on its way out; R itself may still be busy.
            pid = call.pid
            process, call.process = call.process, None  # its pidfd stays open for SIGKILL
            done = process.end() if process is not None else "its pid is unknown"
            log.warning(
                "%s %s: no answer from R (pid %s) within %g s; script %s; connection closed, %s",
                *(request.method, url, pid, self.timeout, script, done),
            )
            raise Refusal(
                504, f"R did not answer within {self.timeout:g} s (--rscript-timeout)."
            ) from None
        except Refusal as refusal:
            log.warning("%s %s: %s (R pid %s)", request.method, url, refusal.text, call.pid)
            raise
        finally:
            if call.process is not None:
                call.process.close()
        log.info(
            "%s %s: rendered by R pid %s, status %d", request.method, url, call.pid, answer.status
        )
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
