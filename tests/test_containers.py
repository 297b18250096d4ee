"""deploy/'s container images built with podman from the real Dockerfiles and run as a user
would: the compose pair (podman-compose) in both start orders, and the Kubernetes sidecar
manifest (`podman kube play`). From the host: the static page, a WebSocket session with a real R
evaluation, /healthz following the Rserve container, SIGTERM, forward's confinement.

The base images are NOT the official ones: no registry is reachable, so `debian:bookworm-slim` is
a debootstrap of Debian bookworm made here (with the slim variant's dpkg excludes), and
`python:3.11-slim` is that plus Debian's python3 and pip, linked into /usr/local/bin as the
official image lays Python out. What is tested is the Dockerfiles' own steps on such a base; the
official images themselves are not. The debootstrap is cached in .cache/containers/.

Podman runs rootful with its configuration, storage and network files in a directory of its own
(CONTAINERS_CONF and friends), never /etc's; everything it made, on disk, in the network
interfaces and in iptables, is removed at the end. Published ports bind 127.0.0.1 only.
Deselect locally with `-m 'not containers'`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from .conftest import IN_CI, ROOT, eventually, free_port
from .rclient import RClient

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(900)]

DEPLOY = ROOT / "deploy"
CACHE = ROOT / ".cache" / "containers"
MIRROR = "http://deb.debian.org/debian"
# The host's CA bundle, which its pip trusts (a TLS-inspecting proxy may sit between this
# machine and PyPI): mounted for the forward image's RUN steps only, never part of the image, at
# the path of the system bundle, which Debian's pip (the stand-in's) reads.
CA_BUNDLE = Path(
    os.environ.get("PIP_CERT")
    or ssl.get_default_verify_paths().cafile
    or "/etc/ssl/certs/ca-certificates.crt"
)
# Container limits inside the host's hard limits (runc refuses more than the host allows).
NOFILE = 20000
SLIM_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
# apt as in the slim images: no package caches or downloaded packages left in a layer, no
# translations fetched.
SLIM_APT = """\
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb || true"; };
Acquire::Languages "none";
"""
# The official python image's layout: the interpreter and pip on /usr/local/bin, pip installing
# without PEP 668's refusal, UTF-8 locale.
PYTHON_SLIM = """\
FROM {base}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-pip \\
 && rm -rf /var/lib/apt/lists/* /usr/lib/python3.*/EXTERNALLY-MANAGED \\
 && ln -s /usr/bin/python3 /usr/local/bin/python3 && ln -s python3 /usr/local/bin/python \\
 && ln -s /usr/bin/pip3 /usr/local/bin/pip3 && ln -s pip3 /usr/local/bin/pip
ENV LANG=C.UTF-8
CMD ["python3"]
"""


def need_root_and_podman() -> None:
    missing = [
        t
        for t in ("podman", "podman-compose", "debootstrap", "runc", "catatonit")
        if not shutil.which(t)
    ]
    why = f"{', '.join(missing)} not installed" if missing else None
    if os.geteuid() != 0:
        why = "rootful podman and debootstrap need root"
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"the container test runs in CI: {why} (scripts/install-deps installs them)")
    pytest.skip(why)


# -- podman with its own configuration -----------------------------------------------------------


@dataclass
class Podman:
    home: Path
    env: dict[str, str]

    def run(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        started = time.monotonic()
        proc = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        if args[0] in ("build", "load", "save", "import"):  # shown with -s: what the time went to
            what = args[args.index("-t") + 1] if "-t" in args else args[-1]
            print(f"podman {args[0]} {what}: {time.monotonic() - started:.1f} s")
        return proc.stdout.strip()

    async def arun(self, *args: str) -> tuple[int, str]:
        """For a test that keeps sessions open meanwhile: the event loop goes on."""
        proc = await asyncio.create_subprocess_exec(
            "podman",
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode(errors="replace")

    def logs(self, name: str) -> str:
        return subprocess.run(
            ["podman", "logs", name],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        ).stdout

    def succeeds(self, *args: str) -> bool:
        return subprocess.run(["podman", *args], env=self.env, capture_output=True).returncode == 0

    def inspect(self, name: str, fmt: str) -> Any:
        return json.loads(self.run("inspect", name, "--format", "{{json " + fmt + "}}"))

    def exit_code(self, name: str) -> int:
        return int(self.inspect(name, ".State.ExitCode"))

    def compose(self, *args: str) -> str:
        proc = subprocess.run(
            ["podman-compose", *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"podman-compose {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
        return proc.stdout


def podman_config(home: Path) -> dict[str, str]:
    (home / "containers.conf").write_text(
        f"""\
