"""`-S host[:port]`: tell a server manager that this forward is up (`ADD`) or going (`DEL`).

The protocol is the C forward's: open TCP to the manager, send the three bytes, close. A manager
that is down must never hold up or stop forward: each attempt has a short connect timeout (the C
program's 200 ms), `ADD` is retried in the background with a growing delay until it gets through,
and `DEL` at shutdown gets a few quick attempts within a small, fixed budget. Every outcome is
logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from .ulog import host_port, split_host_port

log = logging.getLogger(__name__)

DEFAULT_PORT = 40
CONNECT_TIMEOUT = 0.2
RETRY_MIN, RETRY_MAX = 0.2, 30.0
# DEL must not delay shutdown by more than about this long.
DEL_BUDGET = 2.0


class ServerManagerError(ValueError):
    """A -S value that cannot be understood."""


def parse(text: str) -> tuple[str, int]:
    """`host[:port]` (or `[v6]:port`) -> (host, port), port 40 by default."""
    try:
        host, port = split_host_port(text, DEFAULT_PORT)
    except ValueError:
        raise ServerManagerError(
            f"-S {text}: the port must be a number between 1 and 65535"
        ) from None
    if not host:
        raise ServerManagerError(f"-S {text}: no host name")
    return host, port


async def send(host: str, port: int, what: str, limit: float = CONNECT_TIMEOUT) -> None:
    """One attempt; raises OSError/TimeoutError when the manager cannot be reached."""
    async with asyncio.timeout(limit):
        _, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(what.encode())
        async with asyncio.timeout(limit):
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(limit):
                await writer.wait_closed()


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return f"no connection within {CONNECT_TIMEOUT * 1000:.0f} ms"
    return str(exc) or type(exc).__name__


@dataclass
class ServerManager:
    host: str
    port: int
    _adder: asyncio.Task[None] | None = field(default=None, init=False)
    added: bool = field(default=False, init=False)

    @classmethod
    def from_config(cls, value: str | None) -> ServerManager | None:
        return None if not value else cls(*parse(value))

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)

    def start_add(self) -> None:
        """Send ADD in the background, retrying with backoff until it gets through."""
        self._adder = asyncio.get_running_loop().create_task(self._add())

    async def _add(self) -> None:
        delay = RETRY_MIN
        attempt = 0
        while True:
            attempt += 1
            try:
                await send(self.host, self.port, "ADD")
            except (OSError, TimeoutError) as exc:
                if attempt == 1:
                    log.warning(
                        "server manager %s: cannot send ADD (%s); retrying in the background",
                        self.where,
                        _why(exc),
                    )
                else:
                    log.debug(
                        "server manager %s: ADD attempt %d failed: %s",
                        self.where,
                        attempt,
                        _why(exc),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self.added = True
            log.info(
                "server manager %s: sent ADD%s",
                self.where,
                f" (attempt {attempt})" if attempt > 1 else "",
            )
            return

    async def delete(self) -> None:
        """Send DEL: a few quick attempts within DEL_BUDGET seconds, then give up (logged)."""
        if self._adder is not None and not self._adder.done():
            self._adder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adder
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEL_BUDGET
        delay = RETRY_MIN
        why = ""
        while True:
            try:
                await send(self.host, self.port, "DEL")
            except (OSError, TimeoutError) as exc:
                why = _why(exc)
                if loop.time() + delay + CONNECT_TIMEOUT > deadline:
                    break
                await asyncio.sleep(delay)
                delay *= 2
                continue
            log.info("server manager %s: sent DEL", self.where)
            return
        log.warning("server manager %s: cannot send DEL (%s); giving up", self.where, why)
