"""``build.toolchain = "auto"``: buildkit exactly when buildkitd, buildctl and crane are all found
(PATH or AGENT_BUILDKITD / AGENT_BUILDCTL / AGENT_CRANE), else buildah."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.build import choose_toolchain


def _tool(d: Path, name: str) -> Path:
    p = d / name
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(0o755)
    return p


def test_auto_picks_buildkit_only_when_all_three_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("AGENT_BUILDKITD", "AGENT_BUILDCTL", "AGENT_CRANE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert choose_toolchain("auto") == "buildah"
    _tool(tmp_path, "buildkitd")
    _tool(tmp_path, "buildctl")
    assert choose_toolchain("auto") == "buildah"  # crane is missing
    elsewhere = tmp_path / "opt"
    elsewhere.mkdir()
    monkeypatch.setenv("AGENT_CRANE", str(_tool(elsewhere, "crane")))
    assert choose_toolchain("auto") == "buildkit"
    monkeypatch.setenv("AGENT_BUILDCTL", str(tmp_path / "missing"))
    assert choose_toolchain("auto") == "buildah"
    # an explicit setting is taken as it is
    assert choose_toolchain("buildkit") == "buildkit"
    assert choose_toolchain("buildah") == "buildah"
