"""The control protocol against the real daemon: framing, errors, pipelining, fds, slow readers."""

from __future__ import annotations

import array
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ctl.client import RequestFailed
from tests.infra.daemon import TEST_OPS, DaemonProcess
from tests.infra.wire import connect, frame, is_closed, recv_msg

Factory = Callable[..., DaemonProcess]


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """One daemon for the bad-input tests of this module: each must leave it serving."""
    tmp = Path(tempfile.mkdtemp(prefix="ba-m-", dir="/tmp"))
    d = DaemonProcess(tmp, {"daemon": {"max_frame": 4096}})
    try:
        d.start()
        yield d
        assert d.stop() == 0, d.log()
    finally:
        d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def ping_ok(d: DaemonProcess) -> None:
    with d.client() as c:
        assert c.call("ping")["pong"] is True


def test_ping_roundtrip_raw(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(frame({"v": 1, "id": 7, "op": "ping", "args": {}}))
        reply = recv_msg(s)
    assert reply["id"] == 7 and reply["ok"] is True and reply["result"]["pong"] is True


def test_garbage_bytes_close_the_connection(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = recv_msg(s)
        assert reply["id"] is None and reply["error"]["code"] == "bad_request"
        assert "limit" in reply["error"]["message"]
        assert is_closed(s)
    ping_ok(daemon)


def test_oversized_length_is_refused_and_closed(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(struct.pack(">I", 4097))
        reply = recv_msg(s)
        assert reply["error"]["code"] == "bad_request"
        assert "4097" in reply["error"]["message"] and "max_frame" in reply["error"]["message"]
        assert is_closed(s)
    ping_ok(daemon)


def test_frame_at_the_limit_is_read(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        pad = "x" * (4096 - 60)
        f = frame({"v": 1, "id": 1, "op": "ping", "args": {"pad": pad}})
        assert len(f) - 4 <= 4096
        s.sendall(f)
        assert recv_msg(s)["ok"] is True


def test_truncated_frame_then_eof(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(frame({"v": 1, "id": 1, "op": "ping"})[:-3])
        s.shutdown(socket.SHUT_WR)
        assert is_closed(s)
    ping_ok(daemon)


def test_truncated_frame_does_not_block_others(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as stuck:
        stuck.sendall(struct.pack(">I", 100) + b"\x80")
        ping_ok(daemon)


@pytest.mark.parametrize(
    "payload",
    [[1, 2, 3], "ping", 42, None, b"\x00"],
    ids=["list", "str", "int", "nil", "bin"],
)
def test_non_map_payload_gets_bad_request_and_connection_survives(
    daemon: DaemonProcess, payload: object
) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(frame(payload))
        reply = recv_msg(s)
        assert reply == {
            "id": None,
            "ok": False,
            "error": {"code": "bad_request", "message": reply["error"]["message"], "details": {}},
        }
        assert "not a map" in reply["error"]["message"]
        s.sendall(frame({"v": 1, "id": 2, "op": "ping"}))
        assert recv_msg(s)["ok"] is True


def test_invalid_msgpack_body(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
        reply = recv_msg(s)
        assert reply["error"]["code"] == "bad_request"
        assert "msgpack" in reply["error"]["message"]
        s.sendall(frame({"v": 1, "id": 2, "op": "ping"}))
        assert recv_msg(s)["ok"] is True


@pytest.mark.parametrize(
    ("request_", "reply_id", "code", "words"),
    [
        ({"v": 1, "id": "7", "op": "ping"}, None, "bad_request", "request id"),
        ({"v": 1, "id": -1, "op": "ping"}, None, "bad_request", "request id"),
        ({"v": 1, "id": True, "op": "ping"}, None, "bad_request", "request id"),
        ({"v": 1, "op": "ping"}, None, "bad_request", "request id"),
        ({"v": 1, "id": 3, "op": 5}, 3, "bad_request", "unknown op"),
        ({"v": 1, "id": 3, "op": "nope"}, 3, "bad_request", "unknown op 'nope'"),
        ({"v": 1, "id": 3, "op": "ping", "args": [1]}, 3, "bad_request", "args must be a map"),
        ({"v": 1, "id": 3, "op": "drain", "args": {b"enable": 1}}, 3, "bad_request", "string keys"),
        ({"v": 1, "id": 3, "op": "drain", "args": {"enable": "yes"}}, 3, "bad_request", "enable"),
        ({"v": 2, "id": 3, "op": "ping"}, 3, "unsupported_version", "version 2"),
        ({"v": "1", "id": 3, "op": "ping"}, 3, "unsupported_version", "not supported"),
        ({"id": 3, "op": "ping"}, 3, "unsupported_version", "not supported"),
    ],
)
def test_invalid_requests_get_documented_errors(
    daemon: DaemonProcess, request_: dict[str, object], reply_id: int | None, code: str, words: str
) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(frame(request_))
        reply = recv_msg(s)
        assert reply["id"] == reply_id
        assert reply["ok"] is False
        assert reply["error"]["code"] == code
        assert words in reply["error"]["message"]
        s.sendall(frame({"v": 1, "id": 99, "op": "ping"}))
        assert recv_msg(s)["id"] == 99


def test_unknown_op_lists_known_ops(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(frame({"v": 1, "id": 1, "op": "frobnicate"}))
        reply = recv_msg(s)
    assert {"ping", "info"} <= set(reply["error"]["details"]["ops"])


def test_pipelined_requests_all_answered(daemon: DaemonProcess) -> None:
    with connect(daemon.socket_path) as s:
        s.sendall(b"".join(frame({"v": 1, "id": i, "op": "ping"}) for i in range(1, 51)))
        ids = {recv_msg(s)["id"] for _ in range(50)}
    assert ids == set(range(1, 51))


def test_client_library_several_calls_in_flight(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        calls = [c.start("ping"), c.start("info"), c.start("ping")]
        results = [call.result() for call in reversed(calls)]
    assert results[0]["pong"] and "uptime" in results[1] and results[2]["pong"]


def test_passed_fds_are_closed_by_the_daemon(daemon: DaemonProcess) -> None:
    ping_ok(daemon)
    before = daemon.settled_fds()
    r, w = os.pipe()
    try:
        with connect(daemon.socket_path) as s:
            for i in range(20):
                s.sendmsg(
                    [frame({"v": 1, "id": i, "op": "ping"})],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w, r]))],
                )
                assert recv_msg(s)["ok"] is True
    finally:
        os.close(r)
        os.close(w)
    ping_ok(daemon)
    assert daemon.wait_fds(before) == before


def test_too_many_fds_close_the_connection(daemon: DaemonProcess) -> None:
    before = daemon.settled_fds()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(40)]
    try:
        with connect(daemon.socket_path) as s:
            s.sendmsg(
                [frame({"v": 1, "id": 1, "op": "ping"})],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
            )
            reply = recv_msg(s)
            assert reply["error"]["code"] == "bad_request"
            assert "file descriptors" in reply["error"]["message"]
            assert is_closed(s)
    finally:
        for fd in fds:
            os.close(fd)
    ping_ok(daemon)
    assert daemon.wait_fds(before) == before


def test_slow_reader_does_not_stall_others(daemon: DaemonProcess) -> None:
    # A client that sends thousands of requests and never reads a reply: the daemon must stop
    # reading it (bounded output) and keep answering everyone else.
    before = daemon.settled_fds()
    hog = connect(daemon.socket_path)
    hog.setblocking(False)
    req = frame({"v": 1, "id": 1, "op": "info"})
    sent = 0
    try:
        while sent < 64 << 20:
            sent += hog.send(req * 64)
    except BlockingIOError:
        pass  # the daemon stopped reading us: the kernel buffers are full
    assert sent < 64 << 20, "the daemon kept reading a client that never reads"
    for _ in range(5):
        ping_ok(daemon)
    hog.close()
    ping_ok(daemon)
    # The hog's connection and buffers go away once it is closed.
    assert daemon.wait_fds(before) == before


def test_requests_complete_out_of_order(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    with connect(d.socket_path) as s:
        s.sendall(
            frame({"v": 1, "id": 1, "op": "test_sleep", "args": {"seconds": 0.3}})
            + frame({"v": 1, "id": 2, "op": "ping"})
        )
        first, second, third = recv_msg(s), recv_msg(s), recv_msg(s)
    assert first == {"id": 1, "event": "started", "data": None}
    assert second["id"] == 2 and second["ok"] is True  # ping did not wait for the sleep
    assert third == {"id": 1, "ok": True, "result": {"slept": True}}


def test_duplicate_in_flight_id_is_refused(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    with connect(d.socket_path) as s:
        s.sendall(frame({"v": 1, "id": 5, "op": "test_sleep", "args": {"seconds": 0.3}}))
        assert recv_msg(s)["event"] == "started"
        s.sendall(frame({"v": 1, "id": 5, "op": "ping"}))
        dup = recv_msg(s)
        assert dup["id"] == 5 and dup["error"]["code"] == "bad_request"
        assert "already in flight" in dup["error"]["message"]
        assert recv_msg(s)["result"] == {"slept": True}


def _identity(fd: int) -> list[int]:
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino]


def test_fds_reach_the_request_they_were_sent_with(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    before = d.settled_fds()
    r, w = os.pipe()
    dfd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    ids = {fd: _identity(fd) for fd in (r, w, dfd)}
    try:
        with connect(d.socket_path) as s:
            # A frame without fds, then one sent with two fds, then one without, in 3 writes.
            s.sendall(frame({"v": 1, "id": 1, "op": "test_fds"}))
            s.sendmsg(
                [frame({"v": 1, "id": 2, "op": "test_fds"})],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [dfd, r]))],
            )
            s.sendall(frame({"v": 1, "id": 3, "op": "test_fds"}))
            # The fds with the first 6 bytes of a frame, the rest in a later write.
            split = frame({"v": 1, "id": 4, "op": "test_fds"})
            s.sendmsg([split[:6]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]))])
            s.sendall(split[6:])
            replies = {m["id"]: m["result"] for m in (recv_msg(s) for _ in range(4))}
            # Through the client library too.
            with d.client() as c:
                assert c.call("test_fds", fds=[w]) == [ids[w]]
    finally:
        for fd in (r, w, dfd):
            os.close(fd)
    assert replies == {1: [], 2: [ids[dfd], ids[r]], 3: [], 4: [ids[w]]}
    assert d.wait_fds(before) == before


