"""Zero-copy download path: ``splice(2)`` from the registry's socket to the client's socket.

Used only where it is exact: a GET answered 200/206 with a ``Content-Length``, over plain HTTP
upstream (TLS must be decrypted in user space) and a plain client socket. The bytes aiohttp has
already read are written first; the rest moves socket -> pipe -> socket in the kernel, so the
proxy's CPU per byte drops to a few syscalls per pipe-full (bench/proxy_throughput.py). The
upstream connection is closed afterwards (aiohttp's parser never saw the body).
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

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
AVAILABLE = hasattr(os, "splice")


class SpliceBroke(Exception):
    """The transfer failed after bytes were moved: the client connection must be cut."""

    def __init__(self, moved: int, why: str) -> None:
        super().__init__(why)
        self.moved = moved


def eligible(request: web.BaseRequest, up: aiohttp.ClientResponse) -> int | None:
    """Bytes to splice, or None when this response must take the ordinary path."""
    if not AVAILABLE or request.method != "GET" or up.status not in (200, 206):
        return None
    length = up.content_length
    if length is None or length < _PIPE_SIZE or "Transfer-Encoding" in up.headers:
        return None
    conn = up.connection
    if conn is None or conn.transport is None or request.transport is None:
        return None
    if conn.transport.get_extra_info("sslcontext") is not None:
        return None
    if request.transport.get_extra_info("sslcontext") is not None:
        return None
    for t in (conn.transport, request.transport):
        sock = t.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            return None
    return length


async def splice_body(
    request: web.BaseRequest, resp: web.StreamResponse, up: aiohttp.ClientResponse, length: int
) -> int:
    """Send the ``length`` body bytes of ``up`` to the client; return how many moved."""
    conn = up.connection
    assert conn is not None and conn.transport is not None and request.transport is not None
    up_transport, client_transport = conn.transport, request.transport
    # What aiohttp has read goes out first, through the normal writer. Taking it and pausing
    # happen with no await between: no more data can reach aiohttp's buffer after this.
    head = up.content.read_nowait(-1)
    up_transport.pause_reading()
    await resp.write(head)  # also flushes the buffered response headers
    moved = len(head)
    # Our bytes must follow everything the transport still holds: wait until it is empty.
    client_transport.set_write_buffer_limits(high=0, low=0)
    await request.writer.drain()
    loop = asyncio.get_running_loop()
    src = os.dup(_fd(up_transport))
    dst = os.dup(_fd(client_transport))
    rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(wpipe, _F_SETPIPE_SZ, _PIPE_SIZE)
        room = fcntl.fcntl(wpipe, _F_GETPIPE_SZ)
        in_pipe = 0  # bytes read from the registry, not yet sent to the client
        # Both directions are tried on every turn so the registry keeps sending while the
        # client drains (a read-all-then-write-all loop halves the throughput).
        while moved < length:
            want = length - moved - in_pipe
            read = wrote = 0
            if want > 0 and in_pipe < room:
                try:
                    read = os.splice(src, wpipe, min(want, room - in_pipe), flags=_FLAGS)
                except BlockingIOError:
                    pass  # the socket is empty, or the pipe's slots are full
                except OSError as exc:
                    raise SpliceBroke(moved, f"reading from the registry: {exc.strerror}") from exc
                else:
                    if read == 0:
                        raise SpliceBroke(moved, "the registry closed the connection early")
                    in_pipe += read
            if in_pipe:
                try:
                    wrote = os.splice(rpipe, dst, in_pipe, flags=_FLAGS)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise SpliceBroke(moved, f"writing to the client: {exc.strerror}") from exc
                in_pipe -= wrote
                moved += wrote
            if not (read or wrote):
                # With bytes in the pipe, the client is the one to wait for (a full pipe
                # also reads as EAGAIN); with an empty pipe, the registry.
                await _wait(loop, dst if in_pipe else src, readable=not in_pipe, moved=moved)
    finally:
        for fd in (rpipe, wpipe, src, dst):
            os.close(fd)
        client_transport.set_write_buffer_limits()
        up.close()  # aiohttp's parser never saw the body: this connection cannot be reused
    return moved


def _fd(transport: Any) -> int:
    return int(transport.get_extra_info("socket").fileno())


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


__all__ = ["AVAILABLE", "SpliceBroke", "eligible", "splice_body"]
