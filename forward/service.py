"""The life of a forward service, written once: start, ready, stop, and what the system is told.

The process that stands for forward (a single forward, or the parent of `--workers`) owns a few
duties towards the system around it, and `Lifecycle` is all of them, as an async context
manager: the PID file is written on entry (a failure is a `ConfigError`, so the user gets one
line); `ready()` sends `-S` ADD and systemd READY; `stopping()` sends systemd STOPPING and then
DEL, first thing, so that the manager stops sending sessions here before the drain; on exit, DEL
if it is still owed, the `--listen-unix` socket file and the PID file are removed. A worker does
none of this: its parent does it once for all of them.

`serve` runs one process's listeners until SIGTERM/SIGINT (a second signal cuts the drain
short; SIGHUP reloads TLS), and `run` is the event loop every forward process uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from . import __version__, daemon, succession, tls
from .app import Server
from .config import Config, ConfigError
from .dispatch import make_http_handler
from .listeners import unlink_unix
from .srvmgr import ServerManager
from .stats import Stats

log = logging.getLogger("forward")

T = TypeVar("T")
Listeners = dict[str, list[socket.socket]]


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop, or None (asyncio's) where uvloop is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported system
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on a new event loop of `loop_factory()`."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


class Lifecycle:
    """The service's duties towards the system: PID file, `-S`, systemd, the unix socket file."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._pid_file = daemon.PidFile(config.pid_file)
        self._manager = ServerManager.from_config(config.server_manager)
        self._del_owed = False  # ADD was started: the manager must hear DEL
        # The listeners (the unix socket file among them) and the service's registrations are
        # this process's to remove at exit. A forward taking over gets them from its
        # predecessor only once that succeeded; one that handed over has given them away.
        self.owner = not config.takeover

    async def __aenter__(self) -> Lifecycle:
        if self.owner:
            self._write_pid_file()
        return self

    def _write_pid_file(self) -> None:
        try:
            self._pid_file.write()
        except OSError as exc:
            raise ConfigError(
                f"cannot write --pid-file {self.config.pid_file}: {exc.strerror or exc}"
            ) from None

    def took_over(self) -> None:
        """The predecessor's listeners are ours now: our PID file, our socket file to remove."""
        self.owner = True
        self._write_pid_file()

    def handed_over(self) -> None:
        """A successor holds the listeners and registrations now: leave them be at exit."""
        self.owner = False
        self._del_owed = False

    def ready(self) -> None:
        """Serving: ADD to the server manager (retried in the background), READY to systemd
        (with this process as the service's main one: after a hand-over, that changes)."""
        if self._manager is not None:
            self._manager.start_add()
            self._del_owed = True
        daemon.notify(f"READY=1\nMAINPID={os.getpid()}")

    async def stopping(self) -> None:
        """Going: STOPPING to systemd, then DEL, before any session is drained or closed."""
        daemon.notify("STOPPING=1")
        await self._delete()

    async def _delete(self) -> None:
        if self._manager is not None and self._del_owed:
            self._del_owed = False
            await self._manager.delete()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._delete()
        finally:
            if self.owner:
                unlink_unix(self.config)
            self._pid_file.remove()


async def serve(
    config: Config,
    ready: asyncio.Event | None = None,
    *,
    listeners: Listeners | None = None,
    stats: Stats | None = None,
    row: int = 0,
    manage: bool = True,
) -> None:
    """Run one forward process until SIGTERM/SIGINT. A --workers child passes the listeners and
    counters its parent made and `manage=False`: the parent holds the `Lifecycle`."""
    # Key, certificate and CA are loaded before anything is bound; a failure ends the process.
    contexts = tls.Contexts(config) if config.tls else None
    server = Server(
        config,
        ssl_context=contexts,
        http_handler=make_http_handler(config),
        stats=stats or Stats(),
        row=row,
    )
    if not manage:
        await _serve(server, contexts, ready, listeners, None)
        return
    async with Lifecycle(config) as lifecycle:
        await _serve(server, contexts, ready, listeners, lifecycle)


async def _serve(
    server: Server,
    contexts: tls.Contexts | None,
    ready: asyncio.Event | None,
    listeners: Listeners | None,
    lifecycle: Lifecycle | None,
) -> None:
    config = server.config
    announced = False

    def announce() -> None:
        nonlocal announced
        if lifecycle is not None and not announced:
            announced = True
            lifecycle.ready()

    if config.takeover and lifecycle is not None:  # a --workers child has its parent's sockets
        channel, predecessor_pid = await succession.take_over(config, server)
        if lifecycle is not None:
            lifecycle.took_over()
        # The sessions arrive while this process serves already; systemd hears of the new
        # main process before the predecessor is told it may exit.
        await succession.take_sessions(channel, server, predecessor_pid, announce)
    else:
        await server.start(listeners)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if contexts is not None:
        loop.add_signal_handler(signal.SIGHUP, contexts.reload)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if lifecycle is None:
        # A --workers child: SIGUSR1 says a new forward serves on these sockets (a hand-over):
        # stop accepting; SIGTERM follows, for the drain and the sessions' end.
        stopping: list[asyncio.Future[None]] = []

        def stop_accepting() -> None:
            log.info("a new forward serves on these sockets: no longer accepting")
            stopping.append(asyncio.ensure_future(server.stop_accepting()))

        loop.add_signal_handler(signal.SIGUSR1, stop_accepting)
    predecessor = None
    if config.handover_socket and lifecycle is not None:
        predecessor = succession.Predecessor(
            succession.ServerHolder(server), config.handover_socket
        )
        predecessor.start()
        predecessor.handed_callbacks.append(stop.set)
        loop.add_signal_handler(signal.SIGUSR2, predecessor.start_successor)
    log.info(
        "forward %s: relaying WebSocket sessions to %s (heartbeat %ss)",
        __version__,
        config.socket,
        config.heartbeat,
    )
    if config.workers > 1 and config.resume_grace > 0:
        log.warning(
            "session resume is off with --workers %d: a resume could reach another worker than "
            "its session's (docs/resume.md)",
            config.workers,
        )
    announce()
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        if predecessor is not None and predecessor.handed.is_set():
            # The successor serves; what is left here are sessions that did not ask for
            # resume: they get the shutdown notice and 1001 in stop().
            if lifecycle is not None:
                lifecycle.handed_over()
            log.info("handed over to process %d: exiting", predecessor.successor)
            if config.drain_timeout > 0 and server.sessions:
                await _drain(server, config.drain_timeout, stop)
        else:
            log.info("shutting down")
            if lifecycle is not None:
                await lifecycle.stopping()
            await _drain(server, config.drain_timeout, stop, predecessor)
            if predecessor is not None and predecessor.handed.is_set() and lifecycle is not None:
                lifecycle.handed_over()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            loop.remove_signal_handler(sig)
        if predecessor is not None:
            predecessor.close(unlink=not predecessor.handed.is_set())
        await server.stop()


async def _drain(
    server: Server,
    grace: float,
    stop: asyncio.Event,
    predecessor: succession.Predecessor | None = None,
) -> None:
    """Server.drain, cut short by a second SIGTERM/SIGINT, or by a successor that took the
    sessions over (a hand-over may end a drain)."""
    stop.clear()
    drain = asyncio.ensure_future(server.drain(grace))
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait((drain, again), return_when=asyncio.FIRST_COMPLETED)
    if not drain.done() and not (predecessor is not None and predecessor.handed.is_set()):
        log.info("second signal: closing open sessions now")
    for task in (drain, again):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
