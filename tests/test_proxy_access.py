"""Who may use the proxy's credentials, attacked through the real daemon: an unprivileged local
user on the host-side listener, and a build's RUN step (a real buildah build in the sandbox) or a
process in the sandbox's network namespace against static routes. The upstream is the htpasswd
registry, so whatever gets through did so with the proxy's credentials. Root (useradd, netns)."""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.proxy._routes import mirror_name
from tests.infra.builds import read_from_image, write_context
from tests.infra.daemon import DaemonProcess, as_user
from tests.infra.registry import Registry, start_registry
from tests.infra.sandbox_env import unique_netns

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd, the sandbox)"),
    pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo"),
]

USER, PASSWORD = "alice", "pw-access-Hq3vR8"
ATTACKER = "ba-proxy-attacker"
OCI = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = f"{OCI}, application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def private(session_tmp: Path, base_image: str) -> Iterator[tuple[Registry, str, str]]:
    """The htpasswd registry holding ``private/secret:1`` and ``team/app:1`` (busybox), and the
    digests (manifest of team/app:1, first layer of private/secret:1)."""
    reg = start_registry(
        session_tmp / "registry-access", "htpasswd", username=USER, password=PASSWORD
    )
    try:
        for repo in ("private/secret:1", "team/app:1"):
            subprocess.run(
                [
                    *("skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false"),
                    *("--dest-creds", f"{USER}:{PASSWORD}", "--format", "oci"),
                    *(f"docker://{base_image}", f"docker://{reg.host}/{repo}"),
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        manifest = _upstream(reg, "team/app/manifests/1")
        layer = json.loads(_upstream(reg, "private/secret/manifests/1")[1])["layers"][0]
        yield reg, manifest[0], layer["digest"]
    finally:
        reg.stop()


def _upstream(reg: Registry, path: str) -> tuple[str, bytes]:
    """GET straight from the registry with its own credentials: (digest header, body)."""
    import urllib.request

    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req = urllib.request.Request(
        f"{reg.url}/v2/{path}", headers={"Accept": ACCEPT, "Authorization": f"Basic {auth}"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Docker-Content-Digest", ""), r.read()


def _sections(
    reg: Registry, tmp: Path, plain: Registry, routes: list[dict[str, Any]], **sandbox: Any
) -> dict[str, dict[str, Any]]:
    cfg = tmp / "docker-config" / "config.json"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    cfg.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    cfg.chmod(0o600)
    return {
        "build": {
            "base_repo": f"{plain.host}/base",
            "toolchain": "buildah",
            "docker_config": str(cfg),
        },
        "proxy": {
            "registries": [{"host": r.host, "http": True} for r in (plain, reg)],
            "routes": routes,
        },
        "sandbox": sandbox or {"mode": "off"},
    }


@pytest.fixture(scope="module")
def attacker() -> str:
    """An unprivileged local user, made once (left in place: useradd is not cheap to undo
    while another test may run as it)."""
    try:
        pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", ATTACKER],
            check=True,
            capture_output=True,
        )
    return ATTACKER


def _curl(*args: str, user: str | None = None) -> int:
    """The HTTP status curl got (0: no answer)."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args]
    if user is not None:
        argv = [*as_user(user), *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    return int(r.stdout or 0)


def test_a_local_user_gets_nothing_through_the_host_listener(
    private: tuple[Registry, str, str],
    registry: Registry,
    attacker: str,
    short_tmp: Path,
) -> None:
    reg, manifest_digest, layer = private
    routes = [{"name": "ws", "upstream": f"{reg.host}/team", "access": "push"}]
    d = DaemonProcess(short_tmp / "d", _sections(reg, short_tmp, registry, routes)).start()
    try:
        base = f"http://{d.sections['proxy']['host_address']}"
        mirror = f"mirror/{mirror_name(reg.host)}"
        attacks = {
            "mirror-read": (
                "-H",
                f"Accept: {ACCEPT}",
                f"{base}/v2/{mirror}/private/secret/manifests/1",
            ),
            "ns-read": (
                "-H",
                f"Accept: {ACCEPT}",
                f"{base}/v2/private/secret/manifests/1?ns={reg.host}",
            ),
            "static-read": ("-H", f"Accept: {ACCEPT}", f"{base}/v2/ws/app/manifests/1"),
            "push": ("-X", "POST", f"{base}/v2/ws/evil/blobs/uploads/"),
            "mount": (
                "-X",
                "POST",
                f"{base}/v2/ws/evil/blobs/uploads/?mount={layer}&from={mirror}/private/secret",
            ),
            "delete": ("-X", "DELETE", f"{base}/v2/ws/app/manifests/{manifest_digest}"),
            "guessed-token": (
                "-u",
                f"x:{uuid.uuid4().hex}",
                "-H",
                f"Accept: {ACCEPT}",
                f"{base}/v2/ws/app/manifests/1",
            ),
        }
        got = {name: _curl(*args, user=attacker) for name, args in attacks.items()}
        assert got == dict.fromkeys(attacks, 401), got
        # Nothing reached the registry: the manifest is still there, no upload was started.
        assert _upstream(reg, "team/app/manifests/1")[0] == manifest_digest
        assert "/v2/team/evil/" not in reg.log()
        # The token is root's alone; with it the same requests work (so the 401s are the
        # authorization, not a broken route).
        info = json.loads(d.ctl("--json", "info").stdout)
        host = info["config"]["proxy"]["host_listener"]
        assert host["auth"] == "token", host
        token_file = Path(host["token_file"])
        assert (token_file.stat().st_mode & 0o777) == 0o600
        token = token_file.read_text().strip()
        assert token not in d.log()
        ok = _curl("-u", f"op:{token}", "-H", f"Accept: {ACCEPT}", attacks["mirror-read"][-1])
        assert ok == 200
        r = d.ctl("info")
        text = r.stdout + r.stderr
        assert "auth token" in text, text
        # This daemon's sandbox is off: info says what that opens to local users.
        assert "any local user can pull through its mirrors" in text, text
    finally:
        d.stop()
        d.cleanup()
    assert not token_file.exists()  # a made token goes with the daemon


def _probe(name: str, method: str, url: str) -> str:
    """A shell line (busybox) appending ``<name> <HTTP status>`` to /probes."""
    post = "--post-data= " if method == "POST" else f"--header 'Accept: {ACCEPT}' "
    return (
        f"s=$(wget -S -O /dev/null {post}'{url}' 2>&1 | grep -m1 'HTTP/' | "
        f"awk '{{print $2}}'); echo \"{name} ${{s:-none}}\" >> /probes"
    )


@pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")
def test_a_run_step_cannot_push_or_mount_into_a_static_route(
    private: tuple[Registry, str, str],
    registry: Registry,
    base_image: str,
    short_tmp: Path,
) -> None:
    reg, _, layer = private
    routes = [{"name": "ws", "upstream": f"{reg.host}/team", "access": "push"}]
    sections = _sections(reg, short_tmp, registry, routes, mode="on", netns=unique_netns())
    d = DaemonProcess(short_tmp / "d", sections).start()
    try:
        proxy = f"http://localhost:{d.sections['proxy']['port']}/v2"
        mirror = f"mirror/{mirror_name(reg.host)}"
        probes = [
            # The mirror answers (so the refusals below are not an unreachable proxy).
            _probe("mirror", "GET", f"{proxy}/{mirror}/private/secret/manifests/1"),
            _probe("static-read", "GET", f"{proxy}/ws/app/manifests/1"),
            _probe("push", "POST", f"{proxy}/ws/evil/blobs/uploads/"),
            _probe(
                "mount",
                "POST",
                f"{proxy}/ws/evil/blobs/uploads/?mount={layer}&from={mirror}/private/secret",
            ),
        ]
        ctx = write_context(
            short_tmp / "ctx",
            {"Dockerfile": f"FROM {base_image}\nRUN " + " ; ".join(probes) + "\n"},
        )
        target = f"{registry.host}/access-{uuid.uuid4().hex[:8]}:1"
        r = d.ctl("build", "--context", str(ctx), "--target", target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        lines = read_from_image(target, "/probes").decode().splitlines()
    finally:
        d.stop()
        d.cleanup()
    got = dict(line.split() for line in lines)
    assert got == {"mirror": "200", "static-read": "404", "push": "404", "mount": "404"}, got
    assert "/v2/team/evil/" not in reg.log()


@pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")
def test_a_children_route_lets_a_run_step_pull_but_not_push(
    private: tuple[Registry, str, str],
    registry: Registry,
    base_image: str,
    short_tmp: Path,
) -> None:
    reg, _, layer = private
    routes = [
        {"name": "shared", "upstream": f"{reg.host}/team", "access": "push", "children": True},
        {"name": "hidden", "upstream": f"{reg.host}/team", "access": "push"},
    ]
    sections = _sections(reg, short_tmp, registry, routes, mode="on", netns=unique_netns())
    d = DaemonProcess(short_tmp / "d", sections).start()
    try:
        proxy = f"http://localhost:{d.sections['proxy']['port']}/v2"
        mirror = f"mirror/{mirror_name(reg.host)}"
        probes = [
            _probe("pull", "GET", f"{proxy}/shared/app/manifests/1"),
            _probe("push", "POST", f"{proxy}/shared/evil/blobs/uploads/"),
            _probe(
                "mount",
                "POST",
                f"{proxy}/shared/evil/blobs/uploads/?mount={layer}&from={mirror}/private/secret",
            ),
            _probe("hidden", "GET", f"{proxy}/hidden/app/manifests/1"),
        ]
        ctx = write_context(
            short_tmp / "ctx",
            {"Dockerfile": f"FROM {base_image}\nRUN " + " ; ".join(probes) + "\n"},
        )
        target = f"{registry.host}/access-{uuid.uuid4().hex[:8]}:1"
        r = d.ctl("build", "--context", str(ctx), "--target", target)
        assert r.returncode == 0, r.stderr + d.log()[-3000:]
        lines = read_from_image(target, "/probes").decode().splitlines()
        info = d.ctl("info").stdout
    finally:
        d.stop()
        d.cleanup()
    got = dict(line.split() for line in lines)
    assert got == {"pull": "200", "push": "403", "mount": "403", "hidden": "404"}, got
    assert "/v2/team/evil/" not in reg.log()
    assert "route       shared (push), children: read-only" in info, info
    assert "route       hidden (push), children: no" in info, info
