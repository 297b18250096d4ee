"""Logging for a forward process: records to stderr, and the same records to `-u` as syslog.

One set-up for the single process, the `--workers` parent and each worker (a forked worker sets
it up again: the `-u` sending thread does not survive fork). Everything else only calls
`logging.getLogger(__name__)`.
"""

from __future__ import annotations

import logging
import sys

from . import ulog
from .config import Config


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
    """Send what `-u` still has queued (briefly), then stop its thread."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, ulog.ULogHandler):
            handler.flush()
            root.removeHandler(handler)
            handler.close()
