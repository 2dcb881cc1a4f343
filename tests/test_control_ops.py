"""The daemon's op table: which ops it serves with which access, filled only at start."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from agent.control.ops import Access
from agent.daemon import op_table
from tests.infra.daemon import REPO

# The daemon's ops and who may call each (docs/protocol.md): a change here is a protocol change.
EXPECTED = {
    "ping": Access.READ,
    "info": Access.READ,
    "drain": Access.ADMIN,
    "reload": Access.ADMIN,
    "resolve": Access.READ,
    "build": Access.BUILD,
    "status": Access.READ,
    "list": Access.READ,
    "logs": Access.READ,
    "cancel": Access.BUILD,
    "explain": Access.READ,
    "diff": Access.READ,
}


def test_the_daemon_serves_the_same_ops_with_the_same_access() -> None:
    ops = op_table()
    table = {}
    for name in ops.names():
        op = ops.get(name)
        assert op is not None and op.name == name
        table[name] = op.access
    assert table == EXPECTED


def test_each_start_gets_its_own_table() -> None:
    first, second = op_table(), op_table()
    assert first is not second
    assert first.get("ping") is not second.get("ping")  # fresh entries, not a shared table


def test_importing_any_agent_module_registers_no_op() -> None:
    # A fresh interpreter imports every module of the daemon, then looks at every op table alive.
    script = textwrap.dedent(
        """
        import gc, importlib, pkgutil
        import agent
        from agent.control.ops import Registry

        for mod in pkgutil.walk_packages(agent.__path__, "agent."):
            importlib.import_module(mod.name)
        tables = [o for o in gc.get_objects() if isinstance(o, Registry)]
        print([name for t in tables for name in t.names()])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
