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
- The per-build staging roots in :data:`STATE_PRIVATE` (``contexts/``: the context copies,
  ``buildah/tmp/`` and ``buildkit-tmp/``: each build's work directory with its push login and
  metadata file) are hidden too, and each
  child sees in them only the directories its start names (``wrap(..., visible=...)``): its own
  build's. So no child of one build reads another build's context, login or temp files.
- The daemon's code (the directory holding the ``agent`` package: the project for an editable
  install, ``site-packages`` otherwise) and its Python environment (``sys.prefix``, unless that is
  a system directory) are read-only (:func:`code_dirs`), unless one holds the state or runtime
  directory (then a warning).
- The daemon's config file, ``build.docker_config`` and the control socket are hidden with their
  directories, when a directory can be hidden: not a shared system directory (``/etc``, ``/run``,
  ``/tmp``...) and not holding the state or runtime directory. Otherwise only the file itself is
  hidden (``/dev/null`` bound over it) and the start logs a warning: give such a file a directory
  of its own.

Every child gets its own network namespace (the sandbox's), mount namespace (private propagation)
and PID namespace with a fresh ``/proc``. The PID namespace is not only for buildkitd: RUN steps
now run in containers of their own on both toolchains, but whatever gets out of one (a runtime
bug) should find only its own build's tree in ``/proc``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import Config
from agent.errors import StartupError

EXEC = str(Path(__file__).with_name("_exec.py"))
RUNTIME_VISIBLE = ("children", "buildkit")
STATE_HIDDEN = ("builds", "records", "logs")
STATE_PRIVATE = ("contexts", "buildah/tmp", "buildkit-tmp")
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)
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
    hidden ones to keep visible, directories made read-only, the per-build staging roots (hidden;
    a child is shown its own build's directories in them), and warnings for the start log."""

    dirs: tuple[str, ...]
    files: tuple[str, ...]
    keeps: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())
    readonly: tuple[str, ...] = field(default=())
    private: tuple[str, ...] = field(default=())

    def args(self) -> list[str]:
        out: list[str] = []
        for r in self.readonly:
            out += ["--readonly", r]
        for k in self.keeps:
            out += ["--keep", k]
        for d in self.dirs:
            out += ["--hide", d]
        for f in self.files:
            out += ["--hide-file", f]
        return out


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def code_dirs() -> list[str]:
    """The daemon's code and its Python environment: what a child must not be able to change."""
    out: list[str] = []
    for raw in (_PACKAGE_PARENT, sys.prefix):
        d = os.path.realpath(raw)
        if d in _SHARED or any(_within(d, o) for o in out):
            continue
        out = [o for o in out if not _within(o, d)] + [d]
    return out


def hide_plan(config: Config, code: list[str] | None = None) -> HidePlan:
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
    # Real paths: a child's directories are named by resolved paths (/proc/self/fd links).
    private = [os.path.join(os.path.realpath(state), p) for p in STATE_PRIVATE]
    dirs = [runtime, *(os.path.join(state, h) for h in STATE_HIDDEN), *private]
    needed = [state, *keeps]
    files: list[str] = []
    warnings: list[str] = []
    readonly: list[str] = []
    for c in code_dirs() if code is None else code:
        if _within(state, c) or _within(runtime, c):
            warnings.append(
                f"the daemon's code or environment {c} holds daemon.state_dir or "
                "daemon.runtime_dir, so it stays writable for build children: keep them apart"
            )
        else:
            readonly.append(c)
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
    return HidePlan(
        tuple(dirs),
        tuple(files),
        tuple(keeps),
        tuple(warnings),
        readonly=tuple(readonly),
        private=tuple(private),
    )


class Wrapper:
    """Builds the argv prefix of :mod:`agent.sandbox._exec` for one sandbox."""

    def __init__(self, netns_path: str, plan: HidePlan, parent: int | None = None) -> None:
        self._prefix = [sys.executable, "-I", "-S", EXEC]
        if parent is not None:
            self._prefix += ["--parent", str(parent)]
        self._prefix += ["--netns", netns_path, "--pid", *plan.args()]
        self._private = plan.private

    def wrap(
        self, argv: list[str], *, pid_namespace: bool = False, visible: Sequence[str] = ()
    ) -> list[str]:
        # pid_namespace is part of the contract; every child gets a PID namespace (see above).
        if not argv:
            raise ValueError("wrap() needs a command")
        keeps: list[str] = []
        for v in visible:
            path = os.path.realpath(v)
            if any(_within(path, p) and path != p for p in self._private):
                keeps += ["--keep", path]
        return [*self._prefix, *keeps, "--", *argv]
