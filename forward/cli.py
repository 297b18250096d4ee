"""The `forward` command: argv -> Config -> logging -> run. The only place that exits.

Every flag comes from a `Config` field (see config.py). A bad command line, a port that cannot be
bound, or a file that cannot be loaded ends the process with one line on stderr and a non-zero
status before anything is served.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from . import __version__, configfile, service
from .app import Server
from .config import Config, ConfigError, kind, settings
from .dispatch import make_http_handler
from .logsetup import close_logging, setup_logging
from .workers import supervise

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
        what = kind(f)
        if what == "list":
            kw["action"] = "append"
        elif what == "flag":
            # None, not False, so that an absent flag leaves the Config default in place.
            kw.update(action="store_true", default=None)
            del kw["metavar"]
        elif what == "int":
            kw["type"] = int
        elif what == "float":
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
            check_files(config)  # in the parent, so that a bad -r fails once, not per worker
            return supervise(config)
        service.run(service.serve(config))
    except ConfigError as exc:
        print(f"forward: {exc}", file=sys.stderr)
        return 1
    finally:
        close_logging()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
