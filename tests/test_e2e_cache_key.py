"""External images in the content key, end to end (issue 12): the real daemon and agentctl,
buildah + skopeo, docker-registry (plain and htpasswd).

The base images are made here with buildah from scratch (busybox plus a marker file), pushed to
the test registries, and moved by pushing another image to the same tag."""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.devmode import make_busybox_image
from tests.infra.builds import (
    metrics,
    read_from_image,
    start_build_daemon,
    tool_runs,
    write_context,
)
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry, free_port, start_registry

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")


@pytest.fixture(scope="module")
def private_registry(session_tmp: Path) -> Iterator[Registry]:
    reg = start_registry(
        session_tmp / "registry-htpasswd-key", "htpasswd", username="bob", password="b0b-pw"
    )
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def images(session_tmp: Path) -> Iterator[Path]:
    d = session_tmp / "key-images"
    d.mkdir(exist_ok=True)
    yield d


def push_marked(storage: Path, dest: str, marker: str, creds: str | None = None) -> str:
    """busybox + /marker.txt, from scratch, pushed to ``dest`` (plain HTTP); its digest."""
    return make_busybox_image(storage, dest, files={"marker.txt": marker}, creds=creds)


@pytest.fixture(scope="module")
def daemon(
    registry: Registry, private_registry: Registry, base_image: str, session_tmp: Path
) -> Iterator[DaemonProcess]:
    tmp = session_tmp / "key-daemon"
    tmp.mkdir(exist_ok=True)
    auth = base64.b64encode(b"bob:b0b-pw").decode()
    cfg = tmp / "docker-config.json"
    cfg.write_text(json.dumps({"auths": {private_registry.host: {"auth": auth}}}))
    d = start_build_daemon(
        tmp, [registry, private_registry], {"build": {"docker_config": str(cfg)}}
    )
    try:
        yield d
    finally:
        d.stop()
        d.cleanup()


def build(d: DaemonProcess, ctx: Path, *args: str) -> dict[str, Any]:
    r = d.ctl("--json", "build", "--context", str(ctx), *args, timeout=120)
    out = _last_json(r.stdout)
    out["_rc"] = r.returncode
    out["_stderr"] = r.stderr
    return out


def _last_json(text: str) -> dict[str, Any]:
    """agentctl --json prints the result indented, an error on one line."""
    if not text.strip():
        return {}
    try:
        out: dict[str, Any] = json.loads(text)
    except ValueError:
        out = json.loads(text.strip().splitlines()[-1])
    return out


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert result["_rc"] == 0, result
    return result


def status(d: DaemonProcess, build_id: str) -> dict[str, Any]:
    with d.client() as c:
        out: dict[str, Any] = c.call("status", {"id": build_id})
        return out


def ctl_json(d: DaemonProcess, *args: str) -> dict[str, Any]:
    r = d.ctl("--json", *args)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def repo(registry: Registry, name: str) -> str:
    return f"{registry.host}/{name}-{uuid.uuid4().hex[:8]}"


