"""TLS on both listeners and the client-certificate policy (docs/tls.md).

Certificates come from trustme; the clients are aiohttp and `openssl s_client`; sessions go to a
real Rserve. The policy table uses the counting fake backend because its point is that a refused
client never causes a backend connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import signal
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from forward import tls
from forward.config import Config, ConfigError
from forward.tls import ClientPolicy, certificate_subject, parse_policy, refusal

from .conftest import IN_CI, PKI, Rserve, Running, StartCli, StartForward, run_forward
from .fakes import FakeRserve
from .rclient import RClient

GREETING = "Rsrv0103QAP1\r\n\r\n--------------\r\n"


def need_openssl() -> str:
    path = shutil.which("openssl")
    if path:
        return path
    if IN_CI:
        pytest.fail("openssl is required in CI (scripts/install-deps)")
    pytest.skip("openssl is not installed")


def tls_settings(pki: PKI, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tls_key": str(pki.key),
        "tls_cert": str(pki.cert),
        "tls_ca": str(pki.ca_file),
    }
    return base | kw


async def start_tls(
    start_forward: StartForward,
    socket_path: Path | str,
    pki: PKI | None = None,
    **settings: Any,
) -> tuple[Running, tls.Contexts]:
    if pki is not None:
        settings = tls_settings(pki, **settings)
    contexts = tls.Contexts(replace(Config(), **settings))
    fwd = await start_forward(socket_path, ssl_context=contexts.get, **settings)
    return fwd, contexts


class LogWatch(logging.Handler):
    """forward's log lines as they are emitted, with a way to wait for one that another task
    writes (the line for a refused handshake may come after the client has seen the refusal)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._waiting: list[tuple[str, asyncio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for text, event in self._waiting:
            if text in line:
                event.set()

    def seen(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    async def wait_for(self, text: str) -> None:
        if self.seen(text):
            return
        event = asyncio.Event()
        self._waiting.append((text, event))
        async with asyncio.timeout(10):
            await event.wait()


@pytest.fixture
def watch() -> Iterator[LogWatch]:
    handler = LogWatch()
    logger = logging.getLogger("forward")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> Callable[[], bool]:
    return lambda: any(text in r.getMessage() for r in caplog.records)


async def https_get(url: str, ctx: ssl.SSLContext, **kw: Any) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as s, s.get(url, ssl=ctx, **kw) as r:
        return r.status, dict(r.headers), await r.text()


# -- the policy as a pure function -------------------------------------------------------------


def cert(cn: str | None, *extra: tuple[str, str]) -> dict[str, Any]:
    """A peer certificate in the shape getpeercert() gives."""
    subject = [(("organizationName", "Org"),)]
    if cn is not None:
        subject.append((("commonName", cn),))
    subject += [(e,) for e in extra]
    return {"subject": tuple(subject), "issuer": ((("commonName", "CA"),),)}


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ((), ClientPolicy("none")),
        (("none",), ClientPolicy("none")),
        (("request",), ClientPolicy("request")),
        (("require",), ClientPolicy("require")),
        (("match:a,b",), ClientPolicy("require", frozenset({"a", "b"}))),
        (("match:a", "match:b"), ClientPolicy("require", frozenset({"a", "b"}))),
        (("prefix:x", "suffix:y"), ClientPolicy("require", frozenset(), ("x",), ("y",))),
        (("require", "suffix:.org"), ClientPolicy("require", frozenset(), (), (".org",))),
    ],
)
def test_parse_policy(specs: tuple[str, ...], expected: ClientPolicy) -> None:
    assert parse_policy(specs) == expected


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (("optional",), "'optional': use none, request, require"),
        (("match:",), "'match:'"),
        (("match:a,,b",), "'match:a,,b'"),
        (("prefix",), "'prefix'"),
        (("none", "require"), "none and require exclude each other"),
        (("request", "match:a"), "request contradicts match:"),
    ],
)
def test_parse_policy_errors(specs: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_policy(specs)


POLICY_CASES = [
    # (policy, peer certificate, allowed)
    (("none",), None, True),
    (("request",), None, True),
    (("request",), cert("anyone"), True),
    (("require",), None, False),
    (("require",), cert("anyone"), True),
    (("require",), cert(None), True),  # no name rules: any valid certificate
    (("match:alice,bob",), cert("alice"), True),
    (("match:alice,bob",), cert("bob"), True),
    (("match:alice,bob",), cert("Alice"), False),  # case-sensitive
    (("match:alice,bob",), cert("alic"), False),  # a prefix of a listed name
    (("match:alice,bob",), cert("alice2"), False),
    (("match:alice,bob",), cert("alice,bob"), False),  # the list is not a substring to search
    (("match:alice,bob",), cert("e,b"), False),
    (("match:alice,bob",), cert(None), False),
    (("match:alice,bob",), None, False),
    (("prefix:team-",), cert("team-a"), True),
    (("prefix:team-",), cert("team-"), True),
    (("prefix:team-",), cert("Team-a"), False),
    (("prefix:team-",), cert("team"), False),
    (("prefix:team-",), cert("xteam-a"), False),
    (("suffix:.example.org",), cert("a.example.org"), True),
    (("suffix:.example.org",), cert("example.org"), False),  # the suffix without its dot
    (("suffix:.example.org",), cert("a.example.org.evil"), False),
    (("suffix:.example.org",), cert("A.EXAMPLE.ORG"), False),
    (("match:admin", "suffix:.ops"), cert("admin"), True),
    (("match:admin", "suffix:.ops"), cert("db.ops"), True),
    (("match:admin", "suffix:.ops"), cert("db.ops.x"), False),
    (("prefix:a", "prefix:b"), cert("bz"), True),
    # The first common name counts, as in Rserve; other attributes never do.
    (("match:alice",), cert("mallory", ("commonName", "alice")), False),
    (("match:alice",), cert("bob", ("organizationalUnitName", "alice")), False),
]


@pytest.mark.parametrize(("specs", "peer", "allowed"), POLICY_CASES)
def test_refusal(specs: tuple[str, ...], peer: dict[str, Any] | None, allowed: bool) -> None:
    why = refusal(parse_policy(specs), peer)
    assert (why is None) == allowed, why


def test_common_name_and_subject() -> None:
    c = cert("alice", ("organizationalUnitName", "R"))
    assert tls.common_name(c) == "alice"
    assert tls.subject_text(c) == "organizationName=Org,commonName=alice,organizationalUnitName=R"
    assert tls.subject_text(None) == "no certificate"


@pytest.mark.parametrize("year", [2031, 2061])  # UTCTime up to 2049, GeneralizedTime after
def test_not_after(year: int) -> None:
    end = dt.datetime(year, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
    leaf = trustme.CA().issue_cert("x.test", not_after=end)
    assert tls.not_after(leaf.cert_chain_pems[0].bytes().decode()) == end


# -- startup errors ----------------------------------------------------------------------------


def encrypted_key(pki: PKI, passphrase: bytes) -> Path:
    key = serialization.load_pem_private_key(pki.server.private_key_pem.bytes(), None)
    path = pki.directory / "encrypted.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    return path


def run_cli(*args: str) -> tuple[int, str]:
    proc = run_forward("-p", "1", "-s", "/nonexistent", *args)
    return proc.returncode, proc.stderr


def startup_cases(pki: PKI) -> list[tuple[list[str], str]]:
    d = pki.directory
    other_key = d / "other.key"
    trustme.CA().issue_cert("x.test").private_key_pem.write_to_path(str(other_key))
    unreadable = d / "unreadable.key"
    unreadable.write_text("")
    unreadable.chmod(0)
    garbage = d / "garbage.pem"
    garbage.write_text("not a certificate\n")
    enc = encrypted_key(pki, b"s3cret")
    wrong = d / "wrong-pass"
    wrong.write_text("nope\n")
    k, c, ca = str(pki.key), str(pki.cert), str(pki.ca_file)
    cases = [
        (
            ["-k", str(d / "missing.key"), "-c", c],
            f"forward: cannot read TLS key {d / 'missing.key'} (-k): No such file or directory",
        ),
        (["-k", str(other_key), "-c", c], f"the key {other_key} (-k) does not belong to the"),
        (["-k", k, "-c", str(garbage)], f"no PEM certificate in {garbage} (-c)"),
        (["-k", str(garbage), "-c", c], f"no PEM private key in {garbage} (-k)"),
        (["-k", str(enc), "-c", c], "is encrypted: give its passphrase in a file with"),
        (
            ["-k", str(enc), "-c", c, "--tls-passphrase-file", str(wrong)],
            f"cannot decrypt the key {enc} (-k): wrong passphrase?",
        ),
        (
            ["-k", k, "-c", c, "-C", str(d / "missing-ca.pem")],
            f"cannot load CA file {d / 'missing-ca.pem'} (-C): No such file or directory",
        ),
        (["-k", k, "-c", c, "-C", str(garbage)], f"cannot load CA file {garbage} (-C)"),
        (["-k", k], "-k <key> requires a corresponding certificate"),
        (["-k", k, "-c", c, "--tls-client", "require"], "--tls-client require needs -C"),
        (["-k", k, "-c", c, "-C", ca, "--tls-client", "match"], "--tls-client 'match': use"),
        (["--tls-client", "require"], "--tls-client needs TLS: add -k <key> -c <cert>"),
        (["--hsts", "60"], "--hsts needs TLS"),
        (["--hsts-include-subdomains"], "--hsts-include-subdomains needs TLS"),
        (["--tls-ciphers", "AES128-SHA"], "--tls-ciphers needs TLS"),
        (["-k", k, "-c", c, "--tls-ciphers", "NOPE"], "--tls-ciphers 'NOPE': OpenSSL selects"),
        (["--redirect-port", "8080"], "--redirect-port needs TLS"),
    ]
    if os.geteuid() != 0:  # root reads any file
        cases.append((["-k", str(unreadable), "-c", c], "(-k): Permission denied"))
    return cases


def test_startup_errors(pki: PKI) -> None:
    cases = startup_cases(pki)
    with ThreadPoolExecutor(8) as pool:  # each is a Python start-up: side by side, not in turn
        results = list(pool.map(lambda case: run_cli(*case[0]), cases))
    for (args, message), (status, stderr) in zip(cases, results, strict=True):
        assert status != 0, args
        assert message in stderr, (args, stderr)
        assert stderr.count("\n") == 1, stderr  # one line, no traceback


def test_passphrase_from_file_or_environment(pki: PKI, tmp_path: Path) -> None:
    enc = encrypted_key(pki, b"s3cret")
    pass_file = tmp_path / "pass"
    pass_file.write_text("s3cret\n")  # the trailing newline of `echo` is not part of it
    base = replace(Config(), tls_key=str(enc), tls_cert=str(pki.cert))
    tls.build_context(replace(base, tls_passphrase_file=str(pass_file)), environ={})
    tls.build_context(base, environ={tls.PASSPHRASE_ENV: "s3cret"})
    with pytest.raises(ConfigError, match="wrong passphrase"):
        tls.build_context(base, environ={tls.PASSPHRASE_ENV: "wrong"})


def test_expired_certificate_warns(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    leaf = pki.ca.issue_cert("127.0.0.1", not_before=past, not_after=past + dt.timedelta(days=1))
    key, crt = pki.directory / "old.key", pki.directory / "old.pem"
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(crt))
    tls.build_context(replace(Config(), tls_key=str(key), tls_cert=str(crt)))
    assert logged(caplog, f"the certificate {crt} (-c) expired on 2020-01-02")()


# -- HTTPS and WSS on both ports ---------------------------------------------------------------


@pytest.mark.rserve
@pytest.mark.parametrize("listener", ["http", "ws"])
async def test_wss_and_https_on_both_ports(
    rserve_qap: Rserve, start_forward: StartForward, pki: PKI, listener: str
) -> None:
    fwd, _ = await start_tls(start_forward, rserve_qap.socket, pki)
    async with await RClient.connect(fwd.url(listener), ssl_context=pki.client_context()) as c:
        assert c.greeting == GREETING
        assert (await c.eval("6*7")).value == [42.0]
    port = fwd.server.port(listener)
    status, _, text = await https_get(f"https://127.0.0.1:{port}/x", pki.client_context())
    # -p has no document root in this test (404); -w answers anything but an upgrade with 426.
    assert (status, listener) in ((404, "http"), (426, "ws")), text


async def s_client(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        need_openssl(),
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


@pytest.mark.parametrize("listener", ["http", "ws"])
async def test_s_client_handshake(
    start_forward: StartForward,
    pki: PKI,
    tmp_path: Path,
    watch: LogWatch,
    listener: str,
) -> None:
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki)
    out = await s_client(
        fwd.server.port(listener),
        "-CAfile",
        str(pki.ca_file),
        "-alpn",
        "http/1.1",
        "-verify_return_error",
    )
    assert "Verify return code: 0 (ok)" in out, out
    assert "ALPN protocol: http/1.1" in out, out
    assert "CN = forward.test" in out, out
    out = await s_client(fwd.server.port(listener), "-tls1_2", "-CAfile", str(pki.ca_file))
    assert "Protocol  : TLSv1.2" in out, out
    # TLS 1.1 is refused by the server (the client is allowed to try it at security level 0).
    out = await s_client(fwd.server.port(listener), "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "Cipher is (NONE)" in out, out
    await watch.wait_for("refused: unsupported protocol")


@pytest.mark.parametrize("listener", ["http", "ws"])
@pytest.mark.parametrize("scheme", ["http", "ws"])
async def test_plain_text_on_a_tls_port_is_refused(
    start_forward: StartForward,
    pki: PKI,
    tmp_path: Path,
    watch: LogWatch,
    listener: str,
    scheme: str,
) -> None:
    fake = await FakeRserve(tmp_path / "r.sock").start()
    try:
        fwd, _ = await start_tls(start_forward, fake.path, pki)
        url = f"{scheme}://127.0.0.1:{fwd.server.port(listener)}/"
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                if scheme == "ws":
                    await s.ws_connect(url)
                else:
                    await s.get(url)
        await watch.wait_for("refused: plain HTTP on a TLS port")
        assert fake.connections == 0
        # Still serving TLS afterwards.
        status, _, _ = await https_get(
            fwd.url(listener).replace("wss", "https"), pki.client_context()
        )
        assert status in (404, 426)
    finally:
        await fake.stop()


async def test_minimum_version(start_forward: StartForward, pki: PKI, tmp_path: Path) -> None:
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki, tls_min_version="1.3")
    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(aiohttp.ClientError):
        await https_get(fwd.http_url("/"), tls12)
    fwd12, _ = await start_tls(start_forward, tmp_path / "no.sock", pki)
    assert (await https_get(fwd12.http_url("/"), tls12))[0] == 404


CBC_SUITE = "ECDHE-ECDSA-AES128-SHA256"  # what OpenSSL's default list offers on TLS 1.2


async def test_cipher_profile_and_override(
    start_forward: StartForward, pki: PKI, tmp_path: Path
) -> None:
    """Mozilla intermediate by default: a client that offers only a CBC suite gets no
    handshake; `--tls-ciphers` puts OpenSSL's list back."""
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki)
    port = fwd.server.port("http")
    out = await s_client(port, "-tls1_2", "-cipher", CBC_SUITE)
    assert "Cipher is (NONE)" in out, out
    out = await s_client(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
    assert "Cipher is ECDHE-ECDSA-CHACHA20-POLY1305" in out, out
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki, tls_ciphers="DEFAULT")
    out = await s_client(fwd.server.port("http"), "-tls1_2", "-cipher", CBC_SUITE)
    assert f"Cipher is {CBC_SUITE}" in out, out


def need_testssl() -> str:
    path = shutil.which("testssl") or shutil.which("testssl.sh")
    if path:
        return path
    if IN_CI:
        pytest.fail("testssl.sh is required in CI (scripts/install-deps)")
    pytest.skip("testssl.sh is not installed")


@pytest.mark.slow
async def test_testssl_scan(start_forward: StartForward, pki: PKI, tmp_path: Path) -> None:
    """testssl.sh, limited to protocols, ciphers per protocol and vulnerabilities (about 20 s):
    nothing below TLS 1.2, only AEAD suites with forward secrecy, nothing vulnerable."""
    testssl = need_testssl()
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki)
    report = tmp_path / "testssl.json"
    proc = await asyncio.create_subprocess_exec(
        testssl,
        *("--quiet", "--color", "0", "--warnings", "batch", "--jsonfile", str(report)),
        *("--protocols", "--cipher-per-proto", "--vulnerable"),
        f"127.0.0.1:{fwd.server.port('http')}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert report.exists(), out.decode(errors="replace")
    findings = {f["id"]: f for f in json.loads(report.read_text())}
    text = out.decode(errors="replace")
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[old]["finding"].startswith("not offered"), (old, text)
    assert findings["TLS1_2"]["finding"] == "offered", text
    suites = [f["finding"].split()[3] for k, f in findings.items() if k.startswith("cipher-tls1_2")]
    assert suites, text
    for suite in suites:
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), suite
    bad = [
        f"{f['id']}: {f['finding']}"
        for f in findings.values()
        if "VULNERABLE" in f["finding"].upper().replace("NOT VULNERABLE", "")
        or f["severity"] in ("MEDIUM", "HIGH", "CRITICAL")
    ]
    assert not bad, text
    assert findings["LUCKY13"]["severity"] == "OK", text


