"""The tests' base image: busybox-static with a few applet links, made with buildah from scratch
and pushed to a test registry. Nothing comes from the internet.

The code lives in agent/devmode.py (development mode makes the same image); this module keeps the
names the tests import."""

from __future__ import annotations

from agent.devmode import BUSYBOX_APPLETS as APPLETS
from agent.devmode import buildah_cmd, make_busybox_image

__all__ = ["APPLETS", "buildah_cmd", "make_busybox_image"]
