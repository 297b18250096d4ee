"""The `forward` command: argv -> Config -> logging -> run. The only place that exits.

Every flag comes from a `Config` field (see config.py). A bad command line, a port that cannot be
bound, or a file that cannot be loaded ends the process with one line on stderr and a non-zero
status before anything is served.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, tls
from .app import Server
from .config import Config, ConfigError, settings
from .dispatch import make_http_handler

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
    parser.add_argument("--version", action="version", version=f"forward {__version__}")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        value = getattr(ns, f.name)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return Config(**values).validate()


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    # Key, certificate and CA are loaded before anything is bound; a failure ends the process.
    contexts = tls.Contexts(config) if config.tls else None
    server = Server(
        config,
        ssl_context=contexts.get if contexts else None,
        http_handler=make_http_handler(config),
    )
    await server.start()
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
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop()


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported system
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except ConfigError as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(config))
    except ConfigError as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
