"""Reliability figures at full size: the control-plane soak and the mixed-build load.

1. Soak: 100 clients x 1,000 requests each (ping, info, status, list, logs, followed log streams;
   tests/reliability/soak.py) against one real daemon: requests/s, p50/p99/max latency, errors.
2. Load: tests/reliability/test_load.py at RELIABILITY_SCALE=full (200 mixed builds from 50
   clients against 2 slots and 6 queue places, BuildKit stand-ins): its printed summary.

Writes its section of docs/performance.md between ``<!-- bench:reliability -->`` markers.

    .venv/bin/python bench/reliability.py [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import write_section  # noqa: E402
from tests.infra.builds import build_sections, write_context  # noqa: E402
from tests.infra.daemon import DaemonProcess  # noqa: E402
from tests.infra.images import make_busybox_image  # noqa: E402
from tests.infra.registry import start_registry  # noqa: E402
from tests.reliability._support import run_build, settled_rss_kb  # noqa: E402
from tests.reliability.soak import run_soak  # noqa: E402
from tests.standins import install  # noqa: E402

START, END = "<!-- bench:reliability -->", "<!-- /bench:reliability -->"


def soak(clients: int, requests: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-rel-", dir="/tmp"))
    reg = start_registry(tmp / "registry")
    try:
        base = f"{reg.host}/busybox:latest"
        make_busybox_image(tmp / "buildah", base)
        standins = install(tmp / "bin")
        sections = build_sections([reg], {"build": {"toolchain": "buildkit"}})
        d = DaemonProcess(tmp / "d", sections, env=standins.env()).start(timeout=30)
        try:
            ctx = write_context(tmp / "ctx", {"Dockerfile": f"FROM {base}\nRUN true\n"})
            built = run_build(d.socket_path, ctx, {"target_ref": f"{reg.host}/soak:1"})
            assert built.state == "succeeded", built
            log = Path(d.sections["daemon"]["state_dir"]) / "builds" / f"{built.id}.log"
            size = len(log.read_text())
            run_soak(d.socket_path, 4, 100, built.id, size)  # warm-up
            rss0 = settled_rss_kb(d.pid)
            fds0 = d.settled_fds()
            result = run_soak(d.socket_path, clients, requests, built.id, size)
            out = result.summary()
            out["rss_before_kib"], out["rss_after_kib"] = rss0, settled_rss_kb(d.pid)
            out["fds_before"], out["fds_after"] = fds0, d.settled_fds()
            if result.errors:
                print("soak errors:", result.errors[:5], file=sys.stderr)
            return out
        finally:
            d.stop()
            d.cleanup()
    finally:
        reg.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def load(scale: str) -> str:
    env = {**os.environ, "RELIABILITY_SCALE": scale}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "tests/reliability/test_load.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    found = re.findall(r"^load \((\w+)\): (.*)$", r.stdout, re.MULTILINE)
    if r.returncode != 0 or not found:
        return f"the load test failed (exit {r.returncode}); see `pytest tests/reliability`"
    return "<br>".join(f"{toolchain}: {line}" for toolchain, line in found)


def render(clients: int, requests: int, s: dict[str, float], load_line: str, size: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    la = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    met = "met" if s["errors"] == 0 else "NOT met"
    return "\n".join(
        [
            START,
            f"## Reliability at {size} size (`bench/reliability.py`)",
            "",
            f"Measured {now}, {os.cpu_count()} CPUs, load average before {la}. One daemon, sandbox "
            "off, BuildKit stand-ins; the clients run on the same machine.",
            "",
            "| measure | value | reference |",
            "| --- | --- | --- |",
            f"| soak: clients x requests | {clients} x {requests} = {s['requests']:,.0f} "
            f"(+{s['events']:,.0f} stream events) | issue 6: 100 x 1,000 |",
            f"| soak: errors | {s['errors']:.0f} | 0 ({met}) |",
            f"| soak: requests/s | {s['rps']:,.0f} | |",
            f"| soak: latency p50 / p99 / max | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} / "
            f"{s['max_ms']:.1f} ms | reported (issue 6 sets no target) |",
            f"| soak: daemon RSS before / after | {s['rss_before_kib'] / 1024:.1f} / "
            f"{s['rss_after_kib'] / 1024:.1f} MiB | back to baseline |",
            f"| soak: daemon fds before / after | {s['fds_before']:.0f} / {s['fds_after']:.0f} "
            "| equal |",
            f"| load (`tests/reliability/test_load.py`, {size} size) | {load_line} | every build "
            "final, none lost, fds back to baseline, RSS within 12 MiB |",
            "",
            "Latency is per request from write to final frame, with every client keeping one "
            "request in flight (so 100 clients queue behind each other on one event loop), and "
            f"the clients sharing the {os.cpu_count()} CPUs with the daemon.",
            END,
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="20 x 200 and the small load (a smoke run)"
    )
    ap.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    opts = ap.parse_args()
    clients, requests = (20, 200) if opts.quick else (100, 1000)
    s = soak(clients, requests)
    size = "small" if opts.quick else "full"
    section = render(clients, requests, s, load(size), size)
    print(section)
    if not opts.no_write:
        write_section(section)
    return 0 if s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
