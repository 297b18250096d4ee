"""The HTTP handler as the `forward` command wires it: new flags, and one run of the real CLI
serving the document root and an .R page side by side."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from forward.cli import parse_args
from forward.config import ConfigError

from .conftest import Rserve
from .test_cli import ROOT, free_port


def test_new_flags() -> None:
    c = parse_args([])
    assert (c.follow_symlinks, c.trusted_proxy, c.max_body_size) == (False, (), 64 * 1024 * 1024)
    c = parse_args(
        [
            "--follow-symlinks",
            "--trusted-proxy",
            "127.0.0.1",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--max-body-size",
            "1000",
        ]
    )
    assert (c.follow_symlinks, c.trusted_proxy, c.max_body_size) == (
        True,
        ("127.0.0.1", "10.0.0.0/8"),
        1000,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trusted-proxy", "proxy.example"], "not an IP address or network"),
        (["--max-body-size", "-1"], "--max-body-size must be"),
    ],
)
def test_bad_new_flags(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(args)


def test_missing_doc_root_fails_before_serving(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "forward",
            "-b",
            "127.0.0.1",
            "-p",
            str(free_port()),
            "-r",
            str(tmp_path / "nowhere"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode != 0
    missing = tmp_path / "nowhere"
    assert proc.stderr.strip().splitlines() == [f"forward: -r {missing}: not a directory"]


PAGE = r"""
library(Rserve)
oc.init <- function() ocap(function(req) list("<p>from R</p>", "text/html; charset=utf-8"))
"""


@pytest.mark.rserve
async def test_cli_serves_files_and_r(tmp_path: Path, fresh_rserve: Callable[..., Rserve]) -> None:
    r = fresh_rserve(ocap=True, source=PAGE)
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hi\n")
    (root / "page.R").write_text("#\n")
    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - the server under test runs beside the client
        [
            sys.executable,
            "-m",
            "forward",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "-r",
            str(root),
            "-R",
            str(r.socket),
            "-s",
            str(tmp_path / "unused.sock"),
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # start-up is done when forward says it listens
            if "listening on" in line:
                break
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/hello.txt") as resp:
                assert (resp.status, await resp.text()) == (200, "hi\n")
            async with s.get(base + "/page.R") as resp:
                assert resp.status == 200 and await resp.text() == "<p>from R</p>"
                assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        # The request Debian's C forward answers with /etc/shadow.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /../../../etc/shadow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert answer.startswith(b"HTTP/1.1 403 ") and b"root:" not in answer
    finally:
        proc.terminate()
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()
