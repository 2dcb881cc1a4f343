"""The build ops of the control protocol (docs/protocol.md): build, status, list, logs, cancel.

``build`` takes the context directory as the request's first file descriptor (SCM_RIGHTS). Its
stream: one ``build`` event ``{id, joined, state}`` as soon as the build is known, ``state``
events ``{id, state, phase}`` on every change, ``log`` events ``{offset, data}`` with the log as it
grows (text, whole lines); then the result, or the build's error. Its arguments are checked by
:mod:`agent.build.request` first.

Every build belongs to the uids that submitted or joined it; ``status``, ``logs``, ``list`` and
``cancel`` apply :mod:`agent.build.ownership` on top of the op-level access check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from agent import reference
from agent.build import ownership
from agent.build import records as rec
from agent.build.buildlog import follow_file, read_file
from agent.build.context import Caller, ContextDigest, hash_context
from agent.build.failure import error_of
from agent.build.flow import Plan
from agent.build.keyed import Keyed, key_build, make_lookup, node_secret
from agent.build.manager import Build, BuildManager
from agent.build.records import BuildRecord, new_id
from agent.build.request import BuildRequest, parse_repo, parse_request
from agent.control.ops import Access, Args, Registry, RequestContext
from agent.errors import BadRequest, Busy, Cancelled, InternalError

_LOG_CHUNK = 512 * 1024


def _manager(ctx: RequestContext) -> BuildManager:
    m = ctx.app.builds
    if not isinstance(m, BuildManager):
        raise InternalError("builds are not available: the build manager did not start")
    return m


async def build(ctx: RequestContext, args: Args) -> Any:
    context_fd = ctx.fds.pop(0) if ctx.fds else None
    try:
        manager = _manager(ctx)
        if ctx.app.draining:
            raise Busy("the daemon is draining and takes no new builds; try another node")
        build, joined, detach = await _submit(ctx, args, manager, context_fd)
        context_fd = None  # the manager owns it now
    finally:
        if context_fd is not None:
            with contextlib.suppress(OSError):
                os.close(context_fd)
    if detach:
        return {"id": build.id, "state": build.state, "joined": joined}
    manager.attach(build)
    try:
        return await _follow_build(ctx, build, joined)
    finally:
        if not build.done.is_set():
            manager.detach(build)


async def _submit(
    ctx: RequestContext, args: Args, manager: BuildManager, context_fd: int | None
) -> tuple[Build, bool, bool]:
    """Parse the request, plan the build, record it and hand it to the manager."""
    req = parse_request(args, ctx.app.config.build.timeout, with_context=context_fd is not None)
    record = _new_record(ctx, req, manager)
    if context_fd is not None:
        plan = await _plan_dockerfile(ctx, req, manager, context_fd, record)
    else:
        plan = _plan_ref_only(req)
    plan.limits = manager.limits.narrowed(req.limits)
    record.limits = plan.limits.to_dict()
    record.base_ref = str(plan.base_ref)
    if req.target_ref is not None:
        record.target_ref = str(req.target_ref)
        key = f"target {req.target_ref}"
    else:
        key = f"repo {req.target_repo} from {plan.base_ref}"
    build, joined = manager.submit(
        key=key, plan=plan, timeout=req.timeout, record=record, detach=req.detach
    )
    if not joined and plan.keyed is not None:
        manager.store.save_entries(build.id, plan.keyed.entries)
    return build, joined, req.detach


def _new_record(ctx: RequestContext, req: BuildRequest, manager: BuildManager) -> BuildRecord:
    """The record of who asked for what; values that may be secret are not in it."""
    return BuildRecord(
        id=new_id(),
        labels=req.labels,
        peer={"uid": ctx.peer.uid, "gid": ctx.peer.gid, "pid": ctx.peer.pid},
        owners=[ctx.peer.uid],  # joiners are added (agent.build.ownership)
        toolchain=getattr(manager.toolchain, "name", ""),
        request={
            "dockerfile": req.dockerfile,
            "base_ref": req.base_text,
            "target_ref": req.target_ref_text,
            "target_repo": req.target_repo_text,
            "build_arg_names": sorted(req.build_args),  # values may be secret: names only
            "secret_ids": sorted(req.secrets),  # never the values
            "target": req.stage,
            "platform": req.platform,
            "force": req.force,
            "timeout": req.timeout,
            "context_name": req.context_name,
        },
    )


async def _plan_dockerfile(
    ctx: RequestContext,
    req: BuildRequest,
    manager: BuildManager,
    context_fd: int,
    record: BuildRecord,
) -> Plan:
    """Hash the context and key the build; the record gets the context summary and the key's
    inputs (``record`` is also what the key is compared with: keyinputs.previous)."""
    cfg = ctx.app.config.build
    base_repo_text = req.base_repo_text or cfg.base_repo
    if base_repo_text:
        base_repo = parse_repo(base_repo_text, "base_repo")
    else:
        base_repo = req.target_repo or (req.target_ref.repo if req.target_ref else "")
    caller = Caller(ctx.peer.uid, ctx.peer.gid, ctx.peer.groups)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    digest = await asyncio.to_thread(
        hash_context,
        context_fd,
        req.dockerfile or "Dockerfile",
        build_args=req.build_args,
        stage=req.stage,
        platform=req.platform,
        secret_ids=sorted(req.secrets),
        caller=caller,
        cache=manager.hash_cache,
    )
    hashed = loop.time() - t0
    manager.metrics.phase.labels("context").observe(hashed)
    keyed = await _key(ctx, req, manager, digest, record)
    record.context = {
        "key": keyed.key,
        "context_key": digest.key,
        "files": digest.files,
        "bytes": digest.bytes,
        "excluded": digest.excluded,
        "seconds": round(hashed, 4),
        "resolve_seconds": round(loop.time() - t0 - hashed, 4),  # the external images
    }
    record.inputs = keyed.inputs
    return Plan(
        target_ref=req.target_ref,
        target_repo=req.target_repo,
        base_ref=reference.Reference(base_repo, keyed.key),
        dockerfile=digest.dockerfile,
        context_fd=context_fd,
        build_args=req.build_args,
        stage=req.stage,
        platform=req.platform,
        force=req.force,
        dockerfile_text=digest.dockerfile_text,
        secrets=req.secrets,
        caller=caller,
        context_key=digest.key,
        keyed=keyed,
    )


async def _key(
    ctx: RequestContext,
    req: BuildRequest,
    manager: BuildManager,
    digest: ContextDigest,
    record: BuildRecord,
) -> Keyed:
    """The content key: the context's, the Dockerfile's external images resolved."""
    return await key_build(
        digest,
        lookup=make_lookup(ctx.app.resolver, manager.proxy),
        max_age=ctx.app.config.build.from_max_age,
        build_args=req.build_args,
        stage=req.stage,
        platform=req.platform,
        secret_ids=sorted(req.secrets),
        force=req.force,
        arg_secret=node_secret(ctx.app.config.daemon.state_dir),
        records=manager.store.all(),
        record=record,
    )


def _plan_ref_only(req: BuildRequest) -> Plan:
    assert req.base_text  # parse_request checked the kind
    return Plan(
        target_ref=req.target_ref,
        target_repo=req.target_repo,
        base_ref=reference.parse(req.base_text, what="base_ref"),
        dockerfile=None,
        context_fd=None,
        force=req.force,
    )


async def _follow_build(ctx: RequestContext, build: Build, joined: bool) -> Any:
    await ctx.emit("build", {"id": build.id, "joined": joined, "state": build.state})

    async def logs() -> None:
        async for offset, chunk in build.log.follow(0):
            await ctx.emit("log", {"offset": offset, "data": chunk.decode("utf-8", "replace")})

    async def states() -> None:
        last = None
        while True:
            changed = build.changed()
            now = build.progress()
            if now != last:
                await ctx.emit("state", now)
                last = now
            if build.done.is_set():
                return
            await changed.wait()

    tasks = [asyncio.create_task(logs()), asyncio.create_task(states())]
    done_wait = asyncio.create_task(build.done.wait())
    waits: list[asyncio.Future[Any]] = [done_wait]
    gone = None
    if ctx.disconnected is not None:
        gone = asyncio.create_task(ctx.disconnected.wait())
        waits.append(gone)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if not build.done.is_set():
            raise Cancelled("the client went away", details={"id": build.id})
        await asyncio.gather(*tasks)
    finally:
        for t in [*tasks, *waits]:
            t.cancel()
    err = error_of(build.record)
    if err is not None:
        raise err
    return build.record.result()


def _record(manager: BuildManager, build_id: str) -> BuildRecord:
    """The live record (it has the joiners) or the stored one; NotFound when unknown."""
    live = manager.live(build_id)
    return live.record if live is not None else manager.store.get(build_id)


async def status(ctx: RequestContext, args: Args) -> Any:
    args.only("id")
    build_id = args.string("id", required=True)
    manager = _manager(ctx)
    record = _record(manager, build_id)
    ownership.check_read(ctx.app.config, record, ctx.peer, "status")
    out = record.result()
    live = manager.live(build_id)
    out["phase"] = live.phase if live else record.state
    stored = record.to_json()
    for k in _STATUS_KEYS:
        if k in stored:
            out[k] = stored[k]
    return out


# What ``status`` adds to the result, when the record has it (docs/protocol.md section 7.2).
_STATUS_KEYS = (
    "created",
    "started",
    "finished",
    "labels",
    "transitions",
    "request",
    "context",
    "inputs",
    "base_miss",
)


def _summary(record: BuildRecord, ctx: RequestContext) -> dict[str, Any]:
    mine = ownership.is_owner(record, ctx.peer)
    times = {"created": record.created, "finished": record.finished}
    if not (mine or ownership.reads_every_build(ctx.app.config, ctx.peer)):
        # Someone else's build: that it exists, its state and times; not what or for whom.
        return {"id": record.id, "state": record.state, **times, "mine": False}
    return {
        "id": record.id,
        "state": record.state,
        "mine": mine,
        "target_ref": record.target_ref or "",
        "digest": record.digest or "",
        **times,
        "labels": record.labels,
        "error": record.error["code"] if record.error else None,
    }


async def list_builds(ctx: RequestContext, args: Args) -> Any:
    args.only("limit", "state")
    limit = args.integer("limit", 50)
    state = args.string("state")
    if state is not None and state not in (*rec.FINAL, rec.QUEUED, rec.RUNNING):
        raise BadRequest(f"unknown state {state!r}", details={"field": "state"})
    records = _manager(ctx).store.all()
    if state:
        records = [r for r in records if r.state == state]
    records = records[::-1][: max(0, limit)]
    return {"builds": [_summary(r, ctx) for r in records]}


async def logs(ctx: RequestContext, args: Args) -> Any:
    args.only("id", "offset", "follow", "limit")
    build_id = args.string("id", required=True)
    offset = args.integer("offset", 0)
    if offset < 0:
        raise BadRequest("offset must be 0 or greater", details={"field": "offset"})
    limit = min(args.integer("limit", _LOG_CHUNK), _LOG_CHUNK)
    if limit < 0:  # os.pread refuses it: an internal error before
        raise BadRequest("limit must be 0 or greater", details={"field": "limit"})
    follow = args.flag("follow")
    manager = _manager(ctx)
    record = _record(manager, build_id)
    ownership.check_read(ctx.app.config, record, ctx.peer, "log")
    path = manager.store.log_path(build_id)
    live = manager.live(build_id)
    if not follow:
        data = live.log.read(offset, limit) if live else read_file(path, offset, limit)
        size = live.log.size if live else _size(path)
        nxt = offset + len(data)
        return {
            "id": build_id,
            "offset": offset,
            "next": nxt,
            "size": size,
            "data": data.decode("utf-8", "replace"),
            "state": record.state,
            "eof": record.done and nxt >= size,
        }
    position = [offset]

    async def pump() -> None:
        stream = live.log.follow(offset) if live else follow_file(path, offset)
        async for off, chunk in stream:
            await ctx.emit("log", {"offset": off, "data": chunk.decode("utf-8", "replace")})
            position[0] = off + len(chunk)

    task = asyncio.create_task(pump())
    waits: list[asyncio.Future[Any]] = [task]
    if ctx.disconnected is not None:
        waits.append(asyncio.create_task(ctx.disconnected.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        for t in waits:
            t.cancel()
    return {"id": build_id, "next": position[0], "state": manager.store.get(build_id).state}


def _size(path: os.PathLike[str] | str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


async def cancel(ctx: RequestContext, args: Args) -> Any:
    args.only("id")
    build_id = args.string("id", required=True)
    manager = _manager(ctx)
    ownership.check_cancel(_record(manager, build_id), ctx.peer)
    return manager.cancel(build_id, who=f"uid {ctx.peer.uid}")


def register(ops: Registry) -> None:
    ops.add("build", Access.BUILD, build)
    ops.add("status", Access.READ, status)
    ops.add("list", Access.READ, list_builds)
    ops.add("logs", Access.READ, logs)
    ops.add("cancel", Access.BUILD, cancel)
