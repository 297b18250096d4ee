"""The TOML configuration file, its precedence under the command line, and --check-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from forward import configfile
from forward.cli import parse_args
from forward.config import Config, ConfigError

from .conftest import RunMain

FULL = """
http-port = 8080
ws-port = 8081
socket = "/run/rserve/qap.sock"
doc-root = "."
bind = ["127.0.0.1", "::1"]
heartbeat = 300
ulog = "udp://127.0.0.1:1514"
server-manager = "mgr:41"
admin-port = 9100
workers = 4
pid-file = "/run/forward.pid"
trusted-proxy = "10.0.0.0/8"
log-level = "warning"
"""


def test_every_key_form_and_type() -> None:
    values = configfile.parse(FULL)
    c = Config(**values).validate()
    assert (c.http_port, c.ws_port, c.socket, c.doc_root) == (
        8080,
        8081,
        "/run/rserve/qap.sock",
        ".",
    )
    assert c.bind == ("127.0.0.1", "::1") and c.trusted_proxy == ("10.0.0.0/8",)
    assert (c.heartbeat, c.workers, c.admin_port, c.log_level) == (300.0, 4, 9100, "warning")
    assert configfile.parse("http_port = 1") == {"http_port": 1}  # field names work too
    assert configfile.parse("[forward]\nws-port = 5") == {"ws_port": 5}


def test_every_setting_can_be_given_in_the_file() -> None:
    from forward.config import settings

    keys = configfile._key_names()
    assert all(f.name in keys for f in settings())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http-port = '80'", "http-port: expected an integer"),
        ("http-port = true", "http-port: expected an integer"),
        ("heartbeat = 'x'", "heartbeat: expected a number"),
        ("socket = 5", "socket: expected a string"),
        ("bind = [1]", "bind: expected a string or a list of strings"),
        ("no-such = 1", "unknown setting 'no-such'"),
        ("http-port = 1\nhttp_port = 2", "'http_port' is given twice"),
        ("log-level = 'loud'", "'loud' is not one of"),
        ("http-port = ", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configfile.parse(text, "f.toml")


def test_command_line_overrides_the_file(tmp_path: Path) -> None:
    f = tmp_path / "forward.toml"
    f.write_text(FULL)
    c = parse_args(["--config", str(f), "-p", "9999", "--bind", "0.0.0.0"])
    assert (c.http_port, c.ws_port, c.bind) == (9999, 8081, ("0.0.0.0",))


def test_check_config_accepts_and_rejects(tmp_path: Path, forward_main: RunMain) -> None:
    good = tmp_path / "good.toml"
    good.write_text(FULL)
    out = forward_main("--config", str(good), "--check-config")
    assert out.returncode == 0 and out.stdout.strip() == f"forward: configuration OK ({good})"
    bad = tmp_path / "bad.toml"
    bad.write_text("http-port = 8080\nws-port = 8080\n")
    out = forward_main("--config", str(bad), "--check-config")
    assert out.returncode == 2
    assert out.stderr.strip() == "forward: -p and -w are both 8080: give them different ports"
    out = forward_main("--config", str(tmp_path / "absent.toml"), "--check-config")
    assert out.returncode == 2 and "cannot read the configuration file" in out.stderr
    out = forward_main("--check-config", "-S", "host:0")
    assert out.returncode == 2 and "-S host:0" in out.stderr
    out = forward_main("--check-config", "-r", str(tmp_path / "no-such-dir"))
    assert out.returncode == 2 and "not a directory" in out.stderr
