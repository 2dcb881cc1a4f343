"""The control server: framing, peer credentials, dispatch and replies on the Unix socket.

The protocol is docs/protocol.md (DESIGN section 5). Each connection is driven straight from the
event loop's readiness callbacks rather than asyncio streams, because a request may carry file
descriptors (SCM_RIGHTS) and only ``recvmsg`` delivers them. Rules this module enforces:

- A frame announcing more than ``daemon.max_frame`` bytes gets a ``bad_request`` reply and the
  connection is closed (the stream cannot be resynchronised). A frame that is intact but is not a
  valid request gets a ``bad_request`` / ``unsupported_version`` reply and the connection goes on.
- File descriptors belong to the request whose frame holds the *last* byte of the read they
  arrived with. Linux ends a stream read right after the message that carried fds, so when the
  client sends a frame (or its beginning) and the fds in one ``sendmsg`` holding no other frame,
  that is the frame they were sent with. The server closes every fd the handler did not take out
  of ``ctx.fds``.
- Every request runs in its own task, so several may be in flight on one connection (up to
  ``_MAX_INFLIGHT``). Frames are written whole and in order from the loop thread, so writes never
  interleave. A slow reader only ever stalls itself: past ``_HIGH_WATER`` bytes of unsent output
  the server stops reading that connection and ``emit`` waits, until the output drains.
- End of input (the client closed its side) sets ``ctx.disconnected``; requests still running
  finish and their replies are flushed before the socket is closed. A write error closes the
  connection at once and cancels its requests.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from functools import partial
from typing import Any

from agent.control._auth import Authorizer, peer_credentials
from agent.control._request import Refused, read_request
from agent.control.ops import Args, Op, Peer, Registry, RequestContext
from agent.errors import AgentError
from agent.metrics import DaemonMetrics
from agent.runtime import App
from ctl import protocol

_log = logging.getLogger("agent.control")

_RECV_SIZE = 256 * 1024
_ANC_SIZE = socket.CMSG_SPACE(protocol.MAX_FDS * 4)
_HIGH_WATER = 1 << 20
_LOW_WATER = 1 << 18
_MAX_INFLIGHT = 256
_ACCEPT_BATCH = 64
_ACCEPT_PAUSE = 0.5
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class _Connection:
    """One client connection (see the module docstring for its rules)."""

    def __init__(self, server: ControlServer, sock: socket.socket, peer: Peer) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.loop = server.loop
        self.inbuf = bytearray()
        self.inpos = 0  # stream offset of inbuf[0]
        self.pending_fds: list[tuple[int, list[int]]] = []
        self.out = bytearray()
        self.reading = False
        self.eof = False
        self.closed = False
        self.close_after_flush = False
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.drained: asyncio.Event | None = None
        self.disconnected = asyncio.Event()
        self._resume_reading()

    # --- input ----------------------------------------------------------------------------

    def _resume_reading(self) -> None:
        if not self.reading and not self.eof and not self.closed:
            self.loop.add_reader(self.fd, self._on_readable)
            self.reading = True

    def _pause_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def _on_readable(self) -> None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(_RECV_SIZE, _ANC_SIZE, _CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if anc or flags & socket.MSG_CTRUNC:
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:usable]))
            if flags & socket.MSG_CTRUNC:  # the kernel dropped the fds that did not fit
                _close_fds(fds)
                self._fatal(f"more than {protocol.MAX_FDS} file descriptors sent with one message")
                return
            if fds:
                last = self.inpos + len(self.inbuf) + len(data) - 1
                self.pending_fds.append((last, fds))
        if not data:
            self._on_eof()
            return
        self.inbuf += data
        self._parse()

    def _on_eof(self) -> None:
        self.eof = True
        self._pause_reading()
        self.disconnected.set()
        for _, fds in self.pending_fds:
            _close_fds(fds)
        self.pending_fds.clear()
        self._maybe_finish()

    def _parse(self) -> None:
        buf = self.inbuf
        size = len(buf)
        limit = self.server.max_frame
        off = 0
        while size - off >= 4 and not self.close_after_flush and not self.closed:
            length = int.from_bytes(buf[off : off + 4], "big")
            if length > limit:
                self._fatal(
                    f"frame of {length} bytes announced; the limit is {limit} (daemon.max_frame)"
                )
                return
            end = off + 4 + length
            if end > size:
                break
            fds = self._take_fds(self.inpos + end) if self.pending_fds else []
            body = bytes(buf[off + 4 : end])
            off = end
            self._dispatch(body, fds)
        if off:
            del buf[:off]
            self.inpos += off

    def _take_fds(self, end: int) -> list[int]:
        """The fds whose read ended inside the frame that ends at stream offset ``end``."""
        taken: list[int] = []
        while self.pending_fds and self.pending_fds[0][0] < end:
            taken.extend(self.pending_fds.pop(0)[1])
        return taken

    # --- dispatch -------------------------------------------------------------------------

    def _dispatch(self, body: bytes, fds: list[int]) -> None:
        started = time.perf_counter()
        try:
            req_id, op, args = self._admit(body)
        except Refused as no:
            self._refuse(no, fds, started)
            return
        ctx = RequestContext(
            app=self.server.app,
            peer=self.peer,
            request_id=req_id,
            op=op.name,
            emit=partial(self._emit, req_id),
            fds=fds,
            disconnected=self.disconnected,
        )
        task = self.loop.create_task(self._run(op, ctx, Args(args), started))
        self.inflight[req_id] = task

    def _admit(self, body: bytes) -> tuple[int, Op, dict[str, Any]]:
        """The request's id, op and args, or :class:`Refused` (checked in this order)."""
        server = self.server
        req_id, op, args = read_request(body, server.registry)
        if not server.auth.allowed(op.access, self.peer):
            raise Refused(req_id, op.name, protocol.FORBIDDEN, server.auth.refusal(op, self.peer))
        if req_id in self.inflight:
            raise Refused(
                req_id,
                op.name,
                protocol.BAD_REQUEST,
                f"request id {req_id} is already in flight on this connection",
            )
        if len(self.inflight) >= _MAX_INFLIGHT:
            raise Refused(
                req_id,
                op.name,
                protocol.BUSY,
                f"{_MAX_INFLIGHT} requests are already in flight on this connection; "
                "wait for replies or open another connection",
            )
        return req_id, op, args

    def _refuse(self, no: Refused, fds: list[int], started: float) -> None:
        """Answer a request that will not run with its error; the fds it came with are closed."""
        _close_fds(fds)
        self._write(no.reply())
        self.server.metrics.observe(no.label, no.code, time.perf_counter() - started)

    async def _run(self, op: Op, ctx: RequestContext, args: Args, started: float) -> None:
        req_id = ctx.request_id
        code = "ok"
        try:
            try:
                result = await op.handler(ctx, args)
                frame = protocol.encode(
                    protocol.reply_ok(req_id, result), self.server.max_frame_out
                )
            except AgentError as exc:
                code = exc.code if exc.code in protocol.ERROR_CODES else protocol.INTERNAL
                try:
                    frame = protocol.encode(
                        protocol.reply_error(req_id, code, exc.message, exc.details),
                        self.server.max_frame_out,
                    )
                except Exception as bad:
                    _log.exception("op %s (request %d): error not encodable", op.name, req_id)
                    code = protocol.INTERNAL
                    frame = _internal_error(req_id, op.name, bad)
            except asyncio.CancelledError:
                code = protocol.CANCELLED
                raise
            except Exception as exc:
                # A bug in the handler, or a result/details msgpack cannot carry.
                code = protocol.INTERNAL
                _log.exception("op %s (request %d) failed", op.name, req_id)
                frame = _internal_error(req_id, op.name, exc)
            self._write(frame)
        finally:
            if ctx.fds:
                _close_fds(ctx.fds)
            self.inflight.pop(req_id, None)
            self.server.metrics.observe(op.name, code, time.perf_counter() - started)
            if self.eof:
                self._maybe_finish()

    async def _emit(self, req_id: int, name: str, data: Any) -> None:
        if self.closed:
            return
        self._write(protocol.encode(protocol.event(req_id, name, data), self.server.max_frame_out))
        while len(self.out) > _HIGH_WATER and not self.closed:
            if self.drained is None:
                self.drained = asyncio.Event()
            await self.drained.wait()

    # --- output ---------------------------------------------------------------------------

    def _write(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += frame
        else:
            try:
                sent = self.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(frame):
                return
            self.out += memoryview(frame)[sent:]
            self.loop.add_writer(self.fd, self._on_writable)
        if len(self.out) > _HIGH_WATER:
            self._pause_reading()

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.out[:sent]
        if len(self.out) <= _LOW_WATER:
            if self.drained is not None:
                self.drained.set()
                self.drained = None
            if not self.close_after_flush:
                self._resume_reading()
        if not self.out:
            self.loop.remove_writer(self.fd)
            if self.close_after_flush or self.eof:
                self._maybe_finish()

    # --- closing --------------------------------------------------------------------------

    def _fatal(self, message: str) -> None:
        """The byte stream is unusable: answer once (id null), flush, close."""
        self.server.metrics.frame_errors.inc()
        self.server.metrics.observe("invalid", protocol.BAD_REQUEST, 0.0)
        self._write(protocol.encode(protocol.reply_error(None, protocol.BAD_REQUEST, message)))
        self.close_after_flush = True
        self._pause_reading()
        self.eof = True
        self.disconnected.set()
        for task in self.inflight.values():
            task.cancel()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.closed or self.out:
            return
        if self.close_after_flush or not self.inflight:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pause_reading()
        self.loop.remove_writer(self.fd)
        self.disconnected.set()
        if self.drained is not None:
            self.drained.set()
        for task in list(self.inflight.values()):
            task.cancel()
        for _, fds in self.pending_fds:
            _close_fds(fds)
        self.pending_fds.clear()
        self.out.clear()
        self.sock.close()
        self.server.forget(self)


def _internal_error(req_id: int, op: str, exc: BaseException) -> bytes:
    return protocol.encode(
        protocol.reply_error(
            req_id,
            protocol.INTERNAL,
            f"internal error while running {op!r} ({type(exc).__name__}); "
            "the daemon's log has the details",
        )
    )


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class ControlServer:
    """Accepts connections on a listening Unix socket and serves the ops of ``registry``."""

    def __init__(
        self,
        app: App,
        metrics: DaemonMetrics,
        listener: socket.socket,
        *,
        path: str | None,
        registry: Registry,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.registry = registry
        self.max_frame = app.config.daemon.max_frame
        # Replies may be bigger than requests (logs, lists), up to what clients accept.
        self.max_frame_out = max(self.max_frame, protocol.CLIENT_MAX_FRAME)
        self.auth = Authorizer(app)
        self.loop = asyncio.get_running_loop()
        self._listener: socket.socket | None = listener
        self._path = path  # unlinked at close when we created it (not under socket activation)
        self._conns: set[_Connection] = set()
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._on_accept)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _on_accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: without a pause this would spin. Clients
                    # wait in the backlog meanwhile.
                    _log.error(
                        "accept failed: %s; pausing new connections for %gs (raise LimitNOFILE?)",
                        exc.strerror,
                        _ACCEPT_PAUSE,
                    )
                    self.loop.remove_reader(listener.fileno())
                    self.loop.call_later(_ACCEPT_PAUSE, self._resume_accepting)
                    return
                _log.error("accept failed: %s", exc.strerror)
                return
            sock.setblocking(False)
            try:
                peer = peer_credentials(sock, self.auth.needs_groups)
            except OSError:
                sock.close()
                continue
            self._conns.add(_Connection(self, sock, peer))
            _log.debug("connection from pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid)
            self.metrics.connections.inc()
            self.metrics.connections_total.inc()

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._on_accept)

    def forget(self, conn: _Connection) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            self.metrics.connections.dec()

    def stop_listening(self) -> None:
        """Stop accepting; unlink the socket path if this process created it."""
        if self._listener is None:
            return
        self.loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._listener = None
        if self._path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        _log.info("control socket closed")

    async def close_connections(self, grace: float) -> None:
        """Let running requests finish for up to ``grace`` seconds, then cancel and close."""
        tasks = [t for c in self._conns for t in c.inflight.values()]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for conn in list(self._conns):
            conn.close()
        leftover = [t for t in tasks if not t.done()]
        if leftover:
            await asyncio.wait(leftover, timeout=1.0)
