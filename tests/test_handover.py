"""A hand-over between two forward processes (forward/succession.py, docs/operations.md), with a
real Rserve: resumable sessions carry on in the new process with the same R, every byte exactly
once; sessions that did not ask for resume get the shutdown notice; no connection is refused
while it happens; a new process that cannot take over leaves the running one serving."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from forward import handover, qap
from forward.resume import ResumeClose

from .conftest import PKI, ROOT, Rserve, StartCli, eventually, free_port
from .rclient import RClient
from .resume_client import Gone, ResumeClient

pytestmark = pytest.mark.rserve


def big(i: int) -> str:
    """An R expression whose answer is long and particular to `i`, and its text."""
    return f"paste(rep('{i:04d}-abcdefghij', 5000), collapse='')"


def big_text(i: int) -> str:
    return f"{i:04d}-abcdefghij" * 5000


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def plain_session_works(url: str) -> None:
    async with await RClient.connect(url) as c:
        assert (await c.eval("1 + 1")).value == [2.0]


async def plain_session_served(url: str) -> None:
    """A connection made while a hand-over happens is served: its upgrade is answered and R
    greets it. The old process may have accepted it just before it stopped: then the session
    ends as that process's plain sessions do, with the shutdown notice and 1001."""
    try:
        c = await RClient.connect(url)
    except ConnectionError as exc:  # upgraded, then closed before R's greeting came
        assert "1001" in str(exc), exc
        return
    async with c:
        try:
            assert (await c.eval("1 + 1")).value == [2.0]
        except ConnectionError as exc:
            assert "1001" in str(exc) and c.oob and c.oob[-1].header.cmd & 0xFFFFF000 == 0x21000


