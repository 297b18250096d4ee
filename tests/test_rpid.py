"""Finding and ending the R process behind a connection (forward/rpid.py): the sock_diag netlink
messages as byte literals, then real Rserve processes, whose own Sys.getpid() is the oracle."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import struct
import sys
from pathlib import Path

import pytest

from forward import rpid
from forward.rpid import RProcess, children_of, diag_request, find_r_pid, peer_from_reply

from .conftest import Rserve, StartCli, StartForward, eventually
from .rclient import RClient

# -- pure: the netlink messages --------------------------------------------------------------------


def test_diag_request_bytes() -> None:
    assert diag_request(0x01020304, seq=7) == (
        b"\x28\x00\x00\x00"  # length 40
        b"\x14\x00"  # SOCK_DIAG_BY_FAMILY
        b"\x01\x00"  # NLM_F_REQUEST
        b"\x07\x00\x00\x00"  # sequence
        b"\x00\x00\x00\x00"  # port id: the kernel
        b"\x01\x00\x00\x00"  # AF_UNIX, protocol 0, padding
        b"\xff\xff\xff\xff"  # every state
        b"\x04\x03\x02\x01"  # the inode
        b"\x04\x00\x00\x00"  # UDIAG_SHOW_PEER
        b"\xff\xff\xff\xff\xff\xff\xff\xff"  # no cookie
    )


def reply(*attrs: tuple[int, bytes], kind: int = 20, cut: int = 0) -> bytes:
    body = b"\x01\x01\x01\x00" + struct.pack("=III", 99, 0, 0)  # unix_diag_msg
    for attr, value in attrs:
        body += struct.pack("=HH", 4 + len(value), attr) + value
        body += b"\0" * (-len(value) % 4)
    data = struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body
    return data[: len(data) - cut]


def test_peer_from_reply() -> None:
    peer = (2, struct.pack("=I", 4242))
    assert peer_from_reply(reply(peer)) == 4242
    # after a name attribute of odd length (padded) and the VFS one
    assert peer_from_reply(reply((0, b"\0abc\0"), (1, b"\0" * 8), peer)) == 4242
    assert peer_from_reply(reply((0, b"/x"))) is None  # no peer: not connected
    assert peer_from_reply(reply(peer, kind=2)) is None  # NLMSG_ERROR
    assert peer_from_reply(reply(peer, cut=4)) is None  # shorter than it says
    assert peer_from_reply(b"") is None
    bad = bytearray(reply(peer))
    bad[32:34] = struct.pack("=H", 2)  # an attribute shorter than its own header
    assert peer_from_reply(bytes(bad)) is None


def test_children_of(tmp_path: Path) -> None:
    for task, kids in (("10", "12 30 25 "), ("11", "40")):
        (tmp_path / "10" / "task" / task).mkdir(parents=True)
        (tmp_path / "10" / "task" / task / "children").write_text(kids)
    assert children_of(10, str(tmp_path)) == [30, 25, 12]  # the main thread's, newest first
    assert children_of(99, str(tmp_path)) == []


# -- real processes --------------------------------------------------------------------------------


@pytest.mark.rserve
async def test_session_log_names_rs_own_pid(
    rserve_qap: Rserve, start_forward: StartForward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="forward")
    fwd = await start_forward(rserve_qap.socket)
    async with await RClient.connect(fwd.url("http")) as c:
        pid = int((await c.eval("Sys.getpid()")).value[0])
    assert rserve_qap.proc is not None and pid != rserve_qap.proc.pid
    assert f"opened: Rserve in QAP mode, R pid {pid}" in caplog.text


@pytest.mark.rserve
async def test_the_command_logs_rs_pid(rserve_qap: Rserve, forward_cli: StartCli) -> None:
    """The same through `python -m forward` (uvloop's transports give their own socket type)."""
    fwd = await forward_cli("-s", str(rserve_qap.socket))
    async with await RClient.connect(fwd.url("ws")) as c:
        pid = int((await c.eval("Sys.getpid()")).value[0])
    await fwd.expect(f"opened: Rserve in QAP mode, R pid {pid}")


@pytest.mark.rserve
def test_find_r_pid_is_the_fork_holding_the_connection(rserve_qap: Rserve) -> None:
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.connect(str(rserve_qap.socket))
        b.connect(str(rserve_qap.socket))
        a.recv(32, socket.MSG_WAITALL)
        b.recv(32, socket.MSG_WAITALL)  # greeted: both forks exist
        assert rserve_qap.proc is not None
        assert rpid.listener_pid(a) == rserve_qap.proc.pid  # SO_PEERCRED: not the R process
        pa, pb = find_r_pid(a), find_r_pid(b)
        assert pa is not None and pb is not None and pa != pb
        assert {pa, pb} <= set(rserve_qap.children())


async def test_a_server_that_does_not_fork_is_never_named(tmp_path: Path) -> None:
    """The listener itself (here: this very process) would end every session: never returned."""
    path = str(tmp_path / "s.sock")
    server = await asyncio.start_unix_server(lambda r, w: None, path)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            assert rpid.peer_inode(s) is not None
            assert find_r_pid(s) is None
    finally:
        server.close()


STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(1, flush=True); time.sleep(60)"
)


async def test_end_terms_then_kills(caplog: pytest.LogCaptureFixture) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STUBBORN, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    await proc.stdout.readline()  # SIGTERM is ignored from here on
    r = RProcess(proc.pid, os.pidfd_open(proc.pid))
    assert r.end(grace=0.1) == "ended with SIGTERM"
    assert await proc.wait() == -signal.SIGKILL
    await eventually(lambda: r.pidfd == -1, what="the pidfd closed")
    assert f"R process {proc.pid} did not end at SIGTERM: sent SIGKILL" in caplog.text


async def test_end_of_an_ended_or_foreign_process(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    r = RProcess(proc.pid, os.pidfd_open(proc.pid))
    await proc.wait()
    assert r.end() == "it had already ended" and r.pidfd == -1
    # Another user's R (forward not root): the kernel says no, and R runs on. Root can signal
    # anything, so the refusal is played here.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    r = RProcess(proc.pid, os.pidfd_open(proc.pid))

    def refuse(fd: int, sig: int) -> None:
        raise PermissionError

    monkeypatch.setattr(signal, "pidfd_send_signal", refuse)
    try:
        assert "may not signal it" in r.end() and r.pidfd == -1
    finally:
        monkeypatch.undo()
        proc.kill()
        await proc.wait()
