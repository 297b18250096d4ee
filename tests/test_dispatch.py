"""The HTTP handler as the `forward` command wires it: new flags, and one run of the real CLI
serving the document root and an .R page side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from forward.cli import parse_args
from forward.config import ConfigError

from .conftest import Rserve, StartCli, free_port, run_forward


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
    missing = tmp_path / "nowhere"
    proc = run_forward("-b", "127.0.0.1", "-p", str(free_port()), "-r", str(missing))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"forward: -r {missing}: not a directory"]


PAGE = r"""
library(Rserve)
oc.init <- function() ocap(function(req) list("<p>from R</p>", "text/html; charset=utf-8"))
"""


@pytest.mark.rserve
async def test_cli_serves_files_and_r(
    tmp_path: Path, fresh_rserve: Callable[..., Rserve], forward_cli: StartCli
) -> None:
    r = fresh_rserve(ocap=True, source=PAGE)
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hi\n")
    (root / "page.R").write_text("#\n")
    fwd = await forward_cli(
        *["-r", str(root), "-R", str(r.socket), "-s", str(tmp_path / "unused.sock")]
    )
    base = fwd.url("http").rstrip("/")
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/hello.txt") as resp:
            assert (resp.status, await resp.text()) == (200, "hi\n")
        async with s.get(base + "/page.R") as resp:
            assert resp.status == 200 and await resp.text() == "<p>from R</p>"
            assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    # The request Debian's C forward answers with /etc/shadow.
    reader, writer = await asyncio.open_connection("127.0.0.1", fwd.ports["-p"])
    writer.write(b"GET /../../../etc/shadow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 403 ") and b"root:" not in answer
