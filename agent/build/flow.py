"""What one build does once it has a slot (DESIGN section 2): base image, workspace image, check.

    Dockerfile build                         ref-only build (no Dockerfile)
    ────────────────                         ──────────────────────────────
    base_ref = base_repo:<content key>       base digest = resolve(base_ref)
    exists upstream and not force?  ─ yes ─▶ base cache hit
    else: route(base: push pinned to <key>)
          toolchain.build -> push to route.base:<key>
          the push's digest (HEAD base_ref only when the tool did not report one)
                        │
    target = target_ref, or target_repo:sha256("<base repo>@<base digest>\\n<process version>\\n")
    exists and not force?  ─ yes ─▶ workspace cache hit
    else: route(base: read, target: push pinned to <tag>)
          copy route.base@digest -> route.target:tag
    the copy's digest, else HEAD target, else "the build did not produce the workspace image"

Every route is removed as soon as its phase ends. The proxy maps ``route.base``/``route.target``
onto the real repositories and holds the credentials; this module only sees upstream refs and the
route addresses children use.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from agent import PROCESS_VERSION
from agent.build._metrics import BuildMetrics
from agent.build.context import ROOT, Caller, hash_context
from agent.build.keyed import Keyed, write_pinned
from agent.build.secretfds import secret_fds
from agent.build.toolchain import BuildOutput, BuildSpec, LogSink, Toolchain
from agent.contracts import CgroupPort, RegistryPort, RouteTarget
from agent.errors import AgentError, BuildFailed, NotFound, UpstreamError
from agent.limits import Limits
from agent.reference import Reference

log = logging.getLogger("agent.build")

_T = TypeVar("_T")


def workspace_tag(base_repo: str, base_digest: str) -> str:
    """``sha256("<base digest ref>\\n<process version>\\n")``: equal inputs give the same tag on
    every node, so a build done anywhere is a cache hit everywhere."""
    text = f"{base_repo}@{base_digest}\n{PROCESS_VERSION}\n"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Plan:
    """A build's inputs after validation (what the manager hands the flow)."""

    target_ref: Reference | None
    target_repo: str | None
    base_ref: Reference  # Dockerfile builds: base_repo:<key>; ref-only: the given base
    dockerfile: str | None  # None for a ref-only build
    context_fd: int | None
    build_args: dict[str, str] = field(default_factory=dict)
    stage: str | None = None
    platform: str | None = None
    force: bool = False
    dockerfile_text: str = ""
    # id -> value; repr=False keeps values out of any repr. The manager empties it when the
    # build ends; a request that joins a running build does not change it.
    secrets: dict[str, bytes] = field(default_factory=dict, repr=False)
    caller: Caller = ROOT  # whose read permission the context walk checks
    limits: Limits = field(default_factory=Limits)  # the node's, lowered by the request
    # Dockerfile builds: the context part of the key (the staged copy must hash to it) and the
    # key's images, pins and unknowns (agent/build/keyed.py)
    context_key: str = ""
    keyed: Keyed | None = None


@dataclass
class Outcome:
    target_ref: str = ""
    digest: str = ""
    base_ref: str = ""
    base_digest: str = ""
    cache: dict[str, bool | None] = field(default_factory=lambda: {"base": None, "workspace": None})
    timings: dict[str, float] = field(default_factory=dict)
    base_miss: list[str] = field(default_factory=list)  # why the base was rebuilt

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_ref": self.target_ref,
            "digest": self.digest,
            "base_ref": self.base_ref,
            "base_digest": self.base_digest,
            "cache": dict(self.cache),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            **({"base_miss": list(self.base_miss)} if self.base_miss else {}),
        }


