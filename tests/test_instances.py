"""Several forward instances behind the shipped nginx file (deploy/nginx/forward-instances.conf),
each with its own Rserve: sessions spread over both, every resume lands on the instance holding
its session whenever its connection is cut, a resume that reaches the wrong instance is told
"gone" at once, and stopping one instance touches only its own sessions."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import trustme

from forward import qap
from forward.resume import PROTOCOL, ResumeClose, ticket_token

from .conftest import Rserve, StartCli, free_port
from .cutproxy import CutProxy
from .resume_client import Gone, ResumeClient
from .test_deploy import DEPLOY, NGINX, need, nginx

pytestmark = pytest.mark.rserve


def instances_site(ports: dict[str, int], port: int, cert: Path, key: Path) -> str:
    """The shipped file with this test's ports and certificate (instances a and b)."""
    text = (DEPLOY / "nginx" / "forward-instances.conf").read_text()
    for default, name in ((8081, "a"), (8082, "b")):
        text = text.replace(f"server 127.0.0.1:{default};", f"server 127.0.0.1:{ports[name]};")
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    text = text.replace("    listen [::]:443 ssl;\n", "")
    text = text.replace("/etc/ssl/forward/fullchain.pem", str(cert))
    return text.replace("/etc/ssl/forward/privkey.pem", str(key))


async def test_resumes_find_their_instance_behind_nginx(
    fresh_rserve: Callable[..., Rserve],
    forward_cli: StartCli,
    proxies: Callable[[int], Awaitable[CutProxy]],
    clients: Callable[..., ResumeClient],
    tmp_path: Path,
) -> None:
    need(NGINX, "nginx (nginx-light)")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    tls = ssl.create_default_context()
    ca.configure_trust(tls)

    ports = {"a": free_port(), "b": free_port()}
    fwds = {}
    for name in ("a", "b"):
        r = fresh_rserve()
        fwds[name] = await forward_cli(
            "-s",
            r.socket,
            "-p",
            str(ports[name]),
            "--instance-id",
            name,
            ports=(),
            ready="listening on",
        )
    port = free_port()
    with nginx(tmp_path / "nginx", instances_site(ports, port, cert, key), port):
        # Each client behind its own cuttable link to nginx.
        links = [await proxies(port) for _ in range(10)]
        cs = []
        for i, link in enumerate(links):
            origin = f"https://127.0.0.1:{link.port}"
            c = clients(f"wss://127.0.0.1:{link.port}/", ssl_context=tls, origin=origin)
            await c.connect()
            await c.eval(f"x <- {i}; Sys.getpid()", 1)
            cs.append(c)
        pids = []
        for c in cs:
            await c.wait_messages(1)
            pids.append(c.values()[0])
        where = [c.ticket.split("_")[0] for c in cs if c.ticket]
        assert sorted(set(where)) == ["a", "b"], where  # least_conn spread them
        assert min(where.count("a"), where.count("b")) >= 3, where

        # Cuts at random moments, during evaluations: every resume finds its R again.
        rng = random.Random(14)
        for round_ in range(3):
            for c in cs:
                await c.eval(f"Sys.sleep({rng.uniform(0, 0.3):.3f}); x + {round_}", 2 + round_)
            for link in rng.sample(links, 6):
                await asyncio.sleep(rng.uniform(0, 0.2))
                link.cut()
            for i, c in enumerate(cs):
                await c.wait_messages(2 + round_)
                assert c.values()[1 + round_] == [float(i + round_)]
        for i, c in enumerate(cs):
            await c.eval("Sys.getpid()", 9)
            await c.wait_messages(5)
            assert c.values()[4] == pids[i], i  # the same R, so the same instance
        assert sum(c.resumes for c in cs) >= 6

        # A ticket for one instance, sent straight to the other: gone, at once.
        holder = next(c for c in cs if c.ticket and c.ticket.startswith("a_"))
        assert holder.ticket is not None
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(
                f"ws://127.0.0.1:{ports['b']}/",
                protocols=(PROTOCOL, ticket_token(holder.ticket, len(holder.stream))),
            )
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == ResumeClose.GONE
            assert "the ticket is for instance a; this is instance b" in msg.extra
            # A ticket naming no instance nginx knows goes to the pool, and is gone there too.
            stray = "zz_" + holder.ticket.split("_", 1)[1]
            ws = await http.ws_connect(
                f"wss://127.0.0.1:{port}/", ssl=tls, protocols=(PROTOCOL, ticket_token(stray, 0))
            )
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == ResumeClose.GONE

        # Stopping instance a ends its sessions only: they get the shutdown notice, and no
        # resume brings them back; b's go on.
        assert await fwds["a"].stop() == 0

        async def after_the_stop(i: int, c: ResumeClient) -> None:
            await c.eval("x", 10)
            await c.wait_messages(6)
            if where[i] == "b":
                assert c.values()[5] == [float(i)]
            else:
                assert c.messages[5].header.cmd & 0xFFFFF000 == qap.Cmd.OOB_SEND
                with pytest.raises((Gone, TimeoutError)):
                    await c.wait_messages(7)

        await asyncio.gather(*(after_the_stop(i, c) for i, c in enumerate(cs)))
