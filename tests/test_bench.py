"""The benchmark script (bench/run.py), run end to end on a tiny load.

Only that it works is checked: every relay is started, driven and stopped, and each figure comes
out as a number (or as "not available" with a reason where the feature is not there yet). The
figures themselves are never asserted: timing belongs to `bench/run.py`, not to the test suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import C_FORWARD, IN_CI
from .test_deploy import NGINX

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a whole benchmark round, if a tiny one: half a minute
ALWAYS = (
    "rtt_p50_us",
    "rtt_p99_us",
    "bulk_mb_s",
    "parallel_msg_s",
    "pss_kb_per_session",
    "sessions_per_s",
)


def need(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (scripts/install-deps installs it)")
    pytest.skip(f"{what} is not installed")


def test_bench_runs_end_to_end_on_a_tiny_load(tmp_path: Path) -> None:
    need(C_FORWARD.exists(), "the C forward (r-cran-rserve)")
    need(shutil.which("R") is not None and Path(NGINX).exists(), "R and nginx")
    need(shutil.which("websockify") is not None, "websockify")
    need(shutil.which("wrk") is not None, "wrk")
    need(importlib.util.find_spec("trustme") is not None, "trustme")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    report = json.loads((out / "results.json").read_text())
    plain = report["schemes"]["plain"]["results"]
    for relay in ("forward", "c-forward", "websockify", "ceiling"):
        figures = plain[relay]
        assert "unavailable" not in figures, figures
        for key in ALWAYS:
            assert isinstance(figures.get(key), float), (relay, key, figures["notes"])
        assert figures["sessions_detail"][0]["sessions"] > 0
        assert figures["sessions_detail"][0]["failed"] == 0
    assert plain["c-forward"]["static_req_s"] > 0
    # forward's own figures are read against the C forward's.
    assert set(report["schemes"]["plain"]["ratios"]["forward"]) >= set(ALWAYS)

    tls = report["schemes"]["tls"]["results"]
    for key in ALWAYS:
        assert isinstance(tls["c-forward"].get(key), float), (key, tls["c-forward"]["notes"])
    # Until forward wires -k/-c into TLS, its WSS figures are reported as not available.
    ours = tls["forward"]
    assert "unavailable" in ours or isinstance(ours.get("rtt_p50_us"), float), ours

    table = (out / "results.md").read_text()
    assert "| round trip p50, 64 B (µs) |" in table
    assert "forward target" in table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round 1: forward" in proc.stdout

    # The real-R section: every path measured with a real Rserve, nginx included.
    real = json.loads((out / "realr.json").read_text())
    assert real["real_r"]["notes"] == {}, real["real_r"]["notes"]
    results = real["real_r"]["results"]
    for path in ("rserve-ws", "nginx-rserve-ws", "c-forward", "forward", "nginx-forward"):
        for key in ("rtt_p50_us", "bulk_mb_s", "connect_ms", "sessions_per_s"):
            assert isinstance(results[path].get(key), float), (path, key)
    for path in ("nginx-rserve-ws", "c-forward", "forward", "forward-warm", "passthrough"):
        assert isinstance(results[path].get("cpu_us_per_call"), float), path
    for path in ("rserve-ws", "forward", "forward-warm"):
        assert isinstance(real["warm"][path].get("greeting_p50_ms"), float), path
    assert "| eval round trip p50 (µs) |" in (out / "realr.md").read_text()
