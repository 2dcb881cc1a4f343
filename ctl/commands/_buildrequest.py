"""The ``build`` request's args from agentctl's flags, or from bob's environment without them.

``--secret`` values are read here, from the caller's files and environment (the daemon never
opens a caller's path), and checked against the wire's limits (``ctl.protocol``: the daemon
checks the same) so that a mistake fails before any connection, with the flag in the message.
"""

from __future__ import annotations

import argparse
import os

from ctl.protocol import MAX_SECRET_BYTES, MAX_SECRETS, SECRET_ID

TYPE_CHECKING = False  # typing is not imported at run time: agentctl's start-up is measured
if TYPE_CHECKING:
    from typing import Any

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
# Flags sent as they are: (flag, request arg).
_AS_GIVEN = (
    ("target", "target_ref"),
    ("target_repo", "target_repo"),
    ("base_repo", "base_repo"),
    ("platform", "platform"),
    ("stage", "target"),
)


class UsageError(Exception):
    """A flag or variable is wrong: ``agentctl build`` says so and exits 2, before connecting."""


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
    if not SECRET_ID.fullmatch(sid):
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
    opts = _with_bob(opts, env)
    args: dict[str, Any] = {}
    context = _source_and_target(opts, args)
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
    for flag, key in _AS_GIVEN:
        if getattr(opts, flag):
            args[key] = getattr(opts, flag)
    if opts.force:
        args["force"] = True
    _limits_and_timeout(opts, args)
    return args, context


def _with_bob(opts: argparse.Namespace, env: dict[str, str]) -> argparse.Namespace:
    """``opts``, or bob's environment when no build flag is given."""
    # --timeout and the limits are not build flags either: they apply to bob's build as well.
    keep = ("timeout", *_LIMIT_FLAGS)
    given = any(
        getattr(opts, k, None) not in (None, [], False) for k in _BUILD_FLAGS if k not in keep
    )
    if given:
        return opts
    bob = _from_bob(env)
    if bob is None:
        return opts
    for k in keep:
        setattr(bob, k, getattr(opts, k, None))
    return bob


def _source_and_target(opts: argparse.Namespace, args: dict[str, Any]) -> str | None:
    """What the build starts from; returns the context directory (None for ref-only)."""
    if not opts.target and not opts.target_repo:
        raise UsageError("give --target REF or --target-repo REPO (or set BOB_TARGET_REF)")
    if opts.target and opts.target_repo:
        raise UsageError("--target and --target-repo are exclusive")
    context: str | None = None
    if opts.base:
        if opts.file or opts.context:
            raise UsageError("--base builds without a Dockerfile: drop --file/--context")
        args["base_ref"] = opts.base
    else:
        context = opts.context or "."
        args["dockerfile"] = opts.file or "Dockerfile"
        args["context_name"] = os.path.abspath(context)
    return context


def _limits_and_timeout(opts: argparse.Namespace, args: dict[str, Any]) -> None:
    # Limits are checked by the daemon: a request may only lower the node's (build.*_max).
    limits = {k: getattr(opts, k, None) for k in _LIMIT_FLAGS}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        args["limits"] = limits
    timeout = getattr(opts, "timeout", None)
    if timeout is not None:
        if timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        args["timeout"] = timeout
