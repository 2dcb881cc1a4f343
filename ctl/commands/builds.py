"""``agentctl build | status | ls | logs | cancel`` (DESIGN section 6).

``build`` opens the context directory itself and passes the open fd with the request (SCM_RIGHTS):
the daemon never opens a path on the caller's behalf. The log streams to stderr (a one-line
progress state on a terminal, plain lines elsewhere); the result goes to stdout:
``<target_ref>@<digest>``, or the whole result with ``--json``.

Without any build flag, ``build`` reads bob's environment, so an existing workspace task keeps
working: ``BOB_TARGET_REF`` is the target; with ``BOB_BUILD_BASE=true`` the Dockerfile
``BOB_DOCKERFILE_PATH`` in ``BOB_CONTEXT_DIR`` is built and its base goes to the repository of
``BOB_BASE_REF``; otherwise ``BOB_BASE_REF`` is copied as is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from typing import Any, TextIO

    from ctl.cli import Context, Subcommands
    from ctl.client import Call

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

_BUILD_FLAGS = (
    "context",
    "file",
    "base",
    "target",
    "target_repo",
    "base_repo",
    "build_arg",
    "label",
    "force",
    "timeout",
    "platform",
    "stage",
    "memory_max",
    "pids_max",
    "cpu_max",
)
_LIMIT_FLAGS = ("memory_max", "pids_max", "cpu_max")
# The daemon's limits (agent/build/secretfds.py), checked here so a mistake fails before any
# connection, with the flag in the message.
_SECRET_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
MAX_SECRETS = 32
MAX_SECRET_BYTES = 500 * 1024


def register(sub: Subcommands) -> None:
    # --timeout (a global option) is the build's timeout here: the daemon cancels the build
    # when it runs out, and agentctl waits as long as the build runs.
    p = sub.add_parser(
        "build",
        help="build and push a workspace image",
        description="Build and push a workspace image. --timeout SECONDS is the build timeout.",
    )
    p.add_argument("--context", metavar="DIR", help="build context directory (default .)")
    p.add_argument("--file", metavar="PATH", help="Dockerfile, relative to the context")
    p.add_argument("--base", metavar="REF", help="image to start from (no Dockerfile)")
    p.add_argument("--target", metavar="REF", help="where the workspace image goes")
    p.add_argument("--target-repo", metavar="REPO", help="target repository; tag computed")
    p.add_argument("--base-repo", metavar="REPO", help="where a built base image goes")
    p.add_argument("--build-arg", metavar="K=V", action="append", help="build argument")
    p.add_argument("--label", metavar="K=V", action="append", help="kept on the build record")
    p.add_argument("--platform", metavar="OS/ARCH", help="target platform")
    p.add_argument("--stage", metavar="NAME", help="Dockerfile stage to build")
    p.add_argument(
        "--secret",
        metavar="id=ID[,src=PATH|,env=VAR][,type=file|env]",
        action="append",
        help="a build secret for RUN --mount=type=secret,id=ID: read from file PATH, from "
        "environment variable VAR, or (bare id=ID) from the environment variable ID; repeatable",
    )
    p.add_argument(
        "--memory-max", metavar="SIZE", help="lower memory limit for this build (e.g. 2GiB)"
    )
    p.add_argument("--pids-max", metavar="N", type=int, help="lower process limit for this build")
    p.add_argument("--cpu-max", metavar="CPUS", type=float, help="lower CPU limit (e.g. 1.5)")
    p.add_argument("--force", action="store_true", default=None, help="rebuild even if cached")
    p.add_argument("--detach", action="store_true", help="print the build id and return")
    p.set_defaults(run=_build)

    p = sub.add_parser("status", help="show one build (exit 1 when it failed)")
    p.add_argument("id")
    p.set_defaults(run=_status)
    p = sub.add_parser("ls", help="list builds, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--state", help="only builds in this state")
    p.set_defaults(run=_ls)
    p = sub.add_parser("logs", help="print a build's log")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the build ends")
    p.add_argument("--offset", type=int, default=0, help="start at this byte")
    p.set_defaults(run=_logs)
    p = sub.add_parser("cancel", help="cancel a queued or running build")
    p.add_argument("id")
    p.set_defaults(run=_cancel)


class UsageError(Exception):
    pass


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _secret_spec(spec: str) -> tuple[str, str, str]:
    """``id=ID[,src=PATH|,env=VAR][,type=file|env]`` as (id, kind, where); the forms of
    ``docker build --secret`` / ``buildctl --secret`` (``source`` is ``src``)."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("id", "src", "source", "env", "type") or not value:
            # Only the key is quoted: whatever follows "=" might be a value typed by mistake.
            raise UsageError(
                f"--secret: {(key + '=') if sep else 'a field without ='} is not one of id=, "
                "src=, env=, type= with a value; write --secret id=NAME,src=FILE or "
                "--secret id=NAME,env=VAR"
            )
        key = "src" if key == "source" else key
        if key in fields:
            raise UsageError(f"--secret {spec!r}: {key}= given twice")
        fields[key] = value
    sid = fields.get("id", "")
    if not sid:
        raise UsageError(f"--secret {spec!r}: id= is required, e.g. --secret id=NAME,src=FILE")
    if len(sid) > 64 or not set(sid) <= _SECRET_ID_CHARS or sid[0] in ".-":
        raise UsageError(
            f"--secret id={sid!r}: an id is 1 to 64 of A-Z a-z 0-9 _ . - (not starting with . or -)"
        )
    typ = fields.get("type")
    if typ not in (None, "file", "env"):
        raise UsageError(f"--secret id={sid}: type={typ} is not file or env")
    if "src" in fields and "env" in fields:
        raise UsageError(f"--secret id={sid}: give src= or env=, not both")
    if "env" in fields:
        if typ == "file":
            raise UsageError(f"--secret id={sid}: type=file reads src=, not env=")
        return sid, "env", fields["env"]
    if "src" in fields:
        return sid, typ or "file", fields["src"]
    if typ == "file":
        raise UsageError(f"--secret id={sid}: type=file needs src=FILE")
    return sid, "env", sid


