"""The per-build cost of running buildah RUN steps in a runc container (``bench/sandbox_overhead.py
--build``): a forced few-KiB build through the real daemon (sandbox on, real proxy, agentctl)
beside the same ``buildah bud`` + ``buildah push`` + ``skopeo copy`` by hand, once with
``--isolation oci`` (runc: what the agent runs now) and once with ``--isolation chroot`` (what
it ran before), all interleaved so they see the same load."""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from agent.build.buildah import registries_conf
from agent.devmode import buildah_cmd, make_busybox_image
from bench._common import machine
from tests.infra.builds import build_sections, write_context
from tests.infra.daemon import AGENTCTL, REPO, DaemonProcess
from tests.infra.registry import Registry, start_registry
from tests.infra.sandbox_env import unique_netns

START, END = "<!-- bench:isolation -->", "<!-- /bench:isolation -->"


def _context(root: Path, base: str) -> Path:
    return write_context(
        root / uuid.uuid4().hex[:12],
        {
            "Dockerfile": (
                f"FROM {base}\nCOPY hello.txt /hello.txt\n"
                "RUN echo built-$(cat /hello.txt) > /out.txt\n"
            ),
            "hello.txt": uuid.uuid4().hex,
        },
    )


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _daemon_cpu(pid: int) -> float:
    """CPU seconds of the daemon and every child it reaped (utime, stime, cutime, cstime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2 :].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _by_hand(tmp: Path, ctx: Path, reg: Registry, isolation: str) -> tuple[float, float]:
    storage = tmp / "hand"
    conf = tmp / "hand-registries.conf"
    conf.write_text(registries_conf("", [], [reg.host]))
    b = [*buildah_cmd(storage), "--registries-conf", str(conf)]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "BUILDAH_ISOLATION": isolation}
    iso = ["--isolation", isolation]
    if isolation == "oci":
        iso += ["--runtime", shutil.which("runc") or "runc", "--network", "host"]
    image = f"localhost/bench/{uuid.uuid4().hex[:12]}"
    tag = uuid.uuid4().hex[:12]
    t0, c0 = time.perf_counter(), _children_cpu()
    for argv in (
        [*b, "bud", *iso, "--pull=true", "--format", "oci", "-f", str(ctx / "Dockerfile"),
         "-t", image, str(ctx)],
        [*b, "push", "--tls-verify=false", "--retry", "0", image,
         f"docker://{reg.host}/bench-iso-base:{tag}"],
        ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
         "--retry-times", "0", f"docker://{reg.host}/bench-iso-base:{tag}",
         f"docker://{reg.host}/bench-iso:{tag}"],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, env=env)
    took = time.perf_counter() - t0, _children_cpu() - c0
    subprocess.run([*b, "rmi", "-f", image], capture_output=True, env=env)
    return took


def _agent(d: DaemonProcess, ctx: Path, target: str) -> tuple[float, float]:
    t0, c0, d0 = time.perf_counter(), _children_cpu(), _daemon_cpu(d.pid)
    subprocess.run(
        [*AGENTCTL, "--socket", d.socket_path, "build", "--force", "--context", str(ctx),
         "--target", target],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    took = time.perf_counter() - t0
    return took, _children_cpu() - c0 + _daemon_cpu(d.pid) - d0


STEPS = 10


def _steps_bud(tmp: Path, base: str, isolation: str) -> tuple[float, float]:
    """One ``buildah bud`` of FROM + :data:`STEPS` ``RUN true`` (no push): the steps' own cost."""
    ctx = write_context(
        tmp / uuid.uuid4().hex[:12],
        {"Dockerfile": f"FROM {base}\n" + "".join(f"RUN true {i}\n" for i in range(STEPS))},
    )
    conf = tmp / "hand-registries.conf"
    iso = ["--isolation", isolation]
    if isolation == "oci":
        iso += ["--runtime", shutil.which("runc") or "runc", "--network", "host"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "TMPDIR": str(tmp)}
    b = [*buildah_cmd(tmp / "hand"), "--registries-conf", str(conf)]
    image = f"localhost/bench/{uuid.uuid4().hex[:12]}"
    t0, c0 = time.perf_counter(), _children_cpu()
    subprocess.run(
        [*b, "bud", *iso, "--pull=true", "--layers=false", "-t", image, str(ctx)],
        check=True,
        capture_output=True,
        env=env,
    )
    took = time.perf_counter() - t0, _children_cpu() - c0
    subprocess.run([*b, "rmi", "-f", image], capture_output=True, env=env)
    return took


