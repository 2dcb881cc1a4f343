"""Who may use which route, by the listener a request arrived on (docs/proxy.md, "Access").

The proxy has two listeners and they are not equally trusted:

- ``sandbox``: ``127.0.0.1:<proxy.port>`` inside the build sandbox. Whatever arrives there comes
  from a build's children, RUN steps included. Mirror routes are served (read-only, the FROM
  lines), build routes only for a live build's capability, and a static route only when it says
  ``children = true``: then read-only, unless it names in ``builds`` the repositories whose
  builds may write through it; a write must then carry the capability of a live build phase
  that pushes under one of those repositories (a RUN step never holds one).
- ``host``: ``proxy.host_address`` on the node. Any local user can connect to it, so every
  request needs the host token (Basic, any user name, the token as password) or, for a build
  route alone, that build's capability. Without either the answer is 401 and nothing is sent
  upstream.

The host token is read from ``proxy.host_token_file`` or, when that is empty, made at start and
written to ``<runtime_dir>/proxy-host.token`` (0600, root); it never appears in a log.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config, RouteConfig
from agent.errors import ConfigError, StartupError
from agent.proxy._routes import Target
from agent.reference import split_repository

log = logging.getLogger("agent.proxy")

SANDBOX = "sandbox"
HOST = "host"
TOKEN_NAME = "proxy-host.token"  # noqa: S105 (a file name)
_MAX_TOKEN = 4096


@dataclass(frozen=True)
class Caller:
    """What a request proves about itself: the listener it came in on, whether it holds the host
    token, and the repositories its build capability (if any, and live) may push to."""

    side: str
    host_ok: bool
    pushes: tuple[str, ...] = ()


class StaticRules:
    """``children`` and ``builds`` of each ``[[proxy.routes]]`` entry, by route name."""

    def __init__(self, routes: list[RouteConfig]) -> None:
        self._by_name = {r.name: r for r in routes}
        # Canonical "registry/path" prefixes, as Router.pushes_of spells a build's targets.
        self._builds = {
            r.name: tuple("/".join(split_repository(b)) for b in r.builds) for r in routes
        }

    def visible(self, name: str, caller: Caller) -> bool:
        """Whether static route ``name`` exists for ``caller`` (else it is a 404)."""
        if caller.side == HOST:
            return True  # the host token was checked already
        rule = self._by_name.get(name)
        return rule is not None and rule.children

    def write_denial(self, name: str, target: Target, method: str, caller: Caller) -> str | None:
        """Why ``caller`` may not ``method`` through visible static route ``name`` (a 403), or
        None. The route's own ``access`` is checked after this, by ``_routes.denial``."""
        if caller.side == HOST or method in ("GET", "HEAD") or not target.writable:
            return None
        prefixes = self._builds.get(name, ())
        if not prefixes:
            return f"static route {name} is read-only for builds (it names no builds)"
        if any(_under(repo, prefix) for repo in caller.pushes for prefix in prefixes):
            return None
        shown = ", ".join(self._by_name[name].builds)
        return f"static route {name} is writable only by builds pushing under {shown}"

    def source_allowed(self, target: Target, name: str, caller: Caller) -> bool:
        """Whether a cross-repository mount may take blobs from ``target`` (proxy-side
        repository ``name``): only what the caller could pull itself."""
        if target.kind == "build":
            return True  # the router resolved it for this caller's capability
        if caller.side == HOST:
            return caller.host_ok
        if target.kind == "static":
            return self.visible(name.partition("/")[0], caller)
        return True  # mirrors: read-only pulls, served to every child


def _under(repo: str, prefix: str) -> bool:
    return repo == prefix or repo.startswith(prefix + "/")


class HostToken:
    """The host listener's token: the operator's file (``proxy.host_token_file``) or a fresh
    one the daemon writes under the runtime directory."""

    def __init__(self, config: Config) -> None:
        self._file = config.proxy.host_token_file
        self._runtime = config.daemon.runtime_dir
        self._token = ""
        self._old: list[str] = []  # tokens replaced by a reload: still scrubbed
        self.path = ""
        self.generation = 0

    def load(self) -> str:
        """Read (or make) the token; returns it. Raises StartupError / ConfigError naming the
        key and the fix."""
        if self._file:
            self._token = _read_token(self._file)
            self.path = self._file
        else:
            self._token = secrets.token_urlsafe(32)
            self.path = str(Path(self._runtime) / TOKEN_NAME)
            _write_private(self.path, self._token)
        self.generation += 1
        return self._token

    def reload(self) -> str | None:
        """Re-read an operator's file (SIGHUP); returns the new token or None when unchanged.
        A made token stays as it is (clients read it from the file)."""
        if not self._file:
            return None
        token = _read_token(self._file)
        if token == self._token:
            return None
        self._old.append(self._token)
        self._token = token
        self.generation += 1
        log.info("host listener token re-read from %s", self._file)
        return token

    def values(self) -> list[str]:
        """Every token this daemon has used (for the log scrubber)."""
        return [t for t in (*self._old, self._token) if t]

    def matches(self, password: str | None) -> bool:
        if not password or not self._token:
            return False
        return hmac.compare_digest(password.encode(), self._token.encode())

    def remove(self) -> None:
        """Delete a made token's file at stop (an operator's file stays)."""
        if not self._file and self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _read_token(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StartupError(
            f"proxy.host_token_file {path} cannot be read: {exc.strerror}; create it (mode "
            '0600, one line) or set proxy.host_token_file = "" to have the daemon make one'
        ) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"proxy.host_token_file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise StartupError(
                f"proxy.host_token_file {path} is readable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        data = os.read(fd, _MAX_TOKEN + 1)
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if len(token) < 16 or len(data) > _MAX_TOKEN or any(c.isspace() for c in token):
        raise ConfigError(
            f"proxy.host_token_file {path} must hold one token of 16 to {_MAX_TOKEN} "
            "characters without spaces"
        )
    return token


def _write_private(path: str, token: str) -> None:
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise StartupError(
            f"cannot write the proxy's host token to {path}: {exc.strerror}; check "
            "daemon.runtime_dir, or set proxy.host_token_file"
        ) from exc


__all__ = ["HOST", "SANDBOX", "TOKEN_NAME", "Caller", "HostToken", "StaticRules"]