def _cache_target(cache_repo: str | None, target_repo: str, plan: Plan) -> RouteTarget | None:
    """Where this build's registry cache lives: ``cache_repo``, one tag per workspace image
    repository, Dockerfile path and stage. Every node building that workspace shares it, and a
    build of another workspace does not overwrite it (BuildKit keeps one cache per ref)."""
    if not cache_repo:
        return None
    scope = f"{target_repo}\n{plan.dockerfile or ''}\n{plan.stage or ''}\n"
    tag = "cache-" + hashlib.sha256(scope.encode()).hexdigest()[:32]
    return RouteTarget(cache_repo, tag=tag, push=True)


class Flow:
    """Runs one :class:`Plan`; ``phase`` is called on every phase change (for progress)."""

    def __init__(
        self,
        proxy: RegistryPort,
        toolchain: Toolchain,
        metrics: BuildMetrics,
        *,
        sink: LogSink,
        phase: Callable[[str], None],
        staging: str,
        cgroup: CgroupPort | None = None,
    ) -> None:
        self._proxy = proxy
        self._tc = toolchain
        self._metrics = metrics
        self._sink = sink
        self._phase = phase
        self._staging = staging  # where the context is copied for the builder
        self._cgroup = cgroup  # the build's limits; every child joins it
        self.outcome = Outcome()

    def _say(self, text: str) -> None:
        self._sink.line(f"[build-agent] {text}")

    async def _timed(self, phase: str, aw: Awaitable[_T]) -> _T:
        self._phase(phase)
        t0 = time.monotonic()
        try:
            return await aw
        finally:
            took = time.monotonic() - t0
            self.outcome.timings[phase] = self.outcome.timings.get(phase, 0.0) + took
            self._metrics.phase.labels(phase).observe(took)

    async def run(self, plan: Plan) -> Outcome:
        out = self.outcome
        out.base_ref = str(plan.base_ref)
        if plan.dockerfile is not None:
            base_digest = await self._base(plan)
        else:
            base_digest = await self._resolve_base(plan)
        out.base_digest = base_digest
        base_repo = plan.base_ref.repo
        if plan.target_ref is not None:
            # ops refused a target pinned by digest before the build was queued.
            assert plan.target_ref.digest is None
            target = plan.target_ref
            if not target.tag:
                target = Reference(target.repo, "latest")
        else:
            assert plan.target_repo is not None
            target = Reference(plan.target_repo, workspace_tag(base_repo, base_digest))
        out.target_ref = str(target)
        existing = None
        if not plan.force:
            existing = await self._timed(
                "workspace_check", self._proxy.manifest_digest(str(target))
            )
        if existing:
            out.cache["workspace"] = True
            self._metrics.cache_hits.labels("workspace").inc()
            self._say(f"workspace image {target} exists ({existing}): cache hit")
            out.digest = existing
            return out
        out.cache["workspace"] = False
        # As for the base: the copy's own digest is the registry's answer; ask only when the tool
        # did not say.
        copied = await self._timed("copy", self._copy(base_repo, base_digest, target))
        digest = copied or await self._timed("verify", self._proxy.manifest_digest(str(target)))
        if not digest:
            raise BuildFailed(
                f"the build did not produce the workspace image: {target} is not in the "
                "registry after the copy reported success",
                details={"target_ref": str(target)},
            )
        out.digest = digest
        self._say(f"pushed {target}@{digest}")
        return out

    async def _resolve_base(self, plan: Plan) -> str:
        ref = plan.base_ref
        if ref.digest:
            digest: str | None = ref.digest
            found = await self._timed("base_check", self._proxy.manifest_digest(str(ref)))
            if not found:
                digest = None
        else:
            digest = await self._timed("base_check", self._proxy.manifest_digest(str(ref)))
        if not digest:
            raise NotFound(
                f"base image {ref} does not exist in {ref.registry}; check --base",
                details={"base_ref": str(ref)},
            )
        self._say(f"base image {ref} is {digest}")
        return digest

    async def _base(self, plan: Plan) -> str:
        ref = plan.base_ref
        out = self.outcome
        keyed = plan.keyed
        if keyed is not None:
            for pin in keyed.pins:
                how = {"digest": "pinned in the Dockerfile", "cache": f"cached {pin.age:g}s"}
                self._say(
                    f"line {pin.line}: {pin.ref} is {pin.digest} "
                    f"({how.get(pin.source, 'asked the registry')})"
                )
            for why in keyed.unknown:
                self._say(f"content key unknown: {why}")
            if keyed.unknown:
                self._say("the key cannot be trusted: rebuilding the base instead of risking a "
                          "stale cache hit")
        if not plan.force and not (keyed is not None and keyed.unknown):
            found = await self._timed("base_check", self._proxy.manifest_digest(str(ref)))
            if found:
                out.cache["base"] = True
                self._metrics.cache_hits.labels("base").inc()
                self._metrics.base_cache.labels("hit", "unchanged").inc()
                self._say(f"base image {ref} exists ({found}): cache hit, not rebuilt")
                return found
        out.cache["base"] = False
        out.base_miss = list(keyed.miss_reasons) if keyed is not None else ["other"]
        for reason in out.base_miss:
            self._metrics.base_cache.labels("miss", reason).inc()
        self._say(f"base cache miss ({', '.join(out.base_miss)}): 'agentctl explain' says more")
        assert plan.context_fd is not None and plan.dockerfile is not None
        # The thread reads its own duplicate: the manager closes the plan's fd when the build
        # ends, and a cancelled build's thread may still be copying then.
        src = os.dup(plan.context_fd)
        copying = asyncio.ensure_future(asyncio.to_thread(self._stage, plan, src))
        try:
            staged_fd, staged_path = await self._timed("context_copy", asyncio.shield(copying))
        except asyncio.CancelledError:
            # The thread copies on: its copy is dropped when it is done.
            copying.add_done_callback(_drop_staged)
            raise
        try:
            digest = await self._build_base(plan, staged_fd)
        finally:
            os.close(staged_fd)
            await asyncio.to_thread(shutil.rmtree, staged_path, True)
        self._say(f"base image {ref} pushed ({digest})")
        return digest

    async def _build_base(self, plan: Plan, context_fd: int) -> str:
        ref = plan.base_ref
        assert plan.dockerfile is not None
        target_repo = plan.target_ref.repo if plan.target_ref else plan.target_repo or ""
        cache = _cache_target(self._tc.cache_repo, target_repo, plan)
        route = self._proxy.add_build_route(
            base=RouteTarget(ref.repo, tag=ref.tag, push=True),
            target=RouteTarget(target_repo),
            cache=cache,
        )
        try:
            assert route.base is not None
            spec = BuildSpec(
                context_fd=context_fd,
                dockerfile=plan.dockerfile,
                push_ref=f"{route.base}:{ref.tag}",
                build_args=dict(plan.build_args),
                target=plan.stage,
                platform=plan.platform,
                no_cache=plan.force,
                mirrors=tuple(self._proxy.mirrors()),
                proxy_address=self._proxy.child_address,
                login=route.login,
                cache_ref=f"{route.cache}:{cache.tag}" if cache and route.cache else None,
                cgroup=self._cgroup,
            )
            self._say(f"building the base image {ref} with {self._tc.name}")
            self._metrics.tool_runs.labels("build").inc()
            try:
                output = await self._timed("base_build", self._build(spec, plan.secrets))
            except AgentError as exc:
                _explain(exc, plan, ref.registry, self._proxy.child_address)
                raise
        finally:
            self._proxy.remove_build_route(route)
        # The push's own digest is the registry's answer; ask only when the tool did not say.
        digest = output.digest or await self._timed(
            "base_check", self._proxy.manifest_digest(str(ref))
        )
        if not digest:
            raise BuildFailed(
                f"the build did not produce the base image: {ref} is not in the registry "
                "after the push reported success",
                details={"base_ref": str(ref)},
            )
        return digest

    async def _build(self, spec: BuildSpec, secrets: dict[str, bytes]) -> BuildOutput:
        # The secrets exist as sealed memfds only for the length of the toolchain's build call.
        with secret_fds(secrets) as fds:
            return await self._tc.build(replace(spec, secrets=fds), self._sink)

    def _stage(self, plan: Plan, src: int) -> tuple[int, str]:
        """Copy the context at ``src`` (closed here) for the builder
        (``hash_context(stage_into=...)`` says why); the copy's key must be the one the base is
        tagged with. Returns (open fd, path) of the copy."""
        try:
            return self._stage_from(plan, src)
        finally:
            os.close(src)

    def _stage_from(self, plan: Plan, src: int) -> tuple[int, str]:
        assert plan.dockerfile is not None
        os.makedirs(self._staging, mode=0o700, exist_ok=True)
        path = tempfile.mkdtemp(prefix="ctx-", dir=self._staging)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            got = hash_context(
                src,
                plan.dockerfile,
                stage_into=fd,
                build_args=plan.build_args,
                stage=plan.stage,
                platform=plan.platform,
                secret_ids=sorted(plan.secrets),
                caller=plan.caller,
            )
            wanted = plan.context_key or plan.base_ref.tag
            if got.key != wanted:
                raise BuildFailed(
                    "the context changed after the build was requested (its context key is "
                    f"now {got.key}, the request's was {wanted}); an image built "
                    "now would not match its tag: run the build again",
                    details={"base_ref": str(plan.base_ref)},
                )
            if plan.keyed is not None and plan.keyed.pinned_text is not None:
                # The builder pulls exactly the digests that were keyed (agent/build/cachekey.py)
                write_pinned(fd, got.dockerfile, plan.keyed.pinned_text)
        except BaseException:
            os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._say(f"context copied for the builder: {got.files} files, {got.bytes} bytes")
        return fd, path

    async def _copy(self, base_repo: str, base_digest: str, target: Reference) -> str | None:
        route = self._proxy.add_build_route(
            base=RouteTarget(base_repo),
            target=RouteTarget(target.repo, tag=target.tag, push=True),
        )
        try:
            assert route.base is not None
            self._say(f"copying {base_repo}@{base_digest} to {target}")
            self._metrics.tool_runs.labels("copy").inc()
            try:
                return await self._tc.copy(
                    f"{route.base}@{base_digest}",
                    f"{route.target}:{target.tag}",
                    self._sink,
                    route.login,
                    self._cgroup,
                )
            except AgentError as exc:
                _explain(exc, None, target.registry, self._proxy.child_address)
                raise
        finally:
            self._proxy.remove_build_route(route)


