"""What every bench shares: the machine line and writing its own section of docs/performance.md."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture when it has none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def machine() -> str:
    """CPU, CPUs, kernel, Python and the load average now (call it before the bench runs)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}; load average before the run {load}"
    )


def replace_section(text: str, start: str, end: str, section: str) -> str:
    """``text`` with what lies from ``start`` to ``end`` replaced by ``section`` (which carries
    both markers), or with ``section`` appended when the markers are not there yet."""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + section + tail
    return text.rstrip("\n") + "\n\n" + section + "\n"


def write_section(section: str) -> Path:
    """Replace a bench's section of docs/performance.md. ``section`` carries its markers: its
    first line is ``<!-- bench:NAME -->`` and its last ``<!-- /bench:NAME -->``."""
    lines = section.strip("\n").splitlines()
    start, end = lines[0].strip(), lines[-1].strip()
    if not (start.startswith("<!-- bench:") and end == start.replace("<!-- ", "<!-- /", 1)):
        raise ValueError(f"a bench section must start and end with its markers, not {start!r}")
    text = DOC.read_text() if DOC.exists() else "# Performance\n\nFigures written by bench/.\n"
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(replace_section(text, start, end, section))
    return DOC


def publish(section: str, *, write: bool) -> None:
    """Print a bench's section and, unless told not to, write it to docs/performance.md."""
    print(section)
    if write:
        print(f"written to {write_section(section)}")
