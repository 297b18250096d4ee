"""The settings' own declarations: the values each allows, and what kind of value it holds."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from forward.config import Config, ConfigError, kind


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_min_version": "1.1"}, "--tls-min-version 1.1: must be one of 1.2, 1.3"),
        ({"log_level": "loud"}, "--log-level loud: must be one of"),
        ({"workers": 0}, "--workers 0: between 1 and 256"),
        ({"workers": 257}, "--workers 257: between 1 and 256"),
        ({"admin_port": 70000}, "--admin-port 70000: 0 (off) or a port up to 65535"),
        ({"ws_ping": -1.0}, "--ws-ping must not be negative"),
        ({"max_sessions": -1}, "--max-sessions must be 0 (no limit)"),
        # The close handshake is never waited for longer: a larger value would be a promise
        # the shutdown does not keep.
        ({"shutdown_timeout": 30.0}, "--shutdown-timeout must be between 0 and 10 seconds"),
    ],
)
def test_validate_checks_what_each_field_declares(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**settings).validate()
    assert str(info.value).startswith(message)


def test_one_kind_for_the_command_line_and_the_file() -> None:
    kinds = {f.name: kind(f) for f in dataclasses.fields(Config)}
    assert kinds["bind"] == "list" and kinds["follow_symlinks"] == "flag"
    assert kinds["http_port"] == "int" and kinds["heartbeat"] == "float"
    assert kinds["tls_min_version"] == "str" and kinds["pid_file"] == "str"


def test_loopback_is_a_trusted_proxy_unless_told_otherwise() -> None:
    assert Config().validate().trusted_proxies == ("127.0.0.0/8", "::1")
    assert Config(trusted_proxy=("10.0.0.0/8",)).validate().trusted_proxies == ("10.0.0.0/8",)
    assert Config(trusted_proxy=("none",)).validate().trusted_proxies == ()
    with pytest.raises(ConfigError, match="--trusted-proxy none cannot be given with"):
        Config(trusted_proxy=("none", "10.0.0.1")).validate()