def _drop_staged(copying: asyncio.Future[tuple[int, str]]) -> None:
    """Close and remove a context copy whose build was cancelled while it was being made."""
    if copying.cancelled() or copying.exception() is not None:
        return
    fd, path = copying.result()
    os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


def _explain(exc: AgentError, plan: Plan | None, registry: str, proxy_address: str) -> None:
    """Name the Dockerfile line of a failed step, and the real registry behind the proxy."""
    step = exc.details.get("step")
    wanted = " ".join(step.split()) if isinstance(step, str) else ""
    # BuildKit names the line itself (and quotes it in the message): only buildah's needs this.
    if wanted and "line" not in exc.details and plan is not None and plan.dockerfile_text:
        for lineno, line in enumerate(plan.dockerfile_text.splitlines(), 1):
            if " ".join(line.split()).startswith(wanted):
                exc.message = f"{plan.dockerfile} line {lineno}: {exc.message}"
                exc.args = (exc.message,)
                exc.details["line"] = lineno
                break
    if isinstance(exc, UpstreamError) and (
        not exc.registry or exc.registry == proxy_address or registry in exc.registry
    ):
        exc.registry = registry
        exc.details["registry"] = registry
        if "the registry" in exc.message:
            exc.message = exc.message.replace("the registry", f"the registry {registry}", 1)
        else:
            exc.message = f"{exc.message} (registry {registry})"
        exc.args = (exc.message,)


__all__ = ["Flow", "Outcome", "Plan", "workspace_tag"]
