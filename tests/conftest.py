"""Fixtures: real Rserve processes (classic QAP and OCAP, on unix sockets) and forward servers.

Nothing here fakes R. When Rserve is not installed the tests that need it are skipped on a
developer's machine and fail in CI (CI=true), where `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from forward.app import Server
from forward.config import Config

ROOT = Path(__file__).resolve().parent.parent  # the checkout: the CLI runs from here
RSERVE = Path("/usr/lib/R/site-library/Rserve/libs/Rserve")
C_FORWARD = RSERVE.parent / "forward"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

OCAP_INIT = """
library(Rserve)
parseEval <- function(s) {
  tryCatch(eval(parse(text=s), .GlobalEnv), error=function(e) e)
}
auth <- function(user, pass) {
  if (user == "mike" && pass == "mypwd") list(parseEval=ocap(parseEval))
  else "sorry, unauthorized!"
}
oc.init <- function() ocap(auth)
"""


def need_rserve() -> None:
    if RSERVE.exists() and shutil.which("R"):
        return
    if IN_CI:
        pytest.fail(f"Rserve is required in CI but {RSERVE} is missing (see .ci/run)")
    pytest.skip("Rserve is not installed (apt-get install r-cran-rserve)")


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Rserve has no readiness signal: poll until its socket accepts a connection."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Rserve exited with {proc.returncode} before listening")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(str(path))
                s.recv(4)
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise TimeoutError(f"Rserve did not listen on {path} within {timeout} s")


@dataclass
class Rserve:
    """A real Rserve on a unix socket, started with `daemon disable` so it can be stopped."""

    directory: Path
    ocap: bool = False
    extra: list[str] = field(default_factory=list)
    source: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.directory / ("oc.sock" if self.ocap else "qap.sock")

    def start(self) -> Rserve:
        need_rserve()
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"socket {self.socket}", "daemon disable"]
        if self.ocap:
            lines += ["qap.oc enable", "oob enable"]
        lines += self.extra
        conf = self.directory / ("oc.conf" if self.ocap else "qap.conf")
        conf.write_text("\n".join(lines) + "\n")
        cmd = ["R", "CMD", str(RSERVE), "--no-save", "--vanilla", "--RS-conf", str(conf)]
        source = self.source if self.source is not None else (OCAP_INIT if self.ocap else None)
        if source is not None:
            init = self.directory / "init.R"
            init.write_text(source)
            cmd += ["--RS-source", str(init)]
        with (self.directory / "rserve.log").open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for_socket(self.socket, self.proc)
        return self

    def children(self) -> list[int]:
        """PIDs of the per-session R processes Rserve forked."""
        assert self.proc is not None
        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            kids = (task / "children").read_text().split()
            out.extend(int(k) for k in kids)
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


@pytest.fixture(scope="session")
def rserve_qap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rserve]:
    r = Rserve(tmp_path_factory.mktemp("rserve-qap")).start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def rserve_ocap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rserve]:
    r = Rserve(tmp_path_factory.mktemp("rserve-ocap"), ocap=True).start()
    yield r
    r.stop()


@pytest.fixture
def fresh_rserve(tmp_path: Path) -> Iterator[Callable[..., Rserve]]:
    """A private Rserve for tests that kill or stop it."""
    started: list[Rserve] = []

    def make(**kw: Any) -> Rserve:
        r = Rserve(tmp_path / f"rserve{len(started)}", **kw).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def free_port() -> int:
    """A port for tests that start the CLI, which takes a number (0 would disable -p). It is
    free now; nothing else on the machine is expected to race for it."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def bound(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_server((host, 0))
    return sock


@dataclass
class Running:
    server: Server
    scheme: str = "ws"

    def url(self, listener: str = "http", path: str = "/") -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.port(listener)}{path}"

    def http_url(self, path: str = "/") -> str:
        scheme = "https" if self.scheme == "wss" else "http"
        return f"{scheme}://127.0.0.1:{self.server.port('http')}{path}"