[containers]
default_ulimits = ["nofile={NOFILE}:{NOFILE}", "nproc={NOFILE}:{NOFILE}"]
[network]
network_config_dir = "{home}/cni"
[engine]
# crun refuses this machine kind's hybrid cgroup layout; cgroupfs: there is no systemd.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{home}/events.log"
tmp_dir = "{home}/tmp"
static_dir = "{home}/storage/libpod"
volume_path = "{home}/storage/volumes"
"""
    )
    (home / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{home}/storage"\nrunroot = "{home}/run"\n'
    )
    # No registry is searched for a short name: FROM finds the stand-ins or fails.
    (home / "registries.conf").write_text("unqualified-search-registries = []\n")
    return {
        **os.environ,
        "CONTAINERS_CONF": str(home / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
    }


class HostState:
    """What rootful podman and its CNI plugins leave on the machine beyond podman's own
    directories: bridge interfaces, iptables chains and rules, IPAM and cache files. Noted
    before, so that what the test added can be removed after."""

    PATHS = (Path("/var/lib/cni"), Path("/var/lib/containers"))

    def __init__(self) -> None:
        self.links = self._links()
        self.rules = {t: self._rules(t) for t in ("nat", "filter")}
        self.files = {p: self._files(p) for p in self.PATHS}
        self.mounts = self._mounts()

    @classmethod
    def _mounts(cls) -> set[str]:
        with open("/proc/self/mounts") as f:
            points = {line.split()[1] for line in f}
        return {m for m in points if any(m.startswith(f"{p}/") for p in cls.PATHS)}

    @staticmethod
    def _links() -> set[str]:
        return set(os.listdir("/sys/class/net"))

    @staticmethod
    def _rules(table: str) -> list[str]:
        if not shutil.which("iptables"):
            return []
        out = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True)
        return out.stdout.splitlines()

    @staticmethod
    def _files(root: Path) -> set[Path]:
        return {root, *root.rglob("*")} if root.exists() else set()

    def restore(self) -> None:
        for link in self._links() - self.links:
            if link.startswith(("cni-", "podman")):
                subprocess.run(["ip", "link", "delete", link], capture_output=True)
        for table, rules in self.rules.items():
            added = [r for r in self._rules(table) if r not in rules]
            for rule in added:  # rules first, then the chains they jumped to
                if rule.startswith("-A "):
                    subprocess.run(["iptables", "-t", table, "-D", *shlex.split(rule[3:])])
            for rule in added:
                if rule.startswith("-N "):
                    subprocess.run(["iptables", "-t", table, "-X", rule[3:]])
        for point in sorted(self._mounts() - self.mounts, key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True)
        for root, files in self.files.items():
            for path in sorted(self._files(root) - files, key=lambda p: -len(p.parts)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def podman() -> Iterator[Podman]:
    need_root_and_podman()
    host = HostState()
    home = Path(tempfile.mkdtemp(prefix="forward-podman-"))
    engine = Podman(home, podman_config(home))
    try:
        yield engine
    finally:
        with contextlib.suppress(Exception):
            engine.run("pod", "rm", "--force", "--all", check=False)
            engine.run("rm", "--force", "--all", check=False)
            engine.run("system", "reset", "--force", check=False)
        # conmon runs each container's clean-up after it exits: without the configuration
        # files, a late one would fall back on /var/lib/containers.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and processes_using(home):
            time.sleep(0.1)
        subprocess.run(["umount", "-R", str(home)], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
        host.restore()


def processes_using(home: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(home).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


# -- the base images and the images from deploy/ -------------------------------------------------


def base_names() -> dict[str, str]:
    """The Dockerfiles' FROM images: the stand-ins must carry exactly these names."""
    names = {}
    for name in ("docker", "rserve"):
        text = (DEPLOY / name / "Dockerfile").read_text()
        froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
        assert len(froms) == 1, f"deploy/{name}/Dockerfile: one FROM expected, not {froms}"
        names[name] = froms[0]
    return names


