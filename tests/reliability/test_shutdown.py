"""SIGTERM while builds run and wait: a running build that can finish within
``daemon.shutdown_grace`` succeeds, one that cannot is recorded ``interrupted``, queued ones end in
a final state too; the daemon exits 0 and leaves nothing behind: no process, no mount, no
network namespace, no socket, no temp record.

With the sandbox on (root), so the namespaces and mounts are real; the BuildKit stand-ins build,
and real buildah too (its RUN step is a runc container the stop must take down).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.build.child import descendants
from tests.infra.builds import log_of, wait_for, write_context
from tests.infra.registry import Registry
from tests.infra.sandbox_env import left_behind, snapshot, unique_netns
from tests.reliability._support import (
    FINAL,
    TOOLCHAINS,
    check_state_dir,
    make_gate,
    pids_alive,
    run_build,
    toolchain_daemon,
)

GRACE = 4.0


@pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")
@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_sigterm_during_builds(
    toolchain: str, short_tmp: Path, registry: Registry, base_image: str
) -> None:
    netns = unique_netns()
    before = snapshot()
    # The gate holds the copy step: crane with BuildKit, skopeo with buildah.
    copier, real = (
        ("crane", str(short_tmp / "bin" / "crane"))
        if toolchain == "buildkit"
        else ("skopeo", shutil.which("skopeo") or "skopeo")
    )
    gate = make_gate(short_tmp / "gate", copier, real)
    d = toolchain_daemon(
        short_tmp,
        registry,
        toolchain,
        {
            "daemon": {"shutdown_grace": GRACE},
            "build": {"max_concurrent_builds": 2, "max_queued": 4},
            "sandbox": {"mode": "on", "netns": netns},
        },
        env={f"AGENT_{copier.upper()}": str(gate.path)},
    )
    try:
        marker = f"started-{uuid.uuid4().hex[:8]}"
        repo = f"{registry.host}/sd-{uuid.uuid4().hex[:8]}"  # new: a pushed target skips the copy
        long_ctx = write_context(
            short_tmp / "long",
            {"Dockerfile": f"FROM {base_image}\nRUN echo {marker} && sleep 60\n"},
        )
        quick = [
            write_context(
                short_tmp / f"q{i}",
                {"Dockerfile": f"FROM {base_image}\nRUN echo quick-{i}-{uuid.uuid4().hex}\n"},
            )
            for i in range(3)
        ]
        with ThreadPoolExecutor(4) as pool:
            # Slot 1: held at its copy by the gate (finishes once the gate opens, within the
            # grace). Slot 2: a RUN step that outlives the grace. Then two that wait in the queue.
            held = pool.submit(run_build, d.socket_path, quick[0], {"target_ref": f"{repo}:held"})
            gate.wait_started()
            long = pool.submit(run_build, d.socket_path, long_ctx, {"target_ref": f"{repo}:long"})

            def running() -> list[str]:
                with d.client() as c:
                    return [b["id"] for b in c.call("list", {"state": "running"})["builds"]]

            ids = wait_for(lambda: len(r := running()) == 2 and r, 30, "two running builds")
            queued = [
                pool.submit(run_build, d.socket_path, ctx, {"target_ref": f"{repo}:q{i}"})
                for i, ctx in enumerate(quick[1:])
            ]
            with d.client() as c:
                wait_for(
                    lambda: len(c.call("list", {"state": "queued"})["builds"]) == 2, 30, "2 queued"
                )
            long_id: str = wait_for(
                lambda: next((i for i in ids if marker in log_of(d, i)), ""), 30, "the long RUN"
            )
            tree = descendants(d.pid)
            assert d.proc is not None
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            gate.open()
            code = d.proc.wait(GRACE + 20)
            took = time.monotonic() - t0
            outcomes = [held.result(30), long.result(30), *(q.result(30) for q in queued)]
        assert code == 0, d.log()[-3000:]
        assert took < GRACE + 10, f"the daemon took {took:.1f}s to stop (grace {GRACE}s)"
        records = {r["id"]: r for r in check_state_dir(Path(d.sections["daemon"]["state_dir"]))}
        states = {o.id: records[o.id]["state"] for o in outcomes if o.id}
        print(f"\nSIGTERM: exit {code} after {took:.1f}s (grace {GRACE}s); states {states}")
        assert records[outcomes[0].id]["state"] == "succeeded", (outcomes[0], states)
        assert records[long_id]["state"] == "interrupted", states
        assert records[long_id]["error"]["message"]
        assert all(s in FINAL for s in states.values())
        for o in outcomes[2:]:  # the queued ones: finished or ended with a reason
            assert o.state == "succeeded" or o.code, o
        assert not pids_alive(tree), "processes left behind"
        assert not os.path.exists(d.socket_path)
        markers = [netns, str(d.tmp)]
        assert not left_behind(before, snapshot(), markers)
    finally:
        gate.open()  # a failed assertion above must not leave a caller held at the gate
        d.stop()
        d.cleanup()
