"""The `forward` command line: the C program's flags, one-line errors, clean shutdown."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from forward.cli import parse_args
from forward.config import Config, ConfigError

from .conftest import Rserve, RunMain, StartCli, run_forward
from .rclient import RClient


def test_short_flags_keep_the_c_meanings_and_defaults() -> None:
    assert parse_args([]) == Config()
    c = Config()
    assert (c.http_port, c.ws_port, c.socket, c.rscript_socket, c.doc_root, c.ulog) == (
        8088,
        0,
        "Rserve_socket",
        "Rscript_socket",
        ".",
        "ulog_socket",
    )
    c = parse_args(
        [
            "-p",
            "8080",
            "-w",
            "8081",
            "-s",
            "/run/r.sock",
            "-R",
            "/run/rs.sock",
            "-r",
            "/srv/www",
            "-k",
            "k.pem",
            "-c",
            "c.pem",
            "-C",
            "ca.pem",
            "-u",
            "udp://127.0.0.1",
            "-S",
            "mgr:41",
        ]
    )
    assert (c.http_port, c.ws_port, c.socket, c.rscript_socket, c.doc_root) == (
        8080,
        8081,
        "/run/r.sock",
        "/run/rs.sock",
        "/srv/www",
    )
    assert (c.tls_key, c.tls_cert, c.tls_ca, c.ulog, c.server_manager) == (
        "k.pem",
        "c.pem",
        "ca.pem",
        "udp://127.0.0.1",
        "mgr:41",
    )
    long = parse_args(["--http-port", "8080", "--ws-port", "8081", "--socket", "/run/r.sock"])
    assert (long.http_port, long.ws_port, long.socket) == (8080, 8081, "/run/r.sock")
    assert parse_args(["-b", "127.0.0.1", "--bind", "::1"]).bind == ("127.0.0.1", "::1")
    assert parse_args(["-p", "-1", "-w", "8081"]).http_port == -1  # negative disables, as in C


def test_help_exits_zero_with_usage() -> None:
    out = run_forward("-h")
    assert out.returncode == 0
    assert "Usage: forward [-h] [-p <http-port>]" in out.stdout.replace("usage:", "Usage:")
    assert "--tls-key" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-x"], "unrecognized arguments: -x"),
        (["-p"], "argument -p/--http-port: expected one argument"),
        (["-p", "eighty"], "invalid int value: 'eighty'"),
        (["-p", "70000"], "-p 70000: a port must be between 1 and 65535"),
        (["-k", "key.pem"], "-k <key> requires a corresponding certificate"),
        (["-p", "0"], "nothing to listen on"),
        (["-p", "9000", "-w", "9000"], "-p and -w are both 9000"),
        (["--heartbeat", "-5"], "--heartbeat must be 0"),
    ],
)
def test_bad_command_lines_fail_with_one_line(
    args: list[str], message: str, forward_main: RunMain
) -> None:
    out = forward_main(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert message in lines[0]
    assert lines[0].startswith("forward: ")


def test_port_in_use_fails_before_serving() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = run_forward("-b", "127.0.0.1", "-p", str(port))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == f"forward: cannot listen on 127.0.0.1:{port} (-p): Address already in use"


def test_validate_rejects_cert_without_key() -> None:
    with pytest.raises(ConfigError, match="-c <cert> needs the private key"):
        Config(tls_cert="c.pem").validate()


@pytest.mark.rserve
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serves_then_exits_zero_on_signal(
    rserve_qap: Rserve, forward_cli: StartCli, sig: signal.Signals
) -> None:
    fwd = await forward_cli("-s", str(rserve_qap.socket))
    async with await RClient.connect(fwd.url()) as c:
        assert (await c.eval("40 + 2")).value == [42.0]
        fwd.send_signal(sig)
        closing = await c.ws.receive()
        while closing.data != 1001 and not c.ws.closed:  # the OOB notice comes first
            closing = await c.ws.receive()
        assert c.ws.close_code == 1001
    assert await fwd.wait() == 0
    assert "shutting down" in fwd.log() and "Traceback" not in fwd.log()


async def test_out_of_file_descriptors_hurts_only_new_sessions(
    tmp_path: Path, forward_cli: StartCli
) -> None:
    """Few file descriptors: sessions past what fits are refused with a reason (1013) instead of
    being dropped by an event loop out of descriptors; open ones go on, and it recovers."""
    import asyncio
    import resource

    from forward.qap import Cmd

    from .fakes import FakeRserve

    fake = await FakeRserve(tmp_path / "echo.sock", record=False).start()

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    clients: list[RClient] = []
    try:
        fwd = await forward_cli(
            *["-s", str(fake.path), "--max-sessions-per-client", "0"], preexec_fn=low_limit
        )
        url = fwd.url()
        failures = 0
        for _ in range(40):  # 2 descriptors per session: the limit is hit well before 40
            try:
                c = await asyncio.wait_for(RClient.connect(url), 10)
            except ConnectionError as exc:
                assert "1013" in str(exc) and "server at capacity" in str(exc)
                failures += 1
                continue
            clients.append(c)
        assert (failures, len(clients)) == (40 - 12, 12)
        for i, c in enumerate(clients):  # every open session still works
            await c.send(Cmd.EVAL, b"alive", msg_id=i)
            assert (await c.response()).payload == b"alive"
        for c in clients:
            await c.close()
        clients.clear()
        async with await RClient.connect(url) as c:  # and it recovers
            await c.send(Cmd.EVAL, b"again", msg_id=1)
            assert (await c.response()).payload == b"again"
        assert fwd.proc.returncode is None
        await fwd.stop()
        log = fwd.log()
        assert "the open-file limit (48) leaves room for about 12 sessions" in log
        assert "refused WebSocket from 127.0.0.1 on http: server at capacity" in log
        assert "Traceback" not in log
    finally:
        for c in clients:
            await c.close()
        await fake.stop()