StartForward = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_forward() -> AsyncIterator[StartForward]:
    """Start an in-process forward on 127.0.0.1, ports chosen by the system (both -p and -w)."""
    servers: list[Server] = []

    async def start(socket_path: Path | str, **overrides: Any) -> Running:
        ssl_context = overrides.pop("ssl_context", None)
        http_handler = overrides.pop("http_handler", None)
        config = replace(Config(), socket=str(socket_path), http_port=1, ws_port=2, **overrides)
        kw: dict[str, Any] = {"ssl_context": ssl_context}
        if http_handler is not None:
            kw["http_handler"] = http_handler
        server = Server(config.validate(), **kw)
        listeners = {}
        if config.http_port > 0:
            listeners["http"] = [bound()]
        if config.ws_port > 0:
            listeners["ws"] = [bound()]
        if config.redirect_port > 0:
            listeners["redirect"] = [bound()]
        await server.start(listeners)
        servers.append(server)
        return Running(server, "wss" if ssl_context else "ws")

    yield start
    for server in servers:
        await server.stop()


@dataclass
class PKI:
    """Certificates from trustme written to files: a CA, a server certificate for 127.0.0.1 and
    localhost, client certificates by common name, and a second CA that forward does not trust."""

    directory: Path
    ca: trustme.CA
    other_ca: trustme.CA
    server: trustme.LeafCert

    @property
    def key(self) -> Path:
        return self.directory / "server.key"

    @property
    def cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def client_context(
        self, cn: str | None = None, *, issuer: trustme.CA | None = None
    ) -> ssl.SSLContext:
        """A client context trusting the CA, presenting a certificate with common name `cn`
        (issued by `issuer`, the CA by default) if one is given."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if cn is not None:
            leaf = (issuer or self.ca).issue_cert("client.test", common_name=cn)
            leaf.configure_cert(ctx)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost", common_name="forward.test")
    pki = PKI(directory, ca, other, server)
    server.private_key_pem.write_to_path(str(pki.key))
    server.cert_chain_pems[0].write_to_path(str(pki.cert))
    ca.cert_pem.write_to_path(str(pki.ca_file))
    return pki


@dataclass
class ForwardProcess:
    """forward started as users start it (`python -m forward ...`), with its stderr kept."""

    proc: asyncio.subprocess.Process
    ports: dict[str, int]  # flag ("-p", "-w", ...) -> the port it was given
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def url(self, scheme: str, flag: str = "-p", path: str = "/") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[flag]}{path}"


StartCli = Callable[..., Awaitable[ForwardProcess]]


async def _copy_lines(
    stream: asyncio.StreamReader, path: Path, listening: list[str], ready: asyncio.Event, need: int
) -> None:
    """forward's stderr into `path`; `ready` once `need` listeners are up, or at its exit."""
    with path.open("ab") as out:
        while line := await stream.readline():
            out.write(line)
            out.flush()
            if b"listening on" in line:
                listening.append(line.decode(errors="replace"))
                if len(listening) >= need:
                    ready.set()
    ready.set()


@pytest.fixture
async def forward_cli(tmp_path: Path) -> AsyncIterator[StartCli]:
    """Start forward's command line on 127.0.0.1 with free ports for the given flags; ready
    once it has logged one "listening on" line per listener. Stopped (SIGTERM) at the end."""
    started: list[tuple[asyncio.subprocess.Process, asyncio.Task[None]]] = []

    async def start(*args: str, ports: tuple[str, ...] = ("-p",)) -> ForwardProcess:
        for _attempt in range(3):
            chosen = {flag: free_port() for flag in ports}
            given = [word for flag, port in chosen.items() for word in (flag, str(port))]
            log_path = tmp_path / f"forward-{len(started)}.log"
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "forward", "-b", "127.0.0.1"],
                *["-u", str(tmp_path / "no-ulog"), *given, *args],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            assert proc.stderr is not None
            listening: list[str] = []
            ready = asyncio.Event()
            copier = asyncio.create_task(
                _copy_lines(proc.stderr, log_path, listening, ready, len(ports))
            )
            started.append((proc, copier))
            async with asyncio.timeout(30):
                await ready.wait()
            if len(listening) >= len(ports):
                return ForwardProcess(proc, chosen, log_path)
            await proc.wait()
            text = log_path.read_text(errors="replace")
            if "cannot listen" not in text:
                raise RuntimeError(f"forward exited with {proc.returncode}: {text}")
        raise RuntimeError("no free port for forward after 3 attempts")

    yield start
    for proc, copier in started:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await copier
