"""Start and stop real Debian ``docker-registry`` processes on loopback ports.

Kinds: ``plain`` (no auth), ``htpasswd`` (basic auth), ``token`` (``auth.token`` trusting the
tests' token server: tests/infra/token_server.py passes it as ``extra_auth``). ``tls`` =
(certificate, key) serves HTTPS instead of HTTP.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now, from below the kernel's ephemeral range (32768-60999 here):
    a port from inside it (what ``bind(0)`` gives) may be taken by any outgoing connection's
    source port before the process it was chosen for binds it. Never the same port twice in a
    session, so that two picks for one test cannot collide either."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """One running registry. ``host`` is ``127.0.0.1:<port>`` as used in image references."""

    root: Path
    port: int
    kind: str = "plain"
    username: str = ""
    password: str = ""
    extra_auth: dict[str, Any] | None = None
    tls: tuple[Path, Path] | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log: {level: info, formatter: text}",
            "storage:",
            f"  filesystem: {{rootdirectory: {self.root / 'data'}}}",
            "  delete: {enabled: true}",
            "  cache: {blobdescriptor: inmemory}",
            f"http: {{addr: 127.0.0.1:{self.port}, secret: test-secret}}",
        ]
        if self.tls is not None:
            lines[-1] = lines[-1][:-1] + (
                f", tls: {{certificate: {self.tls[0]}, key: {self.tls[1]}}}}}"
            )
        if self.kind == "htpasswd":
            lines += [
                "auth:",
                "  htpasswd:",
                "    realm: test-realm",
                f"    path: {self.root / 'htpasswd'}",
            ]
        elif self.extra_auth is not None:
            lines.append("auth:")
            for name, opts in self.extra_auth.items():
                lines.append(f"  {name}:")
                for k, v in opts.items():
                    lines.append(f"    {k}: {v}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.kind == "htpasswd":
            subprocess.run(
                ["htpasswd", "-Bbc", str(self.root / "htpasswd"), self.username, self.password],
                check=True,
                capture_output=True,
            )
        cfg = self.root / "config.yml"
        cfg.write_text(self._config())
        self.log_path = self.root / "registry.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(
                    f"{self.url}/v2/", timeout=1, context=ssl._create_unverified_context()
                ).close()
                return
            except urllib.error.HTTPError:
                return  # 401 from an auth registry: it is up
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"docker-registry on {self.host} not ready in {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()
        return ""


def start_registry(root: Path, kind: str = "plain", **kw: Any) -> Registry:
    reg = Registry(root=root, port=free_port(), kind=kind, **kw)
    reg.start()
    return reg
