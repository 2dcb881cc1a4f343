"""Config loading and validation: one message per invalid field, env overrides win over TOML."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from tests.infra.daemon import DAEMON, REPO


def load_toml(tmp: Path, text: str, env: dict[str, str] | None = None) -> config.Config:
    p = tmp / "c.toml"
    p.write_text(text)
    return config.load(p, environ=env or {})


def test_defaults_without_a_file(short_tmp: Path) -> None:
    c = load_toml(short_tmp, "")
    assert c.daemon.socket == "/run/build-agent/agent.sock"
    assert c.daemon.metrics_address == "127.0.0.1:9500"
    assert c.daemon.allowed_uids == [0]
    assert c.build.toolchain == "auto"
    assert c.sandbox.mode == "on"


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        (
            "[daemon]\nsocket = 'relative.sock'",
            "daemon.socket = 'relative.sock' must be an absolute",
        ),
        ("[daemon]\nstate_dir = 'x'", "daemon.state_dir = 'x' must be an absolute path"),
        ("[daemon]\nmetrics_address = '9500'", "daemon.metrics_address = '9500' must be HOST:PORT"),
        ("[daemon]\nmetrics_address = 'h:99999'", "daemon.metrics_address"),
        ("[daemon]\nallowed_uids = [-1]", "daemon.allowed_uids = [-1] must be a list of ids"),
        ("[daemon]\nallowed_uids = 0", "daemon.allowed_uids = 0 must be a list"),
        ("[daemon]\nread_gids = ['a']", "daemon.read_gids[0] = 'a' must be an integer"),
        ("[daemon]\nshutdown_grace = -1", "daemon.shutdown_grace = -1 must be 0 or greater"),
        ("[daemon]\nmax_frame = 0", "daemon.max_frame = 0 must be greater than 0"),
        ("[daemon]\nlog_level = 'loud'", "daemon.log_level = 'loud' must be one of 'debug'"),
        ("[daemon]\nlog_format = 'xml'", "daemon.log_format = 'xml' must be one of"),
        ("[daemon]\nsocket_group = 5", "daemon.socket_group = 5 must be a string"),
        ("[daemon]\nsockets = '/x'", "unknown key daemon.sockets; valid keys: socket"),
        ("[deamon]\nsocket = '/x'", "unknown section [deamon]"),
        ("[build]\ntoolchain = 'docker'", "build.toolchain = 'docker' must be one of 'auto'"),
        ("[build]\nmax_concurrent_builds = 0", "build.max_concurrent_builds = 0 must be greater"),
        ("[build]\nmax_queued = -5", "build.max_queued = -5 must be 0 or greater"),
        ("[build]\ntimeout = true", "build.timeout = True must be a number"),
        ("[build]\nbase_repo = 'Bad Repo'", "build.base_repo = 'Bad Repo' must be a repository"),
        ("[proxy]\nport = 0", "proxy.port = 0 must be a TCP port"),
        ("[proxy]\nhost_address = 'nope'", "proxy.host_address = 'nope' must be HOST:PORT"),
        ("[proxy]\nhost_address = 'nope'", 'or "" to turn the host listener off'),
        ("[proxy]\nhost_token_file = 'tok'", "proxy.host_token_file = 'tok' must be an absolute"),
        (
            "[[proxy.routes]]\nname = 'ws'\nupstream = 'r.example/t'\nchildren = 'yes'",
            "proxy.routes[0].children = 'yes' must be a boolean",
        ),
        (
            "[[proxy.routes]]\nname = 'ws'\nupstream = 'r.example/t'\nbuilds = ['Bad']",
            "proxy.routes[0].builds = ['Bad'] has 'Bad', which must be a repository",
        ),
        (
            "[[proxy.routes]]\nname = 'ws'\nupstream = 'r.example/t'\nbuilds = ['r.example/w']",
            "proxy.routes[0] (ws): builds names who may write from the sandbox, so it needs "
            'access = "push" and children = true',
        ),
        ("[sandbox]\nmode = 'maybe'", "sandbox.mode = 'maybe' must be one of 'on', 'off'"),
        ("[sandbox]\negress = 'all'", "sandbox.egress = 'all' must be one of 'none', 'nat'"),
        ("[sandbox]\nnetns = 'Bad Name'", "sandbox.netns = 'Bad Name' must be 1-63"),
        (
            "[sandbox]\nnat_subnet = '10.0.0.0/31'",
            "sandbox.nat_subnet = '10.0.0.0/31' must be IPv4",
        ),
        ("daemon = 3", "daemon must be a table"),
        ("[daemon\n", "is not valid TOML"),
    ],
)
def test_each_invalid_field_has_its_own_message(short_tmp: Path, toml: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(short_tmp, toml)
    assert words in err.value.message


def test_missing_explicit_file(short_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(short_tmp / "absent.toml", environ={})


def test_env_overrides_take_precedence(short_tmp: Path) -> None:
    c = load_toml(
        short_tmp,
        "[daemon]\nsocket = '/toml.sock'\nallowed_uids = [0]\nshutdown_grace = 3\n"
        "[sandbox]\nmode = 'on'\n",
        {
            "AGENT_DAEMON_SOCKET": "/env.sock",
            "AGENT_DAEMON_ALLOWED_UIDS": "0, 1000",
            "AGENT_DAEMON_SHUTDOWN_GRACE": "7.5",
            "AGENT_SANDBOX_MODE": "off",
            "AGENT_SOCKET": "/ignored: agentctl's variable",
        },
    )
    assert c.daemon.socket == "/env.sock"
    assert c.daemon.allowed_uids == [0, 1000]
    assert c.daemon.shutdown_grace == 7.5
    assert c.sandbox.mode == "off"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"AGENT_DAEMON_MAX_FRAME": "big"}, "AGENT_DAEMON_MAX_FRAME='big' is not an integer"),
        ({"AGENT_DAEMON_SOKET": "/x"}, "AGENT_DAEMON_SOKET: [daemon] has no key 'soket'"),
        ({"AGENT_PROXY_REGISTRIES": "[{"}, "AGENT_PROXY_REGISTRIES must be a JSON list"),
        ({"AGENT_DAEMON_SOCKET": "rel"}, "daemon.socket = 'rel' must be an absolute path"),
    ],
)
def test_invalid_env_values_name_the_variable(
    short_tmp: Path, env: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_toml(short_tmp, "", env)
    assert words in err.value.message


def test_check_config_shows_env_override(short_tmp: Path) -> None:
    p = short_tmp / "c.toml"
    p.write_text("[daemon]\nsocket = '/toml.sock'\n")
    env = {"PATH": "/usr/bin:/bin", "AGENT_DAEMON_SOCKET": "/env.sock", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [*DAEMON, "check-config", "--config", str(p), "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["daemon"]["socket"] == "/env.sock"
    assert out["source"] == str(p)


def test_check_config_invalid_exits_78(short_tmp: Path) -> None:
    p = short_tmp / "c.toml"
    p.write_text("[build]\nmax_queued = 'many'\n")
    r = subprocess.run(
        [*DAEMON, "check-config", "--config", str(p)], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 78
    assert "build.max_queued = 'many' must be an integer" in r.stderr


def test_example_config_is_valid() -> None:
    c = config.load(REPO / "systemd" / "config.example.toml", environ={})
    assert c.daemon.socket == "/run/build-agent/agent.sock"


def _reference_table() -> str:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, help_text in config.describe():
        meaning = help_text.replace("|", "\\|")
        rows.append(f"| `{key}` | `{default}` | {meaning} |")
    return "\n".join(rows)


def test_readme_config_reference_is_current() -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    begin, end = "<!-- config:begin -->", "<!-- config:end -->"
    head, rest = text.split(begin, 1)
    current, tail = rest.split(end, 1)
    table = _reference_table()
    if os.environ.get("UPDATE_DOCS"):
        readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")
        return
    assert current.strip() == table, "config keys changed: run with UPDATE_DOCS=1 to regenerate"


def test_check_config_output_is_a_config_that_loads_back(short_tmp: Path) -> None:
    p = short_tmp / "c.toml"
    p.write_text(
        '[daemon]\nallowed_gids = [5, 6]\n[[proxy.routes]]\nname = "ws"\n'
        'upstream = "registry.example.com/team/images"\naccess = "push"\n'
    )
    r = subprocess.run(
        [*DAEMON, "check-config", "--config", str(p)], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 0, r.stderr
    again = short_tmp / "again.toml"
    again.write_text(r.stdout)
    assert config.load(again, environ={}) == config.load(p, environ={})


@pytest.mark.parametrize(
    ("toml", "secret"),
    [
        ("[[proxy.credentials]]\nhost = 'r.example'\npassword = 987654321", "987654321"),
        ("[proxy]\ncredentials = ['user:pw-4711']", "pw-4711"),
    ],
)
def test_invalid_secrets_are_not_echoed(short_tmp: Path, toml: str, secret: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_toml(short_tmp, toml)
    assert "proxy.credentials" in exc.value.message
    assert secret not in exc.value.message, exc.value.message
