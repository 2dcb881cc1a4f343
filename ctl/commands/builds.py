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

from ctl.commands._buildrequest import UsageError, request_args

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from typing import Any, TextIO

    from ctl.cli import Context, Subcommands
    from ctl.client import Call

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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
