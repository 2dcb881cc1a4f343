"""Storage and limits benchmark: builds FROM a big image, disk per toolchain, the cgroup's cost.

The FROM image is made here: busybox plus 6 layers of 64 MiB of random bytes (384 MiB that
neither compress nor exist anywhere yet), pushed to a local docker-registry. The Dockerfile is
that FROM and one RUN step with a fresh line each time (so no build is a cache hit).

Measures
  1. buildah, cold (an empty local store: a new daemon, a new store by hand) and warm (the FROM
     image already in the store): ``agentctl build --force`` through the agent beside the same
     ``buildah bud`` + ``buildah push`` + ``skopeo copy`` run by hand on the same storage driver,
     goal <= 1.10 each; the by-hand figures on vfs too, as a reference;
  2. the same for each BuildKit given with ``--buildkit DIR`` (``buildctl build`` + ``crane
     copy`` by hand against a buildkitd of its own, as bench/buildkit.py);
  3. the disk the local store holds after the builds, per toolchain and driver;
  4. the per-build cgroup: create + limits + remove, and the cost the join wrapper adds to
     each child's start.

Writes its section of docs/performance.md between ``<!-- bench:storage -->`` markers.

    .venv/bin/python bench/storage.py [--n N] [--buildkit DIR ...] [--crane PATH] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.build.buildah import registries_conf  # noqa: E402
from agent.build.storage import measure, overlay_works  # noqa: E402
from agent.devmode import buildah_cmd, make_busybox_image  # noqa: E402
from agent.limits import format_bytes  # noqa: E402
from agent.sandbox import create_cgroup, detect_cgroups, release_cgroups  # noqa: E402
from bench._common import machine, publish  # noqa: E402
from bench.build import agentctl  # noqa: E402
from bench.buildkit import by_hand as buildkit_by_hand  # noqa: E402
from bench.buildkit import own_buildkitd, version_of  # noqa: E402
from tests.infra.builds import build_sections, write_context  # noqa: E402
from tests.infra.daemon import DaemonProcess  # noqa: E402
from tests.infra.registry import Registry, start_registry  # noqa: E402

MARK_BEGIN = "<!-- bench:storage -->"
MARK_END = "<!-- /bench:storage -->"
LAYERS, LAYER_MIB = 6, 64


def big_image(tmp: Path, reg: Registry) -> str:
    """busybox + LAYERS layers of LAYER_MIB MiB of random bytes, pushed to ``reg``."""
    ref = f"{reg.host}/bench-big:{uuid.uuid4().hex[:8]}"
    store = tmp / "big-store"
    b = buildah_cmd(store)
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot"}
    make_busybox_image(store, f"{reg.host}/bench-big-base:1")
    image = f"docker://{reg.host}/bench-big-base:1"  # pulled back once, then local
    for i in range(LAYERS):
        ctr = subprocess.run([*b, "from", "--tls-verify=false", image], check=True,
                             capture_output=True, text=True, env=env).stdout.strip()  # fmt: skip
        blob = tmp / f"layer{i}"
        with blob.open("wb") as f:
            for _ in range(LAYER_MIB):
                f.write(os.urandom(1024 * 1024))
        subprocess.run([*b, "copy", ctr, str(blob), f"/layer{i}"], check=True, env=env,
                       capture_output=True)  # fmt: skip
        local = f"localhost/bench-big:{i}"
        subprocess.run([*b, "commit", "-q", ctr, local], check=True, env=env, capture_output=True)
        image = f"containers-storage:{local}"
        subprocess.run([*b, "rm", ctr], check=True, env=env, capture_output=True)
        blob.unlink()
    subprocess.run([*b, "push", "--tls-verify=false", local, f"docker://{ref}"], check=True,
                   env=env, capture_output=True)  # fmt: skip
    shutil.rmtree(store, ignore_errors=True)
    return ref


def context(tmp: Path, base: str) -> Path:
    mark = uuid.uuid4().hex
    return write_context(
        tmp / "ctx" / mark[:12], {"Dockerfile": f"FROM {base}\nRUN echo {mark} > /built.txt\n"}
    )


def buildah_by_hand(store: Path, driver: str, ctx: Path, reg: Registry) -> float:
    """What the buildah toolchain runs (agent/build/buildah.py), straight to the registry."""
    conf = store / "registries.conf"
    store.mkdir(parents=True, exist_ok=True)
    conf.write_text(registries_conf("", [], [reg.host]))
    b = ["buildah", "--root", str(store / "root"), "--runroot", str(store / "run"),
         "--storage-driver", driver, "--registries-conf", str(conf)]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "HOME": str(store), "BUILDAH_ISOLATION": "oci"}
    iso = ["--isolation", "oci", "--runtime", shutil.which("runc") or "runc", "--network", "host"]
    image, tag = f"localhost/bench/{uuid.uuid4().hex[:12]}", uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    for argv in (
        [*b, "bud", *iso, "--pull=true", "--format", "oci", "-f", str(ctx / "Dockerfile"),
         "-t", image, str(ctx)],
        [*b, "push", "--tls-verify=false", "--retry", "0", image,
         f"docker://{reg.host}/bench-hand-base:{tag}"],
        ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times",
         "0", f"docker://{reg.host}/bench-hand-base:{tag}", f"docker://{reg.host}/bench-hand:{tag}"],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, env=env, timeout=900)
    took = time.perf_counter() - t0
    subprocess.run([*b, "rmi", "-f", image], capture_output=True, env=env)
    return took


def _ratio(agent: list[float], hand: list[float]) -> dict[str, float]:
    a, h = statistics.median(agent), statistics.median(hand)
    print(f"  agent {agent} by hand {hand}", file=sys.stderr, flush=True)  # progress
    return {"agent_s": a, "hand_s": h, "ratio": a / h}


def buildah_rounds(tmp: Path, reg: Registry, base: str, n: int, driver: str) -> dict[str, Any]:
    cold_a, cold_h, warm_a, warm_h = [], [], [], []
    disk_a = disk_h = 0
    for i in range(n):
        sections = build_sections([reg], {"build": {"buildah_driver": driver}})
        d = DaemonProcess(tmp / f"d-{driver}-{i}", sections).start(timeout=60)
        hand = tmp / f"hand-{driver}-{i}"
        try:
            target = f"{reg.host}/bench-storage-{driver}"
            cold_a.append(agentctl(d, "build", "--force", "--context", str(context(tmp, base)),
                                   "--target", f"{target}:cold{i}"))  # fmt: skip
            cold_h.append(buildah_by_hand(hand, driver, context(tmp, base), reg))
            warm_a.append(agentctl(d, "build", "--force", "--context", str(context(tmp, base)),
                                   "--target", f"{target}:warm{i}"))  # fmt: skip
            warm_h.append(buildah_by_hand(hand, driver, context(tmp, base), reg))
            time.sleep(1.0)  # the agent removes its built images once no build runs
            state = Path(d.sections["daemon"]["state_dir"])
            disk_a = measure((state / "buildah" / "storage",))
            disk_h = measure((hand / "root",))
        finally:
            d.stop()
            d.cleanup()
            subprocess.run(["umount", "-R", "-l", str(hand / "root" / "overlay")],
                           capture_output=True)  # fmt: skip
            shutil.rmtree(hand, ignore_errors=True)
    return {
        "driver": driver,
        "cold": _ratio(cold_a, cold_h),
        "warm": _ratio(warm_a, warm_h),
        "disk_agent": disk_a,
        "disk_hand": disk_h,
    }


def vfs_by_hand(tmp: Path, reg: Registry, base: str, n: int) -> dict[str, float]:
    cold, warm = [], []
    disk = 0
    for i in range(n):
        hand = tmp / f"vfs-ref-{i}"
        cold.append(buildah_by_hand(hand, "vfs", context(tmp, base), reg))
        warm.append(buildah_by_hand(hand, "vfs", context(tmp, base), reg))
        disk = measure((hand / "root",))
        shutil.rmtree(hand, ignore_errors=True)
    return {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm), "disk": disk}


def buildkit_rounds(
    tmp: Path, bkdir: Path, crane: str, reg: Registry, base: str, n: int
) -> dict[str, Any]:
    env = {"AGENT_BUILDKITD": str(bkdir / "buildkitd"), "AGENT_BUILDCTL": str(bkdir / "buildctl"),
           "AGENT_CRANE": crane}  # fmt: skip
    version = version_of(bkdir)
    cold_a, cold_h, warm_a, warm_h = [], [], [], []
    disk = 0
    for i in range(n):
        sections = build_sections([reg], {"build": {"toolchain": "buildkit"}})
        d = DaemonProcess(tmp / f"bk-{version}-{i}", sections, env=env).start(timeout=60)
        try:
            target = f"{reg.host}/bench-storage-bk"
            cold_a.append(agentctl(d, "build", "--force", "--context", str(context(tmp, base)),
                                   "--target", f"{target}:cold{i}"))  # fmt: skip
            warm_a.append(agentctl(d, "build", "--force", "--context", str(context(tmp, base)),
                                   "--target", f"{target}:warm{i}"))  # fmt: skip
            disk = measure((Path(d.sections["daemon"]["state_dir"]) / "buildkit",))
        finally:
            d.stop()
            d.cleanup()
        hand_root = tmp / f"hand-bk-{version}-{i}"  # a fresh buildkitd root: cold
        hand_root.mkdir()
        with own_buildkitd(hand_root, bkdir, reg) as addr:
            cold_h.append(buildkit_by_hand(tmp, bkdir, crane, addr, context(tmp, base), reg,
                                           f"c{i}"))  # fmt: skip
            warm_h.append(buildkit_by_hand(tmp, bkdir, crane, addr, context(tmp, base), reg,
                                           f"w{i}"))  # fmt: skip
    return {"version": version, "cold": _ratio(cold_a, cold_h), "warm": _ratio(warm_a, warm_h),
            "disk_agent": disk}  # fmt: skip


def cgroup_cost(rounds: int = 50) -> dict[str, Any]:
    support = detect_cgroups(f"bench-{os.getpid()}")
    if support.version == 0:
        return {"words": support.words()}
    setup: list[float] = []
    plain: list[float] = []
    joined: list[float] = []
    try:
        for i in range(rounds):
            t0 = time.perf_counter()
            cg = create_cgroup(support, f"bench-{i}", memory_max=1 << 30, pids_max=512,
                               cpu_max=1.0)  # fmt: skip
            assert cg is not None
            t1 = time.perf_counter()
            subprocess.run(["true"], check=True)
            t2 = time.perf_counter()
            subprocess.run(cg.join_argv(["true"]), check=True)
            t3 = time.perf_counter()
            cg.remove()
            t4 = time.perf_counter()
            setup.append((t1 - t0) + (t4 - t3))
            plain.append(t2 - t1)
            joined.append(t3 - t2)
    finally:
        release_cgroups(support)
    return {
        "words": support.words(),
        "setup_ms": statistics.median(setup) * 1000,
        "join_ms": (statistics.median(joined) - statistics.median(plain)) * 1000,
        "rounds": rounds,
    }


def render(res: dict[str, Any], machine_line: str) -> str:
    def row(what: str, r: dict[str, float]) -> str:
        ok = "met" if r["ratio"] <= 1.10 else "**missed**"
        a, h = r["agent_s"], r["hand_s"]
        cells = [what, f"{a:.2f} s", f"{h:.2f} s", f"{a - h:+.2f} s", f"{r['ratio']:.3f}"]
        return "| " + " | ".join(cells) + f" | ≤ 1.10 ({ok}) |"

    out = [
        MARK_BEGIN,
        "## Storage and limits (bench/storage.py)",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line}. FROM an image of busybox + "
        f"{LAYERS} × {LAYER_MIB} MiB random layers; one RUN step; `agentctl build --force` "
        f"through the agent (sandbox off) beside the same commands by hand. Medians of "
        f"{res['n']} rounds; cold: an empty local store, warm: the FROM image already in it.",
        "",
        "| build | agent | by hand | agent − by hand | ratio | goal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in res["buildah"]:
        out.append(row(f"buildah ({b['driver']}), cold", b["cold"]))
        out.append(row(f"buildah ({b['driver']}), warm", b["warm"]))
    for k in res["buildkit"]:
        out.append(row(f"BuildKit {k['version']}, cold", k["cold"]))
        out.append(row(f"BuildKit {k['version']}, warm", k["warm"]))
    vfs = res["vfs"]
    out += [
        "",
        f"By hand on vfs, a second set of runs for reference: cold {vfs['cold_s']:.2f} s, warm "
        f"{vfs['warm_s']:.2f} s (store {format_bytes(vfs['disk'])}). A warm build's agent figure "
        "carries the agent's fixed cost (the agentctl process, hashing the context and resolving "
        "the FROM image for the key, staging the context, the base and workspace checks, every "
        "registry request of the pull check, push and copy through the proxy): the difference "
        "column. It is most of a warm build, hence the ratio misses there; cold, it is lost in "
        "the pull.",
        "",
        "Disk the local store holds after a cold and a warm build (the FROM image stays as a "
        "cache; the agent removes the images it built; BuildKit keeps both the compressed "
        "layers, in its content store, and their unpacked snapshots):",
        "",
        "| store | disk |",
        "| --- | --- |",
    ]
    for b in res["buildah"]:
        out.append(f"| buildah {b['driver']}, agent | {format_bytes(b['disk_agent'])} |")
        out.append(f"| buildah {b['driver']}, by hand | {format_bytes(b['disk_hand'])} |")
    for k in res["buildkit"]:
        out.append(f"| BuildKit {k['version']} root, agent | {format_bytes(k['disk_agent'])} |")
    cg = res["cgroup"]
    out.append("")
    if "setup_ms" in cg:
        out.append(
            f"Per-build cgroup ({cg['words']}): create with memory, pids and CPU limits and remove "
            f"it: {cg['setup_ms']:.2f} ms a build; the join wrapper (`/bin/sh` writing "
            f"cgroup.procs, then exec) adds {cg['join_ms']:.2f} ms to each child's start "
            f"(medians of {cg['rounds']})."
        )
    else:
        out.append(f"Per-build cgroup: not measured ({cg['words']}).")
    out.append(MARK_END)
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--buildkit", action="append", default=[], type=Path,
                   help="a directory holding buildkitd and buildctl (repeat per version)")
    p.add_argument("--crane", default=shutil.which("crane") or "")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()  # fmt: skip
    machine_line = machine()
    with tempfile.TemporaryDirectory(prefix="bench-storage-", dir="/tmp") as t:
        tmp = Path(t)
        reg = start_registry(tmp / "registry")
        try:
            base = big_image(tmp, reg)
            drivers = ["overlay"] if overlay_works(tmp / "probe")[0] else []
            res: dict[str, Any] = {
                "n": args.n,
                "buildah": [buildah_rounds(tmp, reg, base, args.n, d) for d in [*drivers, "vfs"]],
                "vfs": vfs_by_hand(tmp, reg, base, args.n),
                "buildkit": [
                    buildkit_rounds(tmp, bk, args.crane, reg, base, args.n) for bk in args.buildkit
                ],
                "cgroup": cgroup_cost(),
            }
        finally:
            reg.stop()
    publish(render(res, machine_line), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
