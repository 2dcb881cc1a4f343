"""Per-build resource limits: what the config allows (``[build] memory_max``, ``pids_max``,
``cpu_max``), what a request may ask for (lower, never higher), and their words in messages.

A value of 0 (or an empty ``memory_max``) means "no limit" for that resource.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import BadRequest

_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*")


def parse_bytes(text: str | int) -> int:
    """``"512MiB"``, ``"4GiB"``, ``"2G"``, ``"1048576"`` or an int -> bytes. ValueError else."""
    if isinstance(text, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size (examples: 512MiB, 4GiB, 2G, 1048576)")
    unit = (m.group(2) or "").lower()
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class Limits:
    """One build's limits; None: not limited."""

    memory_max: int | None = None  # bytes
    pids_max: int | None = None
    cpu_max: float | None = None  # CPUs, fractional

    @classmethod
    def from_config(cls, memory_max: str, pids_max: int, cpu_max: float) -> Limits:
        memory = parse_bytes(memory_max) if memory_max not in ("", "0") else 0
        return cls(memory or None, pids_max or None, cpu_max or None)

    def narrowed(self, asked: Mapping[str, Any]) -> Limits:
        """These limits lowered by a request's ``limits`` map; BadRequest for a higher value, an
        unknown key or a wrong type, naming the field and the ceiling."""
        unknown = sorted(set(asked) - {"memory_max", "pids_max", "cpu_max"})
        if unknown:
            raise BadRequest(
                f"limits: unknown key {unknown[0]!r}; use memory_max, pids_max or cpu_max",
                details={"field": "limits"},
            )
        out: dict[str, Any] = {}
        for key, ceiling in (
            ("memory_max", self.memory_max),
            ("pids_max", self.pids_max),
            ("cpu_max", self.cpu_max),
        ):
            if key not in asked:
                out[key] = ceiling
                continue
            value = _value(key, asked[key])
            if value <= 0:
                raise BadRequest(
                    f"limits.{key} must be greater than 0", details={"field": f"limits.{key}"}
                )
            if ceiling is not None and value > ceiling:
                shown = format_bytes(int(ceiling)) if key == "memory_max" else f"{ceiling:g}"
                raise BadRequest(
                    f"limits.{key} may only lower the node's limit ({shown}, build.{key}); "
                    "ask for that or less",
                    details={"field": f"limits.{key}", "max": ceiling},
                )
            out[key] = value
        return Limits(**out)

    def words(self) -> str:
        parts = []
        if self.memory_max:
            parts.append(f"memory_max {format_bytes(self.memory_max)}")
        if self.pids_max:
            parts.append(f"pids_max {self.pids_max}")
        if self.cpu_max:
            parts.append(f"cpu_max {self.cpu_max:g}")
        return ", ".join(parts) or "no limits"

    def to_dict(self) -> dict[str, Any]:
        return {"memory_max": self.memory_max, "pids_max": self.pids_max, "cpu_max": self.cpu_max}


def _value(key: str, raw: Any) -> float:
    where = {"field": f"limits.{key}"}
    if key == "memory_max":
        if not isinstance(raw, int | str) or isinstance(raw, bool):
            raise BadRequest(
                "limits.memory_max must be a size (bytes or e.g. 512MiB)", details=where
            )
        try:
            return parse_bytes(raw)
        except ValueError as exc:
            raise BadRequest(f"limits.memory_max: {exc}", details=where) from exc
    if key == "pids_max":
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise BadRequest("limits.pids_max must be an integer", details=where)
        return raw
    if not isinstance(raw, int | float) or isinstance(raw, bool):
        raise BadRequest("limits.cpu_max must be a number of CPUs (e.g. 1.5)", details=where)
    return float(raw)


__all__ = ["Limits", "format_bytes", "parse_bytes"]