# -- certificate chains ------------------------------------------------------------------------


async def test_chain_from_ca_file_and_fullchain(
    start_forward: StartForward, tmp_path: Path
) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1", common_name="chained.test")
    key, only_leaf, chain, fullchain = (tmp_path / n for n in ("k", "leaf", "chain", "full"))
    leaf.private_key_pem.write_to_path(str(key))
    leaf.cert_chain_pems[0].write_to_path(str(only_leaf))
    chain.write_bytes(intermediate.cert_pem.bytes() + root.cert_pem.bytes())
    fullchain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    client = ssl.create_default_context()
    root.configure_trust(client)  # the client knows only the root

    for settings in (
        {"tls_key": str(key), "tls_cert": str(only_leaf), "tls_ca": str(chain)},  # -c leaf -C
        {"tls_key": str(key), "tls_cert": str(fullchain)},  # Let's Encrypt's fullchain.pem
    ):
        fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", **settings)
        assert (await https_get(fwd.http_url("/"), client))[0] == 404
        out = await s_client(fwd.server.port("ws"), "-showcerts")
        assert out.count("BEGIN CERTIFICATE") >= 2, out

    # The leaf alone does not verify: the chain really came from -C or the fullchain.
    fwd, _ = await start_tls(
        start_forward, tmp_path / "no.sock", tls_key=str(key), tls_cert=str(only_leaf)
    )
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await https_get(fwd.http_url("/"), client)


