"""Key inputs beside the records: the compact per-entry summary, comparing two builds, the miss
reasons, retention, and records written before key inputs existed (read by a real daemon)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.build import keyinputs
from agent.build.context import hash_context
from agent.build.records import BuildRecord, RecordStore
from tests.infra.builds import write_context
from tests.infra.daemon import DaemonProcess


def _digest(root: Path) -> Any:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return hash_context(fd, "Dockerfile")
    finally:
        os.close(fd)


def test_entries_round_trip_with_odd_paths(short_tmp: Path) -> None:
    ctx = write_context(short_tmp / "c", {"Dockerfile": "FROM a\n", "with space/a b": "x"})
    (ctx / "new\nline").write_text("y")
    (ctx / "link").symlink_to("target with spaces")
    (ctx / "bad-\udcff".encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
     ).write_text("z")  # fmt: skip
    d = _digest(ctx)
    entries = keyinputs.decode_entries(keyinputs.encode_entries(d.items))
    assert set(entries) == {"Dockerfile", "with space", "with space/a b", "new\nline", "link",
                            "bad-\udcff"}  # fmt: skip
    assert entries["link"].startswith("l ")
    assert entries["Dockerfile"].split()[0] == "f"


def test_compare_names_each_kind_of_change() -> None:
    base = {
        "dockerfile": {"digest": "sha256:1"},
        "syntax": None,
        "images": [{"ref": "a:1", "digest": "sha256:a"}, {"ref": "b:1", "digest": "sha256:b"}],
        "args": {"X": "h1", "Y": "h2"},
        "target": None,
        "platform": None,
        "secret_ids": [],
        "process_version": "1",
        "entries_digest": "e1",
    }
    assert keyinputs.compare(base, dict(base)) == {}
    new = {
        **base,
        "dockerfile": {"digest": "sha256:2"},
        "images": [{"ref": "a:1", "digest": "sha256:a2"}, {"ref": "c:1", "digest": "sha256:c"}],
        "args": {"X": "h9", "Z": "h3"},
        "entries_digest": "e2",
    }
    old_e = {"keep": "f 100644 1", "edit": "f 100644 2", "gone": "f 100644 3"}
    new_e = {"keep": "f 100644 1", "edit": "f 100644 9", "born": "f 100644 4"}
    changes = keyinputs.compare(base, new, old_e, new_e)
    assert changes == {
        "dockerfile": True,
        "images_moved": [{"ref": "a:1", "old": "sha256:a", "new": "sha256:a2"}],
        "images_added": [{"ref": "c:1", "digest": "sha256:c"}],
        "images_removed": [{"ref": "b:1", "digest": "sha256:b"}],
        "args": {"changed": ["X"], "added": ["Z"], "removed": ["Y"]},
        "context": {"added": ["born"], "removed": ["gone"], "changed": ["edit"]},
    }
    assert keyinputs.reasons(changes) == ["dockerfile", "from_moved", "args", "context"]
    assert keyinputs.compare(base, new)["context"] == {"changed": True}
    assert keyinputs.reasons({}) == ["other"]


def test_arg_digests_are_keyed() -> None:
    a = keyinputs.arg_digest(b"k" * 32, "TOKEN", "abc")
    assert a == keyinputs.arg_digest(b"k" * 32, "TOKEN", "abc")
    assert a != keyinputs.arg_digest(b"j" * 32, "TOKEN", "abc")
    assert "abc" not in a


def test_previous_is_the_newest_succeeded_build_of_the_same_repo_and_dockerfile() -> None:
    def rec(i: str, state: str = "succeeded", repo: str = "r/x", df: str = "Dockerfile") -> Any:
        return BuildRecord(id=i, state=state, inputs={"key": i},
                           request={"target_repo": repo, "dockerfile": df})  # fmt: skip

    records = [rec("1"), rec("2"), rec("3", "failed"), rec("4", repo="r/y"),
               rec("5", df="other/Dockerfile"), BuildRecord(id="6", state="succeeded",
               request={"target_repo": "r/x"})]  # fmt: skip
    now = rec("7")
    assert keyinputs.previous(records, now).id == "2"  # type: ignore[union-attr]
    tagged = BuildRecord(id="8", state="succeeded", inputs={}, target_ref="r/x:tag",
                         request={"target_ref": "r/x:tag", "dockerfile": None})  # fmt: skip
    assert keyinputs.target_repo(tagged) == "r/x"
    assert keyinputs.previous([*records, now], tagged).id == "7"  # type: ignore[union-attr]


def test_prune_removes_the_entries_file(short_tmp: Path) -> None:
    store = RecordStore(short_tmp)
    r = store.create(BuildRecord(id="20200101-000000-aaaaaa"))
    store.transition(r, "running")
    store.transition(r, "succeeded")
    store.save_entries(r.id, b"blob")
    assert store.load_entries(r.id) == b"blob"
    store.prune(max_age=0, max_count=0, now=time.time() + 10)
    assert store.load_entries(r.id) is None
    assert list(store.dir.iterdir()) == []


OLD_RECORD = {
    "id": "20261120-101010-abcdef",
    "state": "succeeded",
    "created": 1763633410.0,
    "started": 1763633411.0,
    "finished": 1763633420.0,
    "transitions": [{"state": "queued", "at": 1763633410.0}],
    "labels": {},
    "toolchain": "buildah",
    "request": {
        "dockerfile": "Dockerfile",
        "target_repo": "localhost:5000/ws",
        "build_arg_names": [],
        "secret_ids": [],
    },
    "context": {"key": "ab" * 32, "files": 2, "bytes": 10, "excluded": 0, "seconds": 0.01},
    "base_ref": "localhost:5000/base:" + "ab" * 32,
    "target_ref": "localhost:5000/ws:" + "cd" * 32,
    "digest": "sha256:" + "ef" * 32,
    "cache": {"base": False, "workspace": False},
    "timings": {},
    "error": None,
}


def test_records_written_before_key_inputs_are_read(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory({"build": {"toolchain": "buildah"}}, start=False)
    builds = d.tmp / "state" / "builds"
    builds.mkdir(parents=True)
    now = time.time()  # young enough not to be pruned at start (build.retention_days)
    old = {**OLD_RECORD, "created": now - 60, "started": now - 59, "finished": now - 50}
    (builds / f"{OLD_RECORD['id']}.json").write_text(json.dumps(old))
    d.start()
    r = d.ctl("--json", "status", OLD_RECORD["id"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "succeeded"
    r = d.ctl("--json", "explain", OLD_RECORD["id"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["inputs"] is None and "no key inputs" in out["note"] and out["verdict"] == "miss"
    r = d.ctl("explain", OLD_RECORD["id"])
    assert r.returncode == 0 and "no key inputs" in r.stdout
    r = d.ctl("diff", OLD_RECORD["id"], OLD_RECORD["id"])
    assert r.returncode == 1 and "bad_request" in r.stderr and "no recorded key inputs" in r.stderr
    r = d.ctl("explain", "20261120-000000-000000")
    assert r.returncode == 1 and "not_found" in r.stderr
