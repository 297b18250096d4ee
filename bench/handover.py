"""What a hand-over costs (docs/operations.md, "the hand-over"): N resumable sessions open through
forward, a new forward takes over (--takeover), and every client resumes with it.

Figures: the whole hand-over (new process started -> old process exited), the old process's own
part (from the moment the new one accepts to "done", from its log), and what each client sees: the
time from forward's 4100 close to its `resumed` message on the new process (the session's pause),
p50 / p99 / max. The backend is the benchmark's QAP echo server (bench/servers.py), so the
figures are forward's alone.

    python bench/handover.py [--sessions 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from forward.resume import PROTOCOL, ticket_token  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_log(path: Path, text: str, within: float = 60) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if text in line:
                return line
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{text!r} not in {path}")


class Client:
    """One resumable session that only waits; on 4100 it resumes and times the pause."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.ticket = ""
        self.received = 0
        self.pause: float | None = None

    async def open(self) -> None:
        self.ws = await self.http.ws_connect(self.url, protocols=(PROTOCOL,))
        first = await self.ws.receive()
        self.ticket = json.loads(first.data)["ticket"]
        greeting = await self.ws.receive()  # the echo backend's ID string, as a binary message
        self.received += len(greeting.data)

    async def ride_out(self) -> None:
        msg = await self.ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4100, msg
        closed = time.perf_counter()
        token = ticket_token(self.ticket, self.received)
        self.ws = await self.http.ws_connect(self.url, protocols=(PROTOCOL, token))
        resumed = json.loads((await self.ws.receive()).data)
        assert resumed["t"] == "resumed", resumed
        self.pause = time.perf_counter() - closed
        await self.ws.close()


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=500)
    n = parser.parse_args().sessions
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backend = str(work / "echo.sock")
        echo = subprocess.Popen(  # its own process group: its pre-forked workers end with it
            [sys.executable, str(ROOT / "bench" / "servers.py"), "echo", "--socket", backend],
            start_new_session=True,
        )
        port = free_port()
        args = [
            *(sys.executable, "-m", "forward", "-b", "127.0.0.1", "-p", str(port)),
            *("-s", backend, "-u", str(work / "no-ulog")),
            *("--handover-socket", str(work / "handover.sock")),
            *("--max-sessions-per-client", "0"),  # every client is 127.0.0.1 here
        ]
        old_log, new_log = work / "old.log", work / "new.log"
        with old_log.open("w") as out:
            old = subprocess.Popen(args, stderr=out, cwd=ROOT)
        new = None
        try:
            await wait_log(old_log, "listening on")
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
                clients = [Client(http, f"ws://127.0.0.1:{port}/") for _ in range(n)]
                for i in range(0, n, 50):
                    await asyncio.gather(*(c.open() for c in clients[i : i + 50]))
                riding = [asyncio.ensure_future(c.ride_out()) for c in clients]
                started = time.perf_counter()
                with new_log.open("w") as out:
                    new = subprocess.Popen([*args, "--takeover"], stderr=out, cwd=ROOT)
                await asyncio.to_thread(old.wait, 120)
                total = time.perf_counter() - started
                await asyncio.gather(*riding)
            accepts = await wait_log(old_log, "accepts on the listeners now")
            done = await wait_log(old_log, "hand-over to process")
            pauses = sorted(c.pause or 0.0 for c in clients)
            print(f"hand-over of {n} resumable sessions (echo backend)")
            print(f"  new process started -> old process exited: {total * 1000:.0f} ms")
            print(
                f"  old process's part (new one accepts -> done): "
                f"{(stamp(done) - stamp(accepts)) * 1000:.0f} ms"
            )
            print(
                "  client's pause, 4100 -> resumed: "
                f"p50 {statistics.median(pauses) * 1000:.1f} ms, "
                f"p99 {pauses[int(0.99 * (n - 1))] * 1000:.1f} ms, max {pauses[-1] * 1000:.1f} ms"
            )
            handed = re.search(r"(\d+) resumable session", done)
            assert handed is not None and int(handed.group(1)) == n, done
        finally:
            for proc in (old, new):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(30)
            os.killpg(echo.pid, signal.SIGTERM)
            echo.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
