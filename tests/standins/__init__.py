"""Stand-in ``buildkitd``, ``buildctl`` and ``crane`` for the BuildKit toolchain's tests.

Real BuildKit and crane cannot be installed on this machine (no Debian package, no registry
download). Each stand-in replays what the real BuildKit (v0.11.6 or v0.24.0: ``version``) and crane
v0.20.2 printed, read at run time from ``tests/fixtures/toolchain/`` (see each module's docstring
for exactly what is replayed and what is real). :func:`install` puts executable wrappers into a
directory; each runs its stand-in with the test's Python and appends every invocation's argv to
``record`` (the daemon scrubs the children's environment, so the record path is baked into the
wrapper, not passed in it).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.standins._common import FIXTURES as FIXTURES_DIR
from tests.standins._common import VERSIONS

HERE = Path(__file__).resolve().parent
NAMES = ("buildkitd", "buildctl", "crane")


__all__ = ["FIXTURES_DIR", "NAMES", "VERSIONS", "Standins", "install"]


@dataclass(frozen=True)
class Standins:
    bindir: Path
    record: Path
    version: str = VERSIONS[0]

    def path(self, name: str) -> str:
        return str(self.bindir / name)

    def env(self) -> dict[str, str]:
        """``AGENT_BUILDKITD``/``AGENT_BUILDCTL``/``AGENT_CRANE`` naming the stand-ins."""
        return {f"AGENT_{n.upper()}": self.path(n) for n in NAMES}

    def calls(self, prog: str | None = None) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        out = [json.loads(ln) for ln in self.record.read_text().splitlines() if ln.strip()]
        return [c for c in out if prog is None or c["prog"] == prog]


def install(bindir: Path, record: Path | None = None, version: str = VERSIONS[0]) -> Standins:
    """Wrappers for the three stand-ins in ``bindir``; buildkitd and buildctl impersonate BuildKit
    ``version`` (one of :data:`VERSIONS`)."""
    if version not in VERSIONS:
        raise ValueError(f"no recordings of BuildKit {version}: {VERSIONS}")
    bindir.mkdir(parents=True, exist_ok=True)
    record = record or bindir / "calls.jsonl"
    for name in NAMES:
        script = bindir / name
        script.write_text(
            "#!/bin/sh\n"
            f"STANDIN_RECORD={shlex.quote(str(record))}; export STANDIN_RECORD\n"
            f"STANDIN_BUILDKIT_VERSION={version}; export STANDIN_BUILDKIT_VERSION\n"
            f"exec {shlex.quote(sys.executable)} {shlex.quote(str(HERE / (name + '.py')))} "
            '"$@"\n'
        )
        script.chmod(0o755)
    return Standins(bindir, record, version)
