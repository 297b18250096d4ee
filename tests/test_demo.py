"""The demo's R side (demo/init.R) on a real Rserve in OCAP mode, reached through forward.

These pin down what the page relies on: the auth capability, the parseEval it returns, R's own
printing streamed as OOB sends (output, messages, warnings after the output), errors in the
answer as R words them, and plots as PNG bytes, one per page, with no file left behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from forward.qap import Cmd, Xt
from forward.rexp import RObj, strings

from .conftest import IN_CI, ROOT, Rserve, StartForward, default_sigint, free_port, need_rserve
from .rclient import RClient

DEMO = ROOT / "demo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.rserve


@pytest.fixture
def demo_rserve(fresh_rserve: Callable[..., Rserve]) -> Rserve:
    return fresh_rserve(ocap=True, source=(DEMO / "init.R").read_text())


def oob_sends(client: RClient) -> list[tuple[str, str | bytes]]:
    """The OOB sends so far as (stream, text), or ("console.plot", PNG bytes); then forgotten."""
    out: list[tuple[str, str | bytes]] = []
    for reply in client.oob:
        assert reply.header.cmd & 0xFFFFF000 == Cmd.OOB_SEND
        stream, payload, *_ = reply.value().value
        value = payload.value if payload.xt == Xt.RAW else payload.value[0]
        out.append((stream.value[0], value))
    client.oob.clear()
    return out


def answer_of(value: RObj) -> dict[str, str]:
    return {k: v.value[0] for k, v in value.as_dict().items()}


async def login(client: RClient, user: str = "mike", password: str = "mypwd") -> RObj:
    return await client.call(client.capability, strings([user]), strings([password]))


async def parse_eval(client: RClient) -> Callable[[str], object]:
    cap = (await login(client)).as_dict()["parseEval"]

    async def run(code: str) -> dict[str, str]:
        return answer_of(await client.call(cap, strings([code])))

    return run


async def test_wrong_password_is_refused(demo_rserve: Rserve, start_forward: StartForward) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        assert client.capability.attr("class") == strings(["OCref"])
        answer = await login(client, password="nope")
        assert answer == strings(["sorry, unauthorized!"])


async def test_r_prints_and_the_output_streams_before_the_answer(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        run = await parse_eval(client)
        assert await run("1+1") == {"status": "ok"}
        assert oob_sends(client) == [("console.out", "[1] 2\n")]

        code = 'x <- 1:3; print("hello"); message("working"); warning("careful"); 7; sum(x)'
        assert await run(code) == {"status": "ok"}
        assert oob_sends(client) == [
            ("console.out", '[1] "hello"\n'),
            ("console.msg", "working\n"),
            ("console.err", "Warning message:\ncareful \n"),
            ("console.out", "[1] 7\n"),
            ("console.out", "[1] 6\n"),
        ]
        # An unfinished line stays unfinished; the value is printed once, by R.
        assert await run('cat("a"); invisible(2); str(list(a = 1)); y <- 5') == {"status": "ok"}
        assert oob_sends(client) == [
            ("console.out", "a"),
            ("console.out", "List of 1\n $ a: num 1\n"),
        ]
        # Warnings of a call come after its output, with the call, as the console shows them.
        assert await run("sqrt(-1)") == {"status": "ok"}
        assert oob_sends(client) == [
            ("console.out", "[1] NaN\n"),
            ("console.err", "Warning message:\nIn sqrt(-1) : NaNs produced\n"),
        ]
        # ls() shows the user's variables, not the demo's.
        assert await run("ls()") == {"status": "ok"}
        assert oob_sends(client) == [("console.out", '[1] "oc.init" "x"       "y"      \n')]


async def test_errors_stop_the_rest_and_say_what_r_says(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        run = await parse_eval(client)
        answer = await run('cat("partial\\n"); stop("boom"); cat("never\\n")')
        assert answer == {"status": "error", "error": "Error: boom\n"}
        assert oob_sends(client) == [("console.out", "partial\n")]

        code = 'f <- function() { warning("w1"); stop("e1") }; f()'
        assert await run(code) == {
            "status": "error",
            "error": "Error in f() : e1\nIn addition: Warning message:\nIn f() : w1\n",
        }
        # A syntax error as the console reports it, after what ran before it.
        assert await run("print(1); 1 +* 2") == {
            "status": "error",
            "error": "Error: unexpected '*' in \" 1 +*\"\n",
        }
        assert oob_sends(client) == [("console.out", "[1] 1\n")]
        assert await run("f(1,") == {"status": "error", "error": "Error: unexpected end of input\n"}
        # The session survives them all.
        assert await run("x <- 41; x + 1") == {"status": "ok"}
        assert oob_sends(client) == [("console.out", "[1] 42\n")]


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_plots_arrive_as_png_pages_and_leave_no_file(
    demo_rserve: Rserve, start_forward: StartForward
) -> None:
    fwd = await start_forward(demo_rserve.socket)
    async with await RClient.connect(fwd.url()) as client:
        cap = (await login(client)).as_dict()["parseEval"]

        async def run(code: str, width: float = 500, ratio: float = 2) -> list[tuple[str, object]]:
            display = RObj(
                Xt.VECTOR,
                [RObj(Xt.ARRAY_DOUBLE, [width]), RObj(Xt.ARRAY_DOUBLE, [ratio])],
                {"names": strings(["width", "ratio"])},
            )
            answer = await client.call(cap, strings([code]), display)
            assert answer_of(answer) == {"status": "ok"}, answer
            return oob_sends(client)

        sent = await run("plot(1:10)")
        assert [s for s, _ in sent] == ["console.plot"]
        # Drawn at twice the CSS size asked for (a high-DPI screen), 4:3.
        assert png_size(sent[0][1]) == (1000, 750)  # type: ignore[arg-type]
        # A plot changed by the next call is sent again; one that is not changed is not.
        assert [s for s, _ in await run("abline(h = 5)")] == ["console.plot"]
        assert await run("1") == [("console.out", "[1] 1\n")]
        assert await run("par(mar = c(1, 1, 1, 1))") == []
        # A loop shows each page; output in between stays in its place.
        sent = await run('for (i in 1:3) { plot(i); cat("page", i, "\\n") }')
        assert [s for s, _ in sent] == ["console.out", "console.plot"] * 2 + [
            "console.out",
            "console.plot",
        ]
        # par(mfrow): one page with four figures.
        sent = await run("par(mfrow = c(2, 2)); for (i in 1:4) plot(i)")
        assert [s for s, _ in sent] == ["console.plot"]
        # grid (what ggplot2 draws with), and a narrower page at ratio 1.
        grid = "grid::grid.newpage(); grid::grid.rect(gp = grid::gpar(fill = 'red'))"
        sent = await run(grid, 300, 1)
        assert [s for s, _ in sent] == ["console.plot"]
        assert png_size(sent[0][1]) == (300, 225)  # type: ignore[arg-type]
        # A page too big for a new, smaller size is dropped; the next plot is drawn at that size.
        assert len(await run("par(mfrow = c(4, 4), mar = c(5, 5, 5, 5)); plot(1)", 1200, 1)) == 1
        [(stream, png)] = await run("plot(2)", 240, 1)
        assert stream == "console.plot" and png_size(png) == (240, 180)  # type: ignore[arg-type]
        # Nothing was left in the session's temporary directory.
        assert await run("length(list.files(tempdir(), all.files = TRUE, no.. = TRUE))") == [
            ("console.out", "[1] 0\n")
        ]


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
            env={**os.environ, "DEMO_DIR": str(workdir), "DEMO_PYTHON": sys.executable},
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
            run = await parse_eval(client)
            assert await run("6 * 7") == {"status": "ok"}
            assert oob_sends(client) == [("console.out", "[1] 42\n")]

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
            env={**os.environ, "DEMO_DIR": str(workdir), "DEMO_PYTHON": sys.executable},
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


def install_plan(*command: str) -> tuple[set[str], list[str]]:
    """What an install step would put on a fresh Debian machine: the apt packages as apt
    resolves them with nothing installed, and its pip command lines."""
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    apt = {line.split()[1] for line in lines if line.startswith("apt ")}
    pip = [line for line in lines if line.startswith("pip ")]
    return apt, pip


def browsers_among(packages: set[str]) -> set[str]:
    """The packages that are web browsers, by what Debian says they provide."""
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *sorted(packages)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = set()
    for record in shown.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in record.splitlines() if ": " in line and line[0] != " "
        )
        provides = {p.strip().split(" ")[0] for p in fields.get("Provides", "").split(",")}
        if provides & {"www-browser", "x-www-browser", "gnome-www-browser"}:
            found.add(fields["Package"])
    return found


@pytest.mark.slow
def test_demo_install_step_brings_no_browser_nginx_or_test_tools() -> None:
    """scripts/demo's install step on a fresh machine (apt's own resolution against an empty
    dpkg status, with every dependency): R, Rserve, openssl and .venv, no browser, no nginx, no
    test tools; the same resolution of the test suite's install finds them (the control)."""
    if shutil.which("apt-get") is None:
        if IN_CI:
            pytest.fail("the install plan needs apt (Debian)")
        pytest.skip("not a Debian machine")
    demo, demo_pip = install_plan(str(ROOT / "scripts" / "demo"), "--install-plan")
    full, full_pip = install_plan(str(ROOT / "scripts" / "install-deps"), "--plan")
    assert {"r-base-core", "r-cran-rserve", "openssl", "python3-venv"} <= demo
    assert {"chromium", "nginx-light", "nodejs", "wrk"} <= full
    assert browsers_among(full) >= {"chromium"}
    assert browsers_among(demo) == set()
    assert not {p for p in demo if p.startswith(("chromium", "nginx", "nodejs", "wrk"))}
    # Python: forward and its dependencies, without the test and benchmark extras.
    assert demo_pip == ["pip install -e ."]
    assert full_pip == ["pip install -e .[test,bench]"]