# -- the client-certificate policy end to end --------------------------------------------------

# (client certificate common name or None, issued by the trusted CA?) -> outcome per policy:
# "ok" (session reaches R), "handshake" (TLS refuses it), 403 (refused by name before R).
E2E = {
    ("none",): [((None, True), "ok"), (("alice", True), "ok"), (("alice", False), "ok")],
    ("request",): [((None, True), "ok"), (("alice", True), "ok"), (("alice", False), "handshake")],
    ("require",): [
        ((None, True), "handshake"),
        (("alice", True), "ok"),
        (("alice", False), "handshake"),
    ],
    ("match:alice,bob",): [
        (("alice", True), "ok"),
        (("bob", True), "ok"),
        (("Alice", True), 403),
        (("alic", True), 403),
        (("alice,bob", True), 403),
        ((None, True), "handshake"),
        (("alice", False), "handshake"),
    ],
    ("prefix:team-",): [
        (("team-a", True), "ok"),
        (("Team-a", True), 403),
        (("xteam-a", True), 403),
    ],
    ("suffix:.example.org",): [
        (("db.example.org", True), "ok"),
        (("example.org", True), 403),
        (("db.example.org.evil", True), 403),
    ],
    ("match:admin", "suffix:.ops"): [
        (("admin", True), "ok"),
        (("db.ops", True), "ok"),
        (("db.ops.x", True), 403),
        (("root", True), 403),
    ],
}