def debootstrap_tar() -> Path:
    """Debian bookworm, minbase, slimmed as the official -slim images are; made once and kept
    in .cache/ (about 30 s and 120 MB of downloads on a fresh machine)."""
    recipe = hashlib.sha256((MIRROR + SLIM_EXCLUDES + SLIM_APT).encode()).hexdigest()[:12]
    tar = CACHE / f"debian-bookworm-minbase-{recipe}.tar"
    if tar.exists():
        return tar
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR],
            check=True,
            capture_output=True,
            timeout=600,
        )
        (root / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM_EXCLUDES)
        (root / "etc/apt/apt.conf.d/slim").write_text(SLIM_APT)
        for junk in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/info",
            "usr/share/locale",
        ):
            for path in (root / junk).glob("*"):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.name not in ("lock", "partial"):
                    path.unlink()
        partial = tar.with_suffix(".partial")
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True
        )
        partial.rename(tar)
    print(f"debootstrap: {time.monotonic() - started:.1f} s")
    return tar


@dataclass(frozen=True)
class Images:
    forward: str
    rserve: str


@pytest.fixture(scope="session")
def images(podman: Podman) -> Images:
    bases = base_names()
    debian, python = bases["rserve"], bases["docker"]
    assert debian == "debian:bookworm-slim", f"deploy/rserve/Dockerfile: FROM {debian}"
    assert re.fullmatch(r"python:3\.\d+-slim", python), f"deploy/docker/Dockerfile: FROM {python}"
    base = debootstrap_tar()
    podman.run("import", "--change", 'CMD ["bash"]', str(base), f"docker.io/library/{debian}")
    recipe = PYTHON_SLIM.format(base=f"docker.io/library/{debian}")
    key = hashlib.sha256((base.name + recipe).encode()).hexdigest()[:12]
    saved = CACHE / f"python-slim-{key}.tar"
    for stale in CACHE.glob("*.tar"):  # made from an earlier recipe
        if stale not in (base, saved):
            stale.unlink()
    stand_in = f"docker.io/library/{python}"
    if saved.exists():
        podman.run("load", "--input", str(saved))
    else:
        context = podman.home / "python-slim"
        context.mkdir()
        (context / "Containerfile").write_text(recipe)
        podman.run("build", "--pull=never", "--network=host", "-t", "python-slim", str(context))
        podman.run("save", "--output", str(saved.with_suffix(".partial")), "python-slim")
        saved.with_suffix(".partial").rename(saved)
    podman.run("tag", "localhost/python-slim", stand_in)
    # Debian's python3 stands in for the version the Dockerfile names: they must agree.
    version = podman.run("run", "--rm", "--network=none", stand_in, "python3", "--version")
    assert f"Python {python.split(':')[1].removesuffix('-slim')}." in version, (version, python)

    # The names the Kubernetes manifest runs; the compose copy below uses them too.
    names = manifest_images()
    build = ["build", "--pull=never", "--network=host", "-f"]
    podman.run(
        *build,
        str(DEPLOY / "docker" / "Dockerfile"),
        "--volume",
        f"{CA_BUNDLE}:/etc/ssl/certs/ca-certificates.crt:ro",
        "-t",
        names["forward"],
        str(ROOT),
    )
    # No bundle here: apt fetches over plain HTTP (signed), and ca-certificates' own trigger must
    # be able to write that file.
    podman.run(*build, str(DEPLOY / "rserve" / "Dockerfile"), "-t", names["rserve"], str(ROOT))
    return Images(names["forward"], names["rserve"])


def manifest_images() -> dict[str, str]:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "forward-sidecar.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]
    return {c["name"]: c["image"] for c in pod["containers"]}


