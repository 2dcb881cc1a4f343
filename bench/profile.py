"""Profile the daemon's two per-request hot paths with py-spy (sampling, from outside the process).

1. control: the soak mix (tests/reliability/soak.py) from 50 clients;
2. proxy: HEAD of a manifest through the host listener (static pull route to a real registry),
   from 20 concurrent aiohttp clients.

For each, py-spy samples the daemon for ``--seconds`` and this prints the functions with the most
samples in total (inclusive) and on top of the stack (own time), grouped by module.

Writes its section of docs/performance.md between ``<!-- bench:profile -->`` markers.

    .venv/bin/python bench/profile.py [--seconds N] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import write_section  # noqa: E402
from tests.infra.builds import build_sections, write_context  # noqa: E402
from tests.infra.daemon import DaemonProcess  # noqa: E402
from tests.infra.images import make_busybox_image  # noqa: E402
from tests.infra.registry import start_registry  # noqa: E402
from tests.reliability._support import run_build  # noqa: E402
from tests.reliability.soak import run_soak  # noqa: E402
from tests.standins import install  # noqa: E402

START, END = "<!-- bench:profile -->", "<!-- /bench:profile -->"
PYSPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYSPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "500",
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _frame(f: str) -> str:
    # py-spy raw frames: "function (path/to/module.py:line)"
    name, _, where = f.rpartition(" (")
    path = where.split(":")[0]
    for marker in ("/site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{name}"


# Frames under every sample (the interpreter's entry, the loop's run): no news in "inclusive".
_WRAPPERS = ("<frozen runpy>", "agent/__main__.py", "asyncio/runners.py", "uvloop/__init__.py",
             "agent/daemon.py:run")  # fmt: skip


def top(raw: Path, n: int = 12) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            if not f.startswith(_WRAPPERS):
                incl[f] += c
    return total, own.most_common(n), incl.most_common(n)


async def _heads(url: str, clients: int, deadline: float, auth: str) -> int:
    import aiohttp

    done = 0
    async with aiohttp.ClientSession() as s:

        async def one() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with s.head(url, headers={"Accept": "*/*", "Authorization": auth}) as r:
                    await r.read()
                done += 1

        await asyncio.gather(*(one() for _ in range(clients)))
    return done


def profile(
    seconds: float,
) -> dict[str, tuple[int, int, list[tuple[str, int]], list[tuple[str, int]]]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-prof-", dir="/tmp"))
    reg = start_registry(tmp / "registry")
    results = {}
    try:
        base = f"{reg.host}/busybox:latest"
        make_busybox_image(tmp / "buildah", base)
        standins = install(tmp / "bin")
        sections = build_sections([reg], {"build": {"toolchain": "buildkit"}})
        sections["proxy"] = {
            **sections["proxy"],
            "routes": [{"name": "ws", "upstream": f"{reg.host}/team", "access": "pull"}],
        }
        sections["daemon"] = {"log_level": "warning"}
        d = DaemonProcess(tmp / "d", sections, env=standins.env()).start(timeout=30)
        try:
            ctx = write_context(tmp / "ctx", {"Dockerfile": f"FROM {base}\nRUN true\n"})
            built = run_build(d.socket_path, ctx, {"target_ref": f"{reg.host}/team/prof:1"})
            assert built.state == "succeeded", built
            size = len((Path(d.sections["daemon"]["state_dir"]) / "builds" / f"{built.id}.log")
                       .read_text())  # fmt: skip
            # control
            out = tmp / "control.raw"
            spy = record(d.pid, seconds, out)
            time.sleep(0.5)  # py-spy attaches
            reqs = 0
            t_end = time.monotonic() + seconds - 1
            while time.monotonic() < t_end:
                reqs += run_soak(d.socket_path, 50, 100, built.id, size).requests
            spy.wait()
            results["control"] = (reqs, *top(out))
            # proxy
            port = d.sections["proxy"]["host_address"].rsplit(":", 1)[1]
            url = f"http://127.0.0.1:{port}/v2/ws/prof/manifests/1"
            # The host listener's token, made by the daemon in its runtime directory.
            token = (Path(d.sections["daemon"]["runtime_dir"]) / "proxy-host.token").read_text()
            auth = "Basic " + base64.b64encode(f"op:{token.strip()}".encode()).decode()
            out = tmp / "proxy.raw"
            spy = record(d.pid, seconds, out)
            time.sleep(0.5)
            holder: list[int] = []
            th = threading.Thread(
                target=lambda: holder.append(
                    asyncio.run(_heads(url, 20, time.monotonic() + seconds - 1, auth))
                )
            )
            th.start()
            th.join()
            spy.wait()
            results["proxy"] = (holder[0] if holder else 0, *top(out))
        finally:
            d.stop()
            d.cleanup()
    finally:
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def render(
    seconds: float, res: dict[str, tuple[int, int, list[tuple[str, int]], list[tuple[str, int]]]]
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        START,
        "## Profile (`bench/profile.py`)",
        "",
        f"Sampled {now} with py-spy (500 Hz, {seconds:g} s per path, from outside the daemon).",
        "",
    ]
    for path, (reqs, total, own, incl) in res.items():
        lines += [
            f"### {path} path ({reqs:,} requests during the sample, {total:,} samples)",
            "",
            "| own time (top of stack) | share | | inclusive | share |",
            "| --- | ---: | --- | --- | ---: |",
        ]
        for (o, oc), (i, ic) in zip(own, incl, strict=False):
            share_o, share_i = 100 * oc / max(total, 1), 100 * ic / max(total, 1)
            lines.append(f"| `{o}` | {share_o:.1f}% | | `{i}` | {share_i:.1f}% |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--no-write", action="store_true")
    opts = ap.parse_args()
    section = render(opts.seconds, profile(opts.seconds))
    print(section)
    if not opts.no_write:
        write_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
