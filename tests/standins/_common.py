"""What the three stand-ins share: where the recordings are, argv recording, CLI flag tables read
from the recorded ``--help`` texts, and BuildKit's Dockerfile source box."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve()
FIXTURES = Path(
    os.environ.get("STANDIN_FIXTURES") or _HERE.parents[1] / "fixtures" / "toolchain"
)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def fixture_lines(name: str) -> tuple[list[str], int]:
    """A recorded command's output lines and its exit status (the trailing ``rc=N`` line)."""
    lines = fixture(name).splitlines()
    rc = 0
    if lines and lines[-1].startswith("rc="):
        rc = int(lines.pop()[3:])
    return lines, rc


def record(prog: str) -> None:
    """Append this invocation to ``$STANDIN_RECORD`` (set by the wrapper the tests install)."""
    path = os.environ.get("STANDIN_RECORD")
    if not path:
        return
    entry: dict[str, object] = {
        "prog": prog,
        "argv": sys.argv[1:],
        "pid": os.getpid(),
        "t": time.time(),
    }
    # What the real tool would take its registry logins from (tests check where they come from).
    config = os.path.join(os.environ.get("DOCKER_CONFIG", "/nonexistent"), "config.json")
    if os.path.isfile(config):
        entry["docker_config_path"] = config
        with open(config, encoding="utf-8") as f:
            entry["docker_config"] = json.load(f)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


# --- urfave/cli (buildkitd, buildctl) and cobra (crane) flag tables from the recorded help ----

_URFAVE = re.compile(r"^\s+(--[\w-]+(?: value)?(?:, -[\w-]+(?: value)?)*)\s{2,}")


def urfave_flags(help_text: str) -> dict[str, bool]:
    """``{"--addr": True, "--debug": False, "-o": True, ...}``: name -> takes a value."""
    flags: dict[str, bool] = {}
    for line in help_text.splitlines():
        m = _URFAVE.match(line)
        if not m:
            continue
        for part in m.group(1).split(", "):
            name, _, value = part.partition(" ")
            flags[name] = value == "value"
    return flags


_COBRA = re.compile(r"^\s+(?:-(\w), )?\s*--([\w-]+)(?: (\w+))?\s{2,}")


def cobra_flags(help_text: str) -> dict[str, bool]:
    flags: dict[str, bool] = {}
    for line in help_text.splitlines():
        m = _COBRA.match(line)
        if not m:
            continue
        takes = m.group(3) is not None
        flags["--" + m.group(2)] = takes
        if m.group(1):
            flags["-" + m.group(1)] = takes
    return flags


class UsageError(Exception):
    pass


def parse_urfave(
    args: list[str], table: dict[str, bool], *, stop_at_positional: bool
) -> tuple[list[tuple[str, str]], list[str]]:
    """(flags in order, the rest). urfave/cli accepts ``-x``/``--x``, ``=value`` or a separate
    value, and (v1) stops at the first positional argument."""
    flags: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i + 1 :])
            break
        if not a.startswith("-") or a == "-":
            if stop_at_positional:
                rest.extend(args[i:])
                break
            rest.append(a)
            i += 1
            continue
        name, eq, value = a.partition("=")
        key = name if name in table else "--" + name.lstrip("-")
        if key not in table:
            key = "-" + name.lstrip("-")
        if key not in table:
            raise UsageError(f"flag provided but not defined: -{name.lstrip('-')}")
        if table[key] and not eq:
            if i + 1 >= len(args):
                raise UsageError(f"flag needs an argument: -{name.lstrip('-')}")
            value = args[i + 1]
            i += 1
        flags.append((key, value))
        i += 1
    return flags, rest


# --- BuildKit's Dockerfile source box, as in build-fail-*-plain.txt -----------------------------


def source_box(filename: str, text: str, lineno: int) -> list[str]:
    """``Dockerfile:2`` / rule / numbered lines with ``>>>`` on ``lineno`` / rule."""
    lines = text.split("\n")
    first = max(1, lineno - 4)
    last = min(len(lines), lineno + 4)
    out = [f"{filename}:{lineno}", "-" * 20]
    for n in range(first, last + 1):
        mark = ">>> " if n == lineno else "    "
        out.append(f"{n:>4} | {mark}{lines[n - 1]}")
    out.append("-" * 20)
    return out
