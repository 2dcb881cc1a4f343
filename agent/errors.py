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

from typing import Any, ClassVar

from ctl import protocol


class AgentError(Exception):
    """Base of every error the daemon raises on purpose."""

    code: ClassVar[str] = protocol.INTERNAL

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}


class ConfigError(AgentError):
    """A configuration value is invalid; the message names the key, the value and what is valid."""


class StartupError(AgentError):
    """A component could not be started; the message says which and how to fix it."""


class IllegalTransition(AgentError):
    """A state machine was asked for a transition its table does not allow."""


class BadRequest(AgentError):
    code = protocol.BAD_REQUEST


class UnsupportedVersion(BadRequest):
    code = protocol.UNSUPPORTED_VERSION


class Forbidden(AgentError):
    code = protocol.FORBIDDEN


class NotFound(AgentError):
    code = protocol.NOT_FOUND


class Busy(AgentError):
    code = protocol.BUSY


class BuildFailed(AgentError):
    code = protocol.BUILD_FAILED


class Cancelled(AgentError):
    code = protocol.CANCELLED


class TimedOut(AgentError):
    code = protocol.TIMED_OUT


class UpstreamError(AgentError):
    """A registry did not do what was asked. ``registry`` names the host (never a credential)."""

    def __init__(
        self, message: str, *, registry: str = "", details: dict[str, Any] | None = None
    ) -> None:
        merged = dict(details or {})
        if registry:
            merged.setdefault("registry", registry)
        super().__init__(message, details=merged)
        self.registry = registry


class UpstreamUnauthorized(UpstreamError):
    code = protocol.UPSTREAM_UNAUTHORIZED


class UpstreamUnavailable(UpstreamError):
    code = protocol.UPSTREAM_UNAVAILABLE


class InternalError(AgentError):
    code = protocol.INTERNAL


# Exit codes of the build-agent process (systemd's Restart= logic and operators read these).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: invalid configuration
EXIT_STARTUP = 70  # EX_SOFTWARE: a component refused to start
