"""forward's benchmark: the same client load through forward, the C forward, websockify and a
no-relay ceiling, in one run, with ratios against the C forward; then a real R behind Rserve's own
WebSocket listener, nginx, the C forward and forward (bench/realr.py; see docs/bench.md).

    python3 bench/run.py                 # the full load, results in docs/bench/
    python3 bench/run.py --quick --out /tmp/b   # a tiny load, to check the script works
    python3 bench/run.py --sections real-r      # only the real-R section (realr.md)

Everything binds or targets 127.0.0.1 (the C forward binds all interfaces, as it always does, but
the client only ever connects to 127.0.0.1). Every process started here is stopped before exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import realr
from realr import fmt

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
C_FORWARD = Path("/usr/lib/R/site-library/Rserve/libs/forward")
HOST = "127.0.0.1"
RELAYS = ("forward", "forward-resume", "c-forward", "websockify", "ceiling")
SECTIONS = ("relays", "real-r")
# forward with clients that ask for session resume (docs/resume.md): compared with "forward".
RESUME_STEPS = ("rtt", "bulk_window", "reconnect")
SCHEMES = ("plain", "tls")
STATIC_BODY = b"<!doctype html><title>bench</title>" + b"<p>static file</p>\n" * 48

# figure -> (label, unit, higher is better, target for forward as a ratio against the C forward)
FIGURES: dict[str, tuple[str, str, bool, float | None]] = {
    "rtt_p50_us": ("round trip p50, 64 B", "µs", False, 1.0),
    "rtt_p99_us": ("round trip p99, 64 B", "µs", False, 1.0),
    "bulk_mb_s": ("bulk echo, large messages", "MB/s", True, 1.3),
    "parallel_msg_s": ("32 sessions in parallel, 1 KB", "msg/s", True, 1.5),
    "pss_kb_per_session": ("PSS per idle session", "KB", False, 0.1),
    "sessions_per_s": ("sessions opened per second", "1/s", True, 5.0),
    "static_req_s": ("static file, keep-alive (wrk)", "req/s", True, 10.0),
    "bulk_window_mb_s": ("bulk echo, 256 KiB messages", "MB/s", True, None),
    "reconnect_ms": ("resume: connect to first replayed byte", "ms", False, None),
}
PSS_TARGET_KB = 12.0


@dataclass
class Load:
    rtt_calls: int = 5000
    bulk_size: int = 16 * 1024 * 1024
    bulk_count: int = 8
    bulk_seconds: float = 2.0
    parallel_sessions: int = 32
    parallel_procs: int = 2
    parallel_seconds: float = 3.0
    sessions: int = 5000
    sessions_websockify: int = 500
    session_procs: int = 2
    static_seconds: float = 3.0
    wrk_connections: int = 16
    echo_workers: int = 2
    rounds: int = 5
    session_rounds: int = 1
    # Within resume's window (1 MiB): the echo backend answers while a request still arrives,
    # and a larger answer would wait for acknowledgements queued behind the request.
    window_size: int = 256 * 1024
    reconnects: int = 40


QUICK = Load(
    rtt_calls=50, bulk_size=256 * 1024, bulk_count=2, bulk_seconds=0, parallel_sessions=4,
    parallel_seconds=0.3, sessions=20, sessions_websockify=10, static_seconds=1,
    wrk_connections=2, rounds=1, reconnects=3,
)


class NotAvailable(Exception):
    """A relay or figure that cannot be measured on this system or in this branch."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Forked children of a relay may outlive its main process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def start(name: str, cmd: list[str], workdir: Path, **kw: Any) -> Proc:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, **kw,
        )
    return Proc(name, popen, log)


def free_port() -> int:
    # Free on every interface, since the C forward binds them all.
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, proc: Proc, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while time.monotonic() < deadline:
        if not proc.alive():
            raise NotAvailable(f"{proc.name} exited ({proc.popen.returncode}): {proc.log_tail()}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    raise NotAvailable(f"{proc.name}: {what} not ready within {timeout} s")


def connectable(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


def tls_handshake(port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST):
        pass


# -- measurements -------------------------------------------------------------------------------

def client(
    mode: str, port: int, ca: str | None, *args: str, timeout: float = 300
) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "client.py"), mode, "--port", str(port), *args]
    if ca:
        cmd += ["--ca", ca]
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if out.returncode != 0:
        err = out.stderr.decode(errors="replace").strip().splitlines()
        raise NotAvailable(f"client {mode} failed: {err[-1] if err else out.returncode}")
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def clients(mode: str, port: int, ca: str | None, procs: int, *args: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(BENCH / "client.py"), mode, "--port", str(port), *args]
    if ca:
        cmd += ["--ca", ca]
    running = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for _ in range(procs)]
    results = []
    for p in running:
        stdout, stderr = p.communicate(timeout=300)
        if p.returncode != 0:
            err = stderr.decode(errors="replace").strip().splitlines()
            raise NotAvailable(f"client {mode} failed: {err[-1] if err else p.returncode}")
        results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return results


