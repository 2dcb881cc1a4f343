"""The op registry: how a request's ``op`` finds its handler and who may call it.

Adding an op is a coroutine in the module that owns the feature, added to the table by that
module's ``register``::

    async def status(ctx: RequestContext, args: Args) -> dict[str, Any]:
        build_id = args.string("id", required=True)

    def register(ops: Registry) -> None:
        ops.add("status", Access.READ, status)

and ``agent.daemon.op_table`` calls each module's ``register`` once, at start: importing a module
registers nothing. A handler validates its own ``args`` with :class:`Args` (which raises
``BadRequest`` naming the field), may send stream events with ``await ctx.emit(name, data)``, and
returns the result or raises an :class:`agent.errors.AgentError`. The control server does framing,
authorization (:class:`Access`), metrics and error mapping.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from agent.errors import BadRequest

if TYPE_CHECKING:
    from agent.runtime import App


class Access(enum.Enum):
    """Who may call an op: READ (read lists and build lists), BUILD (build lists), ADMIN (root)."""

    READ = "read"
    BUILD = "build"
    ADMIN = "admin"


@dataclass(frozen=True)
class Peer:
    """The connecting process, from SO_PEERCRED (pid, uid, gid) plus its supplementary groups."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


Emit = Callable[[str, Any], Awaitable[None]]


@dataclass
class RequestContext:
    """Everything a handler may use. ``fds`` are file descriptors received with the request
    (SCM_RIGHTS); a handler that keeps one must remove it from the list, the server closes the rest
    when the handler returns."""

    app: App
    peer: Peer
    request_id: int
    op: str
    emit: Emit
    fds: list[int] = field(default_factory=list)
    # Set by the server when the client disconnects or cancels; long handlers watch it.
    disconnected: Any = None  # asyncio.Event, typed loosely to keep this module loop-free


Handler = Callable[[RequestContext, "Args"], Awaitable[Any]]


@dataclass(frozen=True)
class Op:
    name: str
    access: Access
    handler: Handler


class Registry:
    """The ops one server answers, by name; filled by the handler modules' ``register``."""

    def __init__(self) -> None:
        self._ops: dict[str, Op] = {}

    def add(self, name: str, access: Access, handler: Handler) -> None:
        if name in self._ops:
            raise ValueError(f"op {name!r} registered twice")
        self._ops[name] = Op(name, access, handler)

    def get(self, name: str) -> Op | None:
        return self._ops.get(name)

    def names(self) -> list[str]:
        return sorted(self._ops)


_T = TypeVar("_T")


class Args:
    """Typed access to a request's ``args`` map; every getter raises BadRequest naming the field."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw

    def _get(
        self, key: str, kind: type[_T] | tuple[type, ...], default: Any, required: bool
    ) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise BadRequest(f"args.{key} is required", details={"field": key})
            return default
        value = self.raw[key]
        if isinstance(value, bool) and kind in (int, float):
            raise BadRequest(f"args.{key} must be a number, not a boolean", details={"field": key})
        if not isinstance(value, kind):
            want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise BadRequest(
                f"args.{key} must be {want}, got {type(value).__name__}", details={"field": key}
            )
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        return self._get(key, str, default, required)

    def integer(self, key: str, default: int | None = None, *, required: bool = False) -> Any:
        return self._get(key, int, default, required)

    def number(self, key: str, default: float | None = None, *, required: bool = False) -> Any:
        value = self._get(key, (int, float), default, required)
        return None if value is None else float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self._get(key, bool, default, False))

    def str_map(self, key: str) -> dict[str, str]:
        value = self._get(key, dict, {}, False)
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise BadRequest(f"args.{key} must map strings to strings", details={"field": key})
        return dict(value)

    def str_list(self, key: str) -> list[str]:
        value = self._get(key, list, [], False)
        if not all(isinstance(v, str) for v in value):
            raise BadRequest(f"args.{key} must be a list of strings", details={"field": key})
        return list(value)

    def only(self, *allowed: str) -> None:
        unknown = sorted(set(self.raw) - set(allowed))
        if unknown:
            raise BadRequest(
                f"unknown args: {', '.join(unknown)}; "
                f"this op takes: {', '.join(allowed) or 'none'}",
                details={"fields": unknown},
            )
