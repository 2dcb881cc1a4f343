"""What docs/operations.md promises an operator: the example alert rules load in promtool and only
name metrics the daemon really exports (with the labels and label values they select on), and
the daemon logs human lines on a terminal (JSON lines elsewhere: tests/test_daemon_lifecycle.py).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.infra.builds import metrics, write_context
from tests.infra.daemon import DaemonProcess
from tests.infra.registry import Registry
from tests.reliability._support import run_build, standin_daemon

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "docs" / "alerts.yml"
OPERATIONS = REPO / "docs" / "operations.md"
_SELECTOR = re.compile(r"(build_agent_[a-z_]+)(?:\{([^}]*)\})?")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (prometheus)")
def test_alert_rules_pass_promtool() -> None:
    r = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def _base_name(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_metric_in_the_docs_is_exported(
    short_tmp: Path, registry: Registry, base_image: str
) -> None:
    d, _ = standin_daemon(short_tmp, registry)
    try:
        ctx = write_context(short_tmp / "ctx", {"Dockerfile": f"FROM {base_image}\nRUN true\n"})
        assert run_build(d.socket_path, ctx, {"target_ref": f"{registry.host}/ops:1"}).state == (
            "succeeded"
        )
        samples = metrics(d)
        url = f"http://127.0.0.1:{d.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            declared = {
                ln.split()[2] for ln in r.read().decode().splitlines() if ln.startswith("# TYPE ")
            }
    finally:
        d.stop()
        d.cleanup()
    exported: dict[str, list[str]] = {}
    for key in samples:
        name, _, labels = key.partition("{")
        exported.setdefault(_base_name(name), []).append(labels)
        exported.setdefault(name, []).append(labels)
    text = ALERTS.read_text() + OPERATIONS.read_text()
    named = set()
    checked = 0
    for m in _SELECTOR.finditer(text):
        name, selector = m.group(1), m.group(2) or ""
        named.add(name)
        assert (
            _base_name(name) in declared
            or name in declared
            or (name.endswith("_total") and name[: -len("_total")] in declared)
        ), f"{name} is not exported"
        if not selector:
            continue
        if name not in exported and _base_name(name) not in exported:
            continue  # declared, no sample yet (no such event in this run): labels unchecked
        checked += 1
        for label, op, value in re.findall(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"', selector):
            if label == "job":
                continue
            present = [ls for ls in exported.get(name, exported.get(_base_name(name), []))]
            assert any(f'{label}="' in ls for ls in present), f"{name} has no label {label}"
            if op == "=":
                values = {re.search(rf'{label}="([^"]*)"', ls).group(1) for ls in present}  # type: ignore[union-attr]
                if label == "state" or name.endswith("_bucket"):
                    assert value in values, f'{name}{{{label}="{value}"}}: only {values}'
    assert len(named) >= 10, named
    assert checked >= 5, "too few selectors could be checked against samples"


def test_human_log_lines_on_a_terminal(short_tmp: Path) -> None:
    d = DaemonProcess(short_tmp / "d")
    master, slave = pty.openpty()
    env = d.env()
    env.pop("NOTIFY_SOCKET")
    proc = subprocess.Popen(
        [*d.command(), "run", "--config", str(d.config_path)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        cwd=str(REPO),
    )
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while b"ready" not in out.lower() and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        d.cleanup()
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    assert lines, "the daemon printed nothing on the terminal"
    for line in lines:
        assert re.match(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) agent", line), line
        with pytest.raises(ValueError):
            json.loads(line)
