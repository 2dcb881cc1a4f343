"""Run the real daemon as a subprocess, as systemd would, and drive it with the real agentctl.

    d = DaemonProcess(tmp, {"build": {"max_queued": 3}})   # sections merged over test defaults
    d.start()                          # waits for READY=1 on a NOTIFY_SOCKET the helper owns
    d.ctl("ping")                      # CompletedProcess of `agentctl --socket ... ping`
    with d.client() as c: c.call("info")
    assert d.stop() == 0               # SIGTERM, returns the exit code

Defaults: socket in a short /tmp path, state and runtime dirs in ``tmp``, metrics and the proxy on
free ports, ``sandbox.mode = "off"``, ``socket_group = ""``. The daemon's stderr goes to
``tmp/daemon.log`` (``d.log()`` reads it).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctl.client import Client
from tests.infra.registry import free_port

_VENV_BIN = Path(sys.executable).parent
AGENTCTL = (
    [str(_VENV_BIN / "agentctl")]
    if (_VENV_BIN / "agentctl").exists()
    else [sys.executable, "-m", "ctl"]
)
DAEMON = [sys.executable, "-m", "agent"]
REPO = Path(__file__).resolve().parents[2]


# Test-only ops, added to the daemon's op table (agent.daemon.op_table) inside a daemon started with
# ``preamble=TEST_OPS``:
#   test_sleep {seconds}: emits "started", sleeps, answers {"slept": true}
#   test_fds: answers the (st_dev, st_ino) of each fd received with the request
#   test_flood {count, size}: emits `count` events of `size` bytes; test_flood_progress: how many
TEST_OPS = """
import asyncio, os
import agent.daemon
from agent.control.ops import Access

async def _sleep(ctx, args):
    await ctx.emit("started", None)
    await asyncio.sleep(args.number("seconds", 0.0))
    return {"slept": True}

