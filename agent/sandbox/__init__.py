"""The build sandbox (DESIGN section 4): every child of the daemon runs in it.

``open_sandbox(app)`` (async context manager, daemon start order: config, dirs, metrics,
**sandbox**, proxy, builds, control socket) yields a :class:`agent.contracts.SandboxPort` (a
:class:`Sandbox` or an :class:`OffSandbox`, each with a ``state`` for ``info``):

- ``sandbox.mode = "on"``: a named network namespace (``sandbox.netns``, pyroute2, ``lo`` up; a
  leftover of a crashed daemon, with any process still in it, is removed first) and, with
  ``sandbox.egress = "nat"``, a veth pair, a default route and an nftables table
  ``inet ba_<netns>`` that masquerades and blocks the host's own addresses and 169.254.0.0/16.
  All of it is removed when the context exits. A kernel or privilege refusal raises StartupError
  naming the step and the fix.
- ``sandbox.mode = "off"``: :class:`OffSandbox`: children run on the host, the proxy listens on
  the host's loopback; logged as a WARNING at start and reported as ``"off"`` by its ``state``.

``listen(port)`` returns the proxy's listening socket, bound on 127.0.0.1:<port> inside the
namespace. ``wrap(argv, pid_namespace=...)`` returns the argv that runs ``argv`` in the sandbox:
the network namespace, a private mount namespace and, for every child, a PID namespace of its own
with a fresh ``/proc`` (PID 1 of it dies with the daemon; everything in it dies with PID 1), and
without the capabilities no builder needs (``_exec.DROP_CAPS``: modules, raw I/O, boot, time). The
returned argv must be exec'd directly by the daemon process (``agent/build/child.py`` ``spawn``).

What children can see (the rule the toolchains follow; details in ``_wrap.py``):

- ``<runtime_dir>`` is hidden except ``<runtime_dir>/children/`` and ``<runtime_dir>/buildkit/``:
  put generated configs, the buildkitd socket and the children's HOME there, nothing else.
- ``<state_dir>/builds/``, ``<state_dir>/records/`` and ``<state_dir>/logs/`` are hidden; other
  ``<state_dir>`` subdirectories (toolchain storage: ``buildah/``, ``buildkit/``) are visible.
- The config file, ``build.docker_config`` and the control socket are hidden with their
  directories (only the files, with a start-up warning, when a directory is shared).
- ``<state_dir>/contexts/`` and ``<state_dir>/buildah/tmp/`` (per-build staging) are hidden; a
  child sees in them only the directories passed as ``wrap(..., visible=...)``: its own build's.
- The daemon's code and Python environment are read-only.

Orphans: ``cleanup_buildkitd(pidfile: Path, root: Path) -> None`` (blocking, bounded) kills the
process tree a previous daemon's buildkitd left (the pid in ``pidfile`` if its command line still
names ``buildkitd`` or ``root``, and processes whose root or program lies under ``root``), unmounts
everything at or under ``root`` and removes the pidfile. Call it before starting buildkitd.

Limits: ``detect_cgroups()`` says whether this node gives the daemon cgroup v2 or v1 (and makes
``<own cgroup>/build-agent``); ``create_cgroup(support, build_id, ...)`` makes one build's cgroup
with its memory, process and CPU limits (a :class:`BuildCgroup`: children join it with
``join_argv``, runtimes nest under ``parent``, ``limit_hit()`` names a limit the build ran into,
``remove()`` kills what is left); ``sweep_cgroups(support)`` removes a crashed daemon's.
"""

from __future__ import annotations

from agent.sandbox._cgroup import BuildCgroup, Support
from agent.sandbox._cgroup import create as create_cgroup
from agent.sandbox._cgroup import detect as detect_cgroups
from agent.sandbox._cgroup import release as release_cgroups
from agent.sandbox._cgroup import sweep as sweep_cgroups
from agent.sandbox._orphans import cleanup_buildkitd
from agent.sandbox._sandbox import OffSandbox, Sandbox, open_sandbox
from agent.sandbox._wrap import (
    RUNTIME_VISIBLE,
    STATE_HIDDEN,
    STATE_PRIVATE,
    HidePlan,
    code_dirs,
    hide_plan,
)

__all__ = [
    "RUNTIME_VISIBLE",
    "STATE_HIDDEN",
    "STATE_PRIVATE",
    "BuildCgroup",
    "HidePlan",
    "OffSandbox",
    "Sandbox",
    "Support",
    "cleanup_buildkitd",
    "code_dirs",
    "create_cgroup",
    "detect_cgroups",
    "hide_plan",
    "open_sandbox",
    "release_cgroups",
    "sweep_cgroups",
]