def read_secrets(specs: list[str] | None, env: dict[str, str]) -> dict[str, bytes]:
    """The values of the ``--secret`` flags, read here (the daemon never opens the caller's
    paths). Errors name the flag and the file or variable, never a value."""
    out: dict[str, bytes] = {}
    for spec in specs or []:
        sid, kind, where = _secret_spec(spec)
        if sid in out:
            raise UsageError(f"--secret id={sid} is given twice")
        if kind == "env":
            if where not in env:
                raise UsageError(
                    f"--secret id={sid}: environment variable {where} is not set "
                    f"(export it, or give src=FILE)"
                )
            value = os.fsencode(env[where])
        else:
            try:
                with open(where, "rb") as f:
                    value = f.read(MAX_SECRET_BYTES + 1)
            except OSError as exc:
                raise UsageError(
                    f"--secret id={sid}: cannot read {where}: {exc.strerror or exc}"
                ) from None
        if len(value) > MAX_SECRET_BYTES:
            raise UsageError(
                f"--secret id={sid}: the value is over the limit of {MAX_SECRET_BYTES} bytes "
                "(500 KiB, BuildKit's per-secret limit)"
            )
        out[sid] = value
    if len(out) > MAX_SECRETS:
        raise UsageError(f"{len(out)} --secret flags; at most {MAX_SECRETS} per build")
    return out


def _from_bob(env: dict[str, str]) -> argparse.Namespace | None:
    """bob's environment as build flags, or None when it is not set."""
    target = env.get("BOB_TARGET_REF")
    if not target:
        return None
    ns = argparse.Namespace(**{k: None for k in _BUILD_FLAGS})
    ns.target = target
    base = env.get("BOB_BASE_REF", "")
    if env.get("BOB_BUILD_BASE", "").lower() in ("1", "true", "yes"):
        ns.context = env.get("BOB_CONTEXT_DIR") or "."
        dockerfile = env.get("BOB_DOCKERFILE_PATH") or "Dockerfile"
        if os.path.isabs(dockerfile):
            dockerfile = os.path.relpath(dockerfile, os.path.abspath(ns.context))
        ns.file = dockerfile
        if base:
            name = base.split("@", 1)[0]
            if name.rfind(":") > name.rfind("/"):
                name = name[: name.rfind(":")]
            ns.base_repo = name
    else:
        if not base:
            raise UsageError("BOB_BASE_REF is required when BOB_BUILD_BASE is not true")
        ns.base = base
    return ns


