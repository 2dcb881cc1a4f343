"""The real daemon process: readiness over NOTIFY_SOCKET, agentctl, signals, exit codes."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ctl.client import ClientError
from tests.infra.daemon import DAEMON, REPO, TEST_OPS, DaemonProcess

Factory = Callable[..., DaemonProcess]


def test_ready_ping_sigterm_removes_socket(daemon_factory: Factory) -> None:
    d = daemon_factory()
    assert "READY=1" in d.notifications
    assert os.path.exists(d.socket_path)
    assert oct(os.stat(d.socket_path).st_mode & 0o777) == "0o660"
    r = d.ctl("ping")
    assert r.returncode == 0, r.stderr
    assert "pong" in r.stdout
    assert d.stop(signal.SIGTERM) == 0
    assert not os.path.exists(d.socket_path)
    assert "STOPPING=1" in d.notifications
    assert d.notifications.index("READY=1") < d.notifications.index("STOPPING=1")


def test_sigint_exits_zero(daemon_factory: Factory) -> None:
    d = daemon_factory()
    assert d.stop(signal.SIGINT) == 0
    assert not os.path.exists(d.socket_path)


def test_watchdog_pings_at_half_the_interval(daemon_factory: Factory) -> None:
    # A 1 s watchdog: pings 0.5 s apart. The median of four gaps between received pings must be
    # near 0.5 s: the full interval (1 s), a quarter or three quarters of it all fail, while a
    # late wake-up on a loaded machine moves one gap, not the median.
    d = daemon_factory(env={"WATCHDOG_USEC": "1000000"}, start=False)
    d.start()
    received: list[float] = []
    for _ in range(5):
        d.wait_notify("WATCHDOG=1", timeout=3)
        received.append(time.monotonic())
        d.notifications.remove("WATCHDOG=1")
    gaps = sorted(b - a for a, b in itertools.pairwise(received))
    median = (gaps[1] + gaps[2]) / 2
    assert 0.4 <= median <= 0.65, f"gaps between WATCHDOG=1 pings: {gaps}"


def test_watchdog_for_another_pid_is_ignored(daemon_factory: Factory) -> None:
    d = daemon_factory(env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    # Three whole intervals: a daemon that honoured the variable would have pinged by then.
    with pytest.raises(TimeoutError):
        d.wait_notify("WATCHDOG=1", timeout=0.6)
    d.stop()
    assert "WATCHDOG=1" not in d.notifications


def test_systemd_variables_are_taken_out_of_the_environment() -> None:
    # What a child inherits is os.environ: after take_environment() nothing of systemd's is left,
    # while the values meant for this pid were read first.
    code = (
        "import os; from agent.notify import take_environment; "
        "os.environ.update(NOTIFY_SOCKET='/x', LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
        "WATCHDOG_USEC='5', LISTEN_FDNAMES='control'); sd = take_environment(); "
        "print(sd.notify_socket, sd.listen_fds, sd.watchdog_usec, sd.listen_fdnames, "
        "sorted(k for k in os.environ if k.startswith(('LISTEN_', 'NOTIFY_', 'WATCHDOG_'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert out.strip() == "/x 1 5 ('control',) []"


def test_listen_fds_for_another_pid_are_ignored() -> None:
    code = (
        "import os; from agent.notify import take_environment; "
        "os.environ.update(LISTEN_PID='1', LISTEN_FDS='1'); sd = take_environment(); "
        "print(sd.listen_fds, 'LISTEN_FDS' in os.environ)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert out.strip() == "0 False"


SLEEP_OP = TEST_OPS


def test_sigterm_lets_a_running_request_finish(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=SLEEP_OP)
    with d.client() as c:
        call = c.start("test_sleep", {"seconds": 0.5})
        assert next(iter(call)).name == "started"  # in flight on the daemon
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert call.result() == {"slept": True}
    assert d.proc.wait(10) == 0


def test_second_signal_forces_stop(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=SLEEP_OP)
    with d.client() as c:
        call = c.start("test_sleep", {"seconds": 60})
        assert next(iter(call)).name == "started"
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        d.wait_notify("STOPPING=1")
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 1  # forced: distinct from a clean stop
        assert time.monotonic() - t0 < 1.5, d.log()[-4000:]  # did not sit out the 2 s grace
    assert not os.path.exists(d.socket_path)


def test_request_grace_then_cancel(daemon_factory: Factory) -> None:
    d = daemon_factory(preamble=SLEEP_OP)
    with d.client() as c:
        call = c.start("test_sleep", {"seconds": 60})
        assert next(iter(call)).name == "started"
        t0 = time.monotonic()
        assert d.stop() == 0
        assert 1.5 < time.monotonic() - t0 < 10  # waited the request grace (2 s), then stopped
        try:
            call.result()
        except ClientError:
            pass
        else:
            raise AssertionError("a cancelled request must not get a result")


def test_invalid_config_exits_78_naming_the_key(short_tmp: Path) -> None:
    cfg = short_tmp / "bad.toml"
    cfg.write_text("[daemon]\nmax_frame = -1\n")
    r = subprocess.run(
        [*DAEMON, "run", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 78
    assert "daemon.max_frame" in r.stderr


def test_startup_failure_exits_70(daemon_factory: Factory) -> None:
    first = daemon_factory()
    # Same socket path while the first one listens: a start failure, not a config error.
    second = daemon_factory(start=False)
    second.config_path.write_text(
        second.config_path.read_text().replace(second.socket_path, first.socket_path)
    )
    second.start(wait_ready=False)
    assert second.proc is not None
    assert second.proc.wait(20) == 70
    assert "another daemon is already listening" in second.log()
    assert first.ctl("ping").returncode == 0


def test_metrics_port_in_use_exits_70(daemon_factory: Factory) -> None:
    first = daemon_factory()
    second = daemon_factory(
        {"daemon": {"metrics_address": f"127.0.0.1:{first.metrics_port}"}}, start=False
    )
    second.start(wait_ready=False)
    assert second.proc is not None
    assert second.proc.wait(20) == 70
    assert "daemon.metrics_address" in second.log()


def test_check_config_masks_secrets(short_tmp: Path) -> None:
    cfg = short_tmp / "c.toml"
    cfg.write_text(
        '[[proxy.credentials]]\nhost = "r.example.com"\nusername = "u"\npassword = "hunter2"\n'
    )
    r = subprocess.run(
        [*DAEMON, "check-config", "--config", str(cfg)], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout
    assert 'password = "***"' in r.stdout
    assert "[daemon]" in r.stdout


def test_sighup_reloads_and_keeps_serving(daemon_factory: Factory) -> None:
    d = daemon_factory()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP: reloading" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.02)
    assert d.ctl("ping").returncode == 0
    r = d.ctl("--json", "reload")
    assert r.returncode == 0, r.stderr
    assert "components" in json.loads(r.stdout)
    assert d.stop() == 0


def test_logs_are_json_lines_off_a_tty(daemon_factory: Factory) -> None:
    d = daemon_factory()
    d.stop()
    records = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    loggers = {r["logger"] for r in records}
    assert "agent.daemon" in loggers and "agent.control" in loggers
    assert any(r["msg"].startswith("ready") for r in records)


def test_log_format_text(daemon_factory: Factory) -> None:
    d = daemon_factory({"daemon": {"log_format": "text"}})
    d.stop()
    line = next(x for x in d.log().splitlines() if "agent.daemon: ready" in x)
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO agent.daemon: ready \(pid \d+\)", line), line


def test_missing_socket_group_warns_and_starts(daemon_factory: Factory) -> None:
    d = daemon_factory({"daemon": {"socket_group": "no-such-group-zz"}})
    assert "no-such-group-zz" in d.log() and "does not exist" in d.log()
    assert os.stat(d.socket_path).st_gid == os.getgid()
    assert d.ctl("ping").returncode == 0


def test_stale_socket_file_is_replaced(daemon_factory: Factory) -> None:
    d = daemon_factory(start=False)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(d.socket_path)  # a crash leftover: the file exists, nobody listens
    stale.close()
    d.start()
    assert d.ctl("ping").returncode == 0


def test_non_socket_at_socket_path_exits_70(daemon_factory: Factory) -> None:
    d = daemon_factory(start=False)
    Path(d.socket_path).write_text("not a socket")
    d.start(wait_ready=False)
    assert d.proc is not None and d.proc.wait(20) == 70
    assert "exists and is not a socket" in d.log()


def test_two_signals_at_once_still_clean_up(daemon_factory: Factory) -> None:
    d = daemon_factory()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(10) in (0, 1)  # 0 if the first stop finished before the second signal
    assert not os.path.exists(d.socket_path), d.log()  # the unwinding ran


def test_notifier_abstract_socket_address() -> None:
    from agent.notify import Notifier

    name = f"build-agent-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        n = Notifier("@" + name)
        n.notify("READY=1", "STATUS=ok")
        n.close()
        assert listener.recv(100) == b"READY=1\nSTATUS=ok"


def test_notifier_without_socket_is_a_no_op() -> None:
    from agent.notify import Notifier

    n = Notifier(None)
    assert not n.enabled
    n.notify("READY=1")


def test_helper_chooses_again_when_its_port_was_taken(daemon_factory: Factory) -> None:
    d = daemon_factory(start=False)
    taken = d.sections["daemon"]["metrics_address"]
    host, _, port = taken.rpartition(":")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, int(port)))
        squatter.listen(1)
        d.start()
    assert d.sections["daemon"]["metrics_address"] != taken
    assert f"127.0.0.1:{d.metrics_port}" == d.sections["daemon"]["metrics_address"]
    assert "address already in use" in d.log().lower()
    assert d.ctl("ping").returncode == 0
