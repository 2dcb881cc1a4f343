"""buildkitd seen from outside: finding the three BuildKit programs (:func:`buildkit_binaries`),
the ``buildkitd.toml`` it is started with (:func:`render_config`), and reading what it answers
(:func:`parse_workers`, :func:`fatal_messages`). The toolchain around it is agent/build/buildkit.py.

buildkitd.toml marks the proxy's child address as plain HTTP and points every FROM-line registry
the proxy serves at the proxy, with no path::

    [registry."localhost:8080"]
      http = true
    [registry."docker.io"]
      mirrors = ["localhost:8080"]

Every BuildKit generation then asks ``http://localhost:8080/v2/<repo>/...?ns=docker.io`` (containerd
adds ``ns`` whenever the mirror is not the image's own registry) and the proxy routes by ``ns``. A
mirror with a path is not portable: v0.11 puts the whole string in the host and ``/v2`` after it
(``/<path>/v2/<repo>``) and looks its ``http`` setting up under the whole string; v0.12 and later
send ``/v2/<path>/<repo>`` and look it up under the host alone (docs/proxy.md). ``insecure`` is not
written: with ``http`` and ``insecure`` both set, v0.11 tries plain HTTP and then HTTPS and reports
the HTTPS failure, hiding the real one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.contracts import Mirror

ENV_VARS = {"buildkitd": "AGENT_BUILDKITD", "buildctl": "AGENT_BUILDCTL", "crane": "AGENT_CRANE"}


@dataclass(frozen=True)
class BuildkitBinaries:
    """Absolute paths of the three programs the toolchain runs."""

    buildkitd: str
    buildctl: str
    crane: str


def buildkit_binaries(environ: Mapping[str, str] | None = None) -> BuildkitBinaries | None:
    """The BuildKit programs: ``AGENT_BUILDKITD``/``AGENT_BUILDCTL``/``AGENT_CRANE`` when set,
    else found on ``PATH``. None when any of the three is missing (or not executable)."""
    env = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for name, var in ENV_VARS.items():
        given = env.get(var, "")
        path = shutil.which(given) if given else shutil.which(name, path=env.get("PATH"))
        if not path:
            return None
        found[name] = os.path.abspath(path)
    return BuildkitBinaries(**found)


def _toml_str(s: str) -> str:
    # A TOML basic string accepts JSON's escapes for everything json.dumps produces here.
    return json.dumps(s)


def render_config(
    *,
    root: Path,
    socket: Path,
    proxy_address: str,
    mirrors: list[Mirror],
    cgroup_parent: str = "",
    keep_bytes: int = 0,
) -> str:
    """buildkitd.toml: OCI worker only (its RUN steps' containers under ``cgroup_parent`` when
    given; with ``keep_bytes``, ``gc = true`` and ``gckeepstorage``: the storage budget), the
    proxy as a plain-HTTP registry, mirrors onto it."""
    out = [
        "# Written by build-agent at every start; edits are lost.",
        f"root = {_toml_str(str(root))}",
        "",
        "[grpc]",
        f"  address = [{_toml_str('unix://' + str(socket))}]",
        "",
        "[worker.oci]",
        "  enabled = true",
        *([f"  defaultCgroupParent = {_toml_str(cgroup_parent)}"] if cgroup_parent else []),
        # The budget (build.storage_max): v0.11 reads bytes, v0.24 its reserved space.
        *(["  gc = true", f"  gckeepstorage = {keep_bytes}"] if keep_bytes else []),
        "",
        "[worker.containerd]",
        "  enabled = false",
    ]
    hosts: list[str] = []
    if proxy_address:
        hosts.append(proxy_address)
        port = proxy_address.rpartition(":")[2]
        for alias in (f"localhost:{port}", f"127.0.0.1:{port}"):
            if alias not in hosts:
                hosts.append(alias)
    for host in hosts:
        out += ["", f"[registry.{_toml_str(host)}]", "  http = true"]
    if proxy_address:
        mirror = f"  mirrors = [{_toml_str(proxy_address)}]"
        for m in mirrors:
            out += ["", f"[registry.{_toml_str(m.host)}]", mirror]
    return "\n".join(out) + "\n"


def parse_workers(output: str) -> list[dict[str, object]]:
    """Workers from ``buildctl debug workers --format '{{json .}}'`` (fixtures/workers.json), or
    from the plain table (fixtures/workers.txt). Empty when there are none or it is unreadable."""
    text = output.strip()
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return []
        return [w for w in data if isinstance(w, dict) and w.get("id")]
    rows = [ln.split() for ln in text.splitlines()[1:] if ln.strip()]
    return [{"id": r[0], "platforms": r[1] if len(r) > 1 else ""} for r in rows]


def fatal_messages(lines: list[str]) -> list[str]:
    """``lines`` without a Go stack trace: buildkitd prints a fatal error with pkg/errors' ``%+v``,
    the messages and then, per frame, a function line and a tab-indented ``file:line``
    (tests/fixtures/toolchain/buildkitd-root-not-dir.txt)."""
    out = []
    for i, line in enumerate(lines):
        frame_next = i + 1 < len(lines) and lines[i + 1].startswith("\t")
        if line.startswith("\t") or (frame_next and " " not in line.strip()):
            continue
        out.append(line)
    return out


__all__ = [
    "BuildkitBinaries",
    "buildkit_binaries",
    "fatal_messages",
    "parse_workers",
    "render_config",
]
