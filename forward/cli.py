"""The `forward` command: argv -> Config -> logging -> run. The only place that exits.

Every flag comes from a `Config` field (see config.py). A bad command line, a port that cannot be
bound, or a file that cannot be loaded ends the process with one line on stderr and a non-zero
status before anything is served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, configfile, daemon, tls, ulog
from .app import Server, unlink_unix
from .config import Config, ConfigError, settings
from .dispatch import make_http_handler
from .srvmgr import ServerManager
from .stats import Stats

log = logging.getLogger("forward")

USAGE = (
    "forward [-h] [-p <http-port>] [-w <ws-port>] [-s <QAP-socket>] [-R <Rscript-socket>] "
    "[-r <doc-root>]\n        [-k <TLS-key-path> [-c <TLS-cert-path>] [-C <TLS-CA-path>]] "
    "[-u <ulog-socket>] [-S <host>[:<port>]] [options]"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as the C program does, instead of argparse's usage block.
        self.exit(2, f"forward: {message} (see forward -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forward",
        usage=USAGE,
        description="HTTP(S)/WebSocket front end that relays browser sessions to Rserve.",
        allow_abbrev=False,
    )
    for f in settings():
        meta = f.metadata
        kw: dict[str, Any] = {"help": meta["help"], "dest": f.name, "metavar": meta["metavar"]}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("action") == "append":
            kw["action"] = "append"
        elif meta.get("action") == "store_true":
            # None, not False, so that an absent flag leaves the Config default in place.
            kw.update(action="store_true", default=None)
            del kw["metavar"]
        elif f.type in ("int", int):
            kw["type"] = int
        elif f.type in ("float", float):
            kw["type"] = float
        parser.add_argument(*meta["flags"], **kw)
    parser.add_argument(
        "--config",
        metavar="FILE",
        dest="config_file",
        help="read settings from this TOML file; the command line overrides it",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings (file and command line), say what is wrong, and exit",
    )
    parser.add_argument("--version", action="version", version=f"forward {__version__}")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    return _parse(argv)[0]


def _parse(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = configfile.load(ns.config_file) if ns.config_file else {}
    for f in dataclasses.fields(Config):
        value = getattr(ns, f.name)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return Config(**values).validate(), ns


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # -u: the same records, also as syslog lines (see ulog.py); never blocks the event loop.
    syslog = ulog.handler_for(config.ulog, str(Config().ulog))
    if syslog is not None:
        root.addHandler(syslog)


def close_logging() -> None:
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, ulog.ULogHandler):
            handler.flush()
            root.removeHandler(handler)
            handler.close()


async def serve(
    config: Config,
    ready: asyncio.Event | None = None,
    *,
    listeners: dict[str, list[socket.socket]] | None = None,
    stats: Stats | None = None,
    row: int = 0,
    manage: bool = True,
) -> None:
    """Run one forward process until SIGTERM/SIGINT. A --workers child passes the listeners and
    counters its parent made and `manage=False`: the parent does -S, the PID file and systemd."""
    # Key, certificate and CA are loaded before anything is bound; a failure ends the process.
    contexts = tls.Contexts(config) if config.tls else None
    server = Server(
        config,
        ssl_context=contexts,
        http_handler=make_http_handler(config),
        stats=stats or Stats(),
        row=row,
    )
    pid_file = daemon.PidFile(config.pid_file if manage else None)
    try:
        pid_file.write()
    except OSError as exc:
        raise ConfigError(f"cannot write --pid-file {config.pid_file}: {exc.strerror}") from None
    manager = ServerManager.from_config(config.server_manager) if manage else None
    try:
        await server.start(listeners)
    except BaseException:
        if manage:
            unlink_unix(config)
        pid_file.remove()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if contexts is not None:
        loop.add_signal_handler(signal.SIGHUP, contexts.reload)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "forward %s: relaying WebSocket sessions to %s (heartbeat %ss)",
        __version__,
        config.socket,
        config.heartbeat,
    )
    if manager is not None:
        manager.start_add()
    if manage:
        daemon.notify(f"READY=1\nMAINPID={os.getpid()}")
    if ready is not None:
        ready.set()
    deleted = False
    try:
        await stop.wait()
        log.info("shutting down")
        if manage:
            daemon.notify("STOPPING=1")
        if manager is not None:  # first, so that the manager stops sending sessions here
            await manager.delete()
            deleted = True
        await _drain(server, config.drain_timeout, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        try:
            await server.stop()
        finally:
            if manager is not None and not deleted:
                await manager.delete()
            if manage:
                unlink_unix(config)
            pid_file.remove()


async def _drain(server: Server, grace: float, stop: asyncio.Event) -> None:
    """Server.drain, cut short by a second SIGTERM/SIGINT."""
    stop.clear()
    drain = asyncio.ensure_future(server.drain(grace))
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait((drain, again), return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        log.info("second signal: closing open sessions now")
    for task in (drain, again):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported system
        return None
    return uvloop.new_event_loop


def raise_file_limit() -> None:
    """Use the hard open-file limit: every session holds two descriptors, and the usual soft
    limit of 1024 would cap a server at a few hundred sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def check_files(config: Config) -> None:
    """What start-up would load besides binding: the document root and the IP rules file."""
    make_http_handler(config)
    Server(config).guard()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, ns = _parse(argv)
    except ConfigError as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 2
    if ns.check_config:
        try:
            check_files(config)
        except ConfigError as exc:
            print(f"forward: {exc}", file=sys.stderr)
            return 2
        print(f"forward: configuration OK{f' ({ns.config_file})' if ns.config_file else ''}")
        return 0
    setup_logging(config)
    raise_file_limit()
    try:
        if config.workers > 1:
            from .workers import supervise

            check_files(config)  # in the parent, so that a bad -r fails once, not per worker
            return supervise(config)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(config))
    except ConfigError as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 1
    finally:
        close_logging()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