async def _fds(ctx, args):
    return [[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in ctx.fds]

_flood = {"emitted": 0}

async def _flood_op(ctx, args):
    chunk = "x" * args.integer("size", 65536)
    for i in range(args.integer("count", 1)):
        await ctx.emit("chunk", chunk)
        _flood["emitted"] = i + 1
    return {"emitted": _flood["emitted"]}

async def _bad_result(ctx, args):
    from agent.errors import NotFound
    if args.flag("as_error"):
        raise NotFound("no such thing", details={"obj": object()})
    return {"obj": object()}

async def _flood_progress(ctx, args):
    return _flood["emitted"]

_daemon_ops = agent.daemon.op_table

def _with_test_ops():
    ops = _daemon_ops()
    ops.add("test_sleep", Access.READ, _sleep)
    ops.add("test_fds", Access.READ, _fds)
    ops.add("test_flood", Access.READ, _flood_op)
    ops.add("test_bad_result", Access.READ, _bad_result)
    ops.add("test_flood_progress", Access.READ, _flood_progress)
    return ops

agent.daemon.op_table = _with_test_ops
"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Enough TOML for the config: tables, scalars, lists, and lists of tables."""
    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        nested = {
            k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        }
        for key, value in table.items():
            if key not in nested:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, entries in nested.items():
            for entry in entries:
                lines.append(f"[[{name}.{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in entry.items())
        lines.append("")
    return "\n".join(lines)


class DaemonProcess:
    """One real ``build-agent run`` process with its own config, socket and notify socket."""

    def __init__(
        self,
        tmp: Path,
        sections: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        argv_prefix: Sequence[str] = (),
        preamble: str = "",
    ) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes: keep the socket in its own short dir.
        self.sock_dir = Path(tempfile.mkdtemp(prefix="bas-", dir="/tmp"))
        self.socket_path = str(self.sock_dir / "agent.sock")
        self.metrics_port = free_port()
        merged: dict[str, dict[str, Any]] = {
            "daemon": {
                "socket": self.socket_path,
                "socket_group": "",
                "state_dir": str(self.tmp / "state"),
                "runtime_dir": str(self.tmp / "run"),
                "metrics_address": f"127.0.0.1:{self.metrics_port}",
                "shutdown_grace": 5,
            },
            "sandbox": {"mode": "off"},
            # The proxy listens as soon as it exists: keep parallel daemons off each other's ports.
            "proxy": {"port": free_port(), "host_address": f"127.0.0.1:{free_port()}"},
        }
        # Ports this helper chose (not the caller): start() may choose again if one was taken.
        self._auto_ports = {
            ("daemon", "metrics_address"): merged["daemon"]["metrics_address"],
            ("proxy", "port"): merged["proxy"]["port"],
            ("proxy", "host_address"): merged["proxy"]["host_address"],
        }
        for name, table in (sections or {}).items():
            merged.setdefault(name, {}).update(table)
        self.sections = merged
        self.config_path = self.tmp / "config.toml"
        self.config_path.write_text(to_toml(merged))
        self.extra_env = dict(env or {})
        self.argv_prefix = list(argv_prefix)
        # Python run in the daemon process before main(): tests register extra ops this way.
        self.preamble = preamble
        self.log_path = self.tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = str(self.sock_dir / "notify")
        self._notify: socket.socket | None = None
        self.notifications: list[str] = []

    # --- lifecycle ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        env.update({"NOTIFY_SOCKET": self.notify_path, "PYTHONUNBUFFERED": "1"})
        env["PYTHONPATH"] = str(REPO)
        env.update(self.extra_env)
        return env

    def _notify_bind(self) -> None:
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self.notify_path)

    def start(self, timeout: float = 15.0, *, wait_ready: bool = True) -> DaemonProcess:
        """Start; with ``wait_ready``, wait for READY=1. free_port() can race with other
        processes on the machine: when a port this helper chose turns out taken, it chooses
        again (twice at most) rather than fail the test. A daemon that never gets ready is
        killed and its socket dir removed before the error propagates (callers that start
        before their try/finally would leak it)."""
        for attempt in range(3):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch()
            if not wait_ready:
                return self
            try:
                self.wait_notify("READY=1", timeout)
                return self
            except BaseException as exc:
                retry = isinstance(exc, RuntimeError) and attempt < 2
                if retry and self._reassign_taken_ports(self.log()[offset:]):
                    continue
                self.cleanup()
                raise
        return self

    def _reassign_taken_ports(self, log: str) -> bool:
        if "already in use" not in log.lower():
            return False
        written = self.config_path.read_text()
        if written != to_toml(self.sections):
            return False  # the test edited the file itself: its ports are its business
        clashed = False
        for (section, key), value in self._auto_ports.items():
            if self.sections[section].get(key) != value:
                continue
            port = str(value).rpartition(":")[2]
            if f":{port}" not in log and f", {port})" not in log and f" port {port}" not in log:
                continue
            clashed = True
            fresh = free_port()
            new: Any = fresh if key == "port" else f"127.0.0.1:{fresh}"
            self.sections[section][key] = new
            self._auto_ports[(section, key)] = new
            if key == "metrics_address":
                self.metrics_port = fresh
        if not clashed:
            return False
        self.config_path.write_text(to_toml(self.sections))
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)
        self.notifications.clear()
        return True

    def _launch(self) -> None:
        self._notify_bind()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.argv_prefix, *self.command(), "run", "--config", str(self.config_path)],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=str(REPO),
                pass_fds=self._pass_fds(),
            )

    def _pass_fds(self) -> tuple[int, ...]:
        return ()

    def command(self) -> list[str]:
        if not self.preamble:
            return list(DAEMON)
        main = "import sys\nfrom agent.__main__ import main\nsys.exit(main(sys.argv[1:]))"
        return [sys.executable, "-c", f"{self.preamble}\n{main}"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_notify(self, line: str, timeout: float = 15.0) -> None:
        """Wait until a notify datagram holds ``line``; fails early if the daemon exits."""
        assert self._notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while line not in self.notifications:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {line} from the daemon in {timeout}s; log:\n{self.log()}")
            ready, _, _ = select.select([self._notify], [], [], min(left, 0.1))
            if ready:
                data = self._notify.recv(4096).decode()
                self.notifications.extend(data.split("\n"))
            elif self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode} before {line}; log:\n{self.log()}"
                )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit code (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        code = self.proc.returncode
        self._drain_notify()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def _drain_notify(self) -> None:
        if self._notify is None:
            return
        while select.select([self._notify], [], [], 0)[0]:
            self.notifications.extend(self._notify.recv(4096).decode().split("\n"))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- clients --------------------------------------------------------------------------

    def ctl(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        user: int | str | None = None,
        input: bytes | str | None = None,
        timeout: float = 30.0,
        socket_arg: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real agentctl (``--socket`` added), as ``user`` via setpriv when given."""
        cmd = [*AGENTCTL, *(["--socket", self.socket_path] if socket_arg else []), *args]
        if user is not None:
            cmd = [*as_user(user), *cmd]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        return subprocess.run(
            cmd,
            env=full_env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def client(self, timeout: float | None = 10.0) -> Client:
        return Client.connect(self.socket_path, timeout=timeout)

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def settled_fds(self, timeout: float = 5.0) -> int:
        """The daemon's fd count once it stops changing (closed clients are reaped async)."""
        deadline = time.monotonic() + timeout
        last, same = self.open_fds(), 0
        while same < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
            now = self.open_fds()
            same = same + 1 if now == last else 0
            last = now
        return last

    def wait_fds(self, expected: int, timeout: float = 5.0) -> int:
        """Poll until the daemon holds ``expected`` fds (or the deadline); returns the count."""
        deadline = time.monotonic() + timeout
        while (now := self.open_fds()) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return now


def as_user(user: int | str) -> list[str]:
    """argv prefix running a command as ``user`` (uid or name) with its own gid and no groups."""
    import pwd

    pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    return [
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        "--clear-groups",
    ]
