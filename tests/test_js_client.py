"""The demo's JavaScript client (demo/www/qap.js, resume.js), tested with Node's own runner.

`node --test` runs tests/js/*.test.mjs: the byte-level unit tests, and the live tests against a
real Rserve (Rserve's OCAP example, and a classic one) through a real forward, whose URLs are
passed in the environment. One pytest run thus covers the Python and the JavaScript side.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import IN_CI, ROOT, Rserve, StartForward

JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))


def node() -> list[str]:
    """The node command ($NODE, or node on PATH), with the flag that turns on its WebSocket
    where that flag exists (Node 20); Node 22 has it anyway, and Node 18 uses node-ws."""
    path = os.environ.get("NODE") or shutil.which("node")
    if not path:
        if IN_CI:
            pytest.fail("Node.js is required in CI (scripts/install-deps installs nodejs)")
        pytest.skip("Node.js is not installed (apt-get install nodejs node-ws)")
    probe = subprocess.run(
        [path, "--experimental-websocket", "-e", "0"], capture_output=True, check=False
    )
    return [path, "--experimental-websocket"] if probe.returncode == 0 else [path]


async def run_node(env: dict[str, str], *files: Path) -> subprocess.CompletedProcess[str]:
    cmd = [*node(), "--test", "--test-reporter=spec", *map(str, files)]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode or 0, out.decode(), "")


def summary(output: str) -> dict[str, int]:
    """The counts the spec reporter closes with (a marker, then "pass 4", "skipped 0", ...)."""
    return {k: int(v) for k, v in re.findall(r"^\S+ (\w+) (\d+)$", output, re.M)}


def test_there_are_js_tests() -> None:
    names = {p.name for p in JS_TESTS}
    assert {"qap.test.mjs", "resume.test.mjs", "live.test.mjs"} <= names


async def test_unit() -> None:
    unit = [p for p in JS_TESTS if p.name != "live.test.mjs"]
    result = await run_node({}, *unit)
    assert result.returncode == 0, result.stdout
    counts = summary(result.stdout)
    assert counts["pass"] >= 30 and counts["fail"] == counts["skipped"] == 0, result.stdout


@pytest.mark.rserve
async def test_live_against_rserve(
    rserve_ocap: Rserve, rserve_qap: Rserve, start_forward: StartForward
) -> None:
    ocap = await start_forward(rserve_ocap.socket)
    qap = await start_forward(rserve_qap.socket)
    result = await run_node(
        {"FORWARD_OCAP_URL": ocap.url(), "FORWARD_QAP_URL": qap.url()},
        ROOT / "tests" / "js" / "live.test.mjs",
    )
    assert result.returncode == 0, result.stdout
    # Every live test ran: none was skipped for want of a URL.
    counts = summary(result.stdout)
    assert counts["pass"] == 4 and counts["fail"] == counts["skipped"] == 0, result.stdout