@pytest.mark.parametrize("specs", list(E2E), ids=[" ".join(s) for s in E2E])
async def test_policy_end_to_end(
    start_forward: StartForward,
    pki: PKI,
    tmp_path: Path,
    watch: LogWatch,
    specs: tuple[str, ...],
) -> None:
    fake = await FakeRserve(tmp_path / "r.sock").start()
    try:
        fwd, _ = await start_tls(start_forward, fake.path, pki, tls_client=specs)
        for (cn, trusted), outcome in E2E[specs]:
            before = fake.connections
            watch.lines.clear()
            ctx = pki.client_context(cn, issuer=None if trusted else pki.other_ca)
            where = f"{specs} {cn} trusted={trusted}"
            refused = f"commonName={cn}): common name {cn!r} is not allowed"
            async with aiohttp.ClientSession() as s:
                if outcome == "ok":
                    async with s.ws_connect(fwd.url("ws"), ssl=ctx) as ws:
                        assert (await ws.receive()).data == GREETING, where
                    assert fake.connections == before + 1, where
                    continue
                with pytest.raises(aiohttp.ClientError) as err:
                    await s.ws_connect(fwd.url("ws"), ssl=ctx)
            if outcome == 403:
                assert isinstance(err.value, aiohttp.WSServerHandshakeError), where
                assert err.value.status == 403, where
                assert watch.seen(refused), where
            else:
                assert not isinstance(err.value, aiohttp.WSServerHandshakeError), where
                await watch.wait_for("TLS handshake from 127.0.0.1:")
            assert fake.connections == before, where  # nothing reached the backend
    finally:
        await fake.stop()


