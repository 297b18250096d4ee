"""deploy/nginx/forward-tls-passthrough.conf as shipped, in front of forward started with the
command line that file shows (`--proxy-protocol --trusted-proxy 127.0.0.1`): real nginx with
its stream module, real TLS (forward's own), real Rserves. Clients from 127.0.0.2, .3 and .4
open 300 WSS sessions through nginx; forward sees three clients, not one nginx."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import aiohttp
import pytest

from .conftest import PKI, Rserve, StartCli, free_port
from .rclient import RClient
from .test_deploy import DEPLOY, NGINX, STREAM_MODULE, need, nginx
from .test_rscript import docroot, rpages, split_request

__all__ = ["docroot", "rpages"]  # fixtures, used by name

SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
PER_SOURCE = 100  # 300 sessions in all; the cap below is exactly this


def shipped() -> tuple[list[str], str]:
    """The forward command line the passthrough file shows, and its stream {} block."""
    text = (DEPLOY / "nginx" / "forward-tls-passthrough.conf").read_text()
    command = re.search(r"^#\s+forward (-.*)$", text, re.M)
    assert command, "the file shows no forward command line"
    block = re.search(r"^stream \{\n.*", text, re.M | re.S)
    assert block, "the file has no stream {} block"
    return shlex.split(command[1]), block[0]


def stream_block(text: str, upstream: int, port: int) -> str:
    text, n = re.subn(
        r"(        server 127\.0\.0\.1:\d+;\n)+", f"        server 127.0.0.1:{upstream};\n", text
    )
    assert n == 1
    text = text.replace("listen 443;", f"listen 127.0.0.1:{port};")
    return re.sub(r"\n\s*listen \[::\]:443;", "", text)


def forward_args(words: list[str], pki: PKI) -> list[str]:
    """The shipped command line with this test's files; -b and -p are forward_cli's."""
    files = {"key.pem": str(pki.key), "cert.pem": str(pki.cert), "ca.pem": str(pki.ca_file)}
    out: list[str] = []
    skip = False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word in ("-b", "-p"):
            skip = True
            assert words[i + 1] == "127.0.0.1" or word == "-p"
        else:
            out.append(files.get(word, word))
    return out


@pytest.mark.rserve
async def test_passthrough_nginx_passes_browsers_addresses(
    rserve_qap: Rserve,
    rpages: Rserve,
    docroot: Path,
    pki: PKI,
    forward_cli: StartCli,
    tmp_path: Path,
) -> None:
    need(NGINX, "nginx (nginx-light)")
    need(str(STREAM_MODULE), "nginx's stream module (libnginx-mod-stream)")
    words, stream = shipped()
    assert "--proxy-protocol" in words
    assert "proxy_protocol on;" in stream
    assert words[words.index("--trusted-proxy") + 1] == "127.0.0.1"
    fwd = await forward_cli(
        *forward_args(words, pki),
        *("-s", str(rserve_qap.socket), "-R", str(rpages.socket), "-r", str(docroot)),
        *("--tls-client", "match:alice", "--max-sessions-per-client", str(PER_SOURCE)),
    )
    port = free_port()
    url = f"wss://127.0.0.1:{port}/"
    alice = pki.client_context("alice")
    with nginx(
        tmp_path / "nginx",
        "",
        port,
        stream=stream_block(stream, fwd.ports["-p"], port),
        connections=1024,
    ):
        clients: list[RClient] = []
        try:
            # 300 sessions, 25 handshakes at a time: all succeed, though each source reaches
            # the per-client cap, which nginx's one address would have hit at the 101st.
            gate = asyncio.Semaphore(25)

            async def session(source: str) -> RClient:
                async with gate:
                    c = await RClient.connect(url, ssl_context=alice, local_addr=source)
                    clients.append(c)
                    assert (await c.eval("1 + 1")).value == [2.0]
                    return c

            await asyncio.gather(*(session(s) for s in SOURCES for _ in range(PER_SOURCE)))
            assert len(clients) == 3 * PER_SOURCE
            connector = aiohttp.TCPConnector(local_addr=(SOURCES[0], 0), ssl=alice)
            async with aiohttp.ClientSession(connector=connector) as s:
                ws = await s.ws_connect(url)
                await ws.receive()
                assert ws.close_code == 1013
            await fwd.expect(f"too many sessions from {SOURCES[0]}")
            log = fwd.log()
            for source in SOURCES:
                assert log.count(f"from {source} on http opened") == PER_SOURCE, source
            assert "from 127.0.0.1 on http opened" not in log
        finally:
            await asyncio.gather(*(c.close() for c in clients))

        # A .R script sees the browser's address as X-Real-IP.
        connector = aiohttp.TCPConnector(local_addr=(SOURCES[1], 0), ssl=alice)
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get(f"https://127.0.0.1:{port}/app/echo.R") as r,
        ):
            assert r.status == 200
            _, _, headers, _, _ = split_request(await r.read())
        assert headers["x-real-ip"] == SOURCES[1]
        assert headers["x-ssl-client-cn"] == "alice"

        # The client-certificate policy, through nginx: a name it does not list is refused
        # with 403, no certificate at all in the handshake; both logged with the source.
        mallory = pki.client_context("mallory")
        connector = aiohttp.TCPConnector(local_addr=(SOURCES[2], 0), ssl=mallory)
        async with aiohttp.ClientSession(connector=connector) as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await s.ws_connect(url)
            assert refused.value.status == 403
        await fwd.expect(f"refused {SOURCES[2]} on http (")
        nobody = pki.client_context()
        connector = aiohttp.TCPConnector(local_addr=(SOURCES[2], 0), ssl=nobody)
        async with aiohttp.ClientSession(connector=connector) as s:
            with pytest.raises((aiohttp.ClientError, ConnectionError)):
                async with s.get(f"https://127.0.0.1:{port}/") as r:
                    await r.read()
        line = await fwd.expect(f"TLS handshake from {SOURCES[2]}:")
        assert "(through 127.0.0.1:" in line and "refused" in line