def test_in_flight_limit_answers_busy(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    n = 300
    with connect(d.socket_path) as s:
        s.sendall(
            b"".join(
                frame({"v": 1, "id": i, "op": "test_sleep", "args": {"seconds": 0.5}})
                for i in range(n)
            )
        )
        busy = started = done = 0
        while busy + done < n:
            m = recv_msg(s)
            if m.get("event") == "started":
                started += 1
            elif m["ok"]:
                done += 1
            else:
                assert m["error"]["code"] == "busy" and "in flight" in m["error"]["message"]
                busy += 1
    assert started == done == 256 and busy == n - 256


def test_client_iterates_events_then_result(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    with d.client() as c:
        call = c.start("test_sleep", {"seconds": 0.01})
        assert [(e.name, e.data) for e in call] == [("started", None)]
        assert call.result() == {"slept": True}
        with pytest.raises(RequestFailed) as err:
            c.call("test_sleep", {"seconds": "long"})
        assert err.value.code == "bad_request" and "args.seconds" in err.value.message


def test_out_of_fds_pauses_accepting_then_recovers(daemon_factory: Factory) -> None:
    d = daemon_factory()
    ping_ok(d)
    fds = d.settled_fds()
    # Room for two more connections, then accept() fails with EMFILE.
    soft = next(
        line.split()[3]
        for line in Path(f"/proc/{d.pid}/limits").read_text().splitlines()
        if line.startswith("Max open files")
    )
    subprocess.run(["prlimit", f"--pid={d.pid}", f"--nofile={fds + 2}:"], check=True)
    held = [connect(d.socket_path) for _ in range(6)]  # all connect: the backlog holds them
    try:
        deadline = time.monotonic() + 10
        while "pausing new connections" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.02)
    finally:
        for s in held:
            s.close()
    subprocess.run(["prlimit", f"--pid={d.pid}", f"--nofile={soft}:"], check=True)
    ping_ok(d)
    assert d.log().count("pausing new connections") < 50  # paused, not spinning


def test_stream_to_a_reader_that_does_not_read_is_paused(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    size, count = 65536, 1000  # 64 MiB if nothing held the handler back
    with connect(d.socket_path) as s, d.client() as probe:
        s.sendall(
            frame({"v": 1, "id": 1, "op": "test_flood", "args": {"size": size, "count": count}})
        )
        # Poll the handler's progress until it stops moving: it must be parked in emit().
        deadline = time.monotonic() + 10
        last, same = -1, 0
        while same < 10 and time.monotonic() < deadline:
            now = probe.call("test_flood_progress")
            same = same + 1 if now == last else 0
            last = now
            time.sleep(0.01)
        assert 0 < last < count
        assert last * size < 8 << 20  # ~1 MiB daemon buffer + the kernel's socket buffers
        assert probe.call("ping")["pong"] is True  # everyone else is served meanwhile
        # Reading resumes the stream; every event arrives, in order, then the reply.
        events = 0
        while True:
            m = recv_msg(s)
            if "event" not in m:
                break
            assert len(m["data"]) == size
            events += 1
    assert events == count and m["result"] == {"emitted": count}


def test_unserialisable_result_or_details_is_an_internal_error(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=TEST_OPS)
    with d.client() as c:
        for args in ({}, {"as_error": True}):
            with pytest.raises(RequestFailed) as err:
                c.call("test_bad_result", args)
            assert err.value.code == "internal"
            assert "test_bad_result" in err.value.message
        assert c.call("ping")["pong"] is True
