"""What a child may see, and the argv prefix that puts it in the sandbox.

The rule (toolchain code must follow it; ``agent/sandbox/__init__.py`` repeats it):

- ``daemon.runtime_dir`` is hidden (an empty read-only tmpfs) **except** the subdirectories named in
  :data:`RUNTIME_VISIBLE` (``children/``, ``buildkit/``): generated files a child reads
  (``buildkitd.toml``, ``registries.conf``), the buildkitd socket and the children's HOME go there.
  So the control socket, pid files and anything else of the daemon's in the runtime dir are not
  visible to children.
- In ``daemon.state_dir`` the directories named in :data:`STATE_HIDDEN` (``builds/``,
  ``records/``, ``logs/``: build records and logs) are hidden; everything else (toolchain storage
  such as ``buildah/``, ``buildkit/``, ``toolchain/``) stays visible.
- The daemon's config file, ``build.docker_config`` and the control socket are hidden with their
  directories, when a directory can be hidden: not a shared system directory (``/etc``, ``/run``,
  ``/tmp``...) and not holding the state or runtime directory. Otherwise only the file itself is
  hidden (``/dev/null`` bound over it) and the start logs a warning: give such a file a directory
  of its own.

Every child gets its own network namespace (the sandbox's), mount namespace (private propagation)
and PID namespace with a fresh ``/proc``. The PID namespace is not only for buildkitd: a RUN step
under buildah's chroot isolation sees the ``/proc`` of the namespace buildah runs in, and other
children's command lines there carry other builds' proxy routes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import Config
from agent.errors import StartupError

EXEC = str(Path(__file__).with_name("_exec.py"))
RUNTIME_VISIBLE = ("children", "buildkit")
STATE_HIDDEN = ("builds", "records", "logs")
# Hiding one of these would break the children (or the system's view of itself).
_SHARED = {
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib64",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/var/run",
    "/var/tmp",
}


@dataclass(frozen=True)
class HidePlan:
    """Directories to cover with an empty tmpfs, files to cover with /dev/null, directories under
    hidden ones to keep visible, and warnings for the start log."""

    dirs: tuple[str, ...]
    files: tuple[str, ...]
    keeps: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    def args(self) -> list[str]:
        out: list[str] = []
        for k in self.keeps:
            out += ["--keep", k]
        for d in self.dirs:
            out += ["--hide", d]
        for f in self.files:
            out += ["--hide-file", f]
        return out


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def hide_plan(config: Config) -> HidePlan:
    """The hiding rule above, applied to ``config``."""
    d = config.daemon
    state = os.path.abspath(d.state_dir)
    runtime = os.path.abspath(d.runtime_dir)
    if runtime in _SHARED or _within(state, runtime):
        raise StartupError(
            f"daemon.runtime_dir = {d.runtime_dir} cannot be hidden from build children (it is a "
            "shared system directory or holds daemon.state_dir); give the daemon a runtime "
            "directory of its own, e.g. /run/build-agent"
        )
    keeps = [os.path.join(runtime, k) for k in RUNTIME_VISIBLE]
    dirs = [runtime, *(os.path.join(state, h) for h in STATE_HIDDEN)]
    needed = [state, *keeps]
    files: list[str] = []
    warnings: list[str] = []
    secrets = [("build.docker_config", config.build.docker_config), ("daemon.socket", d.socket)]
    if config.source and os.path.isabs(config.source):
        secrets.insert(0, ("the config file", config.source))
    for what, raw in secrets:
        f = os.path.abspath(raw)
        parent = os.path.dirname(f)
        if any(_within(f, h) for h in dirs) and not any(_within(f, k) for k in keeps):
            continue  # already inside a hidden directory
        files.append(f)
        if parent in _SHARED or any(_within(n, parent) for n in needed):
            warnings.append(
                f"{what} {f} shares its directory with paths the build children need; only the "
                "file is hidden from them: move it into a directory of its own"
            )
        elif parent not in dirs:
            dirs.append(parent)
    return HidePlan(tuple(dirs), tuple(files), tuple(keeps), tuple(warnings))


class Wrapper:
    """Builds the argv prefix of :mod:`agent.sandbox._exec` for one sandbox."""

    def __init__(self, netns_path: str, plan: HidePlan, parent: int | None = None) -> None:
        self._prefix = [sys.executable, "-I", "-S", EXEC]
        if parent is not None:
            self._prefix += ["--parent", str(parent)]
        self._prefix += ["--netns", netns_path, "--pid", *plan.args()]

    def wrap(self, argv: list[str], *, pid_namespace: bool = False) -> list[str]:
        # pid_namespace is part of the contract; every child gets a PID namespace (see above).
        if not argv:
            raise ValueError("wrap() needs a command")
        return [*self._prefix, "--", *argv]