def request_args(
    opts: argparse.Namespace, env: dict[str, str]
) -> tuple[dict[str, Any], str | None]:
    """The build request's args and the context directory to open (None for ref-only)."""
    # --secret is not a "build flag" here: with bob's environment it adds secrets to bob's build.
    secret_specs = getattr(opts, "secret", None)
    # Neither are --timeout and the limits: they apply to bob's build as well.
    keep = ("timeout", *_LIMIT_FLAGS)
    given = any(
        getattr(opts, k, None) not in (None, [], False) for k in _BUILD_FLAGS if k not in keep
    )
    if not given:
        bob = _from_bob(env)
        if bob is not None:
            for k in keep:
                setattr(bob, k, getattr(opts, k, None))
            opts = bob
    if not opts.target and not opts.target_repo:
        raise UsageError("give --target REF or --target-repo REPO (or set BOB_TARGET_REF)")
    if opts.target and opts.target_repo:
        raise UsageError("--target and --target-repo are exclusive")
    args: dict[str, Any] = {}
    context: str | None = None
    if opts.base:
        if opts.file or opts.context:
            raise UsageError("--base builds without a Dockerfile: drop --file/--context")
        args["base_ref"] = opts.base
    else:
        context = opts.context or "."
        args["dockerfile"] = opts.file or "Dockerfile"
        args["context_name"] = os.path.abspath(context)
    if opts.target:
        args["target_ref"] = opts.target
    if opts.target_repo:
        args["target_repo"] = opts.target_repo
    if opts.base_repo:
        args["base_repo"] = opts.base_repo
    build_args = _pairs(opts.build_arg, "--build-arg")
    if build_args:
        args["build_args"] = build_args
    secrets = read_secrets(secret_specs, env)
    if secrets:
        if opts.base:
            raise UsageError("--secret needs a Dockerfile build: --base runs no RUN steps")
        args["secrets"] = secrets
    labels = _pairs(opts.label, "--label")
    if labels:
        args["labels"] = labels
    if opts.platform:
        args["platform"] = opts.platform
    if opts.stage:
        args["target"] = opts.stage
    if opts.force:
        args["force"] = True
    # Limits are checked by the daemon: a request may only lower the node's (build.*_max).
    limits = {
        k: v
        for k, v in (
            ("memory_max", getattr(opts, "memory_max", None)),
            ("pids_max", getattr(opts, "pids_max", None)),
            ("cpu_max", getattr(opts, "cpu_max", None)),
        )
        if v is not None
    }
    if limits:
        args["limits"] = limits
    timeout = getattr(opts, "timeout", None)
    if timeout is not None:
        if timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        args["timeout"] = timeout
    return args, context


