"""Build-arg values: off every argv where the builder allows it, and out of logs when secret.

Why: any local user reads every process's command line (``ps``, ``/proc/<pid>/cmdline``), and
``--build-arg TOKEN=...`` put the value there for as long as the build ran (issue 11, attack 4).

- buildah 1.28: ``--build-arg NAME`` without ``=`` takes the value from buildah's own
  environment (``os.LookupEnv``; unset means "not given"), and ``/proc/<pid>/environ`` is
  readable by the process's uid (root) alone. So a value travels in the child's environment and
  the argv names only the arg. The environment is the builder's own, though, read by buildah, the
  Go runtime, the C library and the sandbox's Python wrapper before any Dockerfile: a name they
  interpret (``LD_PRELOAD``, ``PATH``, ``HTTP_PROXY``, ``GODEBUG``, ``BUILDAH_*``...) must not be
  set by a caller, so such an arg stays on the argv as ``NAME=value`` (:func:`split_for_env`),
  as does a name that is not a plain identifier. docs/security.md lists them.
- BuildKit (buildctl v0.11.6 to v0.24.0): ``--opt build-arg:K=V`` has no environment or file
  form (cmd/buildctl/build/opt.go: ``attrMap`` requires ``=``), so the value stays on buildctl's
  argv; docs/builds.md says so and what to use instead (``--secret``).

Whatever the channel, a value whose *name* looks secret (:func:`looks_secret`) is masked in the
build's log and errors like a ``--secret`` value (:func:`secret_values`, fed to
``buildlog.SecretScrub``); the record keeps names only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names the builder process itself reads (exact, upper-cased): buildah/containers, Go, glibc,
# locale, proxies, the children's scrubbed variables (agent.build.child).
_RESERVED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "TERM",
        "TMPDIR",
        "TZ",
        "LANG",
        "LANGUAGE",
        "IFS",
        "ENV",
        "BASH_ENV",
        "DOCKER_CONFIG",
        "DOCKER_CERT_PATH",
        "REGISTRY_AUTH_FILE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "FTP_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "RES_OPTIONS",
        "RESOLV_HOST_CONF",
        "NLSPATH",
        "GLIBC_TUNABLES",
        "NOTIFY_SOCKET",
        "DBUS_SESSION_BUS_ADDRESS",
        "OPENSSL_CONF",
        "OPENSSL_MODULES",
    }
)
_RESERVED_PREFIXES = (
    "LD_",
    "LC_",
    "MALLOC_",
    "GO",  # GODEBUG, GOMAXPROCS, GOTRACEBACK, GOGC, GOMEMLIMIT...
    "BUILDAH_",
    "CONTAINERS_",
    "STORAGE_",
    "PODMAN_",
    "XDG_",
    "LISTEN_",
    "PYTHON",
    "SYSTEMD_",
    "_",  # _CONTAINERS_USERNS_CONFIGURED, _BUILDAH_STARTED_IN_USERNS...
)


def looks_secret(name: str) -> bool:
    """``*TOKEN*``, ``*PASSWORD*``, ``*SECRET*``, ``*KEY*``, case-insensitive."""
    upper = name.upper()
    return any(word in upper for word in _SECRET_WORDS)


def secret_values(build_args: Mapping[str, str]) -> list[bytes]:
    """The values to mask in the build's log: those of secret-looking names."""
    return [v.encode("utf-8") for k, v in build_args.items() if looks_secret(k) and v]


def env_safe(name: str) -> bool:
    """True when ``name`` may be set in the builder's own environment (module docstring)."""
    if not _IDENT.fullmatch(name):
        return False
    upper = name.upper()
    return upper not in _RESERVED and not upper.startswith(_RESERVED_PREFIXES)


def split_for_env(build_args: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """``(env, argv)``: the args whose value can travel in the environment (named alone on the
    argv), and those that must stay ``NAME=value`` on the argv."""
    env: dict[str, str] = {}
    argv: dict[str, str] = {}
    for k, v in build_args.items():
        (env if env_safe(k) else argv)[k] = v
    return env, argv


__all__ = ["env_safe", "looks_secret", "secret_values", "split_for_env"]
