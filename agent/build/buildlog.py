"""A build's log: appended to its file as lines arrive, and followed by any number of readers.

Fan-out without back-pressure: the writer only appends (to the file and to a bounded in-memory
tail) and wakes the readers. Each reader keeps its own byte offset and reads what it has not seen
from the in-memory tail when it is still there, else from the file. A slow reader therefore never
blocks the build or the other readers; it falls behind and catches up from the file.

Every line passes through ``scrub`` (the proxy's: credentials and capability prefixes; for a build
with secrets, :class:`SecretScrub` adds the secret values) before it is stored anywhere.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

_TAIL_BYTES = 256 * 1024
# A follower that was woken waits this long before reading, so the lines a tool prints in a
# burst go out as one event instead of one each (50 followers x every line is a lot of frames).
_COALESCE = 0.02
_READ_MAX = 64 * 1024


class BuildLog:
    """The live log of one running build. Also a :class:`agent.build.toolchain.LogSink`."""

    def __init__(self, path: Path, scrub: Callable[[str], str]) -> None:
        self.path = path
        self._scrub = scrub
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        self.size = os.fstat(self._fd).st_size
        self._tail = bytearray()
        self._tail_start = self.size
        self._lines: list[str] = []  # the last few lines, for error messages
        self._keep_lines = 200
        self._changed = asyncio.Event()
        self.closed = False

    def line(self, text: str) -> None:
        if self.closed:
            return
        clean = self._scrub(text)
        data = (clean + "\n").encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        self._tail += data
        if len(self._tail) > _TAIL_BYTES:
            drop = len(self._tail) - _TAIL_BYTES // 2
            del self._tail[:drop]
            self._tail_start += drop
        self._lines.append(clean)
        if len(self._lines) > self._keep_lines:
            del self._lines[: len(self._lines) - self._keep_lines]
        self._wake()

    def tail(self, n: int) -> list[str]:
        return self._lines[-n:] if n > 0 else []

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def read(self, offset: int, limit: int = _READ_MAX) -> bytes:
        """Bytes from ``offset`` (at most ``limit``, whole lines when possible), from memory when
        still there."""
        if offset >= self.size:
            return b""
        if offset >= self._tail_start:
            start = offset - self._tail_start
            return _whole_lines(bytes(self._tail[start : start + limit]), limit)
        return read_file(self.path, offset, min(limit, self._tail_start - offset))

    async def follow(self, offset: int = 0) -> AsyncIterator[tuple[int, bytes]]:
        """(offset, chunk) pairs from ``offset`` until the log is closed and fully read."""
        while True:
            waiter = self._changed
            chunk = self.read(offset)
            if chunk:
                yield offset, chunk
                offset += len(chunk)
                continue
            if self.closed:
                return
            await waiter.wait()
            if not self.closed:
                await asyncio.sleep(_COALESCE)


class SecretScrub:
    """A build's scrub: ``base`` (the proxy's: credentials, route capabilities), then every
    secret value of the build, and every line of a multi-line value, replaced by ``***``.

    Pieces shorter than :data:`MIN_SECRET_TEXT` characters are left alone: masking "a" or "on"
    would mangle every line and hide nothing (GitHub Actions masks the same way). Values are
    matched as the log holds them: child output decoded as UTF-8 with replacement.
    :meth:`forget` drops the values when the build ends."""

    MIN_SECRET_TEXT = 4

    def __init__(self, base: Callable[[str], str], values: Iterable[bytes]) -> None:
        self._base = base
        pieces: set[str] = set()
        for value in values:
            text = value.decode("utf-8", "replace")
            for piece in (text, text.strip(), *text.splitlines()):
                piece = piece.strip("\r\n")
                if len(piece) >= self.MIN_SECRET_TEXT:
                    pieces.add(piece)
        # Longest first, so a whole value is masked before any of its lines.
        ordered = sorted(pieces, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        text = self._base(text)
        return self._pattern.sub("***", text) if self._pattern is not None else text

    def forget(self) -> None:
        self._pattern = None


def read_file(path: Path, offset: int, limit: int = _READ_MAX) -> bytes:
    """Up to ``limit`` bytes of a (finished) log file from ``offset``; b"" past the end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return _whole_lines(os.pread(fd, limit, offset), limit)
    finally:
        os.close(fd)


def _whole_lines(chunk: bytes, limit: int) -> bytes:
    """Cut a full-size chunk after its last newline so no UTF-8 sequence is split."""
    if len(chunk) < limit:
        return chunk
    cut = chunk.rfind(b"\n")
    return chunk[: cut + 1] if cut >= 0 else chunk


async def follow_file(path: Path, offset: int) -> AsyncIterator[tuple[int, bytes]]:
    """(offset, chunk) pairs of a finished log, read in pieces without blocking the loop long."""
    while True:
        chunk = read_file(path, offset)
        if not chunk:
            return
        yield offset, chunk
        offset += len(chunk)
        await asyncio.sleep(0)


__all__ = ["BuildLog", "SecretScrub", "follow_file", "read_file"]
