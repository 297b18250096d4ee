"""The configuration file (TOML): every `Config` setting, overridden by the command line.

Keys are the long option names without the dashes (`http-port = 8088`, `tls-key = "..."`,
`bind = ["127.0.0.1"]`); the field names with underscores are accepted too. The value's TOML
type must fit the setting (an integer for a port, a string for a path, a list of strings for a
repeatable option). Every problem is one `ConfigError` naming the file and the key, so that
`forward --check-config` can say exactly what to fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

from .config import ConfigError, kind, settings


def _key_names() -> dict[str, dataclasses.Field[Any]]:
    out: dict[str, dataclasses.Field[Any]] = {}
    for f in settings():
        out[f.name] = f
        for flag in f.metadata["flags"]:
            if flag.startswith("--"):
                out[flag[2:]] = f
    return out


def _convert(path: str, key: str, field: dataclasses.Field[Any], value: Any) -> Any:
    what = kind(field)
    where = f"{path}: {key}"
    if what == "list":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where}: expected a string or a list of strings")
        return tuple(items)
    if what == "flag":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if what == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer")
        return value
    if what == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    choices = field.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def parse(text: str, path: str = "<config>") -> dict[str, Any]:
    """TOML text -> {field name: value}; unknown keys and wrong types are errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    # A [forward] table is allowed, so that the file can share a document with other tools.
    if set(data) == {"forward"} and isinstance(data["forward"], dict):
        data = data["forward"]
    keys = _key_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = keys.get(key)
        if field is None:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        if field.name in out:
            raise ConfigError(f"{path}: {key!r} is given twice")
        out[field.name] = _convert(path, key, field, value)
    return out


def load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)
