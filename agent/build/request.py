"""A ``build`` request's arguments, checked (docs/protocol.md, the ``build`` op).

Everything a request says is checked here, before anything is hashed, keyed or recorded: the
target (exactly one of ``target_ref``, tagged, or ``target_repo``), the build's kind (a context
fd for a Dockerfile build, or ``base_ref`` for a ref-only build, never a mix), build args and
secrets within the wire's limits (ctl.protocol), the timeout. Messages name a field, an id or a
size, never a value that may be secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent import reference
from agent.build.dockerfile_path import check_dockerfile_path
from agent.control.ops import Args
from agent.errors import BadRequest
from ctl.protocol import MAX_SECRET_BYTES, MAX_SECRETS, SECRET_ID

_ARG_NAMES = (  # what a build request may hold
    "limits",
    "dockerfile",
    "base_ref",
    "target_ref",
    "target_repo",
    "base_repo",
    "build_args",
    "target",
    "platform",
    "secrets",
    "force",
    "timeout",
    "labels",
    "detach",
    "context_name",
)


@dataclass
class BuildRequest:
    """A ``build`` request's arguments, checked (everything but the context's content)."""

    target_ref_text: str | None
    target_repo_text: str | None
    target_ref: reference.Reference | None
    target_repo: str | None
    base_text: str | None
    base_repo_text: str | None
    dockerfile: str | None
    build_args: dict[str, str]
    secrets: dict[str, bytes] = field(repr=False)
    stage: str | None
    platform: str | None
    timeout: float
    labels: dict[str, str]
    force: bool
    detach: bool
    context_name: str | None
    limits: dict[str, Any]


def parse_request(args: Args, default_timeout: float, *, with_context: bool) -> BuildRequest:
    """The request's arguments checked; BadRequest naming the field that is wrong."""
    args.only(*_ARG_NAMES)
    target_ref_text = args.string("target_ref")
    target_repo_text = args.string("target_repo")
    if bool(target_ref_text) == bool(target_repo_text):
        raise BadRequest(
            "give exactly one of target_ref (--target) and target_repo (--target-repo)",
            details={"field": "target_ref"},
        )
    target_ref = reference.parse(target_ref_text, what="target_ref") if target_ref_text else None
    if target_ref is not None and target_ref.digest:
        raise BadRequest("target_ref must be tagged, not pinned by digest: a push needs a tag")
    target_repo = parse_repo(target_repo_text, "target_repo") if target_repo_text else None
    secrets = _secrets(args)
    build_args = _build_args(args)
    timeout = args.number("timeout", default_timeout)
    if timeout is None or timeout <= 0:
        raise BadRequest(
            "timeout must be a positive number of seconds", details={"field": "timeout"}
        )
    req = BuildRequest(
        target_ref_text=target_ref_text,
        target_repo_text=target_repo_text,
        target_ref=target_ref,
        target_repo=target_repo,
        base_text=args.string("base_ref"),
        base_repo_text=args.string("base_repo"),
        dockerfile=args.string("dockerfile"),
        build_args=build_args,
        secrets=secrets,
        stage=args.string("target"),
        platform=args.string("platform"),
        timeout=timeout,
        labels=args.str_map("labels"),
        force=args.flag("force"),
        detach=args.flag("detach"),
        context_name=args.string("context_name"),
        limits=args._get("limits", dict, {}, False),
    )
    _check_kind(req, with_context)
    return req


def _check_kind(req: BuildRequest, with_context: bool) -> None:
    """A Dockerfile build (a context fd) or a ref-only build (base_ref), never a mix."""
    if with_context:
        if req.base_text:
            raise BadRequest(
                "give either a context (a Dockerfile build) or base_ref (a ref-only build), "
                "not both",
                details={"field": "base_ref"},
            )
        check_dockerfile_path(req.dockerfile or "Dockerfile")
        return
    if not req.base_text:
        raise BadRequest(
            "nothing to build: pass a context directory (fd) with a Dockerfile, or base_ref",
            details={"field": "base_ref"},
        )
    if req.dockerfile:
        raise BadRequest("dockerfile needs a context directory", details={"field": "dockerfile"})
    if req.secrets:
        raise BadRequest(
            "secrets are for Dockerfile builds (RUN --mount=type=secret); a ref-only build "
            "(base_ref) runs no Dockerfile: drop them",
            details={"field": "secrets"},
        )


def parse_repo(text: str, what: str) -> str:
    """``text`` as a repository (``target_repo``, ``base_repo``): no tag, no digest."""
    r = reference.parse(text, what=what)
    if r.tag or r.digest or "/" not in r.repo:
        raise BadRequest(
            f"{what} {text!r} must be a repository without tag or digest, "
            "e.g. registry.example.com/team/images",
            details={"field": what},
        )
    return r.repo


def _build_args(args: Args) -> dict[str, str]:
    """``args.build_args`` checked: names a builder can take (no ``=``, no NUL, not empty),
    values without NUL. Messages name the arg, never its value."""
    out = args.str_map("build_args")
    for name, value in out.items():
        if not name or "=" in name or "\0" in name:
            why = (
                f"build arg name {name!r} is not valid: give NAME=value with a NAME that is not "
                "empty and holds no '=' or NUL"
            )
        elif "\0" in value:
            why = f"build arg {name!r}: the value holds a NUL byte, which no builder can take"
        else:
            continue
        raise BadRequest(why, details={"field": "build_args"})
    return out


def _secrets(args: Args) -> dict[str, bytes]:
    """``args.secrets`` checked: a map id -> value (str or bin) within the wire's limits
    (ctl.protocol). Messages name ids and sizes, never a value."""
    raw = args.raw.get("secrets")
    if raw is None or raw == []:  # [] was the reserved form of older clients
        return {}
    field = {"field": "secrets"}
    if not isinstance(raw, dict):
        raise BadRequest(
            f"args.secrets must be a map of secret id to value, got {type(raw).__name__}; "
            'send e.g. {"npm_token": "<value>"}',
            details=field,
        )
    if len(raw) > MAX_SECRETS:
        raise BadRequest(
            f"args.secrets has {len(raw)} secrets; at most {MAX_SECRETS} are allowed per build: "
            "merge some into one file",
            details=field,
        )
    out: dict[str, bytes] = {}
    for sid, value in raw.items():
        if not isinstance(sid, str) or not SECRET_ID.fullmatch(sid):
            # Not echoed: a value sent as an id by mistake must not come back in a message.
            what = f"of {len(sid)} characters" if isinstance(sid, str) else type(sid).__name__
            raise BadRequest(
                f"a secret id ({what}) is not valid: an id is 1 to 64 of A-Z a-z 0-9 _ . - "
                "(not starting with . or -), as in RUN --mount=type=secret,id=<id>",
                details=field,
            )
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif isinstance(value, bytes):
            data = value
        else:
            raise BadRequest(
                f"secret {sid!r}: the value must be a string or bytes, got {type(value).__name__}",
                details=field,
            )
        if len(data) > MAX_SECRET_BYTES:
            raise BadRequest(
                f"secret {sid!r} is {len(data)} bytes; the limit is {MAX_SECRET_BYTES} "
                "(500 KiB, BuildKit's own limit): pass a smaller value",
                details=field,
            )
        out[sid] = data
    return out


__all__ = ["BuildRequest", "parse_repo", "parse_request"]
