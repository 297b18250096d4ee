"""The listening sockets: the configured ports bound, with one clear error for each failure.

Binding happens before anything is served, so that a port in use or a bad address ends start-up
with one line naming the flag. `--workers` binds the TCP ports once per worker with SO_REUSEPORT;
the unix socket (`--listen-unix`) replaces a stale socket file, never a regular file, and is
removed again at exit (service.Lifecycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

from .config import Config, ConfigError
from .ulog import host_port


def bind_listeners(
    config: Config, *, reuse_port: bool = False, tcp_only: bool = False
) -> dict[str, list[socket.socket]]:
    """Bind the configured ports; each failure becomes one clear ConfigError. --workers binds
    the TCP ports once per worker with SO_REUSEPORT (`tcp_only` for all but the first), so that
    the kernel spreads connections over the workers."""
    plan = [
        ("http", "-p", config.http_port),
        ("ws", "-w", config.ws_port),
        ("redirect", "--redirect-port", config.redirect_port),
    ]
    out: dict[str, list[socket.socket]] = {}
    try:
        for name, flag, port in plan:
            if port <= 0:
                continue
            for host in config.hosts or (None,):
                try:
                    out.setdefault(name, []).append(_bind(host, port, reuse_port))
                except OSError as exc:
                    where = host_port(host or "*", port)
                    why = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise ConfigError(f"cannot listen on {where} ({flag}): {why}") from exc
        if config.listen_unix and not tcp_only:
            try:
                out.setdefault("http", []).append(bind_unix(config.listen_unix))
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {config.listen_unix} (--listen-unix): {exc.strerror or exc}"
                ) from exc
        if config.admin_port > 0 and not tcp_only:
            try:
                out["admin"] = [_bind(config.admin_bind, config.admin_port)]
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host_port(config.admin_bind, config.admin_port)} "
                    f"(--admin-port): "
                    f"{exc.strerror or exc}"
                ) from exc
    except BaseException:
        for socks in out.values():
            for sock in socks:
                sock.close()
        raise
    return out


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at `path`, replacing a stale socket file (never a regular file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Group-writable: nginx or a sidecar in the socket's group connects; others do not.
        os.chmod(path, 0o660)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def unlink_unix(config: Config) -> None:
    if config.listen_unix:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.stat(config.listen_unix).st_mode):
                os.unlink(config.listen_unix)


def _bind(host: str | None, port: int, reuse_port: bool = False) -> socket.socket:
    if host is None:
        # All interfaces, IPv6 and IPv4 on one socket where the system has IPv6.
        if socket.has_dualstack_ipv6():
            return socket.create_server(
                ("", port),
                family=socket.AF_INET6,
                dualstack_ipv6=True,
                backlog=1024,
                reuse_port=reuse_port,
            )
        return socket.create_server(("", port), backlog=1024, reuse_port=reuse_port)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    return socket.create_server(addr[:2], family=family, backlog=1024, reuse_port=reuse_port)


def show_address(addr: object) -> str:
    """A bound address as aiohttp reports it: (host, port, ...) for TCP, a path for unix."""
    if isinstance(addr, tuple):
        return host_port(str(addr[0]), addr[1])
    return str(addr)


async def wait_ready(sock: socket.socket, write: bool = False) -> None:
    """Wait until a non-blocking socket outside any transport is readable (or writable): the
    PROXY header's bytes, the hand-over's records."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = sock.fileno()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
    )
    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)
