"""Development mode (``build-agent dev``): the whole product on one machine with no config.

It starts a local ``docker-registry`` as the upstream (temporary storage), makes the busybox base
image in it (:func:`make_busybox_image`, shared with the tests), writes a config with temporary
state and runtime dirs, and starts the daemon with it. ``--demo`` then builds ``examples/`` twice
with the real ``agentctl`` (the second build is a cache hit) and stops everything; without it the
daemon serves until Ctrl-C and prints how to point ``agentctl`` at it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

BUSYBOX_APPLETS = [
    "sh", "echo", "cat", "ls", "sleep", "wget", "true", "false", "test", "env", "id", "mkdir",
]  # fmt: skip
REPO = Path(__file__).resolve().parent.parent


def buildah_cmd(storage: Path) -> list[str]:
    return [
        "buildah",
        "--root",
        str(storage / "root"),
        "--runroot",
        str(storage / "run"),
        "--storage-driver",
        "vfs",
    ]


def make_busybox_image(
    storage: Path,
    dest_ref: str,
    *,
    files: Mapping[str, str] | None = None,
    creds: str | None = None,
) -> str:
    """Make a busybox-static image from scratch with buildah and push it (plain HTTP) to
    ``dest_ref``; return its digest. Nothing comes from the internet. ``files`` (path in the
    image -> text) are added to it; ``creds`` (``user:password``) log the push in."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    b = buildah_cmd(storage)
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}

    def run(*args: str) -> str:
        return subprocess.run(
            [*b, *args], check=True, capture_output=True, text=True, env=env
        ).stdout.strip()

    ctr = run("from", "scratch")
    try:
        mnt = Path(run("mount", ctr))
        (mnt / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, mnt / "bin" / "busybox")
        for applet in BUSYBOX_APPLETS:
            (mnt / "bin" / applet).symlink_to("busybox")
        (mnt / "tmp").mkdir(mode=0o1777, exist_ok=True)
        (mnt / "etc").mkdir(exist_ok=True)
        for path, text in (files or {}).items():
            (mnt / path.lstrip("/")).write_text(text)
        run("config", "--env", "PATH=/bin", "--cmd", "/bin/sh", ctr)
        image = run("commit", "--rm", ctr, f"busybox-test-base-{uuid.uuid4().hex[:8]}")
    except BaseException:
        subprocess.run([*b, "rm", ctr], capture_output=True)
        raise
    digest_file = storage / f"digest-{uuid.uuid4().hex[:8]}"
    login = ["--creds", creds] if creds else []
    run("push", "--tls-verify=false", *login, "--digestfile", str(digest_file), image,
        f"docker://{dest_ref}")  # fmt: skip
    run("rmi", image)
    return digest_file.read_text().strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: object, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready in 30s:\n{_tail(log)}")


def _tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def local_registry(root: Path) -> Iterator[str]:
    """A plain-HTTP docker-registry on a free loopback port; yields ``127.0.0.1:<port>``."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "config.yml"
    cfg.write_text(
        "version: 0.1\nlog: {level: warn}\nstorage:\n"
        f"  filesystem: {{rootdirectory: {root / 'data'}}}\n  delete: {{enabled: true}}\n"
        f"http: {{addr: 127.0.0.1:{port}, secret: dev-mode}}\n"
    )
    log = root / "registry.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, "serve", str(cfg)], stdout=out, stderr=out, start_new_session=True
        )

    def up() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            return True
        except (OSError, urllib.error.URLError):
            return False

    try:
        _wait(up, proc, "docker-registry", log)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)


def dev_config(tmp: Path, registry: str) -> str:
    # The sandbox needs root (namespaces, nftables); without it the demo still builds, and the
    # daemon says loudly that children run unsandboxed.
    sandbox = (
        f'mode = "on"\nnetns = "ba-dev-{os.getpid()}"' if os.geteuid() == 0 else 'mode = "off"'
    )
    return f"""# build-agent development mode (generated; temporary)
[daemon]
socket = "{tmp / "agent.sock"}"
socket_group = ""
state_dir = "{tmp / "state"}"
runtime_dir = "{tmp / "run"}"
metrics_address = "127.0.0.1:{free_port()}"
shutdown_grace = 5.0

[build]
base_repo = "{registry}/base"
docker_config = "{tmp / "docker-config.json"}"

[proxy]
port = {free_port()}
host_address = "127.0.0.1:{free_port()}"

[[proxy.registries]]
host = "{registry}"
http = true

[sandbox]
{sandbox}
"""


@contextlib.contextmanager
def dev_daemon(tmp: Path, registry: str) -> Iterator[str]:
    """The daemon with the development config; yields its socket path."""
    conf = tmp / "config.toml"
    conf.write_text(dev_config(tmp, registry))
    sock = str(tmp / "agent.sock")
    log = tmp / "daemon.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env["PYTHONPATH"] = str(REPO)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--dev", "--config", str(conf)],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )

    def up() -> bool:
        from ctl.client import Client, ClientError

        try:
            with Client.connect(sock, timeout=2) as c:
                c.call("ping")
            return True
        except ClientError:
            return False

    try:
        _wait(up, proc, "build-agent", log)
        yield sock
    finally:
        _stop(proc)


def _agentctl(sock: str, *args: str) -> int:
    cmd = [sys.executable, "-m", "ctl", "--socket", sock, *args]
    print("$ agentctl " + " ".join(args), flush=True)
    return subprocess.call(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})


def main(*, demo: bool, keep: bool = False) -> int:
    """``build-agent dev [--demo]``."""
    for tool in ("docker-registry", "buildah", "skopeo", "busybox"):
        if shutil.which(tool) is None and not os.path.exists(f"/bin/{tool}"):
            print(f"build-agent dev: {tool} is missing; run dev/install.sh", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="build-agent-dev-", dir="/tmp"))
    try:
        with local_registry(tmp / "registry") as registry:
            base = f"{registry}/busybox:latest"
            print(f"* upstream registry: docker-registry on {registry} (temporary)", flush=True)
            digest = make_busybox_image(tmp / "base-storage", base)
            print(f"* base image: {base}@{digest}", flush=True)
            with dev_daemon(tmp, registry) as sock:
                sandboxed = "children sandboxed" if os.geteuid() == 0 else "NO sandbox (not root)"
                print(
                    f"* daemon: development mode ({sandboxed}), socket {sock}, state in {tmp}",
                    flush=True,
                )
                if not demo:
                    print(f"  export AGENT_SOCKET={sock}; agentctl info   (Ctrl-C stops)")
                    with contextlib.suppress(KeyboardInterrupt):
                        signal.pause()
                    return 0
                args = [
                    "build",
                    "--context",
                    str(REPO / "examples"),
                    "--build-arg",
                    f"BASE_IMAGE={base}",
                    "--target-repo",
                    f"{registry}/workspace",
                    "--label",
                    "origin=dev-demo",
                ]
                print("* first build (builds the base image, copies it to the workspace repo)")
                if _agentctl(sock, *args) != 0:
                    print(_tail(tmp / "daemon.log"), file=sys.stderr)
                    return 1
                print("* second build of the same context: a cache hit")
                if _agentctl(sock, *args) != 0:
                    return 1
                _agentctl(sock, "ls")
                _agentctl(sock, "info")
        print("* stopped the daemon and the registry")
        return 0
    finally:
        if keep:
            print(f"* kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["buildah_cmd", "local_registry", "main", "make_busybox_image"]
