"""The demo's R side (demo/init.R) on a real Rserve in OCAP mode, reached through forward.

These pin down what the page relies on: the auth capability, the parseEval it returns, errors
as condition objects, and printed output / messages arriving as OOB sends before the answer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from forward.qap import Cmd, Xt
from forward.rexp import RObj, strings

from .conftest import ROOT, Rserve, StartForward, default_sigint, free_port, need_rserve
from .rclient import RClient

DEMO = ROOT / "demo"

pytestmark = pytest.mark.rserve


@pytest.fixture
def demo_rserve(fresh_rserve: Callable[..., Rserve]) -> Rserve:
    return fresh_rserve(ocap=True, source=(DEMO / "init.R").read_text())


def oob_texts(client: RClient) -> list[tuple[str, str]]:
    out = []
    for reply in client.oob:
        assert reply.header.cmd & 0xFFFFF000 == Cmd.OOB_SEND
        stream, text = reply.value().value
        out.append((stream.value[0], text.value[0]))
    return out


async def login(client: RClient, user: str = "mike", password: str = "mypwd") -> RObj:
    return await client.call(client.capability, strings([user]), strings([password]))


async def test_wrong_password_is_refused(demo_rserve: Rserve, start_forward: StartForward) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        assert client.capability.attr("class") == strings(["OCref"])
        answer = await login(client, password="nope")
        assert answer == strings(["sorry, unauthorized!"])


async def test_parse_eval_answers_and_sends_output_first(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        caps = (await login(client)).as_dict()
        parse_eval = caps["parseEval"]
        assert (await client.call(parse_eval, strings(["1+1"]))).value == [2.0]
        assert client.oob == []

        code = 'x <- 1:3; print("hello"); message("working"); warning("careful"); 7; sum(x)'
        answer = await client.call(parse_eval, strings([code]))
        assert answer == RObj(Xt.ARRAY_INT, [6])
        assert oob_texts(client) == [
            ("console.out", '[1] "hello"'),
            ("console.msg", "working"),
            ("console.err", "Warning: careful"),
            ("console.out", "[1] 7"),
        ]


async def test_errors_come_back_as_conditions_with_output_so_far(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        parse_eval = (await login(client)).as_dict()["parseEval"]
        answer = await client.call(parse_eval, strings(['cat("partial\\n"); stop("boom")']))
        assert answer.attr("class") == strings(["simpleError", "error", "condition"])
        assert answer.as_dict()["message"] == strings(["boom"])
        assert oob_texts(client) == [("console.out", "partial")]

        client.oob.clear()
        syntax = await client.call(parse_eval, strings(["1 +* 2"]))
        assert "error" in syntax.attr("class").value  # type: ignore[union-attr]
        assert "unexpected" in syntax.as_dict()["message"].value[0]
        # The session survives both.
        # An invisible value (the assignment) is not printed.
        assert (await client.call(parse_eval, strings(["x <- 41; x + 1"]))).value == [42.0]
        assert client.oob == []


def processes_with(arg: str) -> list[int]:
    """PIDs of the processes that have `arg` on their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if arg.encode() in cmdline:
                pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("plain", [False, True], ids=["https", "http"])
async def test_demo_script_brings_it_up_and_ctrl_c_stops_it(plain: bool, tmp_path: Path) -> None:
    """scripts/demo (the README's run command) as a user runs it, without the install step."""
    need_rserve()
    workdir = tmp_path / "demo"
    args = ["--no-install", "--port", str(free_port())] + (["--plain"] if plain else [])
    with (tmp_path / "demo.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(ROOT / "scripts" / "demo"),
            *args,
            env={**os.environ, "DEMO_DIR": str(workdir)},
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its own process group, like a terminal's foreground job
            preexec_fn=default_sigint(),  # as a terminal starts it, whatever started pytest
        )
    try:
        assert proc.stdout is not None
        url = ""
        async with asyncio.timeout(60):
            while not url:
                line = (await proc.stdout.readline()).decode()
                assert line, f"scripts/demo ended early: {(tmp_path / 'demo.log').read_text()}"
                if line.strip().startswith("Open "):
                    url = line.split()[1]
        assert url.startswith("http://" if plain else "https://")
        ssl_context = None
        if not plain:
            # The self-signed certificate the script made is the only thing trusted here.
            ssl_context = ssl.create_default_context(cafile=str(workdir / "cert.pem"))
        async with aiohttp.ClientSession() as http, http.get(url, ssl=ssl_context or True) as resp:
            assert resp.status == 200
            assert "R in the browser" in await resp.text()
        ws_url = url.replace("http", "ws", 1)
        async with await RClient.connect(ws_url, ssl_context=ssl_context) as client:
            parse_eval = (await login(client)).as_dict()["parseEval"]
            assert (await client.call(parse_eval, strings(["6 * 7"]))).value == [42.0]

        assert processes_with(str(workdir / "rserve.conf")), "Rserve should be running now"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        async with asyncio.timeout(30):
            assert await proc.wait() == 130
        # Both are gone: nothing listens on the port, no Rserve runs with the demo's config.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")))
        assert processes_with(str(workdir / "rserve.conf")) == []
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            await proc.wait()


async def test_demo_script_port_in_use_says_so_and_leaves_nothing_running(tmp_path: Path) -> None:
    need_rserve()
    workdir = tmp_path / "demo"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            str(ROOT / "scripts" / "demo"),
            "--no-install",
            "--plain",
            "--port",
            str(port),
            env={**os.environ, "DEMO_DIR": str(workdir)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 1
    assert "Address already in use" in err.decode()
    assert "forward failed to start" in err.decode()
    assert b"Open " not in out
    # The Rserve it had started is stopped again.
    assert processes_with(str(workdir / "rserve.conf")) == []
