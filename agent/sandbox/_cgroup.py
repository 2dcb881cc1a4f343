"""Per-build cgroups: memory, process and CPU limits for every process of one build.

Layout, in every controller this uses: ``<the daemon's own cgroup>/build-agent/<instance>/<build
id>`` holds the build's limits; the build's own processes (builder, push, copy) are in its
``tools`` leaf, and an OCI runtime's containers under its ``run`` leaf (runc takes a cgroup path
as the container's own and removes it when the container is gone). ``<instance>`` names the
daemon (from its state directory), so two daemons on one host never touch each other's builds.

- cgroup v2 (one unified hierarchy at /sys/fs/cgroup; production nodes under systemd with
  ``Delegate=yes`` in the unit, so the daemon may create children of its own cgroup):
  ``memory.max`` + ``memory.swap.max = 0``, ``pids.max``, ``cpu.max = "<quota> <period>"``;
  ``memory.events`` (``oom_kill``) and ``pids.events`` (``max``) tell which limit was hit;
  ``cgroup.kill`` ends what is left. The daemon's ``build-agent`` cgroup enables the
  controllers in its ``cgroup.subtree_control``.
- cgroup v1 (a hierarchy per controller, as on this project's development machines):
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap accounting is on),
  ``pids.max``, ``cpu.cfs_quota_us``/``cpu.cfs_period_us``; ``memory.oom_control``
  (``oom_kill``, kernels >= 4.13) or ``memory.failcnt`` and ``pids.events``.

A child joins by writing its pid to ``cgroup.procs`` of each hierarchy before it execs the tool
(:meth:`BuildCgroup.join_argv`): every process it starts is then inside. An OCI runtime that
makes its own cgroups for a RUN step is told the build's cgroup as its parent
(:attr:`BuildCgroup.parent`: buildah ``--cgroup-parent``). BuildKit is not given it: it hashes a
step's cgroup parent into the step's cache key, so its RUN steps stay in buildkitd's cgroups.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.limits import format_bytes

log = logging.getLogger("agent.sandbox")

ROOT = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000
_FORK_FAILED = "Resource temporarily unavailable"  # EAGAIN from fork/clone, as sh, runc report it
_KILLED = ("Killed", "status 137", "signal 9", "exit code: 137")
_V1_CONTROLLERS = ("memory", "pids", "cpu")


@dataclass(frozen=True)
class Support:
    """What this node offers: ``version`` 2, 1 or 0 (none), and why not when 0."""

    version: int
    base: tuple[Path, ...] = ()  # v2: one dir; v1: one per controller (memory, pids, cpu)
    reason: str = ""

    def words(self) -> str:
        if self.version == 2:
            return "cgroup v2"
        if self.version == 1:
            return "cgroup v1 (memory, pids, cpu)"
        return f"unavailable: {self.reason}"


def _own(controller: str, proc_cgroup: str) -> str | None:
    """This process's cgroup path in ``controller`` ("" for v2) from /proc/self/cgroup."""
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        names = parts[1].split(",") if parts[1] else [""]
        if controller in names:
            return parts[2]
    return None


def detect(instance: str = "default", root: Path = ROOT) -> Support:
    """Which cgroup version the daemon can use for builds, with its ``build-agent/<instance>``
    dirs made."""
    try:
        proc = Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        return Support(0, reason=f"cannot read /proc/self/cgroup ({exc.strerror})")
    if (root / "cgroup.controllers").exists():
        own = _own("", proc) or "/"
        base = root / own.lstrip("/") / "build-agent" / instance
        try:
            available = (root / own.lstrip("/") / "cgroup.controllers").read_text().split()
            missing = [c for c in ("memory", "pids", "cpu") if c not in available]
            if missing:
                return Support(
                    0,
                    reason=f"the daemon's cgroup {own} is not delegated the "
                    f"{', '.join(missing)} controller(s) (systemd: Delegate=yes in the unit)",
                )
            base.mkdir(parents=True, exist_ok=True)
            _enable_v2(base.parent.parent)
            _enable_v2(base.parent)
            _enable_v2(base)
        except OSError as exc:
            return Support(0, reason=f"cannot create {base} ({exc.strerror})")
        return Support(2, (base,))
    # v1: one relative path in every hierarchy (the daemon's memory cgroup), because an OCI
    # runtime given a cgroup parent uses the same path in each controller.
    rel = (_own("memory", proc) or "/").lstrip("/")
    bases = []
    for controller in _V1_CONTROLLERS:
        top = root / controller
        if _own(controller, proc) is None or not (top / "cgroup.procs").exists():
            return Support(0, reason=f"no cgroup v1 {controller} hierarchy at {top}")
        base = top / rel / "build-agent" / instance
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return Support(0, reason=f"cannot create {base} ({exc.strerror})")
        bases.append(base)
    return Support(1, tuple(bases))