def _med(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def _min(xs: list[float]) -> float:
    return min(xs) * 1000


def measure_builds(runs: int) -> str:
    where = machine()
    tmp = Path(tempfile.mkdtemp(prefix="ba-bench-iso-", dir="/tmp"))
    reg = start_registry(tmp / "reg")
    d: DaemonProcess | None = None
    try:
        base = f"{reg.host}/busybox:latest"
        make_busybox_image(tmp / "base", base)
        sandbox = {"sandbox": {"mode": "on", "netns": unique_netns()}}
        d = DaemonProcess(tmp / "d", build_sections([reg], sandbox)).start()
        times: dict[str, list[float]] = {"agent": [], "oci": [], "chroot": []}
        cpu: dict[str, list[float]] = {"agent": [], "oci": [], "chroot": []}
        steps: dict[str, list[tuple[float, float]]] = {"oci": [], "chroot": []}
        for i in range(runs + 1):  # the first round warms the storages (FROM pulled) and caches
            got = {
                "agent": _agent(d, _context(tmp, base), f"{reg.host}/bench-iso-agent:{i}"),
                "oci": _by_hand(tmp, _context(tmp, base), reg, "oci"),
                "chroot": _by_hand(tmp, _context(tmp, base), reg, "chroot"),
            }
            for iso, out in steps.items():
                out.append(_steps_bud(tmp, base, iso))
            if i:
                for k, (wall, used) in got.items():
                    times[k].append(wall)
                    cpu[k].append(used)
    finally:
        if d is not None:
            d.stop()
            d.cleanup()
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    agent, oci, chroot = _med(times["agent"]), _med(times["oci"]), _med(times["chroot"])
    c_agent, c_oci, c_chroot = _med(cpu["agent"]), _med(cpu["oci"]), _med(cpu["chroot"])
    per_step = {  # (wall, CPU) ms per RUN step, warm-up round left out
        iso: tuple(_med([r[k] for r in out[1:]]) / STEPS for k in (0, 1))
        for iso, out in steps.items()
    }
    return "\n".join(
        [
            START,
            "## buildah RUN isolation: per-build cost",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {where}. "
            f"Forced few-KiB build (FROM busybox, COPY, one RUN), {runs} rounds interleaved "
            "after one warm-up: `agentctl build --force` through the daemon (sandbox on, "
            "proxy, buildah with `--isolation oci` under runc), and the same bud + push + "
            "skopeo copy by hand against the registry directly.",
            "",
            "| how | wall median ms | wall min ms | CPU median ms |",
            "| --- | ---: | ---: | ---: |",
            f"| agent (sandbox on, runc) | {agent:.0f} | {_min(times['agent']):.0f} | "
            f"{c_agent:.0f} |",
            f"| by hand, `--isolation oci` (runc) | {oci:.0f} | {_min(times['oci']):.0f} | "
            f"{c_oci:.0f} |",
            f"| by hand, `--isolation chroot` (before) | {chroot:.0f} | "
            f"{_min(times['chroot']):.0f} | {c_chroot:.0f} |",
            "",
            "CPU = user + system seconds of every process of the build (the daemon's own and its "
            "reaped children's for the agent, with agentctl), which the machine's load does not "
            f"inflate the way it does wall time. runc costs **{c_oci - c_chroot:.0f} ms CPU** "
            f"({oci - chroot:+.0f} ms wall) per build with one RUN step over chroot; agent vs by "
            f"hand with the same isolation: **{agent / oci:.3f}** wall, {c_agent / c_oci:.3f} "
            "CPU (goal <= 1.10 wall). Measured by "
            f"`bench/sandbox_overhead.py --build --runs {runs}`.",
            "",
            f"Per RUN step (`buildah bud` by hand of FROM + {STEPS} `RUN true`, no push, "
            f"median of {runs} / {STEPS}): runc **{per_step['oci'][0]:.0f} ms** wall, "
            f"{per_step['oci'][1]:.0f} ms CPU; chroot {per_step['chroot'][0]:.0f} ms wall, "
            f"{per_step['chroot'][1]:.0f} ms CPU (buildah's chroot isolation re-executes "
            "buildah itself for every step; runc is the lighter program).",
            END,
        ]
    )


__all__ = ["measure_builds"]
