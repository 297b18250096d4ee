"""Living under a service manager: systemd's readiness protocol and the PID file.

`notify("READY=1")` sends one datagram to `$NOTIFY_SOCKET` (systemd's `Type=notify`; the
protocol is a single `sd_notify` datagram, so no library is needed). Without the variable it does
nothing; a failure is logged and never fatal: readiness is a courtesy, serving is the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1") to systemd; True if it was sent."""
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    # A leading "@" names a socket in the abstract namespace.
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            s.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", target, exc.strerror or exc)
        return False
    return True


class PidFile:
    """Writes this process's id to `path` (atomically) and removes it again if it is still ours."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.pid = 0

    def write(self) -> None:
        if not self.path:
            return
        self.pid = os.getpid()
        tmp = f"{self.path}.{self.pid}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{self.pid}\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if not self.path or self.pid != os.getpid():
            return  # a forked worker never removes its parent's file
        with contextlib.suppress(OSError), open(self.path, encoding="ascii") as f:
            if f.read().strip() != str(self.pid):
                return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