def test_images(podman: Podman, images: Images) -> None:
    bases = base_names()
    shown = {
        "forward": images.forward,
        "rserve": images.rserve,
        **{f"stand-in {b}": f"docker.io/library/{b}" for b in bases.values()},
    }
    sizes = {
        name: int(podman.inspect(image, ".Size")) // 1_000_000 for name, image in shown.items()
    }
    print(f"image sizes (MB): {sizes}")  # shown with -s
    # The forward image: the package and nothing of its build (no compiler, no pip cache, no
    # sources); its working directory exists.
    check = (
        "for t in cc gcc g++ make; do command -v $t && exit 1; done; "
        'test ! -e /root/.cache && test ! -e /src && test -d "$PWD" && echo clean'
    )
    out = podman.run(
        "run",
        "--rm",
        "--network=none",
        "--user=0",
        "--entrypoint=sh",
        images.forward,
        "-c",
        check,
        check=False,
    )
    assert out == "clean", out
    workdir = podman.inspect(images.forward, ".Config.WorkingDir")
    assert podman.run("run", "--rm", "--network=none", "--entrypoint=pwd", images.forward) == (
        workdir or "/"
    )
    # The socket directory is the same in both images: owner, group and mode do not depend on
    # which container mounts a fresh volume first.
    stat = ["stat", "-c", "%u:%g %a", "/run/rserve"]
    assert (
        podman.run("run", "--rm", "--network=none", "--entrypoint=stat", images.forward, *stat[1:])
        == podman.run("run", "--rm", "--network=none", images.rserve, *stat)
        == "0:999 2770"
    )
    # The Rserve user is pinned (the manifest's runAsUser).
    assert podman.run("run", "--rm", "--network=none", images.rserve, "id", "-u") == "999"


# -- the checks a user makes -----------------------------------------------------------------------


@dataclass
class Pair:
    podman: Podman
    forward: str  # container names
    rserve: str
    http: int  # host ports on 127.0.0.1
    admin: int
    grace: int  # what the deployment file gives forward after SIGTERM


def status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


async def health_is(pair: Pair, want: int) -> None:
    url = f"http://127.0.0.1:{pair.admin}/healthz"
    try:
        await eventually(lambda: status(url) == want, 60, f"/healthz answers {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}; Rserve's log:\n{pair.podman.logs(pair.rserve)}") from None


async def r_user(pair: Pair) -> list[str]:
    async with await RClient.connect(f"ws://127.0.0.1:{pair.http}/") as c:
        assert (await c.eval("1 + 2")).value == [3.0]
        value: list[str] = (await c.eval('Sys.info()[["user"]]')).value
        return value


async def check_pair(pair: Pair, healthcheck: bool) -> None:
    p = pair.podman
    await health_is(pair, 200)
    if healthcheck:  # the deployment file's own health check, as the engine runs it
        assert p.succeeds("healthcheck", "run", pair.forward)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{pair.http}/") as r:
        assert r.status == 200 and "forward is running" in await r.text()
    assert await r_user(pair) == ["rserve"]  # R evaluates in the Rserve container

    # forward: not root, read-only root file system, no capabilities at all.
    assert p.run("exec", pair.forward, "id", "-u") == "10001"
    assert p.inspect(pair.forward, ".HostConfig.ReadonlyRootfs") is True
    assert p.inspect(pair.forward, ".EffectiveCaps") in (None, [])
    caps = p.run("exec", pair.forward, "grep", "^Cap", "/proc/1/status").split("\n")
    assert {line.split()[1] for line in caps} == {"0000000000000000"}, caps
    # (podman mounts a tmpfs on /tmp of a read-only container; creating a file elsewhere fails
    # with EROFS, which the kernel answers before any permission check)
    write = "touch /etc/forward/x 2>&1 || echo refused"
    assert p.run("exec", pair.forward, "sh", "-c", write).endswith("Read-only file system\nrefused")

    # /healthz follows the Rserve container: 503 while it is stopped, 200 once it is back.
    p.run("stop", pair.rserve)
    await health_is(pair, 503)
    if healthcheck:
        assert not p.succeeds("healthcheck", "run", pair.forward)
    p.run("start", pair.rserve)
    await health_is(pair, 200)
    assert await r_user(pair) == ["rserve"]

    # SIGTERM with a session open: the browser gets forward's close (1001), forward exits 0.
    # Had it outlived the grace period, podman would have killed it (exit status 137).
    async with await RClient.connect(f"ws://127.0.0.1:{pair.http}/") as c:
        assert (await c.eval("6 * 7")).value == [42.0]
        stop = asyncio.ensure_future(p.arun("stop", "--time", str(pair.grace), pair.forward))
        while (msg := await c.ws.receive()).type is not aiohttp.WSMsgType.CLOSE:
            assert msg.type is aiohttp.WSMsgType.BINARY  # the shutdown notice
        assert c.ws.close_code == 1001
        code, out = await stop
        assert code == 0, out
    assert p.exit_code(pair.forward) == 0
    assert "shutting down" in p.logs(pair.forward)


def seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)s", duration)
    assert m, duration
    return int(m[1])


# -- docker-compose.yml, with podman-compose ------------------------------------------------------


@pytest.mark.parametrize("order", ["rserve first", "forward first"])
async def test_compose(podman: Podman, images: Images, tmp_path: Path, order: str) -> None:
    """The compose file as shipped, except: the images built above instead of `build:`, and
    the ports published on 127.0.0.1 only (the admin port too, for the checks)."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, image in (("forward", images.forward), ("rserve", images.rserve)):
        del services[name]["build"]
        services[name]["image"] = image
    http, admin = free_port(), free_port()
    forward = services["forward"]
    forward["ports"] = [f"127.0.0.1:{http}:8088", f"127.0.0.1:{admin}:9100"]
    forward["volumes"] = [
        v.replace("./", f"{DEPLOY}/", 1) if v.startswith("./") else v for v in forward["volumes"]
    ]
    file = tmp_path / "compose.yml"
    file.write_text(yaml.safe_dump(compose))
    project = "fwd" + ("rf" if order == "rserve first" else "fr")
    cli = ["-p", project, "-f", str(file)]
    pair = Pair(
        podman,
        f"{project}_forward_1",
        f"{project}_rserve_1",
        http,
        admin,
        seconds(forward["stop_grace_period"]),
    )
    try:
        if order == "rserve first":
            podman.compose(*cli, "up", "-d")  # depends_on: Rserve first
        else:  # forward mounts the fresh volume first; Rserve must still be able to bind
            podman.compose(*cli, "up", "--no-start")
            podman.run("start", pair.forward)
            await eventually(
                lambda: "listening on" in podman.logs(pair.forward), 30, "forward listens"
            )
            podman.run("start", pair.rserve)
        await check_pair(pair, healthcheck=True)
    finally:
        podman.compose(*cli, "down", "-v")
        podman.run("network", "rm", "--force", f"{project}_default", check=False)


# -- the Kubernetes manifest, with podman kube play ------------------------------------------------


@pytest.mark.parametrize("order", ["rserve first", "forward first"])
async def test_kube(podman: Podman, images: Images, tmp_path: Path, order: str) -> None:
    """deploy/k8s/forward-sidecar.yaml as shipped, except: one replica, the container ports
    published on 127.0.0.1 (hostIP/hostPort), the document root from deploy/www (a hostPath
    volume; in a cluster the application brings its files), and for "forward first" the two
    containers listed the other way round (podman starts them in that order)."""
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "forward-sidecar.yaml").read_text()))
    deployment = docs[0]
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    forward = containers["forward"]
    ports = {"http": free_port(), "admin": free_port()}
    for port in forward["ports"]:
        port.update(hostIP="127.0.0.1", hostPort=ports[port["name"]])
    spec["volumes"].append({"name": "www", "hostPath": {"path": str(DEPLOY / "www")}})
    forward["volumeMounts"].append({"name": "www", "mountPath": "/srv/www", "readOnly": True})
    if order == "forward first":
        spec["containers"] = [containers["forward"], containers["rserve"]]
    file = tmp_path / "kube.yaml"
    file.write_text(yaml.safe_dump(deployment))
    pod = f"{deployment['metadata']['name']}-pod-0"
    pair = Pair(
        podman,
        f"{pod}-forward",
        f"{pod}-rserve",
        ports["http"],
        ports["admin"],
        int(spec["terminationGracePeriodSeconds"]),
    )
    try:
        podman.run("kube", "play", str(file))
        await check_pair(pair, healthcheck=False)
    finally:
        podman.run("kube", "down", str(file), check=False)
