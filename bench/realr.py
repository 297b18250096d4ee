"""The benchmark's real-R section: what a user would run instead of forward, with a real R.

One Rserve serves both a unix socket (QAP) and its own WebSocket listener (`websockets.port`,
`websockets.qap enable`), so every path reaches the same R with the same client:

- rserve-ws: Rserve's own WebSocket listener, nothing in front;
- nginx-rserve-ws: nginx in front of it (as Rserve's documentation suggests for TLS);
- c-forward: the C forward that ships with Rserve, to the unix socket;
- forward, and forward-warm (`--warm 4`), to the unix socket;
- nginx-forward: nginx in front of forward;
- passthrough: `bench/servers.py passthrough` in front of Rserve's listener, a uvloop relay that
  parses nothing: the least CPU per call a relay written in Python on uvloop can spend (the
  floor under forward's figure, as the ceiling is in the echo section).

Figures per path: `eval("1")` round trip p50/p99; the CPU time of the relaying processes per
call (utime + stime from /proc/PID/stat of the relay's process tree, over every call of the round
trip step; nginx and forward summed for nginx-forward); bulk MB/s of a large result (`x`, 5e6
doubles made once per session with `rnorm`, i.e. R's serialisation and the relay, not the random
numbers); time from TCP connect to the first answered eval; sessions opened per second by 8
parallel clients (connect, upgrade, greeting, one eval, close). Each figure is the median of
interleaved rounds, each round starting with another path.

The warm target (issue 18 §3) has its own step: an OCAP Rserve whose `oc.init` takes 300 ms,
sessions opened at a steady rate, the time from TCP connect to R's first message (its
greeting), through forward without and with `--warm 4`, and through Rserve's own listener.

The client is this process, with blocking sockets (threads for the parallel sessions); the
request frames are built and masked once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsframes import FrameCounter, check_response, client_frame, handshake

HOST = "127.0.0.1"
RSERVE = Path("/usr/lib/R/site-library/Rserve/libs/Rserve")
C_FORWARD = RSERVE.parent / "forward"
NGINX = "/usr/sbin/nginx"
PATHS = ("rserve-ws", "nginx-rserve-ws", "c-forward", "forward", "forward-warm", "nginx-forward",
         "passthrough")
WARM_PATHS = ("rserve-ws", "forward", "forward-warm")
CLK_TCK = os.sysconf("SC_CLK_TCK")
QAP_HEADER = struct.Struct("<IIII")
CMD_EVAL = 0x003
SLOW_INIT_MS = 300

# figure -> (label, unit, higher is better)
FIGURES: dict[str, tuple[str, str, bool]] = {
    "rtt_p50_us": ("eval round trip p50", "µs", False),
    "rtt_p99_us": ("eval round trip p99", "µs", False),
    "cpu_us_per_call": ("CPU of the relay per call", "µs", False),
    "bulk_mb_s": ("large result (5e6 doubles)", "MB/s", True),
    "connect_ms": ("TCP connect to first answered eval, p50", "ms", False),
    "sessions_per_s": ("sessions/s, 8 parallel clients", "1/s", True),
}


@dataclass
class RLoad:
    calls: int = 30000
    bulk_count: int = 4
    connects: int = 60
    parallel: int = 8
    session_seconds: float = 2.0
    rounds: int = 5
    warm: int = 4
    warm_sessions: int = 30
    warm_interval: float = 0.25


RQUICK = RLoad(calls=200, bulk_count=1, connects=3, session_seconds=0.3, rounds=1,
               warm_sessions=3, warm_interval=0.4)


def eval_frame(expr: str, msg_id: int = 1) -> bytes:
    """A masked WebSocket frame carrying a QAP EVAL of `expr` (DT_STRING, NUL-padded to 4)."""
    text = expr.encode() + b"\0"
    text += b"\1" * (-len(text) % 4)
    param = struct.pack("<I", 4 | (len(text) << 8)) + text
    return client_frame(QAP_HEADER.pack(CMD_EVAL, len(param), msg_id, 0) + param)


ONE = eval_frame("1")


class Session:
    """A blocking WebSocket client speaking QAP1: whole messages read slowly (greetings, the
    first answer of a kind), then, for an answer whose size is known, only counted."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(handshake(HOST, port))
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            raw += chunk
        head, rest = raw.split(b"\r\n\r\n", 1)
        check_response(head)
        self._pending = bytearray(rest)
        self._buf = bytearray(1 << 20)
        self._view = memoryview(self._buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(client_frame(struct.pack("!H", 1000), opcode=0x8))
        self.sock.close()

    def _frame(self) -> tuple[int, bytes]:
        """The next frame (opcode, payload), from what was read ahead and the socket."""
        p = self._pending
        while True:
            if len(p) >= 2:
                n, hlen = p[1] & 0x7F, 2
                if n == 126 and len(p) >= 4:
                    n, hlen = int.from_bytes(p[2:4], "big"), 4
                elif n == 127 and len(p) >= 10:
                    n, hlen = int.from_bytes(p[2:10], "big"), 10
                if ((p[1] & 0x7F) < 126 or hlen > 2) and len(p) >= hlen + n:
                    opcode, payload = p[0] & 0x0F, bytes(p[hlen:hlen + n])
                    del p[:hlen + n]
                    return opcode, payload
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the relay closed the session")
            p += chunk

    def message(self) -> bytes:
        """The next whole QAP message, or the 32-byte ID string of a classic greeting."""
        data = bytearray()
        while True:
            opcode, payload = self._frame()
            if opcode == 0x8:
                raise ConnectionError(f"closed: {payload[2:].decode(errors='replace')}")
            if opcode in (0x9, 0xA):
                continue
            data += payload
            if data[:4] == b"Rsrv" and len(data) >= 32:
                return bytes(data)
            if len(data) >= 16:
                _, low, _, high = QAP_HEADER.unpack_from(data)
                if len(data) >= 16 + (low | high << 32):
                    return bytes(data)

    def call(self, frame: bytes) -> bytes:
        self.sock.sendall(frame)
        return self.message()

    def counted(self, frame: bytes, size: int) -> None:
        """Send `frame` and wait for `size` bytes of data payload, counting, not collecting."""
        assert not self._pending, "nothing may be read ahead on the fast path"
        counter = FrameCounter()
        self.sock.sendall(frame)
        got = 0
        while got < size:
            n = self.sock.recv_into(self._buf)
            if not n:
                raise ConnectionError("the relay closed the session")
            got += counter.feed(self._view[:n])
            if counter.closed:
                raise ConnectionError("the relay closed the session")


# -- CPU of the relaying processes ---------------------------------------------------------------

def tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_ticks(roots: list[int]) -> dict[int, int]:
    """utime + stime of every process under `roots`, by pid (threads are counted in theirs)."""
    out = {}
    for root in roots:
        for p in tree(root):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                out[p] = int(fields[11]) + int(fields[12])
    return out


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    # A process that started meanwhile (the C forward's per-session child) counts from zero.
    return sum(t - before.get(p, 0) for p, t in after.items()) / CLK_TCK


# -- steps ---------------------------------------------------------------------------------------

def rtt(port: int, relay_pids: list[int], calls: int) -> dict[str, float]:
    s = Session(port)
    try:
        s.message()  # the greeting
        size = len(s.call(ONE))
        for _ in range(max(50, calls // 50)):
            s.counted(ONE, size)
        clock = time.perf_counter_ns
        times = []
        before = cpu_ticks(relay_pids)
        for _ in range(calls):
            t0 = clock()
            s.counted(ONE, size)
            times.append(clock() - t0)
        after = cpu_ticks(relay_pids)
    finally:
        s.close()
    times.sort()
    out = {"rtt_p50_us": times[len(times) // 2] / 1000,
           "rtt_p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] / 1000}
    if relay_pids:
        out["cpu_us_per_call"] = cpu_seconds(before, after) / calls * 1e6
    return out


def bulk(port: int, count: int) -> dict[str, float]:
    s = Session(port)
    try:
        s.message()
        s.call(eval_frame("x <- rnorm(5e6); 1"))
        fetch = eval_frame("x")
        size = len(s.call(fetch))
        t0 = time.perf_counter()
        for _ in range(count):
            s.counted(fetch, size)
        elapsed = time.perf_counter() - t0
    finally:
        s.close()
    return {"bulk_mb_s": size * count / elapsed / 1e6}


def first_answer(port: int) -> float:
    """Seconds from TCP connect to the first answered eval."""
    t0 = time.perf_counter()
    s = Session(port)
    try:
        s.message()
        s.call(ONE)
        return time.perf_counter() - t0
    finally:
        s.close()


def connect(port: int, n: int) -> dict[str, float]:
    times = sorted(first_answer(port) for _ in range(n))
    return {"connect_ms": times[len(times) // 2] * 1000}


def sessions(port: int, parallel: int, seconds: float) -> dict[str, float]:
    done = [0] * parallel
    errors: list[str] = []
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        while time.perf_counter() < stop:
            try:
                first_answer(port)
            except (OSError, ConnectionError) as exc:
                errors.append(str(exc))
                return
            done[i] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise ConnectionError(f"{len(errors)} client(s) failed: {errors[0]}")
    return {"sessions_per_s": sum(done) / elapsed}


def warm_greeting(port: int, n: int, interval: float) -> dict[str, float]:
    """Sessions opened one every `interval` s: the time from TCP connect to R's first message."""
    times = []
    nxt = time.perf_counter()
    for _ in range(n):
        nxt += interval
        t0 = time.perf_counter()
        s = Session(port)
        try:
            s.message()
            times.append(time.perf_counter() - t0)
        finally:
            s.close()
        time.sleep(max(0.0, nxt - time.perf_counter()))
    times.sort()
    return {"greeting_p50_ms": times[len(times) // 2] * 1000,
            "greeting_p90_ms": times[min(len(times) - 1, int(len(times) * 0.9))] * 1000,
            "rate_per_s": 1 / interval}


# -- the set-up ----------------------------------------------------------------------------------

Start = Callable[[str, list[str], Path], Any]  # run.start: (name, argv, workdir, **kw) -> Proc


@dataclass
class Setup:
    work: Path
    start: Callable[..., Any]
    free_port: Callable[[], int]
    wait: Callable[[Callable[[], bool], Any, str], None]
    forward_cmd: Callable[..., tuple[list[str], dict[str, Any]]]
    procs: list[Any] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    relay_pids: dict[str, list[int]] = field(default_factory=dict)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def rserve(setup: Setup, name: str, ocap: bool = False) -> tuple[Path, int]:
    """An Rserve on a unix socket and its own WebSocket listener (QAP, or OCAP with a slow
    oc.init)."""
    if not RSERVE.exists():
        raise RuntimeError(f"{RSERVE} is not installed (apt-get install r-cran-rserve)")
    sock = setup.work / f"{name}.sock"
    ws_port = setup.free_port()
    lines = [f"socket {sock}", "daemon disable", f"websockets.port {ws_port}",
             "websockets.qap enable"]
    cmd = ["R", "CMD", str(RSERVE), "--no-save", "--vanilla"]
    if ocap:
        lines += ["qap.oc enable", "websockets.qap.oc enable"]
        init = setup.work / f"{name}.R"
        init.write_text("library(Rserve)\noc.init <- function() { "
                        f"Sys.sleep({SLOW_INIT_MS / 1000}); ocap(function() Sys.getpid()) }}\n")
        cmd += ["--RS-source", str(init)]
    conf = setup.work / f"{name}.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = setup.start(name, [*cmd, "--RS-conf", str(conf)], setup.work)
    setup.procs.append(proc)

    def ready() -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(5)
            return len(s.recv(4)) == 4

    setup.wait(ready, proc, "Rserve")
    setup.wait(lambda: _connectable(ws_port), proc, "Rserve's WebSocket listener")
    return sock, ws_port


def _connectable(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


def nginx(setup: Setup, upstreams: dict[str, int]) -> dict[str, int]:
    """One nginx process (no master: the one process is the worker), a server per upstream."""
    if not Path(NGINX).exists():
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    prefix = setup.work / "nginx"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    ports, servers = {}, []
    for name, upstream in upstreams.items():
        ports[name] = port = setup.free_port()
        servers.append(
            f"server {{ listen {HOST}:{port}; location / {{ proxy_pass http://{HOST}:{upstream};"
            " proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;"
            " proxy_set_header Connection upgrade; proxy_set_header Host $http_host;"
            " proxy_read_timeout 3600s; proxy_buffering off; } }"
        )
    temp = "".join(f"{k}_temp_path {prefix}/tmp/{k}; "
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process off; pid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\nevents {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; {temp}\n" + "\n".join(servers) + "\n}\n"
    )
    proc = setup.start("nginx", [NGINX, "-p", str(prefix), "-c", str(conf)], setup.work)
    setup.procs.append(proc)
    for port in ports.values():
        setup.wait(lambda p=port: _connectable(p), proc, "nginx")  # type: ignore[misc]
    ports["pid"] = proc.popen.pid
    return ports


def relay(setup: Setup, name: str, cmd: list[str], kw: dict[str, Any]) -> tuple[int, int]:
    port = setup.free_port()
    cmd = [a.replace("{port}", str(port)) for a in cmd]
    proc = setup.start(name, cmd, setup.work, **kw)
    setup.procs.append(proc)
    setup.wait(lambda: _connectable(port), proc, name)
    return port, proc.popen.pid


def bring_up(setup: Setup, paths: list[str], load: RLoad) -> None:
    sock, ws_port = rserve(setup, "rserve")
    setup.ports["rserve-ws"] = ws_port
    setup.relay_pids["rserve-ws"] = []
    want_forward = {"forward", "nginx-forward"} & set(paths)
    if want_forward:
        cmd, kw = setup.forward_cmd(sock)
        setup.ports["forward"], pid = relay(setup, "r-forward", cmd, kw)
        setup.relay_pids["forward"] = [pid]
    if "forward-warm" in paths:
        cmd, kw = setup.forward_cmd(sock, "--warm", str(load.warm))
        setup.ports["forward-warm"], pid = relay(setup, "r-forward-warm", cmd, kw)
        setup.relay_pids["forward-warm"] = [pid]
    if "c-forward" in paths:
        www = setup.work / "www"
        www.mkdir(exist_ok=True)
        cmd = [str(C_FORWARD), "-p", "{port}", "-s", str(sock), "-r", str(www)]
        setup.ports["c-forward"], pid = relay(setup, "r-c-forward", cmd, {"cwd": str(setup.work)})
        setup.relay_pids["c-forward"] = [pid]
    if "passthrough" in paths:
        servers = Path(__file__).resolve().parent / "servers.py"
        cmd = [sys.executable, str(servers), "passthrough", "--port", "{port}", "--upstream",
               str(ws_port)]
        setup.ports["passthrough"], pid = relay(setup, "r-passthrough", cmd, {})
        setup.relay_pids["passthrough"] = [pid]
    upstreams = {}
    if "nginx-rserve-ws" in paths:
        upstreams["nginx-rserve-ws"] = ws_port
    if "nginx-forward" in paths:
        upstreams["nginx-forward"] = setup.ports["forward"]
    if upstreams:
        got = nginx(setup, upstreams)
        for name in upstreams:
            setup.ports[name] = got[name]
        setup.relay_pids["nginx-rserve-ws"] = [got["pid"]]
        setup.relay_pids["nginx-forward"] = [got["pid"], *setup.relay_pids.get("forward", [])]


def measure(setup: Setup, paths: list[str], load: RLoad,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    bring_up(setup, paths, load)
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in paths}
    notes: dict[str, str] = {}
    steps: list[tuple[str, Callable[[str], dict[str, float]]]] = [
        ("rtt", lambda p: rtt(setup.ports[p], setup.relay_pids[p], load.calls)),
        ("bulk", lambda p: bulk(setup.ports[p], load.bulk_count)),
        ("connect", lambda p: connect(setup.ports[p], load.connects)),
        ("sessions", lambda p: sessions(setup.ports[p], load.parallel, load.session_seconds)),
    ]
    for rnd in range(load.rounds):
        order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
        for step, fn in steps:
            for path in order:
                if f"{path} {step}" in notes:
                    continue
                say(f"  real R, round {rnd + 1}: {path:16} {step}")
                try:
                    for key, value in fn(path).items():
                        samples[path].setdefault(key, []).append(value)
                except (OSError, ConnectionError) as exc:
                    notes[f"{path} {step}"] = f"{type(exc).__name__}: {exc}"
    results = {p: {k: statistics.median(v) for k, v in samples[p].items()} for p in paths}
    return {"results": results, "samples": samples, "notes": notes}


def measure_warm(setup: Setup, load: RLoad, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The §3 target: OCAP, oc.init of 300 ms, sessions at a steady rate."""
    sock, ws_port = rserve(setup, "rserve-ocap", ocap=True)
    ports = {"rserve-ws": ws_port}
    cmd, kw = setup.forward_cmd(sock)
    ports["forward"], _ = relay(setup, "ocap-forward", cmd, kw)
    cmd, kw = setup.forward_cmd(sock, "--warm", str(load.warm))
    ports["forward-warm"], _ = relay(setup, "ocap-forward-warm", cmd, kw)
    time.sleep(SLOW_INIT_MS / 1000 * 3)  # the pool's first fill
    out: dict[str, Any] = {}
    for path in WARM_PATHS:
        say(f"  oc.init {SLOW_INIT_MS} ms: {path}")
        try:
            out[path] = warm_greeting(ports[path], load.warm_sessions, load.warm_interval)
        except (OSError, ConnectionError) as exc:
            out[path] = {"note": f"{type(exc).__name__}: {exc}"}
    return out


# -- report --------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def verdicts(res: dict[str, dict[str, float]], warm: dict[str, Any], warm_load: RLoad,
             samples: dict[str, dict[str, list[float]]] | None = None
             ) -> list[tuple[str, str, str]]:
    """(target, figure, met / MISSED) for the targets of issue 18."""
    out = []
    f, n = res.get("forward", {}), res.get("nginx-rserve-ws", {})
    if f.get("cpu_us_per_call") and n.get("cpu_us_per_call"):
        q = f["cpu_us_per_call"] / n["cpu_us_per_call"]
        rounds = ""
        if samples:
            pairs = zip(samples.get("forward", {}).get("cpu_us_per_call", []),
                        samples.get("nginx-rserve-ws", {}).get("cpu_us_per_call", []),
                        strict=False)
            per = [a / b for a, b in pairs if b]
            if per:
                rounds = "; in each round " + ", ".join(f"{x:.2f}x" for x in per)
        out.append(("forward's CPU per relayed call ≤ 1.3x nginx's",
                    f"{fmt(f['cpu_us_per_call'])} against {fmt(n['cpu_us_per_call'])} µs "
                    f"({q:.2f}x{rounds})", "met" if q <= 1.3 else "MISSED"))
    floor = res.get("passthrough", {})
    if f.get("cpu_us_per_call") and n.get("cpu_us_per_call") and floor.get("cpu_us_per_call"):
        out.append(("(no target) the Python floor: a relay on uvloop that parses nothing",
                    f"passthrough {fmt(floor['cpu_us_per_call'])} µs, "
                    f"{floor['cpu_us_per_call'] / n['cpu_us_per_call']:.2f}x nginx's; forward "
                    f"{f['cpu_us_per_call'] / floor['cpu_us_per_call']:.2f}x the floor", ""))
    w = warm.get("forward-warm", {})
    if "greeting_p50_ms" in w:
        out.append((f"--warm {warm_load.warm}, oc.init {SLOW_INIT_MS} ms: connect to first "
                    "message ≤ 10 ms p50",
                    f"{fmt(w['greeting_p50_ms'])} ms at {w['rate_per_s']:g} sessions/s",
                    "met" if w["greeting_p50_ms"] <= 10 else "MISSED"))
    r = res.get("rserve-ws", {})
    for path in ("forward", "forward-warm"):
        p = res.get(path, {})
        if p.get("connect_ms") and r.get("connect_ms"):
            q = p["connect_ms"] / r["connect_ms"]
            out.append((f"{path}: connect to first answer no slower than Rserve's listener",
                        f"{fmt(p['connect_ms'])} against {fmt(r['connect_ms'])} ms ({q:.2f}x)",
                        "met" if q <= 1.0 else "MISSED"))
    return out


def markdown(report: dict[str, Any]) -> str:
    data, warm, load = report["real_r"], report["warm"], RLoad(**report["real_r_load"])
    res, paths = data["results"], report["real_r_paths"]
    lines = [f"# Real R: forward against what users would run instead ({report['when']})", "",
             f"Machine: {report['machine']}", "",
             f"forward measured: commit {report.get('forward_commit', '?')}", "",
             f"Load: {load.calls} eval(\"1\") calls per round (CPU over all of them); "
             f"{load.bulk_count} large results; {load.connects} sessions one after another; "
             f"{load.parallel} parallel clients for {load.session_seconds} s. Medians of "
             f"{load.rounds} interleaved rounds.", "",
             "Load average of the machine (1, 5, 15 min) before: "
             + ", ".join(f"{x:.1f}" for x in report["loadavg_before"]) + "; after: "
             + ", ".join(f"{x:.1f}" for x in report["loadavg_after"]), "",
             "| figure | " + " | ".join(paths) + " |", "|---" * (len(paths) + 1) + "|"]
    for key, (label, unit, _) in FIGURES.items():
        cells = [fmt(res.get(p, {}).get(key)) if p != "rserve-ws" or key != "cpu_us_per_call"
                 else "(none)" for p in paths]
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells) + " |")
    lines += ["", "nginx-forward's CPU is nginx's and forward's together; passthrough is a uvloop "
              "relay that parses nothing, in front of Rserve's listener (the floor for Python).",
              ""]
    lines += [f"## oc.init of {SLOW_INIT_MS} ms: TCP connect to R's first message "
              f"({load.warm_sessions} sessions, one every {load.warm_interval:g} s)", "",
              "| path | p50 (ms) | p90 (ms) |", "|---|---|---|"]
    for path in WARM_PATHS:
        w = warm.get(path, {})
        lines.append(f"| {path} | {fmt(w.get('greeting_p50_ms'))} | "
                     f"{fmt(w.get('greeting_p90_ms'))} |")
    lines += ["", "## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |"
              for t, m, v in verdicts(res, warm, load, data.get("samples"))]
    lines += ["", "<details><summary>all rounds</summary>", ""]
    for p in paths:
        for key, values in data["samples"].get(p, {}).items():
            lines.append(f"- {p} {key}: " + ", ".join(fmt(v) for v in values))
    lines += ["", "</details>", ""]
    if data["notes"]:
        lines += ["Not measured:", ""] + [f"- {k}: {v}" for k, v in data["notes"].items()] + [""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'forward[bench]'): no chart"
    res, paths = report["real_r"]["results"], report["real_r_paths"]
    keys = list(FIGURES)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 4.2))
    colours = ["#999999", "#bbbbbb", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#dddddd"]
    for ax, key in zip(axes, keys, strict=True):
        label, unit, higher = FIGURES[key]
        values = [res.get(p, {}).get(key) or 0 for p in paths]
        ax.bar(range(len(paths)), values, color=colours[: len(paths)])
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels(paths, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{label}\n({unit}, {'higher' if higher else 'lower'} is better)",
                     fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
