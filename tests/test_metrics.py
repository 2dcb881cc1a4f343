"""The metrics endpoint of a real daemon: parsed with prometheus_client, linted with promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ctl.client import RequestFailed
from tests.infra.daemon import DaemonProcess

Factory = Callable[..., DaemonProcess]


def scrape(d: DaemonProcess) -> str:
    url = f"http://127.0.0.1:{d.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return str(r.read().decode())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_control_counters_move_on_ping(daemon_factory: Factory) -> None:
    d = daemon_factory()
    key = ("build_agent_control_requests_total", (("code", "ok"), ("op", "ping")))
    before = samples(scrape(d)).get(key, 0.0)
    with d.client() as c:
        for _ in range(3):
            c.call("ping")
        with pytest.raises(RequestFailed):
            c.call("nope")
    after = samples(scrape(d))
    assert after[key] == before + 3
    unknown = (("code", "bad_request"), ("op", "unknown"))
    assert after[("build_agent_control_requests_total", unknown)] == 1
    count = after[("build_agent_control_request_duration_seconds_count", (("op", "ping"),))]
    assert count >= 3
    info = [labels for (name, labels), v in after.items() if name == "build_agent_info" and v == 1]
    assert len(info) == 1
    assert dict(info[0])["version"] == "0.1.0" and dict(info[0])["toolchain"]


def test_open_connections_gauge(daemon_factory: Factory) -> None:
    d = daemon_factory()
    with d.client() as c:
        c.call("ping")
        assert samples(scrape(d))[("build_agent_control_connections", ())] == 1.0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics_is_clean(daemon_factory: Factory) -> None:
    d = daemon_factory()
    with d.client() as c:
        c.call("ping")
        c.call("info")
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape(d), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_metrics_off(daemon_factory: Factory) -> None:
    d = daemon_factory({"daemon": {"metrics_address": ""}})
    with pytest.raises(OSError):
        scrape(d)
    assert d.ctl("ping").returncode == 0
