"""Shared fixtures: short temp dirs (Unix socket paths are limited to 107 bytes), a plain
registry for the session, and the busybox base image pushed to it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.infra.daemon import DaemonProcess
from tests.infra.images import make_busybox_image
from tests.infra.registry import Registry, start_registry


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ba-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """``daemon_factory(sections=None, *, env=None, start=True, preamble="")``: real daemons
    (tests/infra/daemon.py), always stopped and cleaned up at teardown."""
    made: list[DaemonProcess] = []

    def make(
        sections: dict[str, dict[str, Any]] | None = None,
        *,
        env: dict[str, str] | None = None,
        start: bool = True,
        preamble: str = "",
    ) -> DaemonProcess:
        d = DaemonProcess(short_tmp / f"d{len(made)}", sections, env=env, preamble=preamble)
        made.append(d)
        return d.start() if start else d

    try:
        yield make
    finally:
        for d in made:
            try:
                d.stop()
            finally:
                d.cleanup()


@pytest.fixture(scope="session")
def session_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ba-s-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def registry(session_tmp: Path) -> Iterator[Registry]:
    """A plain (no auth) docker-registry shared by the session."""
    reg = start_registry(session_tmp / "registry-plain")
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def base_image(registry: Registry, session_tmp: Path) -> str:
    """``<registry>/busybox:latest``, pushed once per session."""
    ref = f"{registry.host}/busybox:latest"
    make_busybox_image(session_tmp / "buildah-base", ref)
    return ref
