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

from .cutproxy import CutProxy
from .resume_client import ResumeClient

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
        if config.admin_port > 0:
            listeners["admin"] = [bound()]
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


FORWARD = (sys.executable, "-m", "forward")  # the command line users run


def run_forward(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`forward ARGS` run to its end, for what happens before it serves (help, one-line errors,
    start-up failures): its exit status and output."""
    return subprocess.run(
        [*FORWARD, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


RunMain = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def forward_main(capsys: pytest.CaptureFixture[str]) -> RunMain:
    """As `run_forward`, but `forward.cli.main` in this process, without a Python start-up each
    (half a second): only for what ends before serving (help, a bad command line or
    configuration, --check-config). Exit status and output are what the command gives."""
    from forward.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse: -h and bad flags
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["forward", *args], status, out, err)

    return run


async def eventually(
    condition: Callable[[], object], within: float = 10, what: str | None = None
) -> None:
    """Wait for `condition()` to be true, for state that has no event to await (a counter, a
    flag of a transport, a process table): checked at once, then after 5 ms, doubling to 100 ms.
    Fails with `what` (or the condition's name) once `within` seconds have passed."""
    deadline = asyncio.get_running_loop().time() + within
    delay = 0.005
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within} s: {what or condition.__name__}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


class ForwardExited(AssertionError):
    """forward ended, or stayed silent, before logging what a test waited for."""


@dataclass
class ForwardProcess:
    """forward started as users start it (`python -m forward ...`), its stderr copied to a file
    and read as it comes: `expect()` waits for a line, `log()` is everything so far."""

    proc: asyncio.subprocess.Process
    ports: dict[str, int]  # flag ("-p", "-w", "--admin-port", ...) -> the port it was given
    log_path: Path
    _lines: list[str] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _ended: bool = False
    _cursor: int = 0
    _copier: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "".join(self._lines)

    def url(self, scheme: str = "ws", flag: str = "-p", path: str = "/") -> str:
        return f"{scheme}://127.0.0.1:{self.ports[flag]}{path}"

    async def expect(self, text: str, within: float = 30) -> str:
        """The next line, after the one the previous `expect` found, that contains `text`."""
        try:
            async with asyncio.timeout(within), self._changed:
                while True:
                    for i in range(self._cursor, len(self._lines)):
                        if text in self._lines[i]:
                            self._cursor = i + 1
                            return self._lines[i]
                    if self._ended:
                        break
                    await self._changed.wait()
        except TimeoutError:
            raise ForwardExited(
                f"forward did not log {text!r} within {within} s:\n{self.log()}"
            ) from None
        raise ForwardExited(
            f"forward exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()}"
        )

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, within: float = 30) -> int:
        """forward's exit status, once it has ended and its stderr is all read."""
        async with asyncio.timeout(within):
            status = await self.proc.wait()
            if self._copier is not None:
                await self._copier
        return status

    async def stop(self, sig: int = signal.SIGTERM, within: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.wait(within)

    async def _copy(self, stream: asyncio.StreamReader) -> None:
        with self.log_path.open("ab") as out:
            while line := await stream.readline():
                out.write(line)
                out.flush()
                async with self._changed:
                    self._lines.append(line.decode(errors="replace"))
                    self._changed.notify_all()
        await self.proc.wait()
        async with self._changed:
            self._ended = True
            self._changed.notify_all()


StartCli = Callable[..., Awaitable[ForwardProcess]]


def default_sigint(then: Callable[[], object] | None = None) -> Callable[[], None]:
    """A `preexec_fn` that puts SIGINT back to its default in the child (then calls `then`). A
    shell starts a background job (`pytest ... &`) with SIGINT ignored, every child inherits
    that, and a shell script cannot trap a signal that was ignored when it started."""

    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()

    return preexec


@pytest.fixture
async def forward_cli(tmp_path: Path) -> AsyncIterator[StartCli]:
    """Start forward's command line; returns a `ForwardProcess` once it is ready.

    `forward_cli(*args, ports=("-p",), ready=None, bind="127.0.0.1", env=None, command=FORWARD,
    preexec_fn=None)`: forward gets `-b BIND` (unless bind is None), `-u` to a socket that does
    not exist (unless args name one), a free port for each flag in `ports`, then `args`.
    `command` replaces `python -m forward` (a script that ends by exec'ing it); `env` is added to
    the environment. Ready means: one "listening on" line per listener it opens (`ready` an
    int; by default one per flag in `ports`, at least one), or a line containing `ready` (a
    str); `ready=0` returns at once, for a test that waits its own way. A port taken meanwhile
    ("cannot listen") is retried with others. Each is stopped (SIGTERM) at the end of the test.
    """
    started: list[ForwardProcess] = []

    async def start(
        *args: str,
        ports: tuple[str, ...] = ("-p",),
        ready: int | str | None = None,
        bind: str | None = "127.0.0.1",
        env: dict[str, str] | None = None,
        command: tuple[str, ...] | list[str] = FORWARD,
        preexec_fn: Callable[[], object] | None = None,
    ) -> ForwardProcess:
        fixed = [*(["-b", bind] if bind else [])]
        if not {"-u", "--ulog"} & set(args):
            fixed += ["-u", str(tmp_path / "no-ulog")]
        for _attempt in range(3):
            chosen = {flag: free_port() for flag in ports}
            given = [word for flag, port in chosen.items() for word in (flag, str(port))]
            proc = await asyncio.create_subprocess_exec(
                *command,
                *fixed,
                *given,
                *args,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=default_sigint(preexec_fn),
            )
            assert proc.stderr is not None
            fwd = ForwardProcess(proc, chosen, tmp_path / f"forward-{len(started)}.log")
            fwd._copier = asyncio.create_task(fwd._copy(proc.stderr))
            started.append(fwd)
            if ready == 0:
                return fwd
            try:
                if isinstance(ready, str):
                    await fwd.expect(ready)
                else:
                    for _ in range(ready or max(len(ports), 1)):
                        await fwd.expect("listening on")
                return fwd
            except ForwardExited:
                if proc.returncode is None or "cannot listen" not in fwd.log() or not ports:
                    raise
        raise RuntimeError("no free port for forward after 3 attempts")

    yield start
    for fwd in started:
        if fwd.proc.returncode is None:
            fwd.proc.terminate()
        try:
            await fwd.wait()
        except TimeoutError:
            fwd.proc.kill()
            await fwd.wait()
            raise AssertionError(f"forward did not stop at SIGTERM:\n{fwd.log()}") from None


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[int], Awaitable[CutProxy]]]:
    """TCP relays that a test can cut (tests/cutproxy.py), each in front of a port; stopped at
    the end."""
    started: list[CutProxy] = []

    async def make(port: int) -> CutProxy:
        proxy = await CutProxy(port).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., ResumeClient]]:
    """Resume-protocol clients (tests/resume_client.py), each closed at the end of the test."""
    made: list[ResumeClient] = []

    def make(url: str, **kw: object) -> ResumeClient:
        client = ResumeClient(url, **kw)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await client.close()


def running(pid: int) -> bool:
    """The process exists and has not ended: an exited one that nobody reaped yet (a zombie,
    Z, or X while it goes) counts as ended."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