def test_moved_latest_rebuilds_onto_the_new_base_and_unmoved_hits(
    daemon: DaemonProcess, registry: Registry, images: Path, short_tmp: Path
) -> None:
    base = repo(registry, "moving") + ":latest"
    old = push_marked(images, base, "old-base")
    ctx = write_context(
        short_tmp / "c", {"Dockerfile": f"FROM {base}\nRUN cat /marker.txt > /seen.txt\n"}
    )
    target = repo(registry, "ws")
    first = ok(build(daemon, ctx, "--target-repo", target))
    assert read_from_image(first["target_ref"], "/seen.txt") == b"old-base"
    again = ok(build(daemon, ctx, "--target-repo", target))
    assert again["cache"] == {"base": True, "workspace": True}
    assert again["base_ref"] == first["base_ref"]

    new = push_marked(images, base, "new-base")  # a security update to :latest
    assert new != old
    moved = ok(build(daemon, ctx, "--target-repo", target))
    assert moved["cache"]["base"] is False, moved
    assert moved["base_ref"] != first["base_ref"]
    assert read_from_image(moved["target_ref"], "/seen.txt") == b"new-base"
    assert read_from_image(moved["target_ref"], "/marker.txt") == b"new-base"

    rec = status(daemon, moved["id"])
    assert rec["base_miss"] == ["from_moved"]
    assert [(i["ref"], i["digest"]) for i in rec["inputs"]["images"]] == [(base, new)]
    explained = ctl_json(daemon, "explain", moved["id"])
    assert explained["verdict"] == "miss" and explained["reasons"] == ["from_moved"]
    assert explained["compared_to"]["id"] == again["id"]
    assert explained["changes"] == {"images_moved": [{"ref": base, "old": old, "new": new}]}
    text = daemon.ctl("explain", moved["id"]).stdout
    assert f"image moved: {base}: {old} -> {new}" in text, text

    # diff of two builds with a moved FROM names the ref and both digests
    d = ctl_json(daemon, "diff", first["id"], moved["id"])
    assert d["same_key"] is False and d["reasons"] == ["from_moved"]
    assert d["changes"]["images_moved"] == [{"ref": base, "old": old, "new": new}]
    text = daemon.ctl("diff", first["id"], moved["id"]).stdout
    assert base in text and old in text and new in text, text
    hit = ctl_json(daemon, "explain", again["id"])
    assert hit["verdict"] == "hit" and hit["changes"] == {}

    m = metrics(daemon)
    assert m['build_agent_base_cache_total{reason="from_moved",result="miss"}'] >= 1
    assert m['build_agent_base_cache_total{reason="unchanged",result="hit"}'] >= 1


