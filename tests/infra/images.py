"""The tests' base image: busybox-static with a few applet links, made with buildah from scratch
and pushed to a test registry. Nothing comes from the internet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

APPLETS = ["sh", "echo", "cat", "ls", "sleep", "wget", "true", "false", "test", "env", "id", "mkdir"]


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


def make_busybox_image(storage: Path, dest_ref: str) -> str:
    """Build the busybox base image and push it (plain HTTP) to ``dest_ref``; return its digest."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    b = buildah_cmd(storage)

    def run(*args: str) -> str:
        return subprocess.run(
            [*b, *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    ctr = run("from", "scratch")
    try:
        mnt = Path(run("mount", ctr))
        (mnt / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, mnt / "bin" / "busybox")
        for applet in APPLETS:
            (mnt / "bin" / applet).symlink_to("busybox")
        (mnt / "tmp").mkdir(mode=0o1777, exist_ok=True)
        run("config", "--env", "PATH=/bin", "--cmd", "/bin/sh", ctr)
        image = run("commit", "--rm", ctr, "busybox-test-base")
    except BaseException:
        subprocess.run([*b, "rm", ctr], capture_output=True)
        raise
    digest_file = storage / "digest"
    run("push", "--tls-verify=false", "--digestfile", str(digest_file), image, f"docker://{dest_ref}")
    return digest_file.read_text().strip()
