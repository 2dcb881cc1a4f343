"""Build routes as buildah and skopeo use them through the real daemon and proxy: the route's
capability reaches the children only as the login of a 0600 auth file (never an argv, a log or a
record), and because route names are stable, what the tools learnt about blob locations in one
build saves uploads in the next.

buildah and skopeo are the real ones, run through a recording wrapper (AGENT_BUILDAH,
AGENT_SKOPEO) that notes each call's argv and auth file, then execs the real binary.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.infra.builds import build_sections, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="needs buildah")

_WRAPPER = """#!{python}
import json, os, sys
args = sys.argv[1:]
entry = {{"prog": {prog!r}, "argv": args}}
if "--authfile" in args:
    path = args[args.index("--authfile") + 1]
    entry["authfile"] = path
    entry["mode"] = os.stat(path).st_mode & 0o777
    with open(path) as f:
        entry["auth"] = json.load(f)
with open({record!r}, "a") as f:
    f.write(json.dumps(entry) + "\\n")
os.execv({real!r}, [{real!r}, *args])
"""


def _wrap(tmp: Path, prog: str, record: Path) -> Path:
    real = shutil.which(prog)
    assert real is not None
    path = tmp / f"rec-{prog}"
    path.write_text(
        _WRAPPER.format(python=sys.executable, prog=prog, record=str(record), real=real)
    )
    path.chmod(0o755)
    return path


def _calls(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def _layer_uploads(registry: Registry, repo: str, start: int) -> list[str]:
    """Blob uploads the registry completed into ``repo`` since log line ``start``."""
    lines = registry.log().splitlines()[start:]
    return [ln for ln in lines if f'"PUT /v2/{repo}/blobs/uploads/' in ln and '" 201 ' in ln]


def _layers(ref: str) -> list[str]:
    raw = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
        check=True,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    ).stdout
    return [str(layer["digest"]) for layer in json.loads(raw)["layers"]]


def test_login_is_a_file_not_an_argv_and_known_layers_are_not_uploaded_again(
    registry: Registry, base_image: str, short_tmp: Path
) -> None:
    record = short_tmp / "calls.jsonl"
    base_repo = f"base-{uuid.uuid4().hex[:8]}"
    env = {
        "AGENT_BUILDAH": str(_wrap(short_tmp, "buildah", record)),
        "AGENT_SKOPEO": str(_wrap(short_tmp, "skopeo", record)),
    }
    sections = build_sections([registry], {"build": {"base_repo": f"{registry.host}/{base_repo}"}})
    d = DaemonProcess(short_tmp / "d", sections, env=env).start()
    results = []
    marks = []
    try:
        for i in range(2):
            ctx = write_context(
                short_tmp / f"ctx{i}",
                {
                    "Dockerfile": f"FROM {base_image}\nCOPY hello.txt /hello.txt\n"
                    "RUN echo built-$(cat /hello.txt) > /out.txt\n",
                    "hello.txt": uuid.uuid4().hex,
                },
            )
            marks.append(len(registry.log().splitlines()))
            r = d.ctl(
                "--json", "build", "--context", str(ctx), "--target-repo", f"{registry.host}/ws"
            )
            assert r.returncode == 0, r.stderr + d.log()[-3000:]
            results.append(json.loads(r.stdout))
        log_text = d.log()
        state = Path(d.sections["daemon"]["state_dir"])
        stored = "".join(
            p.read_text(errors="replace")
            for p in state.rglob("*")
            if p.is_file() and p.suffix in (".json", ".log")
        )
    finally:
        d.stop()
        d.cleanup()

    child = f"localhost:{d.sections['proxy']['port']}"
    calls = _calls(record)
    logged_in = [c for c in calls if "auth" in c]
    # Each build pushes its base (buildah push) and copies it (skopeo copy), both with a login.
    assert sorted(c["prog"] for c in logged_in) == ["buildah", "buildah", "skopeo", "skopeo"]
    caps = set()
    for c in logged_in:
        ((address, entry),) = c["auth"]["auths"].items()
        assert address == child
        user, _, cap = base64.b64decode(entry["auth"]).decode().partition(":")
        assert user == "build-agent" and len(cap) == 32
        assert c["mode"] == 0o600
        assert not Path(c["authfile"]).exists()  # removed with the phase's work directory
        caps.add(cap)
        # The route names the upstream repository; the capability is not in any argv.
        assert any(a.startswith(f"docker://{child}/b/") for a in c["argv"])
    assert len(caps) == 4  # one route per phase, each with its own capability
    assert '"succeeded"' in stored and "[build-agent]" in stored  # records and logs were read
    every_argv = json.dumps([c["argv"] for c in calls])
    for cap in caps:
        for text in (every_argv, log_text, stored):
            assert cap not in text

    # The second build's base push finds the FROM image's layer that the first one left in
    # base_repo (a HEAD on the stable route name) and does not upload it again.
    assert results[0]["cache"] == results[1]["cache"] == {"base": False, "workspace": False}
    first, second = (_layers(r["base_ref"]) for r in results)
    assert first[0] == second[0] and first[1:] != second[1:]  # same FROM layer, new COPY/RUN
    uploads = _layer_uploads(registry, base_repo, marks[1])
    assert uploads, "the second build uploaded nothing: its new layers went somewhere"
    assert not [ln for ln in uploads if first[0].split(":")[1] in ln], uploads
