"""The test infrastructure itself: a real registry starts and the base image lands in it."""

from __future__ import annotations

import json
import subprocess

from tests.infra.registry import Registry


def test_base_image_is_in_registry(registry: Registry, base_image: str) -> None:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{base_image}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info = json.loads(out)
    assert info["Digest"].startswith("sha256:")
    assert "PATH=/bin" in info["Env"]