class Prober:
    """New connections, one after another without pause, until `stop()`: how many were
    served (each one must be, see plain_session_served)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.served = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await plain_session_served(self.url)
            self.served += 1

    async def stop(self) -> int:
        self._stop.set()
        await self._task
        return self.served


async def test_fifty_resumable_sessions_survive_a_hand_over(
    rserve_qap: Rserve,
    forward_cli: StartCli,
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
) -> None:
    port = free_port()
    handover = str(tmp_path / "handover.sock")
    args = ("-s", rserve_qap.socket, "-p", str(port), "--handover-socket", handover)
    old = await forward_cli(*args, ports=(), ready="listening on")
    url = f"ws://127.0.0.1:{port}/"

    resumable: list[ResumeClient] = []
    for i in range(50):
        c = clients(url)
        await c.connect()
        await c.eval(f"x <- {i}", 1)
        await c.eval("Sys.getpid()", 2)
        resumable.append(c)
    pids = []
    for c in resumable:
        await c.wait_messages(2)
        pids.append(c.values()[1])
    assert len(set(map(tuple, pids))) == 50  # 50 R processes
    # Half are in the middle of an evaluation when the hand-over happens.
    for i, c in enumerate(resumable[:25]):
        await c.eval(f"Sys.sleep(2); {big(i)}", 3)
    plain = [await RClient.connect(url) for _ in range(3)]
    for p in plain:
        assert (await p.eval("y <- 7")).value == [7.0]

    # New connections keep coming while it happens: every one is served.
    prober = Prober(url)
    new = await forward_cli(*args, "--takeover", ports=(), ready="took over from process")
    assert await old.wait(within=30) == 0
    await old.expect("50 resumable session(s) handed over")
    assert await prober.stop() > 0

    # The plain sessions got the shutdown notice, then 1001.
    for p in plain:
        msg = await p.ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY
        assert qap.Header.parse(msg.data[:16]).cmd & 0xFFFFF000 == qap.Cmd.OOB_SEND & 0xFFFFF000
        closing = await p.ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await p.close()

    for i, c in enumerate(resumable):
        n = 3 if i < 25 else 2
        await c.wait_messages(n)
        await c.eval("x", n + 1)
        await c.eval("Sys.getpid()", n + 2)
        values = c.values()
        await c.wait_messages(n + 2)
        values = c.values()
        assert values[-2] == [float(i)], i  # the workspace
        assert values[-1] == pids[i] == values[1], i  # the same R process
        if i < 25:
            (text,) = values[2]
            assert sha(text) == sha(big_text(i)), i  # the answer, exactly once
        assert len(c.messages) == n + 2, i
        assert c.resumes == 1, i
    assert await plain_session_works_count(url) == 1
    await new.stop()


async def plain_session_works_count(url: str) -> int:
    await plain_session_works(url)
    return 1


async def start_pair(
    rserve: Rserve, forward_cli: StartCli, tmp_path: Path, *extra: str
) -> tuple[int, str, tuple[str, ...]]:
    port = free_port()
    handover = str(tmp_path / "handover.sock")
    args = ("-s", rserve.socket, "-p", str(port), "--handover-socket", handover, *extra)
    return port, handover, args


async def test_a_new_process_that_cannot_take_over_leaves_the_old_one_serving(
    rserve_qap: Rserve,
    forward_cli: StartCli,
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
) -> None:
    port, _, args = await start_pair(rserve_qap, forward_cli, tmp_path)
    old = await forward_cli(*args, ports=(), ready="listening on")
    url = f"ws://127.0.0.1:{port}/"
    c = clients(url)
    await c.connect()
    await c.eval("x <- 1; Sys.getpid()", 1)
    await c.wait_messages(1)
    # Configured for other listeners: it says why, exits 1, and the old one goes on.
    other = free_port()
    moved = list(args)
    moved[moved.index("-p") + 1] = str(other)
    refused = await forward_cli(*moved, "--takeover", ports=(), ready=0)
    assert await refused.wait() == 1
    assert "keeps the listeners" in refused.log() and "Traceback" not in refused.log()
    await old.expect("hand-over refused by the new process")
    assert old.proc.returncode is None
    await c.eval("x + 1", 2)
    await c.wait_messages(2)
    assert c.values()[1] == [2.0] and c.resumes == 0
    await plain_session_works(url)
    # ...and a later hand-over works.
    await forward_cli(*args, "--takeover", ports=(), ready="took over from process")
    assert await old.wait() == 0
    await c.eval("x + 2", 3)
    await c.wait_messages(3)
    assert c.values()[2] == [3.0] and c.resumes == 1


async def test_a_successor_refuses_a_state_version_it_cannot_read(
    rserve_qap: Rserve, forward_cli: StartCli, tmp_path: Path
) -> None:
    """A running forward of another version offers state this one cannot read (played by a
    small stand-in: the running forward writes the only version there is): the new process
    refuses, says why, and has taken nothing."""
    _, handover_path, args = await start_pair(rserve_qap, forward_cli, tmp_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(handover_path)
    listener.listen(1)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    fwd = await forward_cli(*args, "--takeover", ports=(), ready=0)
    conn, _ = await loop.sock_accept(listener)
    with conn, listener:
        hello = handover.decode(await loop.sock_recv(conn, handover.MAX_RECORD))
        assert hello.kind == "hello" and hello.meta["versions"] == [1]
        offer = handover.encode(
            "offer", format=handover.FORMAT, version=99, forward="9.0", pid=1, listeners=[]
        )
        await loop.sock_sendall(conn, offer)
        answer = handover.decode(await loop.sock_recv(conn, handover.MAX_RECORD))
    assert answer.kind == "refuse"
    assert "hands over state version 99; this forward reads version 1" in answer.meta["reason"]
    assert await fwd.wait() == 1
    assert "state version 99" in fwd.log() and "Traceback" not in fwd.log()


async def test_sigusr2_starts_a_successor_from_the_same_command_line(
    rserve_qap: Rserve,
    forward_cli: StartCli,
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
) -> None:
    port, _, args = await start_pair(rserve_qap, forward_cli, tmp_path)
    pid_file = tmp_path / "forward.pid"
    old = await forward_cli(*args, "--pid-file", str(pid_file), ports=(), ready="listening on")
    c = clients(f"ws://127.0.0.1:{port}/")
    await c.connect()
    await c.eval("x <- 5; Sys.getpid()", 1)
    await c.wait_messages(1)
    old.send_signal(signal.SIGUSR2)
    line = await old.expect("successor started, pid")
    successor = int(line.rsplit(" ", 1)[1])
    try:
        # Its log goes where the old one's went (inherited stderr).
        await old.expect("took over from process")
        await eventually(lambda: old.proc.returncode is not None, what="the old process exits")
        assert old.proc.returncode == 0
        assert pid_file.read_text().strip() == str(successor)  # the successor's, not removed
        await c.eval("x", 2)
        await c.wait_messages(2)
        assert c.values()[1] == [5.0] and c.resumes == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(successor, signal.SIGTERM)
    await eventually(lambda: not os.path.exists(f"/proc/{successor}"), what="the successor ends")


async def test_takeover_without_a_running_forward_says_so(
    rserve_qap: Rserve, forward_cli: StartCli, tmp_path: Path
) -> None:
    _, handover, args = await start_pair(rserve_qap, forward_cli, tmp_path)
    fwd = await forward_cli(*args, "--takeover", ports=(), ready=0)
    assert await fwd.wait() == 1
    assert f"cannot reach the running forward at {handover}" in fwd.log()
    assert "Traceback" not in fwd.log()


async def test_a_forward_with_workers_hands_its_sockets_over(
    rserve_qap: Rserve, forward_cli: StartCli, tmp_path: Path
) -> None:
    """With --workers (no resume there), a hand-over passes every worker's sockets: no
    connection is refused meanwhile, open sessions get the shutdown notice and 1001, and the
    number of workers stays (another number is refused, the running forward unharmed)."""
    port, _, args = await start_pair(rserve_qap, forward_cli, tmp_path, "--workers", "2")
    old = await forward_cli(*args, ports=(), ready="2 workers serving")
    url = f"ws://127.0.0.1:{port}/"
    plain = [await RClient.connect(url) for _ in range(4)]
    for p in plain:
        assert (await p.eval("1")).value == [1.0]

    moved = [a if a != "2" else "3" for a in args]
    refused = await forward_cli(*moved, "--takeover", ports=(), ready=0)
    assert await refused.wait() == 1
    assert "serves with --workers 2; this one is configured for --workers 3" in refused.log()
    await old.expect("hand-over refused by the new process")
    await plain_session_works(url)

    prober = Prober(url)
    new = await forward_cli(*args, "--takeover", ports=(), ready="took over from process")
    assert await old.wait(within=30) == 0
    assert await prober.stop() > 0
    for p in plain:
        msg = await p.ws.receive()
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == qap.SHUTDOWN_NOTICE
        closing = await p.ws.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await p.close()
    await plain_session_works(url)
    assert "Traceback" not in old.log() + new.log()
    assert await new.stop() == 0


async def test_systemd_hears_of_the_new_main_process_and_no_stop(
    rserve_qap: Rserve, forward_cli: StartCli, tmp_path: Path
) -> None:
    """Under systemd (Type=notify, NotifyAccess=all as the shipped unit has), the new process
    says it is the main one before the old one exits, and the old one never says STOPPING: the
    service stays up through the hand-over."""
    unit = (ROOT / "deploy" / "systemd" / "forward.service").read_text()
    assert "NotifyAccess=all" in unit and "--handover-socket /run/forward/" in unit
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    _, _, args = await start_pair(rserve_qap, forward_cli, tmp_path)
    old = await forward_cli(*args, ports=(), ready="listening on", env=env)
    new = await forward_cli(*args, "--takeover", ports=(), ready="took over", env=env)
    assert await old.wait() == 0
    messages = []
    with notify, contextlib.suppress(BlockingIOError):
        while True:
            messages.append(notify.recv(4096).decode())
    assert messages == [f"READY=1\nMAINPID={old.pid}", f"READY=1\nMAINPID={new.pid}"]
    await plain_session_works(f"ws://127.0.0.1:{args[args.index('-p') + 1]}/")


async def test_over_tls_a_session_keeps_its_certificate_binding_in_the_new_process(
    rserve_qap: Rserve,
    forward_cli: StartCli,
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
    pki: PKI,
) -> None:
    port, _, args = await start_pair(
        rserve_qap,
        forward_cli,
        tmp_path,
        *("-k", str(pki.key), "-c", str(pki.cert), "-C", str(pki.ca_file)),
        *("--tls-client", "request"),
    )
    old = await forward_cli(*args, ports=(), ready="listening on")
    url = f"wss://127.0.0.1:{port}/"
    c = clients(url, ssl_context=pki.client_context("alice"))
    await c.connect()
    await c.eval("x <- 3; Sys.getpid()", 1)
    await c.wait_messages(1)
    await forward_cli(*args, "--takeover", ports=(), ready="took over")
    assert await old.wait() == 0
    # Another certificate is refused in the new process, as it was in the old one.
    stolen = clients(url, ssl_context=pki.client_context("bob"))
    stolen.ticket = c.ticket
    with pytest.raises(Gone) as refused:
        await stolen.connect()
    assert refused.value.code == ResumeClose.REFUSED
    await c.eval("Sys.getpid()", 2)
    await c.wait_messages(2)
    assert c.values()[0] == c.values()[1] and c.resumes == 1


async def test_a_successor_that_dies_half_way_leaves_the_sessions_with_the_old_process(
    rserve_qap: Rserve,
    forward_cli: StartCli,
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
) -> None:
    """A stand-in successor says it serves, takes the first session's record and dies (what a
    crash of the new process looks like from the old one): the old one accepts again, keeps
    every session, and they carry on unharmed."""
    port, handover_path, args = await start_pair(rserve_qap, forward_cli, tmp_path)
    old = await forward_cli(*args, ports=(), ready="listening on")
    url = f"ws://127.0.0.1:{port}/"
    cs = []
    for i in range(3):
        c = clients(url)
        await c.connect()
        await c.eval(f"x <- {i}; Sys.getpid()", 1)
        await c.wait_messages(1)
        cs.append(c)

    def dying_successor() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(handover_path)
            s.send(handover.hello("0.0", os.getpid()))
            _, fds, _, _ = socket.recv_fds(s, handover.MAX_RECORD, handover.MAX_FDS)
            s.send(handover.encode("accept"))
            s.send(handover.encode("ready"))
            record, session_fds, _, _ = socket.recv_fds(s, handover.MAX_RECORD, 4)
            assert handover.decode(record).kind == "session" and len(session_fds) == 1
            for fd in fds + session_fds:
                os.close(fd)

    await asyncio.to_thread(dying_successor)
    await old.expect("hand-over broke off half-way: accepting again")
    for i, c in enumerate(cs):
        await c.eval("x", 2)
        await c.wait_messages(2)
        assert c.values() == [c.values()[0], [float(i)]] and c.resumes == 0
    await plain_session_works(url)
    assert old.proc.returncode is None and "Traceback" not in old.log()
