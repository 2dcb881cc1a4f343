"""One exception tree for the daemon. Every error carries a stable wire code (ctl.protocol).

    AgentError                        code
    ├── ConfigError                   internal      invalid configuration (stops the start)
    ├── StartupError                  internal      a component could not start (which, and the fix)
    ├── IllegalTransition             internal      a state machine was asked for a move it forbids
    ├── BadRequest                    bad_request   the caller's request is malformed or invalid
    │   └── UnsupportedVersion        unsupported_version
    ├── Forbidden                     forbidden     the peer's uid/gid may not run this op
    ├── NotFound                      not_found     no such build, route or image
    ├── Busy                          busy          the queue is full
    ├── BuildFailed                   build_failed  the builder ran and failed (message says where)
    ├── Cancelled                     cancelled
    ├── TimedOut                      timed_out
    ├── UpstreamError                 (abstract)
    │   ├── UpstreamUnauthorized      upstream_unauthorized   registry refused our credentials
    │   └── UpstreamUnavailable       upstream_unavailable    registry unreachable or failing
    └── InternalError                 internal      a bug; the message says what was being done

Library errors are converted at the boundary with ``raise ... from exc``. Messages never contain a
credential or a proxy capability prefix: they go to logs, records and clients.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypedDict

from ctl import protocol


class ErrorDict(TypedDict):
    """An error as it travels (the reply's ``error``, docs/protocol.md section 3) and as a build
    record keeps it."""

    code: str
    message: str
    details: dict[str, Any]


class BuildErrorDetails(TypedDict, total=False):
    """The ``details`` of a failed build, the same keys whichever toolchain ran it
    (docs/protocol.md section 7.2, "Error details"). Only what is known is present.

    ``exit_code`` is the failing step's own exit status; ``tool_exit_code`` that of the builder
    program (buildah, buildctl, skopeo, crane), which exits 1 (or 125) whatever the step did."""

    id: str  # the build (added when the error reaches its callers)
    log_tail: list[str]  # the last build.log_tail_lines lines of the log, scrubbed
    reason: str  # what kind of failure: run_failed, dockerfile_syntax, ... (the doc lists them)
    step: str  # the Dockerfile instruction that failed, as written ("RUN make")
    line: int  # its line in the Dockerfile
    exit_code: int  # the failing step's exit status
    tool_exit_code: int  # the builder program's exit status
    missing_path: str  # a COPY/ADD source missing from the context, as named inside it
    registry: str  # the registry that refused or failed (never the proxy's address)
    limit: str  # the cgroup limit the build ran into (agent/limits.py words)
    phase: str  # the phase a cancelled or timed-out build was in


def build_details(
    *,
    log_tail: list[str],
    tool_exit_code: int,
    reason: str,
    step: str | None = None,
    line: int | None = None,
    exit_code: int | None = None,
    missing_path: str | None = None,
) -> BuildErrorDetails:
    """The details of a toolchain's failure, without the keys that are not known."""
    out = BuildErrorDetails(log_tail=log_tail, tool_exit_code=tool_exit_code, reason=reason)
    if step is not None:
        out["step"] = step
    if line is not None:
        out["line"] = line
    if exit_code is not None:
        out["exit_code"] = exit_code
    if missing_path is not None:
        out["missing_path"] = missing_path
    return out


class AgentError(Exception):
    """Base of every error the daemon raises on purpose. A subclass names its wire code in its
    class line: ``class Busy(AgentError, code=protocol.BUSY)``; without one it keeps its
    parent's."""

    code: ClassVar[str] = protocol.INTERNAL

    def __init_subclass__(cls, code: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if code is not None:
            cls.code = code

    def __init__(
        self, message: str, *, details: dict[str, Any] | BuildErrorDetails | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    def to_dict(self) -> ErrorDict:
        return {"code": self.code, "message": self.message, "details": dict(self.details)}


class ConfigError(AgentError):
    """A configuration value is invalid; the message names the key, the value and what is valid."""


class StartupError(AgentError):
    """A component could not be started; the message says which and how to fix it."""


class IllegalTransition(AgentError):
    """A state machine was asked for a transition its table does not allow."""


class BadRequest(AgentError, code=protocol.BAD_REQUEST):
    """The request is malformed or invalid; ``details.field`` names the argument when one is."""


class UnsupportedVersion(BadRequest, code=protocol.UNSUPPORTED_VERSION):
    """The request's protocol version is not one this daemon speaks (``details.supported``)."""


class Forbidden(AgentError, code=protocol.FORBIDDEN):
    """The peer may not run this op, or act on this build (``details.rule``)."""


class NotFound(AgentError, code=protocol.NOT_FOUND):
    """No such build, route or image."""


class Busy(AgentError, code=protocol.BUSY):
    """The build queue (or the connection's requests in flight) is full, or the daemon drains."""


class BuildFailed(AgentError, code=protocol.BUILD_FAILED):
    """The builder ran and failed; ``details`` are a :class:`BuildErrorDetails`."""


class Cancelled(AgentError, code=protocol.CANCELLED):
    """The build was cancelled (by a caller, or because every caller left)."""


class TimedOut(AgentError, code=protocol.TIMED_OUT):
    """The build ran out of its running time."""


class UpstreamError(AgentError):
    """A registry did not do what was asked. ``registry`` names the host (never a credential)."""

    def __init__(
        self,
        message: str,
        *,
        registry: str = "",
        details: dict[str, Any] | BuildErrorDetails | None = None,
    ) -> None:
        merged = dict(details or {})
        if registry:
            merged.setdefault("registry", registry)
        super().__init__(message, details=merged)
        self.registry = registry


class UpstreamUnauthorized(UpstreamError, code=protocol.UPSTREAM_UNAUTHORIZED):
    """A registry refused the daemon's credentials."""


class UpstreamUnavailable(UpstreamError, code=protocol.UPSTREAM_UNAVAILABLE):
    """A registry could not be reached or kept failing."""


class InternalError(AgentError, code=protocol.INTERNAL):
    """A bug, or a failure of the node itself; the message says what was being done."""


# Exit codes of the build-agent process (systemd's Restart= logic and operators read these).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: invalid configuration
EXIT_STARTUP = 70  # EX_SOFTWARE: a component refused to start
