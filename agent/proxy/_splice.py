"""Zero-copy body path: ``splice(2)`` between the client's and the registry's sockets.

Used only where it is exact: a body of a known ``Content-Length`` (1 MiB or more, no chunked
coding), over plain HTTP upstream (TLS must be decrypted in user space) and a plain client
socket. Downloads: a GET answered 200/206. Uploads: a PATCH/PUT/POST body. The bytes aiohttp
has already read go first through its writer; the rest moves socket -> pipe -> socket in the
kernel, so the proxy's CPU per byte drops to a few syscalls per pipe-full
(bench/proxy_throughput.py). aiohttp's HTTP parser never sees a spliced body, so the connection
on that side is closed afterwards (never reused with a parser out of step).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import AsyncIterablePayload

THRESHOLD = 1 << 20
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
AVAILABLE = hasattr(os, "splice")
_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


class SpliceBroke(Exception):
    """The transfer failed after bytes were moved: the connections must be cut."""

    def __init__(self, moved: int, why: str) -> None:
        super().__init__(why)
        self.moved = moved


def _plain_socket(transport: Any) -> bool:
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return False
    sock = transport.get_extra_info("socket")
    return sock is not None and sock.family in _FAMILIES


def _fd(transport: Any) -> int:
    return int(transport.get_extra_info("socket").fileno())


# --- downloads --------------------------------------------------------------------------------


def eligible(request: web.BaseRequest, up: aiohttp.ClientResponse) -> int | None:
    """Bytes to splice to the client, or None when this response takes the ordinary path."""
    if not AVAILABLE or request.method != "GET" or up.status not in (200, 206):
        return None
    length = up.content_length
    if length is None or length < THRESHOLD or "Transfer-Encoding" in up.headers:
        return None
    conn = up.connection
    if conn is None or not _plain_socket(conn.transport):
        return None
    return length if _plain_socket(request.transport) else None


async def splice_body(
    request: web.BaseRequest, resp: web.StreamResponse, up: aiohttp.ClientResponse, length: int
) -> int:
    """Send the ``length`` body bytes of ``up`` to the client; return how many moved."""
    conn = up.connection
    assert conn is not None and conn.transport is not None and request.transport is not None
    up_transport, client_transport = conn.transport, request.transport
    # Take what aiohttp has read and pause with no await between: nothing more can reach
    # aiohttp's buffer after this.
    head = up.content.read_nowait(-1)
    up_transport.pause_reading()
    try:
        await resp.write(head)  # also flushes the buffered response headers
        # Our bytes must follow everything the transport still holds: wait until it is empty.
        client_transport.set_write_buffer_limits(high=0, low=0)
        await request.writer.drain()
        return len(head) + await pump(_fd(up_transport), _fd(client_transport), length - len(head))
    except SpliceBroke as exc:
        exc.moved += len(head)
        raise
    finally:
        client_transport.set_write_buffer_limits()
        up.close()


# --- uploads ----------------------------------------------------------------------------------


class UploadBody(AsyncIterablePayload):
    """The client's request body. Sent by splice when the upstream socket is plain and the
    length known; else chunk by chunk. ``count`` is what went up; ``took_over`` says the
    client's connection is out of step with aiohttp's parser and must be closed."""

    def __init__(self, request: web.BaseRequest) -> None:
        self._request = request
        self.count = 0
        self.took_over = False
        length = request.content_length
        self._length = (
            length
            if AVAILABLE
            and length is not None
            and length >= THRESHOLD
            and "Transfer-Encoding" not in request.headers
            and _plain_socket(request.transport)
            else None
        )
        super().__init__(self._chunks(), content_type=None)

    async def _chunks(self) -> Any:
        async for chunk in self._request.content.iter_any():
            self.count += len(chunk)
            yield chunk

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        upstream = getattr(writer, "transport", None)
        if self._length is None or self.count or not _plain_socket(upstream):
            await super().write_with_length(writer, content_length)
            return
        request = self._request
        assert request.transport is not None and upstream is not None
        head = request.content.read_nowait(-1)
        request.transport.pause_reading()
        self.took_over = True
        self.count = len(head)
        upstream.set_write_buffer_limits(high=0, low=0)
        try:
            await writer.write(head)  # flushes the request headers too
            await writer.drain()
            self.count += await pump(
                _fd(request.transport), _fd(upstream), self._length - len(head)
            )
        except SpliceBroke as exc:
            self.count += exc.moved
            raise OSError(f"request body broke off: {exc}") from exc
        finally:
            upstream.set_write_buffer_limits()
            # aiohttp would otherwise linger, waiting for body bytes it will never see.
            request.content.feed_eof()


# --- the pump -----------------------------------------------------------------------------------


async def pump(src_fd: int, dst_fd: int, count: int) -> int:
    """Move ``count`` bytes from socket ``src_fd`` to socket ``dst_fd`` through a pipe.

    Both directions are tried on every turn so the sender keeps sending while the receiver
    drains (read-all-then-write-all halves the throughput). The fds are dup'ed: the event loop
    refuses a second watcher on an fd its transport owns."""
    loop = asyncio.get_running_loop()
    src, dst = os.dup(src_fd), os.dup(dst_fd)
    rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    moved = 0
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(wpipe, _F_SETPIPE_SZ, _PIPE_SIZE)
        room = fcntl.fcntl(wpipe, _F_GETPIPE_SZ)
        in_pipe = 0
        while moved < count:
            want = count - moved - in_pipe
            read = wrote = 0
            if want > 0 and in_pipe < room:
                try:
                    read = os.splice(src, wpipe, min(want, room - in_pipe), flags=_FLAGS)
                except BlockingIOError:
                    pass  # the socket is empty, or the pipe's slots are full
                except OSError as exc:
                    raise SpliceBroke(moved, f"reading: {exc.strerror}") from exc
                else:
                    if read == 0:
                        raise SpliceBroke(moved, "the sender closed the connection early")
                    in_pipe += read
            if in_pipe:
                try:
                    wrote = os.splice(rpipe, dst, in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise SpliceBroke(moved, f"writing: {exc.strerror}") from exc
                in_pipe -= wrote
                moved += wrote
            if not (read or wrote):
                # With bytes in the pipe, wait for the receiver (a full pipe also reads as
                # EAGAIN); with an empty pipe, for the sender.
                await _wait(loop, dst if in_pipe else src, readable=not in_pipe, moved=moved)
    finally:
        for fd in (rpipe, wpipe, src, dst):
            os.close(fd)
    return moved


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, *, readable: bool, moved: int) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if readable:
        loop.add_reader(fd, ready)
    else:
        loop.add_writer(fd, ready)
    try:
        await asyncio.wait_for(fut, 300)
    except TimeoutError:
        raise SpliceBroke(moved, "no progress for 300 s") from None
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


__all__ = ["AVAILABLE", "SpliceBroke", "UploadBody", "eligible", "pump", "splice_body"]