def process_tree(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, ()))
    return out


def pss_kb(pid: int) -> tuple[float, int]:
    """PSS of a process and all its descendants (KB), and how many processes that is."""
    total, count = 0, 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    count += 1
                    break
    return float(total), count


def many_sessions(port: int, ca: str | None, relay_pid: int, n: int, procs: int) -> dict[str, Any]:
    base, _ = pss_kb(relay_pid)
    per = max(1, n // procs)
    cmd = [sys.executable, str(BENCH / "client.py"), "sessions", "--port", str(port),
           "--sessions", str(per), "--concurrency", str(max(1, 64 // procs))]
    if ca:
        cmd += ["--ca", ca]
    running = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for _ in range(procs)]
    try:
        reports = []
        for p in running:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line:
                err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                raise NotAvailable(f"sessions client failed: {err.strip()[-200:]}")
            reports.append(json.loads(line))
        opened = sum(r["opened"] for r in reports)
        if opened == 0:
            raise NotAvailable(f"no session opened: {reports[0]['first_failure']}")
        # Let forked relay children finish their set-up before their memory is read.
        time.sleep(0.5)
        total, nprocs = pss_kb(relay_pid)
    finally:
        for p in running:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.write(b"\n")
                p.stdin.close()
        for p in running:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    failed = sum(r["failed"] for r in reports)
    return {
        "sessions": opened,
        "failed": failed,
        "sessions_per_s": opened / max(r["seconds"] for r in reports),
        "pss_kb_per_session": (total - base) / opened,
        "pss_kb_total": total,
        "pss_kb_before": base,
        "processes": nprocs,
        "first_failure": next((r["first_failure"] for r in reports if r["first_failure"]), None),
    }


def static(port: int, ctx: ssl.SSLContext | None, load: Load) -> dict[str, Any]:
    scheme = "https" if ctx else "http"
    url = f"{scheme}://{HOST}:{port}/static.html"
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            body = resp.read()
    except OSError as exc:
        raise NotAvailable(f"GET /static.html: {exc}") from exc
    if body != STATIC_BODY:
        raise NotAvailable("GET /static.html did not return the file")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise NotAvailable("wrk is not installed (apt-get install wrk)")
    out = subprocess.run(
        [wrk, "-t1", f"-c{load.wrk_connections}", f"-d{max(1, round(load.static_seconds))}s", url],
        capture_output=True, timeout=load.static_seconds + 60, check=False,
    )
    text = out.stdout.decode(errors="replace")
    m = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if out.returncode != 0 or not m:
        raise NotAvailable(f"wrk failed: {text.strip()[-200:] or out.stderr.decode()[-200:]}")
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if errors:
        raise NotAvailable(f"wrk got {errors.group(1)} error responses")
    return {"static_req_s": float(m.group(1))}


# -- relays -------------------------------------------------------------------------------------

@dataclass
class Env:
    work: Path
    socket: Path
    www: Path
    forward_root: Path = REPO
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_ctx: ssl.SSLContext | None = None
    notes: list[str] = field(default_factory=list)


def session_limits(env: Env) -> list[str]:
    """Lift forward's per-client session cap (if this checkout has one): every benchmark
    session comes from 127.0.0.1."""
    out = subprocess.run(
        [sys.executable, "-m", "forward", "-h"], capture_output=True, text=True, check=False,
        cwd=env.forward_root,
        env=dict(os.environ, PYTHONPATH=str(env.forward_root), PYTHONDONTWRITEBYTECODE="1"),
    ).stdout
    flags = []
    if "--max-sessions-per-client" in out:
        flags += ["--max-sessions-per-client", "0"]
    if re.search(r"--max-sessions\b(?!-)", out):
        flags += ["--max-sessions", "0"]
    return flags


def relay_command(name: str, port: int, env: Env, tls: bool) -> tuple[list[str], dict[str, Any]]:
    sock = str(env.socket)
    if name in ("forward", "forward-resume"):
        cmd = [sys.executable, "-m", "forward", "-p", str(port), "-b", HOST, "-s", sock,
               "-r", str(env.www), "--heartbeat", "0", "--log-level", "warning"]
        if tls:
            cmd += ["-k", str(env.key), "-c", str(env.cert)]
        cmd += session_limits(env)
        # No bytecode files: --forward-root may be someone else's checkout.
        envvars = dict(os.environ, PYTHONPATH=str(env.forward_root), PYTHONDONTWRITEBYTECODE="1")
        return cmd, {"cwd": str(env.forward_root), "env": envvars}
    if name == "c-forward":
        if not C_FORWARD.exists():
            raise NotAvailable(f"{C_FORWARD} is not installed (apt-get install r-cran-rserve)")
        cmd = [str(C_FORWARD), "-p", str(port), "-s", sock, "-r", str(env.www)]
        if tls:
            cmd += ["-k", str(env.key), "-c", str(env.cert)]
        return cmd, {"cwd": str(env.work)}
    if name == "websockify":
        exe = shutil.which("websockify")
        if exe is None:
            raise NotAvailable("websockify is not installed (pip install websockify)")
        cmd = [exe, f"--unix-target={sock}", f"{HOST}:{port}"]
        if tls:
            cmd += ["--cert", str(env.cert), "--key", str(env.key), "--ssl-only"]
        return cmd, {"cwd": str(env.work)}
    cmd = [sys.executable, str(BENCH / "servers.py"), "ceiling", "--port", str(port)]
    if tls:
        cmd += ["--cert", str(env.cert), "--key", str(env.key)]
    return cmd, {"cwd": str(env.work)}


@dataclass
class Running:
    name: str
    port: int
    proc: Proc | None = None
    result: dict[str, Any] = field(default_factory=lambda: {"notes": {}, "samples": {}})

    def note(self, step: str, text: str) -> None:
        self.result["notes"][step] = text

    def sample(self, key: str, value: float) -> None:
        self.result["samples"].setdefault(key, []).append(value)


def start_relay(name: str, env: Env, tls: bool) -> Running:
    run = Running(name, free_port())
    try:
        cmd, kw = relay_command(name, run.port, env, tls)
        run.proc = start(f"{name}-{'tls' if tls else 'plain'}", cmd, env.work, **kw)
        wait_until(lambda: connectable(run.port), run.proc, f"port {run.port}")
        if tls:
            assert env.client_ctx is not None
            try:
                tls_handshake(run.port, env.client_ctx)
            except (OSError, ssl.SSLError) as exc:
                raise NotAvailable(f"no TLS on the port ({type(exc).__name__}: {exc})") from exc
    except NotAvailable as exc:
        run.result["unavailable"] = str(exc)
        if run.proc is not None:
            run.proc.stop()
        run.proc = None
    return run


def step_runner(step: str, run: Running, env: Env, tls: bool, load: Load) -> Any:
    port, ca = run.port, env.ca if tls else None
    resume = ["--resume"] if run.name == "forward-resume" else []
    if step == "rtt":
        out = client("latency", port, ca, "--calls", str(load.rtt_calls), "--size", "64", *resume)
        run.sample("rtt_p50_us", out["p50_us"])
        run.sample("rtt_p99_us", out["p99_us"])
    elif step == "bulk":
        out = client("bulk", port, ca, "--size", str(load.bulk_size),
                     "--count", str(load.bulk_count), "--seconds", str(load.bulk_seconds),
                     "--stall", "10" if load.bulk_seconds == 0 else "30")
        run.sample("bulk_mb_s", out["mb_per_s"])
    elif step == "bulk_window":
        out = client("bulk", port, ca, "--size", str(load.window_size),
                     "--count", str(load.bulk_count * 8), "--seconds", str(load.bulk_seconds),
                     "--stall", "10", *resume)
        run.sample("bulk_window_mb_s", out["mb_per_s"])
    elif step == "reconnect":
        out = client("reconnect", port, ca, "--size", str(load.window_size),
                     "--count", str(load.reconnects))
        run.sample("reconnect_ms", out["p50_ms"])
    elif step == "parallel":
        outs = clients("parallel", port, ca, load.parallel_procs,
                       "--sessions", str(max(1, load.parallel_sessions // load.parallel_procs)),
                       "--size", "1024", "--seconds", str(load.parallel_seconds))
        run.sample("parallel_msg_s", sum(o["msg_per_s"] for o in outs))
    elif step == "static":
        run.sample("static_req_s", static(port, env.client_ctx if tls else None, load)
                   ["static_req_s"])
    elif step == "sessions":
        assert run.proc is not None
        n = load.sessions_websockify if run.name == "websockify" else load.sessions
        out = many_sessions(port, ca, run.proc.popen.pid, n, load.session_procs)
        run.sample("sessions_per_s", out["sessions_per_s"])
        run.sample("pss_kb_per_session", out["pss_kb_per_session"])
        run.result.setdefault("sessions_detail", []).append(out)


def wanted(relay: str, step: str) -> bool:
    if relay == "forward-resume":
        return step in RESUME_STEPS
    if step == "reconnect":
        return False
    if step == "bulk_window":  # resume's comparison: forward with and without it
        return relay == "forward"
    if step == "static":
        return relay in ("forward", "c-forward")
    return True


def measure(relays: list[str], env: Env, tls: bool, load: Load) -> dict[str, dict[str, Any]]:
    """All relays run side by side; each round measures every relay in turn, step by step,
    starting with a different relay each round, so that whatever else the machine is doing is
    spread over all of them. A figure is the median of its rounds."""
    running = [start_relay(name, env, tls) for name in relays]
    try:
        steps = ["rtt", "bulk", "bulk_window", "reconnect", "parallel", "static"]
        # The thousands of sessions come last: they leave the machine busy for a while (the C
        # forward's and websockify's per-session processes exiting), which would otherwise
        # disturb whatever is measured next.
        plan = [(rnd, steps) for rnd in range(load.rounds)]
        plan += [(rnd, ["sessions"]) for rnd in range(load.session_rounds)]
        for rnd, round_steps in plan:
            order = running[rnd % len(running):] + running[: rnd % len(running)]
            for step in round_steps:
                for run in order:
                    if run.proc is None or step in run.result["notes"]:
                        continue
                    if not wanted(run.name, step):
                        continue
                    if not run.proc.alive():
                        run.note(step, f"relay exited: {run.proc.log_tail()}")
                        continue
                    print(f"  round {rnd + 1}: {run.name:10} {'wss' if tls else 'ws ':3} "
                          f"{step}", flush=True)
                    try:
                        step_runner(step, run, env, tls, load)
                    except (NotAvailable, subprocess.TimeoutExpired) as exc:
                        run.note(step, str(exc))
    finally:
        for run in running:
            if run.proc is not None:
                run.proc.stop()
    out = {}
    for run in running:
        for key, values in run.result["samples"].items():
            run.result[key] = statistics.median(values)
        out[run.name] = run.result
    return out


# -- report -------------------------------------------------------------------------------------

def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = results.get("c-forward", {})
    out: dict[str, dict[str, float]] = {}
    for relay, figures in results.items():
        out[relay] = {}
        for key in FIGURES:
            a, b = figures.get(key), base.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
                out[relay][key] = a / b
    return out


def verdicts(
    results: dict[str, dict[str, Any]], rat: dict[str, dict[str, float]]
) -> dict[str, str]:
    out = {}
    ours, r = results.get("forward", {}), rat.get("forward", {})
    for key, (_, _, higher, target) in FIGURES.items():
        if target is None or key not in r:
            out[key] = "n/a"
            continue
        ok = r[key] >= target if higher else r[key] <= target
        if key == "pss_kb_per_session":
            ok = ok or ours[key] <= PSS_TARGET_KB
        out[key] = "met" if ok else "MISSED"
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Benchmark results ({report['when']})", "", f"Machine: {report['machine']}", "",
             f"forward measured: commit {report.get('forward_commit', '?')}", "",
             f"Load: {report['load_text']}", "",
             "Load average of the machine (1, 5, 15 min) before: "
             + ", ".join(f"{x:.1f}" for x in report["loadavg_before"]) + "; after: "
             + ", ".join(f"{x:.1f}" for x in report["loadavg_after"]), ""]
    for scheme in SCHEMES:
        data = report["schemes"].get(scheme)
        if not data:
            continue
        res, rat, ver = data["results"], data["ratios"], data["verdicts"]
        title = "WebSocket (ws://)" if scheme == "plain" else "TLS (wss:// and https://)"
        lines += [f"## {title}", "",
                  "| figure | " + " | ".join(RELAYS) + " | forward target | forward |",
                  "|---" * (len(RELAYS) + 3) + "|"]
        for key, (label, unit, higher, target) in FIGURES.items():
            cells = []
            for relay in RELAYS:
                v = res.get(relay, {}).get(key)
                q = rat.get(relay, {}).get(key)
                cells.append(fmt(v) + (f" ({q:.2f}x)" if q is not None and relay != "c-forward"
                                       else ""))
            arrow = "≥" if higher else "≤"
            tgt = f"{arrow} {target}x" if target else ""
            if key == "pss_kb_per_session":
                tgt = f"≤ {PSS_TARGET_KB:g} KB or ≤ {target}x"
            lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + f" | {tgt} | {ver[key]} |")
        lines.append("")
        lines += resume_lines(res)
        notes = [(relay, step, text) for relay in RELAYS
                 for step, text in res.get(relay, {}).get("notes", {}).items()]
        notes += [(relay, "all", res[relay]["unavailable"]) for relay in RELAYS
                  if res.get(relay, {}).get("unavailable")]
        spread = []
        for relay in RELAYS:
            for key, values in res.get(relay, {}).get("samples", {}).items():
                if len(values) > 1:
                    spread.append(f"{relay} {key}: " + ", ".join(fmt(v) for v in values))
        if spread:
            lines += ["<details><summary>all rounds</summary>", ""]
            lines += [f"- {line}" for line in spread]
            lines += ["", "</details>", ""]
        if notes:
            lines += ["Not measured:", ""]
            lines += [f"- {relay}, {step}: {text}" for relay, step, text in notes]
            lines.append("")
    return "\n".join(lines)


def resume_lines(res: dict[str, Any]) -> list[str]:
    """Session resume on against off, same forward, same load (target: within 5%)."""
    on, off = res.get("forward-resume", {}), res.get("forward", {})
    out = []
    for key in ("rtt_p50_us", "rtt_p99_us", "bulk_window_mb_s"):
        a, b = on.get(key), off.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
            label, unit, higher, _ = FIGURES[key]
            q = a / b
            ok = q >= 0.95 if higher else q <= 1.05
            out.append(f"- {label}: resume {fmt(a)} {unit} against {fmt(b)} {unit} without "
                       f"({q:.2f}x, {'within' if ok else 'OUTSIDE'} 5%)")
    if isinstance(on.get("reconnect_ms"), (int, float)):
        out.append(f"- reconnect to the first replayed byte: {fmt(on['reconnect_ms'])} ms (p50)")
    return ["Session resume, on against off:", "", *out, ""] if out else []


def chart(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'forward[bench]'): no chart"
    schemes = [s for s in SCHEMES if s in report["schemes"]]
    fig, axes = plt.subplots(len(schemes), 1, figsize=(11, 4.2 * len(schemes)), squeeze=False)
    keys = list(FIGURES)
    shown = [r for r in RELAYS if r != "c-forward"]
    colours = {"forward": "#1f77b4", "forward-resume": "#2ca02c", "websockify": "#ff7f0e",
               "ceiling": "#999999"}
    for ax, scheme in zip(axes[:, 0], schemes, strict=True):
        rat = report["schemes"][scheme]["ratios"]
        width = 0.8 / len(shown)
        for i, relay in enumerate(shown):
            xs, ys = [], []
            for j, key in enumerate(keys):
                q = rat.get(relay, {}).get(key)
                if q is not None:
                    # Plot "times better than the C forward" so that up is always good.
                    xs.append(j + (i - (len(shown) - 1) / 2) * width)
                    ys.append(q if FIGURES[key][2] else 1 / q)
            ax.bar(xs, ys, width, label=relay, color=colours[relay])
        for j, key in enumerate(keys):
            target = FIGURES[key][3]
            if target:
                t = target if FIGURES[key][2] else 1 / target
                ax.hlines(t, j - 0.45, j + 0.45, colors="green", linestyles="dashed")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([FIGURES[k][0] for k in keys], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("x better than C forward (log)")
        ax.set_title(f"{'ws://' if scheme == 'plain' else 'wss:// / https://'} — "
                     "C forward = 1, dashed green = forward's target")
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def print_table(scheme: str, data: dict[str, Any]) -> None:
    res, rat = data["results"], data["ratios"]
    print(f"\n== {scheme} ==")
    print(f"{'figure':34}" + "".join(f"{r:>22}" for r in RELAYS) + f"{'forward':>9}")
    for key, (label, unit, _, _) in FIGURES.items():
        row = f"{label + ' (' + unit + ')':34}"
        for relay in RELAYS:
            v, q = res.get(relay, {}).get(key), rat.get(relay, {}).get(key)
            cell = fmt(v) + (f" ({q:.2f}x)" if q is not None else "")
            row += f"{cell:>22}"
        print(row + f"{data['verdicts'][key]:>9}")
    for line in resume_lines(res):
        print(line)


# -- main ---------------------------------------------------------------------------------------

def make_certs(work: Path, env: Env) -> None:
    try:
        import trustme
    except ImportError as exc:
        raise NotAvailable("trustme is not installed: no TLS figures") from exc
    ca = trustme.CA()
    server = ca.issue_cert(HOST)
    env.cert, env.key, env.ca = str(work / "cert.pem"), str(work / "key.pem"), str(work / "ca.pem")
    server.cert_chain_pems[0].write_to_path(env.cert)
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(env.cert, append=True)
    server.private_key_pem.write_to_path(env.key)
    ca.cert_pem.write_to_path(env.ca)
    env.client_ctx = ssl.create_default_context(cafile=env.ca)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench",
                        help="directory for results.json, results.md and ratios.png")
    parser.add_argument("--quick", action="store_true", help="a tiny load (smoke test)")
    parser.add_argument("--forward-root", type=Path, default=REPO,
                        help="checkout whose forward package is measured (default: this one)")
    parser.add_argument("--relays", default=",".join(RELAYS))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="relays (the echo backend, results.md), real-r (realr.md)")
    parser.add_argument("--real-r-paths", default=",".join(realr.PATHS))
    for name, value in vars(Load()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    for name, value in vars(realr.RLoad()).items():
        parser.add_argument("--r-" + name.replace("_", "-"), dest="r_" + name, type=type(value),
                            default=None)
    args = parser.parse_args(argv)
    load = QUICK if args.quick else Load()
    for name in vars(Load()):
        if getattr(args, name) is not None:
            setattr(load, name, getattr(args, name))
    rload = realr.RQUICK if args.quick else realr.RLoad()
    for name in vars(realr.RLoad()):
        if getattr(args, "r_" + name) is not None:
            setattr(rload, name, getattr(args, "r_" + name))
    relays = [r for r in args.relays.split(",") if r]
    schemes = [s for s in args.schemes.split(",") if s]
    sections = [s for s in args.sections.split(",") if s]

    # Thousands of sessions: every process started from here inherits the raised limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * load.sessions + 1024)) if hard != resource.RLIM_INFINITY \
        else 4 * load.sessions + 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2 * load.sessions + 64:
        print(f"warning: open-file limit {want} is low for {load.sessions} sessions")

    # A SIGTERM (a timeout, CI cancelling) unwinds like Ctrl-C, so every relay is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="forward-bench-"))
    env = Env(work, work / "echo.sock", work / "www", forward_root=args.forward_root.resolve())
    env.www.mkdir()
    (env.www / "static.html").write_bytes(STATIC_BODY)
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {os.uname().sysname} {os.uname().release}, "
                   f"Python {sys.version.split()[0]}",
        "load": vars(load),
        "forward_root": str(args.forward_root.resolve()),
        "forward_commit": subprocess.run(
            ["git", "-C", str(args.forward_root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=False).stdout.strip() or "unknown",
        "load_text": (
            f"{load.rtt_calls} sequential 64 B calls; bulk: {load.bulk_size // 1024} KiB "
            f"messages, at least {load.bulk_count} and {load.bulk_seconds} s; "
            f"{load.parallel_sessions} sessions x 1 KB for {load.parallel_seconds} s "
            f"({load.parallel_procs} client processes); {load.sessions} idle sessions "
            f"({load.sessions_websockify} for websockify, which forks per session); wrk -c"
            f"{load.wrk_connections} for {load.static_seconds} s; echo backend with "
            f"{load.echo_workers} processes. Each figure is the median of {load.rounds} "
            f"interleaved rounds (sessions: {load.session_rounds})"
        ),
        "loadavg_before": os.getloadavg(),
        "schemes": {},
    }
    if "relays" not in sections:
        schemes = []
    echo = start("echo", [sys.executable, str(BENCH / "servers.py"), "echo", "--socket",
                          str(env.socket), "--workers", str(load.echo_workers)], work)
    try:
        def echo_ready() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(env.socket))
                return s.recv(32) == b"Rsrv0103QAP1\r\n\r\n--------------\r\n"[:32]

        wait_until(echo_ready, echo, "echo backend")
        for scheme in schemes:
            tls = scheme == "tls"
            if tls:
                try:
                    make_certs(work, env)
                except NotAvailable as exc:
                    report["schemes"][scheme] = {"results": {r: {"unavailable": str(exc)}
                                                             for r in relays}}
                    continue
            print(f"{scheme}: {', '.join(relays)}", flush=True)
            results = measure(relays, env, tls, load)
            rat = ratios(results)
            report["schemes"][scheme] = {"results": results, "ratios": rat,
                                         "verdicts": verdicts(results, rat)}
        echo.stop()
        if "real-r" in sections:
            real_r(report, env, rload, [p for p in args.real_r_paths.split(",") if p])
    finally:
        echo.stop()
        shutil.rmtree(work, ignore_errors=True)

    report["loadavg_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    if "real_r" in report:
        write_real_r(report, args.out)
    if "relays" not in sections:
        return 0
    for scheme, data in report["schemes"].items():
        data.setdefault("ratios", {})
        data.setdefault("verdicts", {k: "n/a" for k in FIGURES})
        print_table(scheme, data)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    problem = chart(report, args.out / "ratios.png")
    if problem:
        print(problem)
    before, after = report["loadavg_before"], report["loadavg_after"]
    print(f"load average before {before}, after {after}")
    print(f"\nwritten: {args.out}/results.json, results.md" + ("" if problem else ", ratios.png"))
    return 0


def real_r(report: dict[str, Any], env: Env, load: realr.RLoad, paths: list[str]) -> None:
    """The real-R section (bench/realr.py): its own Rserve, nginx and relays, stopped after."""
    work = env.work / "real-r"
    work.mkdir()

    def forward_cmd(sock: Path, *extra: str) -> tuple[list[str], dict[str, Any]]:
        cmd = [sys.executable, "-m", "forward", "-p", "{port}", "-b", HOST, "-s", str(sock),
               "--heartbeat", "0", "--ws-ping", "0", "--log-level", "warning",
               *session_limits(env), *extra]
        envvars = dict(os.environ, PYTHONPATH=str(env.forward_root), PYTHONDONTWRITEBYTECODE="1")
        return cmd, {"cwd": str(env.forward_root), "env": envvars}

    def wait(check: Any, proc: Proc, what: str) -> None:
        wait_until(check, proc, what, timeout=60)

    print(f"real R: {', '.join(paths)}", flush=True)
    setup = realr.Setup(work, start, free_port, wait, forward_cmd)
    try:
        report["real_r"] = realr.measure(setup, paths, load)
        setup.stop()
        report["warm"] = realr.measure_warm(setup, load)
    except (NotAvailable, RuntimeError) as exc:
        report.setdefault("real_r", {"results": {}, "samples": {}, "notes": {}})
        report["real_r"]["notes"]["all"] = str(exc)
        report.setdefault("warm", {})
    finally:
        setup.stop()
    report["real_r_paths"] = paths
    report["real_r_load"] = vars(load)


def write_real_r(report: dict[str, Any], out: Path) -> None:
    keys = ("when", "machine", "forward_commit", "loadavg_before", "loadavg_after", "real_r",
            "warm", "real_r_paths", "real_r_load")
    part = {k: report[k] for k in keys if k in report}
    (out / "realr.json").write_text(json.dumps(part, indent=2) + "\n")
    text = realr.markdown(part)
    (out / "realr.md").write_text(text)
    print("\n" + text)
    problem = realr.chart(part, out / "realr.png")
    if problem:
        print(problem)
    print(f"written: {out}/realr.json, realr.md" + ("" if problem else ", realr.png"))


if __name__ == "__main__":
    sys.exit(main())
