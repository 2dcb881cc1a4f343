"""Build records (atomic writes, transitions, interrupted on load, retention) and live logs
(scrubbing, many followers, a slow follower catching up from the file)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.build import records as rec
from agent.build.buildlog import BuildLog, read_file
from agent.build.records import BuildRecord, RecordStore, new_id
from agent.errors import IllegalTransition, NotFound


def test_transitions_are_recorded_and_checked(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    r = store.create(BuildRecord(id=new_id()))
    store.transition(r, rec.RUNNING)
    store.transition(r, rec.SUCCEEDED, outcome={"digest": "sha256:x"})
    on_disk = json.loads((tmp_path / "builds" / f"{r.id}.json").read_text())
    assert on_disk["state"] == "succeeded" and on_disk["digest"] == "sha256:x"
    assert [t["state"] for t in on_disk["transitions"]] == ["queued", "running", "succeeded"]
    with pytest.raises(IllegalTransition):
        store.transition(r, rec.RUNNING)
    assert not list((tmp_path / "builds").glob(".*.tmp"))


def test_a_record_reads_back_as_it_was_written(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    r = store.create(
        BuildRecord(
            id=new_id(),
            labels={"team": "a"},
            peer={"uid": 1000, "gid": 1000, "pid": 42},
            owners=[1000],
            toolchain="buildah",
            request={"dockerfile": None, "target_repo": "r/x", "timeout": 60.0},
            context={"key": "k", "files": 1},
            limits={"memory_max": None},
            base_ref="r/base:k",
        )
    )
    store.transition(r, rec.RUNNING)
    error: Any = {"code": "build_failed", "message": "m", "details": {"step": "RUN x"}}
    outcome = {"target_ref": "r/x:t", "digest": "", "cache": {"base": False, "workspace": None}}
    store.transition(r, rec.FAILED, error=error, outcome=outcome)
    path = tmp_path / "builds" / f"{r.id}.json"
    written = path.read_bytes()
    again = RecordStore(tmp_path)
    assert again.load() == []
    back = again.get(r.id)
    assert back.to_json() == r.to_json() and back.owners == [1000] and back.error == error
    again.save(back)
    assert path.read_bytes() == written
    # An illegal move is refused and changes nothing.
    with pytest.raises(IllegalTransition):
        again.transition(back, rec.SUCCEEDED, outcome={"digest": "sha256:y"})
    assert back.state == "failed" and back.digest == "" and len(back.transitions) == 3


def test_records_of_older_versions_load(tmp_path: Path) -> None:
    """No ``owners`` (the submitter owns it), ``error: null``, keys this version does not know
    (kept as they were), a state it does not know (interrupted like an unfinished one)."""
    builds = tmp_path / "builds"
    builds.mkdir()
    old = {"id": "o1", "state": "succeeded", "created": 1, "peer": {"uid": 7}, "error": None,
           "transitions": [{"state": "queued", "at": 1}], "someday": [1, 2]}  # fmt: skip
    (builds / "o1.json").write_text(json.dumps(old))
    (builds / "o2.json").write_text(json.dumps({"id": "o2", "state": "paused"}))
    store = RecordStore(tmp_path)
    assert store.load() == ["o2"]
    o1 = store.get("o1")
    assert o1.owners == [7] and o1.error is None and o1.result()["error"] is None
    assert o1.to_json()["someday"] == [1, 2] and o1.created == 1
    assert store.get("o2").state == "interrupted"
    assert "while this build was paused" in store.get("o2").error["message"]  # type: ignore[index]


def test_load_marks_unfinished_interrupted_and_survives_junk(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    running = store.create(BuildRecord(id="a-running"))
    store.transition(running, rec.RUNNING)
    store.create(BuildRecord(id="b-queued"))
    done = store.create(BuildRecord(id="c-done"))
    store.transition(done, rec.RUNNING)
    store.transition(done, rec.FAILED)
    (tmp_path / "builds" / "d-bad.json").write_text("{half")
    (tmp_path / "builds" / ".e.json.1.tmp").write_text("{")
    again = RecordStore(tmp_path)
    assert sorted(again.load()) == ["a-running", "b-queued"]
    assert again.get("a-running").state == "interrupted"
    assert again.get("a-running").error["message"].startswith("the daemon stopped")
    assert again.get("c-done").state == "failed"
    assert (tmp_path / "builds" / "d-bad.json.bad").exists()
    assert not (tmp_path / "builds" / ".e.json.1.tmp").exists()
    with pytest.raises(NotFound):
        again.get("d-bad")
    with pytest.raises(NotFound):
        again.log_path("../../etc/passwd")


def test_retention_by_age_and_count(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    ids = []
    for i in range(6):
        r = store.create(BuildRecord(id=f"r{i}", created=1000.0 + i))
        store.transition(r, rec.RUNNING)
        store.transition(r, rec.SUCCEEDED)
        r.finished = 1000.0 + i
        store.save(r)
        (tmp_path / "builds" / f"r{i}.log").write_text("log\n")
        ids.append(r.id)
    live = store.create(BuildRecord(id="r9", created=0.0))  # unfinished: never pruned
    pruned = store.prune(max_age=3.5, max_count=100, now=1005.0)
    assert pruned == ["r0", "r1"]
    assert not (tmp_path / "builds" / "r0.log").exists()
    assert store.prune(max_age=1e9, max_count=2, now=1005.0) == ["r2", "r3"]
    assert [r.id for r in store.all()] == ["r9", "r4", "r5"]
    assert live.state == "queued"


async def test_log_scrubs_fans_out_and_a_slow_reader_catches_up(tmp_path: Path) -> None:
    log = BuildLog(tmp_path / "x.log", lambda s: s.replace("SECRET", "***"))
    fast: list[bytes] = []
    slow: list[bytes] = []

    async def reader(out: list[bytes], delay: float) -> None:
        async for _, chunk in log.follow(0):
            out.append(chunk)
            if delay:
                await asyncio.sleep(delay)

    tasks = [asyncio.create_task(reader(fast, 0)), asyncio.create_task(reader(slow, 0.01))]
    await asyncio.sleep(0)
    started = time.monotonic()
    for i in range(20000):  # ~1.3 MB: far past the in-memory tail
        log.line(f"line {i} SECRET {'x' * 50}")
        if i % 1000 == 0:
            await asyncio.sleep(0)
    writing = time.monotonic() - started
    log.close()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    whole = (tmp_path / "x.log").read_bytes()
    assert b"SECRET" not in whole and whole.count(b"\n") == 20000
    assert b"".join(fast) == whole
    assert b"".join(slow) == whole  # it fell behind and read the rest from the file
    assert writing < 5  # the writer never waited for the slow reader
    assert log.tail(2)[-1].startswith("line 19999 ***")
    assert read_file(tmp_path / "x.log", len(whole) - 6) == whole[-6:]
    late = [c async for _, c in log.follow(len(whole) // 2)]
    assert b"".join(late) == whole[len(whole) // 2 :]


def test_logs_of_a_build_interrupted_before_its_first_line(daemon_factory: Any) -> None:
    """A build the daemon lost before it wrote a line has no log file: ``agentctl logs`` prints
    nothing and exits 0, with and without ``-f`` (the record says it was interrupted)."""
    d = daemon_factory(start=False)
    store = RecordStore(Path(d.sections["daemon"]["state_dir"]))
    queued = store.create(BuildRecord(id=new_id()))
    running = store.create(BuildRecord(id=new_id()))
    store.transition(running, rec.RUNNING)
    d.start()
    for build_id in (queued.id, running.id):
        assert not store.log_path(build_id).exists()
        for args in (["logs", build_id], ["logs", "-f", build_id]):
            out = d.ctl(*args)
            assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), args
        out = d.ctl("--json", "logs", build_id)
        assert out.returncode == 0
        assert json.loads(out.stdout)["state"] == "interrupted"
