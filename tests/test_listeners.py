"""Binding the listeners: how a bound address is shown (host_port is the one formatter)."""

from __future__ import annotations

from forward.listeners import show_address
from forward.ulog import host_port


def test_host_port_brackets_ipv6() -> None:
    assert host_port("127.0.0.1", 8088) == "127.0.0.1:8088"
    assert host_port("::1", 8088) == "[::1]:8088"
    assert show_address(("::", 80, 0, 0)) == "[::]:80"
    assert show_address("/run/forward.sock") == "/run/forward.sock"