def test_the_builder_gets_the_keyed_digest_not_the_tag(
    daemon: DaemonProcess, registry: Registry, images: Path, short_tmp: Path
) -> None:
    """The tag moves after the key was computed and before the builder pulls: the image is
    still built on the keyed digest (the staged Dockerfile names it)."""
    base = repo(registry, "racing") + ":latest"
    push_marked(images, base, "keyed")
    ctx = write_context(
        short_tmp / "c",
        {"Dockerfile": f"FROM {base}\nRUN cat /marker.txt > /seen.txt\nCOPY Dockerfile /df\n"},
    )
    target = repo(registry, "ws")
    # Queue behind a slow build, so that the key is computed well before the build runs.
    slow = write_context(
        short_tmp / "slow", {"Dockerfile": f"FROM {base}\nRUN sleep 8\nRUN echo {uuid.uuid4()}\n"}
    )
    blockers = [daemon.ctl("build", "--detach", "--context", str(slow), "--target-repo",
                           repo(registry, f"slow{i}")) for i in range(2)]  # fmt: skip
    assert all(b.returncode == 0 for b in blockers), blockers
    queued = daemon.ctl("build", "--detach", "--context", str(ctx), "--target-repo", target)
    assert queued.returncode == 0, queued.stderr
    build_id = queued.stdout.strip()
    assert status(daemon, build_id)["state"] == "queued"
    push_marked(images, base, "moved-too-late")
    moved_at = time.time()
    deadline = time.monotonic() + 120
    while status(daemon, build_id)["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    rec = status(daemon, build_id)
    assert rec["state"] == "succeeded", rec
    assert rec["started"] > moved_at  # the tag had moved before the build ran
    assert read_from_image(rec["target_ref"], "/seen.txt") == b"keyed"
    pinned = read_from_image(rec["target_ref"], "/df").decode()
    assert f"@{rec['inputs']['images'][0]['digest']}" in pinned.splitlines()[0]


def test_arg_expanded_from_multistage_alias_and_copy_from_image(
    daemon: DaemonProcess, registry: Registry, images: Path, short_tmp: Path
) -> None:
    a = repo(registry, "a") + ":1"
    b = repo(registry, "b") + ":1"
    c = repo(registry, "c") + ":1"
    da, db, dc = (push_marked(images, r, m) for r, m in ((a, "A"), (b, "B"), (c, "C")))
    dockerfile = (
        f"ARG BASE={a}\n"
        "FROM ${BASE} AS tools\n"
        "RUN cat /marker.txt > /tools.txt\n"
        f"FROM {registry.host}/unused-never-pushed:1 AS unused\n"
        f"FROM {a}\n"
        "COPY --from=tools /tools.txt /from-stage.txt\n"
        f"COPY --from={c} /marker.txt /from-image.txt\n"
    )
    ctx = write_context(short_tmp / "c", {"Dockerfile": dockerfile})
    target = repo(registry, "ws")
    first = ok(build(daemon, ctx, "--target-repo", target, "--build-arg", f"BASE={b}"))
    rec = status(daemon, first["id"])
    got = [(i["kind"], i["ref"], i["digest"]) for i in rec["inputs"]["images"]]
    # the unused stage is not resolved (it does not exist), the alias is not an image
    assert got == [("from", b, db), ("from", a, da), ("copy", c, dc)]
    assert read_from_image(first["target_ref"], "/from-stage.txt") == b"B"
    assert read_from_image(first["target_ref"], "/from-image.txt") == b"C"
    # a moved COPY --from image rebuilds too
    push_marked(images, c, "C2")
    second = ok(build(daemon, ctx, "--target-repo", target, "--build-arg", f"BASE={b}"))
    assert second["cache"]["base"] is False
    assert read_from_image(second["target_ref"], "/from-image.txt") == b"C2"
    # a changed build arg: the reason names args, explain the arg's name, never its value
    third = ok(build(daemon, ctx, "--target-repo", target, "--build-arg", f"BASE={a}"))
    explained = ctl_json(daemon, "explain", third["id"])
    assert "args" in explained["reasons"] and "from_moved" in explained["reasons"]
    assert explained["changes"]["args"] == {"changed": ["BASE"]}
    assert b not in json.dumps(explained["inputs"]["args"])


def test_from_pinned_by_digest_is_taken_as_it_is(
    daemon: DaemonProcess, registry: Registry, images: Path, short_tmp: Path
) -> None:
    name = repo(registry, "pinned")
    digest = push_marked(images, f"{name}:1", "pinned")
    ctx = write_context(
        short_tmp / "c", {"Dockerfile": f"FROM {name}@{digest}\nRUN cat /marker.txt > /m\n"}
    )
    target = repo(registry, "ws")
    first = ok(build(daemon, ctx, "--target-repo", target))
    push_marked(images, f"{name}:1", "moved")  # the tag moves, the pin does not
    second = ok(build(daemon, ctx, "--target-repo", target))
    assert second["cache"] == {"base": True, "workspace": True}
    (img,) = status(daemon, first["id"])["inputs"]["images"]
    assert (img["digest"], img["source"]) == (digest, "digest")
    assert read_from_image(first["target_ref"], "/m") == b"pinned"


def test_private_from_through_the_proxys_credentials(
    daemon: DaemonProcess, registry: Registry, private_registry: Registry, images: Path,
    short_tmp: Path,
) -> None:  # fmt: skip
    base = f"{private_registry.host}/private-base:1"
    digest = push_marked(images, base, "private", creds="bob:b0b-pw")
    ctx = write_context(short_tmp / "c", {"Dockerfile": f"FROM {base}\nRUN cat /marker.txt >/m\n"})
    result = ok(build(daemon, ctx, "--target-repo", repo(registry, "ws")))
    assert read_from_image(result["target_ref"], "/m") == b"private"
    rec = status(daemon, result["id"])
    assert rec["inputs"]["images"][0]["digest"] == digest
    for path in (daemon.tmp / "state" / "builds").glob(f"{result['id']}.*"):
        assert b"b0b-pw" not in path.read_bytes()


def _refused(d: DaemonProcess, ctx: Path, target: str) -> dict[str, Any]:
    r = d.ctl("--json", "build", "--context", str(ctx), "--target", target, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    error: dict[str, Any] = _last_json(r.stdout)["error"]
    return error


def test_unresolvable_from_fails_before_anything_runs(
    daemon: DaemonProcess, registry: Registry, private_registry: Registry, short_tmp: Path,
    daemon_factory: Any,
) -> None:  # fmt: skip
    runs = tool_runs(daemon)
    target = f"{registry.host}/ws-unresolvable:1"
    missing = f"{registry.host}/no-such-image:1"
    ctx = write_context(short_tmp / "a", {"Dockerfile": f"FROM busybox AS x\nFROM {missing}\n"})
    err = _refused(daemon, ctx, target)
    assert err["code"] == "build_failed"
    assert "line 2: FROM image not found" in err["message"], err
    assert missing in err["message"] and registry.host in err["message"]
    assert err["details"]["registry"] == registry.host

    down = f"127.0.0.1:{free_port()}"
    ctx = write_context(short_tmp / "b", {"Dockerfile": f"FROM {down}/gone:1\n"})
    err = _refused(daemon, ctx, target)
    assert err["code"] == "upstream_unavailable", err
    assert f"{down}/gone:1" in err["message"] and down in err["message"]

    # A daemon without the private registry's credentials
    bare = daemon_factory(
        {
            "build": {"base_repo": f"{registry.host}/base", "toolchain": "buildah"},
            "proxy": {
                "registries": [{"host": r.host, "http": True} for r in (registry, private_registry)]
            },
        }
    )
    private = f"{private_registry.host}/private-base:1"
    ctx = write_context(short_tmp / "c", {"Dockerfile": f"FROM {private}\n"})
    err = _refused(bare, ctx, target)
    assert err["code"] == "upstream_unauthorized", err
    assert private in err["message"] and private_registry.host in err["message"]
    assert tool_runs(daemon) == runs and tool_runs(bare) == 0  # nothing ran


def test_explain_after_a_one_file_change_names_exactly_that_path(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    files = {f"src/f{i}.txt": str(i) for i in range(20)}
    ctx = write_context(
        short_tmp / "c", {"Dockerfile": f"FROM {base_image}\nCOPY src /src\n", **files}
    )
    target = repo(registry, "ws")
    first = ok(build(daemon, ctx, "--target-repo", target))
    (ctx / "src" / "f7.txt").write_text("edited")
    second = ok(build(daemon, ctx, "--target-repo", target))
    explained = ctl_json(daemon, "explain", second["id"])
    assert explained["compared_to"]["id"] == first["id"]
    assert explained["reasons"] == ["context"]
    assert explained["changes"] == {
        "context": {"added": [], "removed": [], "changed": ["src/f7.txt"]}
    }
    text = daemon.ctl("explain", second["id"]).stdout
    assert "changed src/f7.txt" in text and "src/f8" not in text, text
    first_explained = ctl_json(daemon, "explain", first["id"])
    assert first_explained["reasons"] == ["first"] and first_explained["compared_to"] is None


def test_ten_thousand_file_context_keeps_status_fast(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = short_tmp / "big"
    for i in range(100):
        sub = ctx / f"d{i:02}"
        sub.mkdir(parents=True)
        for j in range(100):
            (sub / f"f{j:02}.txt").write_text(f"{i}-{j}")
    (ctx / "Dockerfile").write_text(f"FROM {base_image}\nRUN true\n")
    result = ok(build(daemon, ctx, "--target-repo", repo(registry, "ws")))
    inputs = daemon.tmp / "state" / "builds" / f"{result['id']}.inputs"
    assert inputs.stat().st_size < 1_000_000
    with daemon.client() as c:
        c.call("status", {"id": result["id"]})
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            rec = c.call("status", {"id": result["id"]})
            times.append(time.perf_counter() - t0)
    assert rec["inputs"]["entries"] == 10_101  # 100 dirs, 10,000 files, the Dockerfile
    assert sorted(times)[len(times) // 2] < 0.020, times


def test_an_unknown_key_rebuilds_and_says_why(
    daemon: DaemonProcess, registry: Registry, base_image: str, short_tmp: Path
) -> None:
    ctx = write_context(
        short_tmp / "c",
        {"Dockerfile": f"FROM {base_image}\nCOPY --from=$FROM_BASE_ENV /x /x\nRUN true\n"},
    )
    target = repo(registry, "ws")
    # The builder fails on the undefined --from; what matters is that the base check is skipped
    # and the log says why.
    r = daemon.ctl("--json", "build", "--context", str(ctx), "--target-repo", target)
    build_id = _last_json(r.stdout)["error"]["details"]["id"]
    rec = status(daemon, build_id)
    assert rec["inputs"]["status"] == "unknown"
    assert "FROM_BASE_ENV" in rec["inputs"]["unknown"][0]
    with daemon.client() as c:
        text = c.call("logs", {"id": build_id})["data"]
    assert "content key unknown: line 2" in text and "rebuilding" in text, text
    assert rec.get("base_miss") == ["unknown"]


def test_buildkit_standin_rebuilds_a_moved_from_and_gets_the_pinned_dockerfile(
    registry: Registry, images: Path, short_tmp: Path
) -> None:
    """The BuildKit flow (buildkitd/buildctl/crane stand-ins: the pushed image is the FROM
    image, pulled through the proxy's mirror as the staged Dockerfile names it)."""
    from tests.infra.builds import build_sections
    from tests.standins import install

    standins = install(short_tmp / "bin")
    d = DaemonProcess(
        short_tmp / "d", build_sections([registry], {"build": {"toolchain": "buildkit"}}),
        env=standins.env(),
    )  # fmt: skip
    try:
        d.start(timeout=30)
        base = repo(registry, "bk-moving") + ":latest"
        old = push_marked(images, base, "old")
        ctx = write_context(short_tmp / "c", {"Dockerfile": f"FROM {base}\nRUN true\n"})
        target = repo(registry, "bk-ws")
        first = ok(build(d, ctx, "--target-repo", target))
        assert first["digest"] == old  # the stand-in pushes the FROM image as it is
        assert ok(build(d, ctx, "--target-repo", target))["cache"]["base"] is True
        new = push_marked(images, base, "new")
        moved = ok(build(d, ctx, "--target-repo", target))
        assert moved["cache"]["base"] is False
        assert read_from_image(moved["target_ref"], "/marker.txt") == b"new"
        assert read_from_image(first["target_ref"], "/marker.txt") == b"old"
        with d.client() as c:
            text = c.call("logs", {"id": moved["id"]})["data"]
        name = base.rsplit(":", 1)[0]
        assert f"FROM {name}@{new}" in text, text  # what buildctl was given
    finally:
        d.stop()
        d.cleanup()


def test_from_max_age_accepts_a_cached_digest_that_young(
    registry: Registry, images: Path, short_tmp: Path, daemon_factory: Any
) -> None:
    """build.from_max_age: the operator's window. Within it a moved tag is not seen (the
    cached digest is keyed, and built: the pin names it); with the default 0 it is."""
    d = daemon_factory(
        {
            "build": {
                "base_repo": f"{registry.host}/base",
                "toolchain": "buildah",
                "from_max_age": 300,
                "resolve_ttl": 300,
            },
            "proxy": {"registries": [{"host": registry.host, "http": True}]},
        }
    )
    base = repo(registry, "windowed") + ":latest"
    old = push_marked(images, base, "old")
    ctx = write_context(short_tmp / "c", {"Dockerfile": f"FROM {base}\nRUN cat /marker.txt >/m\n"})
    target = repo(registry, "ws")
    ok(build(d, ctx, "--target-repo", target))
    push_marked(images, base, "new")
    second = ok(build(d, ctx, "--target-repo", target))
    assert second["cache"]["base"] is True
    (img,) = status(d, second["id"])["inputs"]["images"]
    assert (img["digest"], img["source"]) == (old, "cache")
