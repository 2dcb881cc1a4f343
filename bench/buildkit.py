"""BuildKit benchmark: the real daemon with ``toolchain = "buildkit"`` and the real buildkitd,
buildctl and crane (one BuildKit version per ``--buildkit DIR``, DIR holding buildkitd and
buildctl; crane from ``--crane``), real agentctl, docker-registry; sandbox off, as by hand.

Measures, per version:
  1. whole-process ``agentctl build`` of an already-built target (both cache hits), goal
     <= 100 ms;
  2. a warm forced build through the agent (``agentctl build --force``: buildctl ``--no-cache``
     through the proxy, crane copy through the proxy, the checks) beside the same ``buildctl
     build --no-cache`` + ``crane copy`` run by hand straight to the registry against a
     buildkitd of the same version, goal ratio <= 1.10;
  3. the fleet cache (``build.cache_repo``): node A builds a Dockerfile with a slow RUN (3 s),
     node B builds it plus one line, with A's cache and, on a third node, without one.

Writes its section of docs/performance.md between ``<!-- bench:buildkit -->`` markers.

    .venv/bin/python bench/buildkit.py --buildkit /path/v0.11.6 --buildkit /path/v0.24.0 \\
        --crane /path/crane [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.devmode import make_busybox_image  # noqa: E402
from bench._common import machine, write_section  # noqa: E402
from bench.build import agentctl  # noqa: E402
from tests.infra.builds import build_sections, write_context  # noqa: E402
from tests.infra.daemon import AGENTCTL, DaemonProcess  # noqa: E402
from tests.infra.registry import Registry, start_registry  # noqa: E402

MARK_BEGIN = "<!-- bench:buildkit -->"
MARK_END = "<!-- /bench:buildkit -->"


def context(root: Path, base: str, extra: str = "", layer_mib: int = 0) -> Path:
    """busybox + COPY + RUN (+ ``extra`` lines); with ``layer_mib`` the RUN also writes that many
    MiB of random bytes (a layer that neither compresses nor exists anywhere yet)."""
    blob = (
        f" && dd if=/dev/urandom of=/blob bs=1048576 count={layer_mib} 2>/dev/null"
        if layer_mib
        else ""
    )
    return write_context(
        root / uuid.uuid4().hex[:12],
        {
            "Dockerfile": f"FROM {base}\nCOPY hello.txt /hello.txt\n"
            f"RUN echo built-$(cat /hello.txt) > /out.txt{blob}\n{extra}",
            "hello.txt": uuid.uuid4().hex,
        },
    )


def version_of(bkdir: Path) -> str:
    """The version a build directory holds, from its name (``.../buildkit-v0.11.6``) or
    ``buildctl --version``."""
    for part in reversed(bkdir.parts):
        if "v0." in part:
            return part[part.index("v0.") :]
    out = subprocess.run([str(bkdir / "buildctl"), "--version"], capture_output=True, text=True)
    return out.stdout.split()[2] if out.stdout.count(" ") >= 2 else "unknown"


@contextlib.contextmanager
def own_buildkitd(tmp: Path, bkdir: Path, reg: Registry) -> Iterator[str]:
    """A buildkitd of that version as a person would run it, the registry marked plain HTTP."""
    run = tmp / "hand-bk"
    run.mkdir()
    conf = run / "buildkitd.toml"
    conf.write_text(f'[registry."{reg.host}"]\n  http = true\n')
    addr = f"unix://{run}/bk.sock"
    log = (run / "log").open("wb")
    proc = subprocess.Popen(
        [str(bkdir / "buildkitd"), "--config", str(conf), "--root", str(run / "root"),
         "--addr", addr, "--oci-worker-net", "host"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = subprocess.run(
                [str(bkdir / "buildctl"), "--addr", addr, "debug", "workers"], capture_output=True
            )
            if ok.returncode == 0:
                break
            time.sleep(0.1)  # a bounded poll: buildkitd is starting
        yield addr
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        subprocess.run(["umount", "-R", "-l", str(run / "root")], capture_output=True)
        shutil.rmtree(run, ignore_errors=True)


def by_hand(
    tmp: Path, bkdir: Path, crane: str, addr: str, ctx: Path, reg: Registry, tag: str
) -> float:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "DOCKER_CONFIG": str(tmp / "empty")}
    (tmp / "empty").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for argv in (
        [str(bkdir / "buildctl"), "--addr", addr, "build", "--frontend", "dockerfile.v0",
         "--local", f"context={ctx}", "--local", f"dockerfile={ctx}", "--no-cache",
         "--output", f"type=image,name={reg.host}/bench-hand-base:{tag},push=true",
         "--progress=plain"],
        [crane, "copy", f"{reg.host}/bench-hand-base:{tag}", f"{reg.host}/bench-hand:{tag}",
         "--insecure"],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, env=env, timeout=600)
    return time.perf_counter() - t0


def daemon(tmp: Path, reg: Registry, env: dict[str, str], **build: Any) -> DaemonProcess:
    sections = build_sections([reg], {"build": {"toolchain": "buildkit", **build}})
    return DaemonProcess(tmp, sections, env=env).start(timeout=60)


def one_version(
    tmp: Path, bkdir: Path, crane: str, reg: Registry, base: str, n_cached: int, n_vs: int
) -> dict[str, Any]:
    env = {
        "AGENT_BUILDKITD": str(bkdir / "buildkitd"),
        "AGENT_BUILDCTL": str(bkdir / "buildctl"),
        "AGENT_CRANE": crane,
    }
    out: dict[str, Any] = {"version": version_of(bkdir)}
    d = daemon(tmp / "d", reg, env)
    try:
        ctx = context(tmp, base)
        args = ["build", "--context", str(ctx), "--target-repo", f"{reg.host}/bench-bk-cached"]
        agentctl(d, *args)
        times = sorted(agentctl(d, *args) for _ in range(n_cached))
        out["cached_p50_ms"] = statistics.median(times) * 1000
        out["cached_p90_ms"] = times[int(0.9 * (len(times) - 1))] * 1000
        with own_buildkitd(tmp, bkdir, reg) as addr:
            # Warm both: the FROM image's layers in each buildkitd.
            by_hand(tmp, bkdir, crane, addr, context(tmp, base), reg, "warm")
            agentctl(d, "build", "--context", str(context(tmp, base)), "--target",
                     f"{reg.host}/bench-bk-agent:warm")  # fmt: skip
            for mib in (0, 64):
                agent_t, hand_t = [], []
                for i in range(n_vs):
                    agent_t.append(
                        agentctl(d, "build", "--force", "--context",
                                 str(context(tmp, base, layer_mib=mib)),
                                 "--target", f"{reg.host}/bench-bk-agent-{mib}:{i}")
                    )  # fmt: skip
                    hand_ctx = context(tmp, base, layer_mib=mib)
                    hand_t.append(by_hand(tmp, bkdir, crane, addr, hand_ctx, reg, f"{mib}-{i}"))
                a, h = statistics.median(agent_t), statistics.median(hand_t)
                out[f"vs_{mib}"] = {"agent_s": a, "hand_s": h, "ratio": a / h}
        assert d.stop() == 0, d.log()[-2000:]
    finally:
        d.cleanup()
    out.update(fleet(tmp, reg, env, base))
    return out


def fleet(tmp: Path, reg: Registry, env: dict[str, str], base: str) -> dict[str, float]:
    mark = uuid.uuid4().hex[:12]
    slow = f"RUN echo slow-{mark} && sleep 3 && echo {mark} > /slow.txt\n"
    repo = f"{reg.host}/bench-fleet-{mark}"
    cache = f"{reg.host}/bench-fleet-cache-{mark}"
    a_ctx = context(tmp, base, slow)
    b_ctx = context(tmp, base, slow + "RUN echo after > /after.txt\n")
    (b_ctx / "hello.txt").write_text((a_ctx / "hello.txt").read_text())
    times: dict[str, float] = {}
    for name, cache_repo, ctx in (
        ("a_s", cache, a_ctx),
        ("b_with_cache_s", cache, b_ctx),
        ("b_without_cache_s", "", b_ctx),
    ):
        # Each node its own base_repo: B's base image must really be built, not found.
        own_base = f"{reg.host}/bench-fleet-base-{name}-{mark}"
        d = daemon(tmp / f"node-{name}", reg, env, cache_repo=cache_repo, base_repo=own_base)
        try:
            r = subprocess.run(
                [*AGENTCTL, "--socket", d.socket_path, "--json", "build", "--context", str(ctx),
                 "--target-repo", repo if name != "b_without_cache_s" else repo + "-nc"],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                timeout=600,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            timings = json.loads(r.stdout)["timings"]
            times[name] = float(timings.get("base_build", 0.0))
            assert d.stop() == 0, d.log()[-2000:]
        finally:
            d.cleanup()
    return times


def render(results: list[dict[str, Any]], machine_line: str) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = [
        MARK_BEGIN,
        "## BuildKit toolchain (bench/buildkit.py)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line}. Real buildkitd/buildctl "
        "of each version and crane v0.20.2, docker-registry on loopback, sandbox off.",
        "",
        "| measure | " + " | ".join(r["version"] for r in results) + " | goal |",
        "| --- | " + " | ".join("---" for _ in results) + " | --- |",
        "| cached `agentctl build`, p50 / p90 | "
        + " | ".join(f"{r['cached_p50_ms']:.0f} / {r['cached_p90_ms']:.0f} ms" for r in results)
        + " | p50 <= 100 ms ("
        + ", ".join(met(r["cached_p50_ms"] <= 100) for r in results)
        + ") |",
        *(
            f"| warm forced build{label}, agent / by hand | "
            + " | ".join(
                f"{r[key]['agent_s']:.2f} / {r[key]['hand_s']:.2f} s = **{r[key]['ratio']:.3f}**"
                for r in results
            )
            + " | <= 1.10 ("
            + ", ".join(met(r[key]["ratio"] <= 1.10) for r in results)
            + ") |"
            for key, label in (("vs_0", " (few KiB)"), ("vs_64", " (64 MiB layer)"))
        ),
        "| fleet cache: node A's base build (slow RUN: 3 s) | "
        + " | ".join(f"{r['a_s']:.2f} s" for r in results)
        + " | - |",
        "| node B (A's Dockerfile + 1 line) with A's cache / without | "
        + " | ".join(
            f"{r['b_with_cache_s']:.2f} / {r['b_without_cache_s']:.2f} s" for r in results
        )
        + " | B skips the slow RUN |",
        "",
        "The forced build is `agentctl build --force` (buildctl `--no-cache` through the proxy,",
        "then crane copy through the proxy, the manifest checks, records) against `buildctl",
        "build --no-cache` + `crane copy` straight to the registry on a buildkitd of the same",
        "version.",
        "The fleet figures are the `base_build` phase of each build's record; node B without a",
        "cache is a third daemon with `build.cache_repo` unset.",
        MARK_END,
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--buildkit",
        action="append",
        required=True,
        type=Path,
        help="a directory holding buildkitd and buildctl (repeat per version)",
    )
    ap.add_argument("--crane", required=True, help="the crane binary")
    ap.add_argument("--quick", action="store_true", help="small sample sizes (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    opts = ap.parse_args()
    n_cached, n_vs = (5, 2) if opts.quick else (20, 7)
    machine_line = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-bk-", dir="/tmp") as tmp_s:
        tmp = Path(tmp_s)
        reg = start_registry(tmp / "registry")
        try:
            base = f"{reg.host}/busybox:latest"
            make_busybox_image(tmp / "base", base)
            for bkdir in opts.buildkit:
                work = tmp / bkdir.name
                work.mkdir()
                r = one_version(work, bkdir, opts.crane, reg, base, n_cached, n_vs)
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            reg.stop()
    text = render(results, machine_line)
    if opts.no_write:
        print(text)
    else:
        print(f"wrote {write_section(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
