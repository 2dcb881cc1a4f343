"""Registry credentials: inline config and a Docker ``config.json``, with credential helpers.

``config.json`` (docker/cli ``configfile``): ``auths`` maps a registry to ``auth`` (base64 of
``user:password``), ``username``/``password`` or ``identitytoken`` (an OAuth2 refresh token);
``credHelpers`` maps a registry to a helper name and ``credsStore`` names the helper for all
others. A helper is ``docker-credential-<name> get`` reading the server URL on stdin and printing
``{"ServerURL", "Username", "Secret"}``; ``Username == "<token>"`` marks an identity token
(docker-credential-helpers ``client.Get``).

Precedence: inline ``[[proxy.credentials]]`` > ``credHelpers`` > ``auths`` > ``credsStore``.
The file is re-read on :meth:`CredentialStore.reload` (SIGHUP) and when its mtime/size/inode
change (checked at most every ``check_interval`` seconds, on use). A broken file keeps the
credentials already loaded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import CredentialConfig
from agent.errors import UpstreamUnauthorized
from agent.reference import DOCKER_HUB, canonical_host

log = logging.getLogger("agent.proxy")

HUB_SERVER_URL = "https://index.docker.io/v1/"
_HELPER_CACHE_TTL = 300.0
_NOT_FOUND = "credentials not found"


@dataclass(frozen=True)
class Credential:
    """What the proxy presents to one registry. Never logged (repr hides the secrets)."""

    username: str = ""
    password: str = ""
    identity_token: str = ""

    def __repr__(self) -> str:
        return "Credential(***)"

    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def secrets(self) -> list[str]:
        out = [s for s in (self.password, self.identity_token) if s]
        if self.password:
            out.append(self.basic())
        return out


@dataclass(frozen=True)
class _FileState:
    auths: dict[str, Credential]
    helpers: dict[str, tuple[str, str]]  # canonical host -> (helper, server URL as written)
    store: str
    stamp: tuple[int, int, int] | None  # (mtime_ns, size, inode) of what was read


_EMPTY = _FileState({}, {}, "", None)


def _parse(text: str) -> tuple[dict[str, Credential], dict[str, tuple[str, str]], str]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the top level is not a JSON object")
    auths: dict[str, Credential] = {}
    raw_auths = data.get("auths") or {}
    if not isinstance(raw_auths, dict):
        raise ValueError('"auths" is not an object')
    for key, entry in raw_auths.items():
        if not isinstance(entry, dict):
            raise ValueError('an "auths" entry is not an object')
        user = str(entry.get("username") or "")
        password = str(entry.get("password") or "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ValueError(f'the "auth" of registry {key!r} is not base64') from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError(f'the "auth" of registry {key!r} is not user:password')
        cred = Credential(user, password, str(entry.get("identitytoken") or ""))
        if cred.password or cred.identity_token:
            auths[canonical_host(key)] = cred
    helpers: dict[str, tuple[str, str]] = {}
    raw_helpers = data.get("credHelpers") or {}
    if not isinstance(raw_helpers, dict):
        raise ValueError('"credHelpers" is not an object')
    for key, name in raw_helpers.items():
        helpers[canonical_host(key)] = (str(name), key)
    store = data.get("credsStore") or ""
    if not isinstance(store, str):
        raise ValueError('"credsStore" is not a string')
    return auths, helpers, store


class CredentialStore:
    """Looks up the credential for a registry host (canonical form, see reference.py)."""

    def __init__(
        self,
        path: str,
        inline: Sequence[CredentialConfig],
        *,
        helper_timeout: float,
        check_interval: float = 2.0,
    ) -> None:
        self.path = Path(path) if path else None
        self._inline = {canonical_host(c.host): Credential(c.username, c.password) for c in inline}
        self._helper_timeout = helper_timeout
        self._check_interval = check_interval
        self._state = _EMPTY
        self._checked = 0.0
        self._helper_cache: dict[str, tuple[float, Credential | None]] = {}
        self._helper_locks: dict[str, asyncio.Lock] = {}
        self._seen: set[str] = set()
        for cred in self._inline.values():
            self._seen.update(cred.secrets())
        self.generation = 0  # bumped whenever what get() returns may have changed
        self.last_error = ""  # why the last read failed (no secret in it)
        self.reload()

    # --- loading ------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Re-read the file. Returns False (and keeps the old credentials) when it is broken."""
        self._checked = time.monotonic()
        if self.path is None:
            return True
        stamp = self._stamp()
        if stamp is None:
            if self._state.stamp is not None or self.generation == 0:
                log.info("credential file %s is absent: no file credentials", self.path)
            self._state = _EMPTY
            self._changed()
            return True
        try:
            text = self.path.read_text()
            auths, helpers, store = _parse(text)
        except (OSError, ValueError) as exc:
            # json.JSONDecodeError says where (line/column), never what: safe to log.
            log.warning(
                "credential file %s is unusable, keeping the previous credentials: %s",
                self.path,
                exc,
            )
            # Remember the stamp so a broken file is not re-parsed (and re-logged) on every use.
            self._state = _FileState(
                self._state.auths, self._state.helpers, self._state.store, stamp
            )
            self.last_error = f"credential file {self.path} is unusable: {exc}"
            return False
        self._state = _FileState(auths, helpers, store, stamp)
        self.last_error = ""
        for cred in auths.values():
            self._seen.update(cred.secrets())
        self._changed()
        log.info(
            "credentials loaded from %s: %d registries, %d helpers%s",
            self.path,
            len(auths),
            len(helpers),
            ", a credsStore" if store else "",
        )
        return True

    def _changed(self) -> None:
        self._helper_cache.clear()
        self.generation += 1

    def maybe_reload(self) -> None:
        """Cheap on-use check: stat the file at most every ``check_interval`` seconds."""
        now = time.monotonic()
        if self.path is None or now - self._checked < self._check_interval:
            return
        self._checked = now
        if self._stamp() != self._state.stamp:
            self.reload()

    def secrets(self) -> set[str]:
        """Every secret ever loaded (for scrubbing; old ones may still sit in a log buffer)."""
        return set(self._seen)

    def secrets_count(self) -> int:
        """Grows whenever :meth:`secrets` does (it never shrinks): a cheap change check."""
        return len(self._seen)

    # --- lookup -------------------------------------------------------------------------------

    async def get(self, host: str) -> Credential | None:
        self.maybe_reload()
        h = canonical_host(host)
        if h in self._inline:
            return self._inline[h]
        st = self._state
        if h in st.helpers:
            name, server = st.helpers[h]
            return await self._from_helper(name, h, server)
        if h in st.auths:
            return st.auths[h]
        if st.store:
            return await self._from_helper(st.store, h, HUB_SERVER_URL if h == DOCKER_HUB else h)
        return None

    async def _from_helper(self, name: str, host: str, server: str) -> Credential | None:
        key = f"{name}\0{host}"
        lock = self._helper_locks.setdefault(key, asyncio.Lock())
        async with lock:
            hit = self._helper_cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            cred = await self._run_helper(name, host, server)
            self._helper_cache[key] = (time.monotonic() + _HELPER_CACHE_TTL, cred)
            if cred is not None:
                self._seen.update(cred.secrets())
            return cred

    async def _run_helper(self, name: str, host: str, server: str) -> Credential | None:
        prog = f"docker-credential-{name}"
        exe = shutil.which(prog)
        if exe is None:
            raise UpstreamUnauthorized(
                f"credential helper {prog} for registry {host} is not on PATH; install it or "
                f"remove it from {self.path}",
                registry=host,
            )
        proc = await asyncio.create_subprocess_exec(
            exe,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(server.encode()), self._helper_timeout
            )
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            raise UpstreamUnauthorized(
                f"credential helper {prog} for registry {host} did not answer within "
                f"{self._helper_timeout:g}s (proxy.helper_timeout)",
                registry=host,
            ) from None
        except BaseException:
            _kill_group(proc)
            await proc.wait()
            raise
        if proc.returncode != 0:
            said = (out + err).decode(errors="replace").strip()
            if _NOT_FOUND in said.lower():
                log.debug("credential helper %s has no credential for %s", prog, host)
                return None
            raise UpstreamUnauthorized(
                f"credential helper {prog} for registry {host} failed (exit {proc.returncode}): "
                f"{_complaint(err)}",
                registry=host,
            )
        try:
            reply: Any = json.loads(out)
            user, secret = str(reply["Username"]), str(reply["Secret"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamUnauthorized(
                f"credential helper {prog} for registry {host} printed no valid "
                '{"Username", "Secret"} JSON',
                registry=host,
            ) from exc
        log.debug("credential helper %s answered for %s", prog, host)
        if user == "<token>":
            return Credential(identity_token=secret)
        return Credential(user, secret)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _complaint(stderr: bytes) -> str:
    """What a failed helper said, for the error message. Only stderr's first line: stdout is where
    a helper writes credentials, and a line that looks like a credential reply is withheld."""
    lines = stderr.decode(errors="replace").strip().splitlines()
    first = lines[0][:200] if lines else ""
    if '"secret"' in first.lower() or '"username"' in first.lower():
        return "(its output is withheld: it looks like a credential reply)"
    return first or "(no message on stderr)"