def _open_context(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


class _Progress:
    """Log lines to ``err``; on a terminal, one status line kept under them."""

    def __init__(self, err: TextIO, tty: bool) -> None:
        self.err = err
        self.tty = tty
        self.status = ""
        self.started = time.monotonic()

    def _clear(self) -> None:
        if self.tty and self.status:
            self.err.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.tty and self.status:
            took = time.monotonic() - self.started
            self.err.write(f"\x1b[1m{self.status}\x1b[0m ({took:.1f}s)")
        self.err.flush()

    def log(self, text: str) -> None:
        self._clear()
        self.err.write(text)
        self._draw()

    def state(self, data: dict[str, Any]) -> None:
        line = f"build {data.get('id')}: {data.get('state')}"
        if data.get("phase") and data.get("phase") != data.get("state"):
            line += f" ({data.get('phase')})"
        if self.tty:
            self._clear()
            self.status = line
            self._draw()
        else:
            self.err.write(f"agentctl: {line}\n")
            self.err.flush()

    def done(self) -> None:
        self._clear()
        self.status = ""
        self.err.flush()


def _build(opts: argparse.Namespace, ctx: Context) -> int:
    try:
        args, context = request_args(opts, dict(os.environ))
    except UsageError as exc:
        ctx.error(str(exc))
        return EXIT_USAGE
    fds: list[int] = []
    if context is not None:
        try:
            fds.append(_open_context(context))
        except OSError as exc:
            ctx.error(
                f"cannot open the context directory {context}: {exc.strerror} "
                "(the build context must be a directory you can read)"
            )
            return EXIT_FAILED
    if opts.detach:
        args["detach"] = True
    try:
        from ctl.client import Client

        with Client.connect(ctx.socket, timeout=None) as client:
            call = client.start("build", args, fds=fds)
            for fd in fds:
                os.close(fd)
            fds = []
            if opts.detach:
                result = call.result()
                ctx.emit(result, lambda r: str(r["id"]))
                return 0
            return _stream(call, ctx, opts)
    finally:
        for fd in fds:
            os.close(fd)


def _stream(call: Call, ctx: Context, opts: argparse.Namespace) -> int:
    progress = _Progress(ctx.err, ctx.err.isatty() and not ctx.json)
    build_id = "?"
    try:
        for event in call:
            data = event.data if isinstance(event.data, dict) else {}
            if event.name == "log":
                progress.log(str(data.get("data", "")))
            elif event.name == "state":
                progress.state(data)
            elif event.name == "build":
                build_id = str(data.get("id"))
                if data.get("joined"):
                    progress.log(f"agentctl: joined build {build_id} of the same target\n")
        progress.done()
        result = call.result()
    except KeyboardInterrupt:
        progress.done()
        # Closing the connection tells the daemon we left: it cancels the build unless another
        # caller is still waiting for it.
        call.client.close()
        ctx.error(f"interrupted; left build {build_id} (cancelled unless others wait for it)")
        return EXIT_INTERRUPTED
    ctx.emit(result, _format_result)
    cache = result.get("cache") or {}
    ctx.err.write(
        f"agentctl: build {result.get('id')} {result.get('state')} in "
        f"{(result.get('timings') or {}).get('total', 0):.3f}s "
        f"(base: {_cache_word(cache.get('base'))}, "
        f"workspace: {_cache_word(cache.get('workspace'))})\n"
    )
    return 0


def _cache_word(value: Any) -> str:
    return {True: "cache hit", False: "built", None: "n/a"}.get(value, str(value))


def _format_result(r: dict[str, Any]) -> str:
    return f"{r.get('target_ref')}@{r.get('digest')}"


def _status(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        r = client.call("status", {"id": opts.id})
    ctx.emit(r, _format_status)
    return 0 if r.get("state") in ("succeeded", "queued", "running") else EXIT_FAILED


def _format_status(r: dict[str, Any]) -> str:
    lines = [
        f"id        {r.get('id')}",
        f"state     {r.get('state')}" + (f" ({r['phase']})" if r.get("phase") else ""),
        f"target    {r.get('target_ref') or '-'}",
        f"digest    {r.get('digest') or '-'}",
        f"base      {r.get('base_ref') or '-'}",
    ]
    cache = r.get("cache") or {}
    lines.append(
        f"cache     base {_cache_word(cache.get('base'))}, "
        f"workspace {_cache_word(cache.get('workspace'))}"
    )
    timings = r.get("timings") or {}
    if timings:
        lines.append("timings   " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(timings.items())))
    err = r.get("error")
    if err:
        lines.append(f"error     {err.get('code')}: {err.get('message')}")
    return "\n".join(lines)


def _ls(opts: argparse.Namespace, ctx: Context) -> int:
    args: dict[str, Any] = {"limit": opts.limit}
    if opts.state:
        args["state"] = opts.state
    with ctx.connect() as client:
        r = client.call("list", args)
    ctx.emit(r, _format_ls)
    return 0


def _format_ls(r: dict[str, Any]) -> str:
    rows = r.get("builds") or []
    if not rows:
        return "no builds"
    out = [f"{'ID':<24} {'STATE':<12} {'CREATED':<20} TARGET"]
    for b in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.get("created") or 0))
        out.append(f"{b['id']:<24} {b['state']:<12} {created:<20} {b.get('target_ref') or '-'}")
    return "\n".join(out)


def _logs(opts: argparse.Namespace, ctx: Context) -> int:
    out = sys.stdout
    with ctx.connect(None) as client:
        if opts.follow:
            call = client.start("logs", {"id": opts.id, "offset": opts.offset, "follow": True})
            try:
                for event in call:
                    if event.name == "log" and isinstance(event.data, dict):
                        out.write(str(event.data.get("data", "")))
                        out.flush()
                result = call.result()
            except KeyboardInterrupt:
                return EXIT_INTERRUPTED
            if ctx.json:
                ctx.emit(result, str)
            return 0
        offset = opts.offset
        chunks: list[str] = []
        while True:
            r = client.call("logs", {"id": opts.id, "offset": offset})
            if ctx.json:
                chunks.append(str(r.get("data", "")))
            else:
                out.write(str(r.get("data", "")))
            if r["next"] == offset or r["next"] >= r["size"]:
                break
            offset = r["next"]
        if ctx.json:
            ctx.emit({**r, "offset": opts.offset, "data": "".join(chunks)}, str)
        out.flush()
    return 0


def _cancel(opts: argparse.Namespace, ctx: Context) -> int:
    with ctx.connect() as client:
        r = client.call("cancel", {"id": opts.id})
    ctx.emit(r, lambda x: f"build {x.get('id')}: {x.get('state')}")
    return 0
