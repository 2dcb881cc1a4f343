"""Helpers of the build tests: contexts on disk, a daemon wired to a test registry, reading files
back out of a pushed image, metrics, and the daemon's process tree."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.build.child import descendants
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry


def write_context(root: Path, files: Mapping[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def build_sections(
    registries: list[Registry], extra: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Config for a daemon that builds into ``registries[0]``; every registry is plain HTTP."""
    sections: dict[str, dict[str, Any]] = {
        "build": {"base_repo": f"{registries[0].host}/base", "toolchain": "buildah"},
        "proxy": {"registries": [{"host": r.host, "http": True} for r in registries]},
    }
    for name, table in (extra or {}).items():
        sections.setdefault(name, {}).update(table)
    return sections


def start_build_daemon(
    tmp: Path,
    registries: list[Registry],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> DaemonProcess:
    return DaemonProcess(tmp, build_sections(registries, extra)).start()


@contextlib.contextmanager
def image_dir(ref: str) -> Iterator[Path]:
    """Image ``ref`` (plain HTTP registry) copied by skopeo into a ``dir:`` layout: manifest.json
    and one file per blob, named by its hex digest. Removed on exit."""
    with tempfile.TemporaryDirectory(prefix="img-") as d:
        subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"dir:{d}"],
            check=True,
            capture_output=True,
            env={"PATH": "/usr/bin:/bin", "HOME": d},
        )
        yield Path(d)


def read_from_image(ref: str, path: str) -> bytes:
    """The content of ``path`` in image ``ref`` (plain HTTP registry), read with skopeo."""
    with image_dir(ref) as d:
        manifest = json.loads((d / "manifest.json").read_text())
        found: bytes | None = None
        want = path.lstrip("/")
        for layer in manifest["layers"]:
            blob = d / layer["digest"].split(":", 1)[1]
            with tarfile.open(blob) as tar:
                for member in tar.getmembers():
                    if member.name.lstrip("./") == want and member.isfile():
                        f = tar.extractfile(member)
                        assert f is not None
                        found = f.read()
        if found is None:
            raise FileNotFoundError(f"{path} not in {ref}")
        return found


def metrics(d: DaemonProcess) -> dict[str, float]:
    """Every sample of the daemon's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def tool_runs(d: DaemonProcess, kind: str = "build") -> float:
    return metrics(d).get(f'build_agent_toolchain_runs_total{{kind="{kind}"}}', 0.0)


def children_of(d: DaemonProcess) -> list[int]:
    return descendants(d.pid)


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


# Driving builds through the real daemon (used by the lifecycle and sandbox tests).


def detach(d: DaemonProcess, ctx: Path, target: str, *extra: str) -> str:
    r = d.ctl("build", "--detach", "--context", str(ctx), "--target", target, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def status(d: DaemonProcess, build_id: str) -> dict[str, Any]:
    with d.client() as c:
        result: dict[str, Any] = c.call("status", {"id": build_id})
        return result


def log_of(d: DaemonProcess, build_id: str) -> str:
    with d.client() as c:
        return str(c.call("logs", {"id": build_id})["data"])