def _enable_v2(path: Path) -> None:
    """Turn on the controllers for ``path``'s children (moves this process out of ``path``
    first when it is in it: v2 allows no process in a cgroup that has controllers on)."""
    text = " ".join(f"+{c}" for c in ("memory", "pids", "cpu"))
    try:
        (path / "cgroup.subtree_control").write_text(text)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        leaf = path / "daemon"
        leaf.mkdir(exist_ok=True)
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (leaf / "cgroup.procs").write_text(pid)
        (path / "cgroup.subtree_control").write_text(text)


@dataclass
class BuildCgroup:
    """The cgroup(s) of one build. ``paths`` has one directory per hierarchy (v2: one)."""

    version: int
    paths: tuple[Path, ...]
    memory_max: int | None
    pids_max: int | None
    cpu_max: float | None
    _before: dict[str, int] = field(default_factory=dict)
    # Who the limits are for, in messages: "the build", or for BuildKit's node-wide cgroup of RUN
    # steps, the words that say they are shared.
    who: str = "the build"
    shared: bool = False  # counters and peaks are not this build's alone: trust output only

    @property
    def parent(self) -> str:
        """The cgroup path (from the hierarchy's root) where an OCI runtime puts containers: the
        build's ``run`` leaf (buildah's runc uses it as the container's own cgroup, BuildKit's
        nests one below it per container)."""
        first = self.paths[0]
        depth = len(ROOT.parts) + (0 if self.version == 2 else 1)  # v1: below the controller
        return "/" + "/".join((*first.parts[depth:], "run"))

    def join_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into this build's cgroup(s) (the
        ``tools`` leaf): the tool and all it starts are inside from their first instruction. A
        write that fails stops the child (it never runs outside its limits)."""
        writes = " && ".join(f'echo $$ > "{p}/tools/cgroup.procs"' for p in self.paths)
        return ["/bin/sh", "-c", f'{writes} && exec "$@"', "build-agent-cgroup", *argv]

    def _file(self, name: str) -> Path | None:
        controller = name.split(".", 1)[0]
        if self.version == 2:
            return self.paths[0] / name
        for p in self.paths:
            if p.parts[len(ROOT.parts)] == controller:
                return p / name
        return None

    def _read_counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        names: tuple[tuple[str, str], ...] = (
            ("memory.events", "oom_kill"),
            ("memory.events", "max"),
            ("pids.events", "max"),
        )
        if self.version == 1:
            names = (("memory.oom_control", "oom_kill"), ("pids.events", "max"))
        for fname, key in names:
            f = self._file(fname)
            if f is None:
                continue
            # Summed over the build's cgroup and what is below it (its leaves, a runtime's): v1
            # counts an event where the failing task is, not where the limit is.
            for g in f.parent.rglob(fname):
                with contextlib.suppress(OSError, ValueError):
                    for line in g.read_text().splitlines():
                        k, _, v = line.partition(" ")
                        if k == key:
                            out[f"{fname}:{key}"] = out.get(f"{fname}:{key}", 0) + int(v)
        singles: tuple[tuple[str, str], ...] = (
            ("memory.failcnt", "memory.failcnt"),
            ("memory.max_usage_in_bytes", "memory.peak"),
            ("pids.peak", "pids.peak"),  # hierarchical; kernels since 6.x have it in v1 too
        )
        if self.version == 2:
            singles = (("memory.peak", "memory.peak"), ("pids.peak", "pids.peak"))
        for fname, key in singles:
            f = self._file(fname)
            if f is not None:
                with contextlib.suppress(OSError, ValueError):
                    out[key] = int(f.read_text().split()[0])
        return out

    def limit_hit(self, output: Sequence[str] = ()) -> str | None:
        """Which limit the build ran into, in words with its value, or None.

        From the cgroup's own counters; for processes, also from the failed fork in the build's
        last ``output`` lines, since a runtime's container cgroup below this one (BuildKit's
        runc) counts that event itself under cgroup v1 and is gone by now. Only this build's
        own error message depends on that output."""
        now = {} if self.shared else self._read_counters()

        def grew(key: str) -> bool:
            return now.get(key, 0) > self._before.get(key, 0)

        # v1 counts an OOM kill in the killed task's own memcg (a runtime's container cgroup,
        # gone by now), and a charge that failed below this cgroup in neither: there the sign
        # is a peak at the limit here plus a killed step.
        oom = ("memory.oom_control:oom_kill", "memory.events:oom_kill")
        killed = any(w in line for line in output[-40:] for w in _KILLED)
        at_limit = bool(self.memory_max) and now.get("memory.peak", 0) >= 0.98 * (
            self.memory_max or 0
        )
        memory = any(grew(k) for k in oom) or (killed and (grew("memory.failcnt") or at_limit))
        if self.shared:
            memory = killed
        if self.memory_max and memory:
            return f"{self.who} ran out of memory: memory_max {format_bytes(self.memory_max)}"
        forked = any(_FORK_FAILED in line for line in output[-40:])
        full = bool(self.pids_max) and now.get("pids.peak", 0) >= (self.pids_max or 0)
        if self.pids_max and (grew("pids.events:max") or forked or full):
            return f"{self.who} hit pids_max {self.pids_max} (too many processes at once)"
        return None

    def pids(self) -> list[int]:
        """Every process in the build's cgroups, its leaves and a runtime's cgroups below."""
        out: set[int] = set()
        for p in self.paths:
            for procs in p.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    out.update(int(x) for x in procs.read_text().split())
        return sorted(out)

    def remove(self, timeout: float = 5.0) -> list[int]:
        """Kill whatever is left in the build's cgroup(s) and remove them; returns the pids that
        would not die (bounded)."""
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.paths[0] / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + timeout
        left = self.pids()
        while left and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)  # the kernel is tearing them down: a bounded poll
            left = self.pids()
        for p in self.paths:
            _rmtree(p)
        if left:
            log.warning("build cgroup %s: %d process(es) would not die", self.paths[0], len(left))
        return left


def _rmtree(path: Path) -> None:
    """rmdir a cgroup and its children (a runtime may have made children), deepest first."""
    if not path.exists():
        return
    for sub in sorted((d for d in path.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def create(
    support: Support,
    build_id: str,
    *,
    memory_max: int | None,
    pids_max: int | None,
    cpu_max: float | None,
) -> BuildCgroup | None:
    """The build's cgroup(s) with their limits written, or None when the node has none (the
    daemon said so at start). Raises OSError when a limit cannot be written."""
    if support.version == 0:
        return None
    paths = tuple(base / build_id for base in support.base)
    for p in paths:
        _rmtree(p)  # a leftover of a crashed daemon with the same id
        p.mkdir()
    cg = BuildCgroup(support.version, paths, memory_max, pids_max, cpu_max)
    try:
        _write_limits(cg)
        if support.version == 2:
            _enable_v2(paths[0])  # for the leaves and the runtime's containers below
        for p in paths:
            (p / "tools").mkdir()
    except OSError:
        cg.remove()
        raise
    cg._before = cg._read_counters()
    return cg


def _write_limits(cg: BuildCgroup) -> None:
    def put(name: str, value: str) -> None:
        f = cg._file(name)
        if f is not None:
            f.write_text(value)

    if cg.version == 2:
        if cg.memory_max:
            put("memory.max", str(cg.memory_max))
            with contextlib.suppress(OSError):  # no swap controller: nothing to turn off
                put("memory.swap.max", "0")
        if cg.pids_max:
            put("pids.max", str(cg.pids_max))
        if cg.cpu_max:
            put("cpu.max", f"{int(cg.cpu_max * _PERIOD_US)} {_PERIOD_US}")
        return
    if cg.memory_max:
        put("memory.limit_in_bytes", str(cg.memory_max))
        memsw = cg._file("memory.memsw.limit_in_bytes")
        if memsw is not None and memsw.exists():
            memsw.write_text(str(cg.memory_max))
    if cg.pids_max:
        put("pids.max", str(cg.pids_max))
    if cg.cpu_max:
        put("cpu.cfs_period_us", str(_PERIOD_US))
        put("cpu.cfs_quota_us", str(int(cg.cpu_max * _PERIOD_US)))


def release(support: Support) -> None:
    """Remove the daemon's own ``build-agent/<instance>`` dirs at stop (their builds are gone)."""
    for base in support.base:
        _rmtree(base)


def sweep(support: Support) -> int:
    """Remove the build cgroups an earlier daemon left (at start); returns how many."""
    count = 0
    for base in support.base:
        for d in base.iterdir() if base.exists() else ():
            if d.is_dir() and d.name != "daemon":
                BuildCgroup(support.version, (d,), None, None, None).remove(timeout=2.0)
                count += 1
    return count


__all__ = ["BuildCgroup", "Support", "create", "detect", "release", "sweep"]
