"""Property test: thousands of random frames at ONE daemon; it keeps answering and leaks no fds."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctl import protocol
from tests.infra.daemon import DaemonProcess
from tests.infra.wire import connect

Factory = Callable[..., DaemonProcess]

_MAX_FRAME = 2048

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), _scalars),
        "id": st.one_of(st.integers(min_value=0, max_value=2**63 - 1), _scalars),
        "op": st.one_of(st.sampled_from(["ping", "info", "drain", "reload", "build"]), _scalars),
        "args": st.one_of(st.dictionaries(st.text(max_size=8), _values, max_size=3), _values),
    },
)


def _framed(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


_chunks = st.one_of(
    st.binary(min_size=1, max_size=64),  # raw garbage
    _requests.map(_framed),  # request-shaped maps
    _values.map(_framed),  # any msgpack value in a valid frame
    st.integers(min_value=0, max_value=2**32 - 1).map(lambda n: struct.pack(">I", n)),  # lengths
)


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _check_replies(data: bytes) -> None:
    off = 0
    while off < len(data):
        (length,) = struct.unpack(">I", data[off : off + 4])
        msg = protocol.decode(data[off + 4 : off + 4 + length])
        off += 4 + length
        assert "id" in msg
        if msg.get("ok") is False:
            assert msg["error"]["code"] in protocol.ERROR_CODES
            assert isinstance(msg["error"]["message"], str)
        else:
            assert msg.get("ok") is True or "event" in msg
    assert off == len(data), "the daemon sent a partial frame"


def test_random_frames(daemon_factory: Factory) -> None:
    d = daemon_factory({"daemon": {"max_frame": _MAX_FRAME, "log_level": "error"}})
    with d.client() as c:
        c.call("ping")
    before = d.settled_fds()
    sent_frames = 0

    @settings(
        max_examples=500,
        deadline=None,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(_chunks, min_size=4, max_size=12))
    def run(chunks: list[bytes]) -> None:
        nonlocal sent_frames
        sent_frames += len(chunks)
        with connect(d.socket_path, timeout=10) as s:
            try:
                s.sendall(b"".join(chunks))
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon already refused the stream and closed
            _check_replies(_read_until_closed(s))

    run()
    assert sent_frames >= 2000
    with d.client() as c:
        assert c.call("ping")["pong"] is True
    assert d.wait_fds(before) == before
    assert d.proc is not None and d.proc.poll() is None