async def test_policy_applies_to_http_requests_on_p(
    start_forward: StartForward, pki: PKI, tmp_path: Path, watch: LogWatch
) -> None:
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki, tls_client=("match:alice",))
    status, _, text = await https_get(fwd.http_url("/index.html"), pki.client_context("mallory"))
    assert status == 403
    assert "common name 'mallory' is not allowed" in text
    assert watch.seen("refused 127.0.0.1 on http (")
    assert (await https_get(fwd.http_url("/index.html"), pki.client_context("alice")))[0] == 404


# -- rotation ----------------------------------------------------------------------------------


def write_server_files(directory: Path, ca: trustme.CA, cn: str) -> None:
    leaf = ca.issue_cert("127.0.0.1", common_name=cn)
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.mark.rserve
async def test_reload_keeps_sessions_and_serves_the_new_certificate(
    rserve_qap: Rserve,
    start_forward: StartForward,
    tmp_path: Path,
    watch: LogWatch,
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    write_server_files(tmp_path, old_ca, "old.test")
    settings = {"tls_key": str(tmp_path / "server.key"), "tls_cert": str(tmp_path / "server.pem")}
    fwd, contexts = await start_tls(start_forward, rserve_qap.socket, **settings)
    both = trusting(old_ca)
    new_ca.configure_trust(both)

    async with await RClient.connect(fwd.url("ws"), ssl_context=both) as before:
        await before.eval("x <- 1")
        write_server_files(tmp_path, new_ca, "new.test")
        assert contexts.reload()
        # The session opened before the reload carries on with its own connection.
        assert (await before.eval("x + 1")).value == [2.0]
        for listener in ("http", "ws"):
            url = fwd.url(listener)
            async with await RClient.connect(url, ssl_context=trusting(new_ca)) as after:
                assert (await after.eval("2+2")).value == [4.0]
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await RClient.connect(url, ssl_context=trusting(old_ca))

        # A bad reload keeps the previous (new.test) certificate in service.
        (tmp_path / "server.key").write_text("-----BEGIN PRIVATE KEY-----\nbroken\n")
        assert not contexts.reload()
        assert watch.seen("TLS reload failed, still serving the previous certificate")
        async with await RClient.connect(fwd.url("ws"), ssl_context=trusting(new_ca)) as after:
            assert (await after.eval("3")).value == [3.0]
        assert (await before.eval("x")).value == [1.0]


async def test_sighup_reloads_the_cli(tmp_path: Path, forward_cli: StartCli) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    write_server_files(tmp_path, old_ca, "old.test")
    fwd = await forward_cli(
        *["-s", str(tmp_path / "no.sock")],
        *["-k", str(tmp_path / "server.key"), "-c", str(tmp_path / "server.pem")],
    )
    port = fwd.ports["-p"]
    assert "CN = old.test" in await s_client(port)
    write_server_files(tmp_path, new_ca, "new.test")
    fwd.send_signal(signal.SIGHUP)
    await fwd.expect("TLS reload: key, certificate and CA loaded again")
    assert "CN = new.test" in await s_client(port)
    (tmp_path / "server.pem").write_text("garbage")
    fwd.send_signal(signal.SIGHUP)
    await fwd.expect("TLS reload failed")
    assert "CN = new.test" in await s_client(port)
    assert await fwd.stop() == 0, fwd.log()


# -- HSTS and the redirect port ----------------------------------------------------------------


async def test_hsts_header(start_forward: StartForward, pki: PKI, tmp_path: Path) -> None:
    # With TLS, one day by default, as RStudio Server.
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki)
    for listener in ("http", "ws"):
        url = fwd.url(listener).replace("wss:", "https:")
        _, headers, _ = await https_get(url, pki.client_context())
        assert headers["Strict-Transport-Security"] == "max-age=86400"
    fwd, _ = await start_tls(
        start_forward, tmp_path / "no.sock", pki, hsts=600, hsts_include_subdomains=True
    )
    _, headers, _ = await https_get(fwd.http_url("/"), pki.client_context())
    assert headers["Strict-Transport-Security"] == "max-age=600; includeSubDomains"
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki, hsts=0)
    _, headers, _ = await https_get(fwd.http_url("/"), pki.client_context())
    assert "Strict-Transport-Security" not in headers
    assert headers["X-Content-Type-Options"] == "nosniff"  # the others stay


