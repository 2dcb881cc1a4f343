"""Who may change a toolchain's local image store, and when.

Builds *use* the store side by side; removing images *changes* it and must wait until no build
uses it. The reason is in c/storage, under buildah: two builds whose RUN steps change nothing
make the same (empty) top layer, and the store keeps one layer for both. Removing the first
build's image while the second is committing deletes that layer under it, and the second build
fails with ``committing the finished image: creating image "<id>": layer not known``.

A removal normally waits for a quiet moment and does not hold builds back. An *urgent* one (the
store is over its budget, or the disk is full) also stops new builds from starting until it ran.
A removal already waiting turns urgent when :meth:`StoreGate.escalate` is called: while builds
overlap without pause a quiet moment may never come (buildah_store.py escalates once enough
removals are pending).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class StoreGate:
    def __init__(self) -> None:
        self.users = 0
        self._changing = False
        self._urgent = 0
        self._escalated = False
        self._moved = asyncio.Event()

    def escalate(self) -> None:
        """Make the change that waits now (or the next one) urgent."""
        self._escalated = True
        self._moved.set()

    async def _until(self, ok: Callable[[], bool]) -> None:
        while not ok():
            self._moved.clear()
            await self._moved.wait()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        """Held by a build for as long as it may commit to or read from the store."""
        await self._until(lambda: not self._changing and not self._urgent)
        self.users += 1
        try:
            yield
        finally:
            self.users -= 1
            self._moved.set()

    @contextlib.asynccontextmanager
    async def change(self, *, urgent: bool = False) -> AsyncIterator[None]:
        """Held while images are removed: no build uses the store meanwhile."""
        counted = urgent
        if counted:
            self._urgent += 1
        try:
            while not (self.users == 0 and not self._changing):
                if self._escalated and not counted:
                    counted = True
                    self._urgent += 1
                self._moved.clear()
                await self._moved.wait()
            self._escalated = False
        finally:
            if counted:
                self._urgent -= 1
                self._moved.set()  # builds held back by this urgent wait may go on
        self._changing = True
        try:
            yield
        finally:
            self._changing = False
            self._moved.set()
