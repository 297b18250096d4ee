"""`--workers N`: N forward processes on the same ports, supervised by a parent.

The parent binds everything before forking: each TCP listener once per worker with SO_REUSEPORT,
so that the kernel spreads new connections over the workers (a shared accept queue would let the
busiest loop win), and the unix socket and the admin port once, shared by all. The parent keeps
every socket open, so a worker that dies loses no queued connection: its replacement inherits the
same sockets, and the counters in the shared `Stats` survive it (only its open-session gauge is
cleared). Restarts of a worker that keeps dying at once are spaced out, up to 30 s.

The parent also does what must happen once per service (`service.Lifecycle`: the PID file, `-S`
ADD/DEL, systemd notification, the unix socket file). SIGTERM/SIGINT are passed to the workers
(each drains as a single forward does), SIGHUP too (TLS reload happens in each worker).
Processes are made with fork: the workers need the parent's sockets and shared memory, and the
parent has no event loop of uvloop's to inherit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

from . import service, succession
from .config import Config
from .listeners import bind_listeners
from .logsetup import close_logging, setup_logging
from .resumable import ResumableSession
from .stats import Stat, Stats

log = logging.getLogger(__name__)

Listeners = dict[str, list[socket.socket]]

QUICK_DEATH = 2.0  # a worker that dies sooner than this after its start is restarted later
RESTART_MAX = 30.0
KILL_GRACE = 5.0  # after the workers' own shutdown timeout, before SIGKILL


def bind_rows(config: Config, n: int) -> list[Listeners]:
    rows: list[Listeners] = []
    try:
        rows.append(bind_listeners(config, reuse_port=True))
        for _ in range(n - 1):
            rows.append(bind_listeners(config, reuse_port=True, tcp_only=True))
    except BaseException:
        _close(rows)
        raise
    return share(rows)


def share(rows: list[Listeners]) -> list[Listeners]:
    """Give every row the sockets all workers share, which are bound once, in row 0: the unix
    socket, the admin port and the redirect port."""
    shared = {k: v for k, v in rows[0].items() if k not in ("http", "ws")}
    unix_http = [s for s in rows[0].get("http", []) if s.family == socket.AF_UNIX]
    for row in rows[1:]:
        for name, socks in shared.items():
            row[name] = list(socks)
        if unix_http:
            row.setdefault("http", []).extend(unix_http)
    return rows


def _close(rows: list[Listeners]) -> None:
    seen: set[int] = set()
    for row in rows:
        for socks in row.values():
            for sock in socks:
                if id(sock) not in seen:
                    seen.add(id(sock))
                    sock.close()


def supervise(config: Config) -> int:
    """Run the parent until SIGTERM/SIGINT; returns the exit status."""
    return asyncio.run(_supervise(config))


async def _supervise(config: Config) -> int:
    # The PID file is written before anything is bound, as a single forward does.
    async with service.Lifecycle(config) as lifecycle:
        takeover = None
        if config.takeover:
            channel, pid, rows = await succession.receive_listeners(config)
            rows = share(rows)
            lifecycle.took_over()
            takeover = (channel, pid)
        else:
            rows = bind_rows(config, config.workers)
        try:
            supervisor = Supervisor(config, rows, Stats(config.workers))
            return await supervisor.run(lifecycle, takeover)
        finally:
            _close(rows)


class Supervisor:
    def __init__(self, config: Config, rows: list[Listeners], stats: Stats) -> None:
        self.config = config
        self.rows = rows
        self.stats = stats
        self.pids: dict[int, int] = {}  # pid -> row
        self.started: dict[int, float] = {}  # row -> monotonic start time
        self.delay: dict[int, float] = {}  # row -> next restart delay
        self.ready_rows: set[int] = set()
        self.ready_r, self.ready_w = os.pipe()
        # Only the parent keeps the write end: when it dies, however it dies, the workers read
        # EOF and shut down instead of serving on unsupervised.
        self.life_r, self.life_w = os.pipe()
        self.stopping = False
        self.failed = False
        self.handed = False  # a successor serves on our sockets: the workers stop at once

    # -- as the holder of the listeners in a hand-over (succession.Holder) --------------------

    def listening(self) -> list[tuple[int, str, socket.socket]]:
        seen: set[int] = set()
        out = []
        for row, listeners in enumerate(self.rows):
            for name, socks in listeners.items():
                for sock in socks:
                    if id(sock) not in seen:  # a shared socket once, in row 0
                        seen.add(id(sock))
                        out.append((row, name, sock))
        return out

    async def stop_accepting(self) -> None:
        """The successor accepts on the same sockets: the workers stop (SIGUSR1); their
        sessions go on until the hand-over is done, then end as at SIGTERM."""
        self._signal_all(signal.SIGUSR1)

    async def accept_again(self, rows: list[Listeners]) -> None:
        # The workers stopped accepting: new ones take over on the sockets the parent holds.
        for listeners in rows:
            for socks in listeners.values():
                for sock in socks:
                    sock.close()
        log.error("restarting the workers on the sockets: the successor failed half-way")
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def resumable(self) -> list[ResumableSession]:
        return []

    def others(self) -> int:
        return sum(self.stats.per_row(Stat.SESSIONS_OPEN))

    def _handed(self) -> None:
        self.handed = True
        self._stop.set()

    # -- the parent's life --------------------------------------------------------------------

    async def run(
        self,
        lifecycle: service.Lifecycle,
        takeover: tuple[succession.Channel, int] | None = None,
    ) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._none_left = asyncio.Event()
        predecessor: succession.Predecessor | None = None
        loop.add_reader(self.ready_r, self._on_ready)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        try:
            for row in range(len(self.rows)):
                self._spawn(row)
            ready = asyncio.ensure_future(self._all_ready.wait())
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait((ready, stop), return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if not self._stop.is_set():
                log.info(
                    "%d workers serving (pids %s)",
                    len(self.pids),
                    " ".join(str(p) for p in sorted(self.pids)),
                )
                if takeover is not None:
                    channel, pid = takeover
                    await succession.serve_on(channel, _nothing())
                    await succession.take_sessions(channel, None, pid, lifecycle.ready)
                else:
                    lifecycle.ready()
            if self.config.handover_socket and not self._stop.is_set():
                predecessor = succession.Predecessor(self, self.config.handover_socket)
                predecessor.start()
                predecessor.handed_callbacks.append(self._handed)
                loop.add_signal_handler(signal.SIGUSR2, predecessor.start_successor)
            await stop
            if self.handed and predecessor is not None:
                lifecycle.handed_over()
                log.info("handed over to process %d: stopping the workers", predecessor.successor)
            else:
                log.info("shutting down %d workers", len(self.pids))
                await lifecycle.stopping()
        finally:
            self.stopping = True
            await self._stop_workers()
            if predecessor is not None:
                predecessor.close(unlink=not self.handed)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            loop.remove_signal_handler(signal.SIGUSR2)
            loop.remove_reader(self.ready_r)
            for fd in (self.ready_r, self.ready_w, self.life_r, self.life_w):
                os.close(fd)
        return 1 if self.failed else 0

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self, row: int) -> None:
        if self.stopping:
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the workers tests
            code = 1
            try:
                code = self._child(row)
            finally:
                os._exit(code)
        self.pids[pid] = row
        self.started[row] = time.monotonic()
        log.info("worker %d started (pid %d)", row, pid)

    def _child(self, row: int) -> int:  # pragma: no cover - runs in the child
        # The parent's loop installed its own handlers and wakeup fd: put the defaults back
        # before the worker's loop installs its own. SIGHUP is ignored unless the worker
        # installs a handler (TLS reload), so that a reload never kills a worker.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.close(self.ready_r)
        os.close(self.life_w)
        mine = self.rows[row]
        keep = {id(s) for socks in mine.values() for s in socks}
        for other in self.rows:
            for socks in other.values():
                for sock in socks:
                    if id(sock) not in keep:
                        sock.close()
        setup_logging(self.config)  # a fresh ulog thread: threads do not survive fork
        log.info("worker %d serving", row)

        async def run() -> None:
            ready = asyncio.Event()
            task = asyncio.ensure_future(
                service.serve(
                    self.config, ready, listeners=mine, stats=self.stats, row=row, manage=False
                )
            )
            waiter = asyncio.ensure_future(ready.wait())
            await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if ready.is_set():
                os.write(self.ready_w, bytes([row % 256]))
                asyncio.get_running_loop().add_reader(self.life_r, orphaned)
            await task

        def orphaned() -> None:
            asyncio.get_running_loop().remove_reader(self.life_r)
            log.warning("worker %d: the parent has gone; shutting down", row)
            os.kill(os.getpid(), signal.SIGTERM)

        try:
            service.run(run())
        except Exception:
            log.exception("worker %d failed", row)
            return 1
        finally:
            close_logging()
        return 0

    def _on_ready(self) -> None:
        for b in os.read(self.ready_r, 256):
            self.ready_rows.add(b)
            self.delay.pop(b, None)
        if len(self.ready_rows) >= len(self.rows):
            self._all_ready.set()

    def _reap(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            row = self.pids.pop(pid, None)
            if row is None:
                continue
            self.stats.slot(row).reset_gauges()
            code = os.waitstatus_to_exitcode(status)
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if self.stopping:
                log.info("worker %d (pid %d) exited with %s", row, pid, how)
                continue
            if not self._all_ready.is_set() and row not in self.ready_rows:
                # A worker that cannot even start (a file it needs, a bad setting) would only
                # fail again: give up, as a single forward would.
                log.error(
                    "worker %d (pid %d) exited with %s before serving; stopping", row, pid, how
                )
                self.failed = True
                self._stop.set()
                continue
            lived = time.monotonic() - self.started.get(row, 0.0)
            delay = 0.0
            if lived < QUICK_DEATH:
                delay = self.delay.get(row, 0.5)
                self.delay[row] = min(delay * 2, RESTART_MAX)
            log.warning(
                "worker %d (pid %d) died with %s after %.1f s; restarting it%s",
                row,
                pid,
                how,
                lived,
                f" in {delay:g} s" if delay else "",
            )
            loop.call_later(delay, self._spawn, row)
        if not self.pids:
            self._none_left.set()

    def _signal_all(self, sig: int) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def _stop_workers(self) -> None:
        if not self.pids:
            return
        self._none_left.clear()
        self._signal_all(signal.SIGTERM)
        # A worker's own stop: the drain, the sessions' close handshakes, then its listeners'
        # requests in progress (together), each bounded by the shutdown timeout.
        limit = self.config.drain_timeout + 2 * self.config.shutdown_timeout + KILL_GRACE
        try:
            async with asyncio.timeout(limit):
                await self._none_left.wait()
        except TimeoutError:
            log.warning("workers still running after %g s: killing them", limit)
            self._signal_all(signal.SIGKILL)
            async with asyncio.timeout(KILL_GRACE):
                await self._none_left.wait()


async def _nothing() -> None:
    """The workers serve already when the successor says it is ready."""