async def test_redirect_port(start_forward: StartForward, pki: PKI, tmp_path: Path) -> None:
    fwd, _ = await start_tls(start_forward, tmp_path / "no.sock", pki, redirect_port=3)
    plain = f"http://127.0.0.1:{fwd.server.port('redirect')}/app/x.R?a=1&b=%20"
    target = f"https://127.0.0.1:{fwd.server.port('http')}/app/x.R?a=1&b=%20"
    async with aiohttp.ClientSession() as s:
        async with s.get(plain, allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (301, target)
            assert r.headers["X-Frame-Options"] == "DENY"
            assert "Strict-Transport-Security" not in r.headers  # not over plain HTTP
        async with s.post(plain, data=b"x", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (308, target)
        async with s.get(plain, ssl=pki.client_context()) as r:  # followed: lands on HTTPS
            assert (r.status, str(r.url)) == (404, target)


def test_certificate_subject() -> None:
    cert = {
        "subject": (
            (("countryName", "DE"),),
            (("organizationName", "ACME, Inc."),),
            (("commonName", "alice"),),
        )
    }
    assert certificate_subject(cert) == ("CN=alice,O=ACME\\, Inc.,C=DE", "alice")
    assert certificate_subject({}) == (None, None)
    assert certificate_subject(None) == (None, None)
