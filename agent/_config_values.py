"""Raw config values made typed: TOML tables checked into a section, environment text parsed.

:func:`build_section` turns one TOML table (or an entry of an array of tables) into its
dataclass of agent/config.py: unknown keys refused, each value coerced to the field's type and
run through the field's validator (agent/_config_checks.py), required keys enforced. A secret
key's value never appears in a message. :func:`from_env` turns an ``AGENT_*`` variable's text
into what the TOML would have held.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from agent.errors import ConfigError


def from_env(var: str, text: str, hint: Any) -> Any:
    """Environment values are strings; turn them into what the TOML would have held."""
    if hint is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}={text!r} is not a boolean; use true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{var}={text!r} is not a number") from None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{var} must be a JSON list of tables: {exc}") from None
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [from_env(var, p, item) for p in parts]
    return text


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_type_name(item)}"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}.get(
        hint, str(hint)
    )


def _coerce(where: str, value: Any, hint: Any, *, secret: bool = False) -> Any:
    shown = "***" if secret else repr(value)  # a mistyped password must not reach the message
    bad = ConfigError(f"{where} = {shown} must be {_type_name(hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(hint)
        if dataclasses.is_dataclass(item):
            out = []
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    # Not the value: an entry of [[proxy.credentials]] may hold a password.
                    raise ConfigError(f"{where}[{i}] must be a table, not {type(v).__name__}")
                out.append(build_section(typing.cast(type, item), v, f"{where}[{i}]"))
            return out
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if isinstance(hint, types.UnionType):  # pragma: no cover - no union keys yet
        return value
    raise bad


def build_section(cls: type, table: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in table:
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}; valid keys: " + ", ".join(fields))
    values = {}
    for key, value in table.items():
        label = f"{where}.{key}"
        secret = bool(fields[key].metadata.get("secret"))
        coerced = _coerce(label, value, hints[key], secret=secret)
        check = fields[key].metadata.get("check")
        if check is not None:
            why = check(coerced)
            if why:
                shown = "***" if secret else repr(value)
                raise ConfigError(f"{label} = {shown} {why}")
        values[key] = coerced
    # Required keys of array-of-table entries (routes, registries): "" defaults fail their check.
    for key, f in fields.items():
        if key not in values and f.metadata.get("check") is not None and f.default == "":
            why = f.metadata["check"]("")
            if why:
                raise ConfigError(f"{where}.{key} is required: it {why}")
    return cls(**values)


__all__ = ["build_section", "from_env"]
