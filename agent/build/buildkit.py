"""The BuildKit toolchain: one supervised buildkitd; ``buildctl build`` per build; ``crane copy``.

For the wiring code (``agent/build/__init__.py``):

- :func:`buildkit_binaries` (agent/build/_buildkitd.py) returns the three programs
  (``AGENT_BUILDKITD``, ``AGENT_BUILDCTL``, ``AGENT_CRANE``, else ``PATH``) or None when one is
  missing: ``toolchain = "auto"`` picks BuildKit exactly when it is not None.
- ``BuildkitToolchain(state_dir=..., runtime_dir=..., registry=..., sandbox=..., proxy=...)``
  (``binaries`` defaults to :func:`buildkit_binaries`, StartupError when one is missing; ``cleanup``
  to the sandbox's ``cleanup_buildkitd``); ``await tc.start()`` writes
  ``buildkitd.toml``, cleans up after a buildkitd a crashed daemon left behind, starts buildkitd and
  returns once ``buildctl debug workers`` answers (StartupError when it cannot: the daemon must not
  report READY without its builder). ``await tc.close()`` stops it.

Files: ``<runtime_dir>/buildkit/`` holds ``buildkitd.toml``, ``buildkitd.sock``, ``buildkitd.pid``
and ``home/`` (the children's empty HOME and DOCKER_CONFIG); BuildKit's own state lives in
``<state_dir>/buildkit``. buildkitd runs through ``sandbox.wrap(..., pid_namespace=True)``: its own
PID and mount namespace, so that when it dies every RUN process and overlay mount goes with it
(BuildKit v0.11.6 killed with SIGKILL leaves both behind, see ``fixtures/toolchain/README.md``).

What buildkitd.toml says, and why its mirrors carry no path: agent/build/_buildkitd.py.

The context travels as the caller's directory fd: buildctl gets ``--local context=/dev/fd/N``
(and the same for ``dockerfile``, with ``--opt filename=``). Not verified here against the real
buildctl (it cannot be installed on this machine): if its file walker resolves the fd's magic link
to a path, a directory that is not reachable from the daemon's mount namespace would not be found;
the real-binary tests (``pytest -m buildkit``) cover it wherever BuildKit is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from agent.build import child as children
from agent.build._buildkit_progress import Transcript, build_error, copied_digest, copy_error
from agent.build._buildkitd import (
    BuildkitBinaries,
    buildkit_binaries,
    fatal_messages,
    parse_workers,
    render_config,
)
from agent.build._supervisor import Policy, State, Supervisor
from agent.build.buildargs import looks_secret
from agent.build.buildkit_store import BuildkitStore
from agent.build.failure import limit_failure
from agent.build.secretfds import secret_flags
from agent.build.storage import StorageReport
from agent.build.toolchain import BuildOutput, BuildSpec, LogSink
from agent.contracts import CgroupPort, ProxyLogin, RegistryPort, SandboxPort
from agent.errors import AgentError, BuildFailed, InternalError, StartupError
from agent.sandbox import cleanup_buildkitd

if TYPE_CHECKING:
    from agent.sandbox import BuildCgroup

log = logging.getLogger("agent.build")

# How long a build waits for a buildkitd that is (re)starting before it gives up.
_BUILD_WAIT_READY = 60.0


def _read_json(path: str) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Collect:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


Cleanup = Callable[[Path, Path], None]


class BuildkitToolchain:
    """The ``buildkit`` toolchain (:class:`agent.build.toolchain.Toolchain`)."""

    name = "buildkit"
    # RUN steps run in the node-wide ``steps_cgroup`` (not the build's): BuildKit hashes a step's
    # cgroup parent into its cache key, so it must be the same for every build.
    steps_in_build_cgroup = False

    def __init__(
        self,
        *,
        state_dir: str | Path,
        runtime_dir: str | Path,
        registry: CollectorRegistry,
        sandbox: SandboxPort,
        proxy: RegistryPort | None,
        log_tail_lines: int = 20,
        binaries: BuildkitBinaries | None = None,
        policy: Policy | None = None,
        cleanup: Cleanup | None = None,
        cache_repo: str | None = None,
        steps_cgroup: BuildCgroup | None = None,
        storage_max: int = 0,
    ) -> None:
        bins = binaries or buildkit_binaries()
        if bins is None:
            raise StartupError(
                "build.toolchain = buildkit needs buildkitd, buildctl and crane: install them on "
                "PATH or name them with AGENT_BUILDKITD, AGENT_BUILDCTL and AGENT_CRANE"
            )
        self.bins = bins
        self.sandbox = sandbox
        self.proxy = proxy
        self.cache_repo = cache_repo or None
        # One cgroup for the RUN steps of every BuildKit build on the node, limited to the
        # per-build limits times build.max_concurrent_builds (agent/build/__init__.py).
        self.steps_cgroup = steps_cgroup
        self.tail_lines = log_tail_lines
        self.run_dir = Path(runtime_dir) / "buildkit"
        self.root = Path(state_dir) / "buildkit"
        self.socket = self.run_dir / "buildkitd.sock"
        self.config_path = self.run_dir / "buildkitd.toml"
        self.pidfile = self.run_dir / "buildkitd.pid"
        self.home = self.run_dir / "home"
        # Each build's and copy's temp dir (its login, buildctl's metadata file): a per-build
        # staging root of the sandbox, so only that child sees it (agent/sandbox/_wrap.py).
        # A real path: the sandbox names a child's visible directories by their real paths.
        self.tmp_root = Path(os.path.realpath(Path(state_dir) / "buildkit-tmp"))
        self.addr = f"unix://{self.socket}"
        self.store = BuildkitStore(self.root, max_bytes=storage_max, prune=self._prune)
        self._cleanup: Cleanup = cleanup if cleanup is not None else cleanup_buildkitd
        self.supervisor = Supervisor(
            "buildkitd",
            launch=self._launch,
            probe=self._probe,
            registry=registry,
            policy=policy,
            after_exit=self._after_exit,
            scrub=self._scrub,  # buildkitd's own log names the proxy routes it pushes to
        )

    @property
    def state(self) -> str:
        return self.supervisor.state.value

    @property
    def storage(self) -> StorageReport:
        return self.store.report

    def after_build(self, *, failed: bool, disk_full: bool = False) -> None:
        self.store.after_build(failed=failed, disk_full=disk_full)

    async def _prune(self, keep_mb: int) -> int:
        argv = [self.bins.buildctl, "--addr", self.addr, "prune", "--keep-storage", str(keep_mb)]
        sink = _Collect()
        code = await children.run(
            "buildctl prune", argv, sandbox=self.sandbox, env=self._env(), sink=sink
        )
        if code != 0:
            log.warning("buildctl prune exited %d: %s", code, " | ".join(sink.lines[-3:]))
        return code

    def _env(self, docker_config: Path | None = None) -> dict[str, str]:
        env = children.child_env(self.home)
        if docker_config is not None:  # buildctl hands it to buildkitd, crane reads it
            env["DOCKER_CONFIG"] = str(docker_config.parent)
        return env

    def _scrub(self, text: str) -> str:
        return self.proxy.scrub(text) if self.proxy is not None else text

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._cleanup is not None:  # blocking, bounded: kills and unmounts what is left
            await asyncio.to_thread(self._cleanup, self.pidfile, self.root)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self._write_config()
        self.supervisor.start()
        state = await self.supervisor.wait_ready(self.supervisor.policy.ready_timeout * 2)
        if state is not State.RUNNING:
            await self.supervisor.stop()
            raise StartupError(self._not_running(state))
        await self.store.start()

    def _write_config(self) -> None:
        address = self.proxy.child_address if self.proxy is not None else ""
        mirrors = self.proxy.mirrors() if self.proxy is not None else []
        text = render_config(
            root=self.root,
            socket=self.socket,
            proxy_address=address,
            mirrors=mirrors,
            cgroup_parent=self.steps_cgroup.parent if self.steps_cgroup is not None else "",
            keep_bytes=self.store.keep_bytes(),
        )
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    async def reload(self) -> None:
        """Rewrite buildkitd.toml (the proxy's mirrors may have changed) and start a FATAL
        buildkitd again, once its cause is fixed. A running buildkitd keeps its configuration
        until it next restarts: restarting it now would kill the builds it runs."""
        self._write_config()
        if self.supervisor.state is State.FATAL:
            log.info("buildkitd: starting again after FATAL (reload)")
            self.supervisor.start()

    async def close(self) -> None:
        try:
            await self.store.wait()  # a second signal cancels this wait, not the stop below
        finally:
            await self.supervisor.stop()
            await self._after_exit()

    def _not_running(self, state: State) -> str:
        out = fatal_messages([ln for ln in self.supervisor.output if ln.strip()])[-5:]
        last = " | ".join(out) if out else "no output"  # scrubbed as the supervisor read it
        return (
            f"buildkitd is {state.value}: it {self.supervisor.last_exit or 'did not start'} "
            f"({self.supervisor.quick_failures} failed starts in a row; last output: {last}); "
            f"fix the cause, then reload or restart the daemon"
        )

    async def _launch(self) -> children.Child:
        # buildkitd creates its --root itself (and fails loudly when it cannot).
        argv = [
            self.bins.buildkitd,
            "--config",
            str(self.config_path),
            "--root",
            str(self.root),
            "--addr",
            self.addr,
            # The sandbox's network namespace is the isolation; BuildKit's CNI is not needed.
            "--oci-worker-net",
            "host",
        ]
        child = await children.spawn(
            "buildkitd", argv, sandbox=self.sandbox, env=self._env(), pid_namespace=True
        )
        self.pidfile.write_text(f"{child.pid}\n")
        return child

    async def _after_exit(self) -> None:
        # runc starts each RUN step in a session of its own: without a PID namespace (sandbox
        # off) a SIGKILLed buildkitd leaves them running, and its overlay mounts mounted.
        if self._cleanup is not None:  # blocking, bounded
            await asyncio.to_thread(self._cleanup, self.pidfile, self.root)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    async def _probe(self, child: children.Child) -> bool:
        if not self.socket.exists():
            return False
        sink = _Collect()
        argv = [
            self.bins.buildctl,
            "--addr",
            self.addr,
            "debug",
            "workers",
            "--format",
            "{{json .}}",
        ]
        try:
            code = await children.run(
                "buildctl-probe", argv, sandbox=self.sandbox, env=self._env(), sink=sink
            )
        except AgentError:
            return False
        if code != 0:
            log.debug("buildkitd probe: %s", " | ".join(sink.lines[-3:]))
            return False
        workers = parse_workers("\n".join(sink.lines))
        if workers:
            log.info("buildkitd (pid %d) ready: worker %s", child.pid, workers[0].get("id"))
        return bool(workers)

    async def _ready(self) -> None:
        sup = self.supervisor
        if sup.state is State.RUNNING:
            return
        if sup.state is State.STOPPED:
            raise InternalError("the BuildKit toolchain is not started")
        state = await sup.wait_ready(_BUILD_WAIT_READY)
        if state is not State.RUNNING:
            raise InternalError(self._not_running(state))

    # --- builds -----------------------------------------------------------------------------

    def build_argv(self, spec: BuildSpec, metadata_file: str) -> list[str]:
        ctx = f"/dev/fd/{spec.context_fd}"
        argv = [
            self.bins.buildctl,
            "--addr",
            self.addr,
            "build",
            "--frontend",
            "dockerfile.v0",
            "--local",
            f"context={ctx}",
            "--local",
            f"dockerfile={ctx}",
            "--opt",
            f"filename={spec.dockerfile}",
        ]
        if spec.target:
            argv += ["--opt", f"target={spec.target}"]
        if spec.platform:
            argv += ["--opt", f"platform={spec.platform}"]
        # buildctl has no environment or file form for these (docs/builds.md#build-args): the
        # values stay on its argv, and build() warns about secret-looking names.
        for key, value in sorted(spec.build_args.items()):
            argv += ["--opt", f"build-arg:{key}={value}"]
        argv += secret_flags(spec.secrets)
        if spec.no_cache:
            argv.append("--no-cache")
        # No "--opt cgroup-parent=<the build's cgroup>": BuildKit hashes ExecOp.Meta.CgroupParent
        # into every RUN step's cache key (solver/llbsolver/ops/exec.go CacheMap), so a per-build
        # parent would make every step a miss, locally and in the fleet's registry cache. RUN
        # steps therefore run in buildkitd's own cgroups; buildctl and crane are in the build's.
        if spec.cache_ref:
            # Through the build's own route, like the push: its login is the only way to write
            # the cache, so a RUN step (which has none) cannot poison it for the fleet.
            argv += [
                "--export-cache",
                f"type=registry,ref={spec.cache_ref},mode=max",
                "--import-cache",
                f"type=registry,ref={spec.cache_ref}",
            ]
        argv += [
            "--output",
            f"type=image,name={spec.push_ref},push=true",
            "--progress=plain",
            "--metadata-file",
            metadata_file,
        ]
        return argv

    async def build(self, spec: BuildSpec, log_sink: LogSink) -> BuildOutput:
        await self._ready()
        exposed = sorted(k for k in spec.build_args if looks_secret(k))
        if exposed:
            log_sink.line(
                "[build-agent] warning: with BuildKit, build-arg values are on buildctl's "
                f"command line, which local users can read while the build runs "
                f"({', '.join(exposed)}); pass secret values with --secret"
            )
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryDirectory(prefix="build-", dir=self.tmp_root) as tmp:
            metadata = os.path.join(tmp, "metadata.json")
            transcript = Transcript(log_sink)
            code = await children.run(
                "buildctl",
                self.build_argv(spec, metadata),
                sandbox=self.sandbox,
                env=self._env(children.write_login(Path(tmp), spec.login)),
                sink=transcript,
                pass_fds=(spec.context_fd, *(fd for _, fd in spec.secrets)),
                cgroup=spec.cgroup,
                visible=(tmp,),
            )
            if code != 0:
                err = build_error(
                    list(transcript.lines),
                    code,
                    tail_lines=self.tail_lines,
                    scrub=self._scrub,
                    exit_words=children.describe_exit(code),
                )
                raise self._steps_limited(err, list(transcript.lines))
            try:
                data = _read_json(metadata)
            except (OSError, ValueError) as exc:
                raise BuildFailed(
                    "buildctl reported success but wrote no readable metadata file "
                    f"({exc}); the pushed image's digest is unknown"
                ) from exc
        digest = data.get("containerimage.digest") if isinstance(data, dict) else None
        return BuildOutput(digest=digest if isinstance(digest, str) else None)

    def _steps_limited(self, err: AgentError, lines: list[str]) -> AgentError:
        """``err``, or one naming the node-wide limit of BuildKit's RUN steps when the step's
        output says it ran into it (their cgroup is shared: its counters are not this build's)."""
        hit = self.steps_cgroup.limit_hit(lines) if self.steps_cgroup is not None else None
        if hit is None:
            return err
        return limit_failure(
            err,
            hit,
            "the RUN steps of all BuildKit builds on this node share that limit "
            "(build.*_max x build.max_concurrent_builds)",
        )

    async def copy(
        self,
        src: str,
        dst: str,
        log_sink: LogSink,
        login: ProxyLogin | None = None,
        cgroup: CgroupPort | None = None,
    ) -> str | None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        transcript = Transcript(log_sink)
        # The proxy speaks plain HTTP to children: --insecure lets crane use it.
        argv = [self.bins.crane, "copy", src, dst, "--insecure"]
        self.tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryDirectory(prefix="copy-", dir=self.tmp_root) as tmp:
            env = self._env(children.write_login(Path(tmp), login))
            code = await children.run(
                "crane",
                argv,
                sandbox=self.sandbox,
                env=env,
                sink=transcript,
                cgroup=cgroup,
                visible=(tmp,),
            )
        lines = list(transcript.lines)
        if code != 0:
            raise copy_error(
                lines,
                code,
                src,
                dst,
                tail_lines=self.tail_lines,
                scrub=self._scrub,
                exit_words=children.describe_exit(code),
            )
        return copied_digest(lines)


# BuildkitBinaries and buildkit_binaries stay importable here: the wiring code and the
# constructor's ``binaries`` name them with the toolchain.
__all__ = ["BuildkitBinaries", "BuildkitToolchain", "buildkit_binaries"]
