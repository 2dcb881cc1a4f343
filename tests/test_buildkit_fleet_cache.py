"""How a fleet shares work: ``build.cache_repo`` with BuildKit, two nodes, one registry.

Two daemons ("nodes": their own state and runtime dirs, sockets, sandboxes with their own network
namespaces, buildkitd roots) push to one registry. Node A builds a Dockerfile with a slow RUN;
node B builds the same Dockerfile with one more line and takes A's layers from the registry cache
(exported and imported through each build's own capability route on the proxy): the slow RUN does
not run on B. The stand-in variant checks the wiring (the cache ref on the build route, the login
that reaches it); the real-binary variants (``-m buildkit``) check that BuildKit really reuses
the layers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.build.buildkit import buildkit_binaries
from tests.infra.builds import build_sections, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.infra.sandbox_env import unique_netns
from tests.standins import Standins, install

REAL = buildkit_binaries()


def _node(tmp: Path, registry: Registry, env: dict[str, str], cache_repo: str) -> DaemonProcess:
    sections = build_sections(
        [registry],
        {
            "build": {"toolchain": "buildkit", "cache_repo": cache_repo},
            "sandbox": {"mode": "on", "netns": unique_netns()},
        },
    )
    return DaemonProcess(tmp, sections, env=env)


@pytest.fixture(params=["standin", pytest.param("real", marks=pytest.mark.buildkit)])
def nodes(
    request: pytest.FixtureRequest, short_tmp: Path, registry: Registry, base_image: str
) -> Iterator[tuple[DaemonProcess, DaemonProcess, Standins | None, str]]:
    standins: Standins | None = None
    if request.param == "real":
        if REAL is None:
            pytest.skip("real buildkitd/buildctl/crane not installed")
        env = {"AGENT_BUILDKITD": REAL.buildkitd, "AGENT_BUILDCTL": REAL.buildctl,
               "AGENT_CRANE": REAL.crane}  # fmt: skip
    else:
        standins = install(short_tmp / "bin")
        env = standins.env()
    cache_repo = f"{registry.host}/fleet-cache-{uuid.uuid4().hex[:8]}"
    a = _node(short_tmp / "a", registry, env, cache_repo)
    b = _node(short_tmp / "b", registry, env, cache_repo)
    try:
        a.start(timeout=30)
        b.start(timeout=30)
        yield a, b, standins, cache_repo
    finally:
        for d in (a, b):
            d.stop()
            d.cleanup()


def _build(d: DaemonProcess, ctx: Path, repo: str) -> dict[str, Any]:
    r = d.ctl("--json", "build", "--context", str(ctx), "--target-repo", repo, timeout=180)
    assert r.returncode == 0, r.stderr + d.log()[-3000:]
    out: dict[str, Any] = json.loads(r.stdout)
    out["_log"] = d.ctl("logs", out["id"]).stdout
    return out


def test_node_b_reuses_node_a_layers_through_the_registry_cache(
    nodes: tuple[DaemonProcess, DaemonProcess, Standins | None, str],
    registry: Registry,
    base_image: str,
    short_tmp: Path,
) -> None:
    a, b, standins, cache_repo = nodes
    mark = uuid.uuid4().hex[:12]
    slow = f"RUN echo slow-step-{mark} && sleep 2 && echo {mark} > /slow.txt\n"
    ctx_a = write_context(short_tmp / "ctx-a", {"Dockerfile": f"FROM {base_image}\n{slow}"})
    ctx_b = write_context(
        short_tmp / "ctx-b",
        {"Dockerfile": f"FROM {base_image}\n{slow}RUN echo after > /after.txt\n"},
    )
    repo = f"{registry.host}/fleet-ws-{mark}"
    first = _build(a, ctx_a, repo)
    second = _build(b, ctx_b, repo)
    assert first["cache"]["base"] is False and second["cache"]["base"] is False
    if standins is not None:
        # The wiring: both nodes export to and import from one ref on their build's own route,
        # reached with that build's login; no static route is involved.
        calls = [c for c in standins.calls("buildctl") if "build" in c["argv"]]
        assert len(calls) == 2
        refs = set()
        for call in calls:
            argv = call["argv"]
            exp = argv[argv.index("--export-cache") + 1]
            imp = argv[argv.index("--import-cache") + 1]
            ref = imp.removeprefix("type=registry,ref=")
            assert exp == f"type=registry,ref={ref},mode=max"
            host, _, rest = ref.partition("/")
            assert rest.startswith(
                f"b/{registry.host.replace(':', '-')}/{cache_repo.split('/', 1)[1]}:"
            )
            (login,) = call["docker_config"]["auths"]
            assert login == host
            refs.add(ref.partition("/")[2])
        assert len(refs) == 1  # one workspace, one cache tag on every node
        return

    # Real BuildKit: the slow step ran on A (its echo is in A's log), and on B its layer came
    # from A's cache: B imported the cache manifest and the step printed nothing of its own.
    def step_output(log: str) -> list[str]:
        return [ln for ln in log.splitlines() if f"slow-step-{mark}" in ln and " RUN " not in ln]

    assert step_output(first["_log"]), first["_log"]
    assert "importing cache manifest" in second["_log"], second["_log"]
    assert not step_output(second["_log"]), second["_log"]
    after = [ln for ln in second["_log"].splitlines() if "RUN echo after" in ln]
    assert after, second["_log"]  # B's own new step did run
