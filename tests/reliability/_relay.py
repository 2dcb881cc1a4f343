"""A fault-injecting TCP relay in front of a real registry, run on its own thread and loop.

    relay = Relay(registry.port).start()       # 127.0.0.1:<relay.port> -> registry
    relay.delay = 0.05                         # every chunk waits 50 ms each way (slow registry)
    relay.answer_429 = 2                       # the next 2 GET/HEAD requests get 429 + close
    relay.watch(b"PATCH ")                     # relay.seen is set when a client sends that
    relay.down() / relay.up()                  # reset every connection and refuse new ones

A request that gets 429 is answered by the relay without reaching the registry. Everything else
is forwarded byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

from tests.infra.registry import free_port

_BODY_429 = b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}\n'
_429 = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 0\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(_BODY_429)
) + _BODY_429


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = 0.0
        self.answer_429 = 0
        self.answered_429 = 0
        self.requests = 0
        self.seen = threading.Event()
        self._pattern = b""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def watch(self, pattern: bytes) -> None:
        self._pattern = pattern
        self.seen.clear()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> Relay:
        self._thread.start()
        self.up()
        return self

    def up(self) -> None:
        async def listen() -> None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            self._server = await asyncio.start_server(self._handle, sock=sock)

        self._call(listen())

    def down(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._conns):
                with contextlib.suppress(OSError):
                    sock = w.get_extra_info("socket")
                    # RST, as a crashed registry's kernel would answer.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                w.close()
            self._conns.clear()

        self._call(close())

    def stop(self) -> None:
        self.down()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            first = await reader.read(65536)
            if not first:
                return
            self.requests += 1
            if self.answer_429 > 0 and first.split(b" ", 1)[0] in (b"GET", b"HEAD"):
                self.answer_429 -= 1
                self.answered_429 += 1
                writer.write(_429)
                await writer.drain()
                return
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return  # the registry is down: the client sees its connection closed
            self._conns.add(up_w)
            try:
                await asyncio.gather(
                    self._pipe(reader, up_w, first, watch=True),
                    self._pipe(up_r, writer, b"", watch=False),
                )
            finally:
                self._conns.discard(up_w)
                up_w.close()
        except OSError:
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, first: bytes, *, watch: bool
    ) -> None:
        data = first
        try:
            while True:
                if data:
                    if watch and self._pattern and self._pattern in data:
                        self.seen.set()
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
                data = await src.read(65536)
                if not data:
                    break
            if dst.can_write_eof():
                dst.write_eof()
        except OSError:
            dst.close()
