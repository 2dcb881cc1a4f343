""".dockerignore matching (Docker's rules), the content key over a context fd, the Dockerfile
path checks, the caller's read permission, and the warm hash cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.build.context import Caller, HashCache, hash_context
from agent.build.dockerignore import Matcher, parse
from agent.errors import BadRequest, Forbidden
from tests.infra.builds import write_context


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        ("*.md", "README.md", True),
        ("*.md", "docs/README.md", False),  # '*' does not cross '/'
        ("**/*.md", "docs/deep/README.md", True),
        ("**/*.md", "README.md", True),  # '**/' matches no directory too
        ("docs", "docs/a/b.txt", True),  # a parent directory matches
        ("docs/**", "docs/a/b.txt", True),
        ("/build", "build/x", True),  # leading slash is dropped
        ("./build/../build", "build", True),  # cleaned
        ("*.md\n!KEEP.md", "KEEP.md", False),  # exception
        ("*.md\n!KEEP.md\nKEEP.md", "KEEP.md", True),  # the last match wins
        ("docs\n!docs/keep.txt", "docs/keep.txt", False),
        ("docs\n!docs/keep.txt", "docs/other.txt", True),
        ("a?c", "abc", True),
        ("a?c", "a/c", False),
        ("[a-c]x", "bx", True),
        ("[!a-c]x", "dx", True),
        ("[!a-c]x", "ax", False),
        ("# comment\n\n  spaced.txt  ", "spaced.txt", True),
        ("\ufeffbom.txt", "bom.txt", True),
        (r"\*literal", "*literal", True),
        (r"\*literal", "xliteral", False),
        ("file.txt", "file.txt.bak", False),
        ("**", "anything/at/all", True),
    ],
)
def test_dockerignore_rules(patterns: str, path: str, excluded: bool) -> None:
    assert Matcher.from_text(patterns).excluded(path) is excluded


def test_dockerignore_parse_keeps_exceptions_in_order() -> None:
    parsed = parse("# c\n!  /x/../y  \n*.tmp\n")
    assert [(p.text, p.exception) for p in parsed] == [("y", True), ("*.tmp", False)]


@contextmanager
def opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def key(path: Path, dockerfile: str = "Dockerfile", **kw: object) -> str:
    with opened(path) as fd:
        return hash_context(fd, dockerfile, **kw).key  # type: ignore[arg-type]


@pytest.fixture
def ctx(tmp_path: Path) -> Path:
    return write_context(
        tmp_path / "ctx",
        {
            "Dockerfile": "FROM scratch\nCOPY . /\n",
            "a.txt": "a",
            "src/b.txt": "b",
            "logs/x.log": "noise",
            ".dockerignore": "logs\n*.tmp\n",
        },
    )


def test_key_follows_kept_content_mode_and_inputs(ctx: Path) -> None:
    k0 = key(ctx)
    assert key(ctx) == k0
    (ctx / "logs" / "x.log").write_text("more noise")
    (ctx / "new.tmp").write_text("ignored")
    assert key(ctx) == k0
    (ctx / "src" / "b.txt").write_text("B")
    k1 = key(ctx)
    assert k1 != k0
    os.chmod(ctx / "src" / "b.txt", 0o755)
    k2 = key(ctx)
    assert k2 != k1
    (ctx / "src" / "empty").mkdir()
    k3 = key(ctx)
    assert k3 != k2
    assert key(ctx, build_args={"A": "1"}) != k3
    assert key(ctx, stage="dev") != k3
    assert key(ctx, platform="linux/arm64") != k3
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY . /x/\n")
    assert key(ctx) != k3
    (ctx / ".dockerignore").write_text("logs\n")
    assert key(ctx) != k3  # the .tmp file is part of the context now


def test_symlinks_are_hashed_not_followed(ctx: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("outside")
    (ctx / "link").symlink_to(secret)
    k0 = key(ctx)
    secret.write_text("changed outside")
    assert key(ctx) == k0  # the target's content is not read
    (ctx / "link").unlink()
    (ctx / "link").symlink_to("/etc/hostname")
    assert key(ctx) != k0


@pytest.mark.parametrize("bad", ["../Dockerfile", "/etc/passwd", "", "a/../../Dockerfile"])
def test_dockerfile_path_may_not_escape(ctx: Path, bad: str) -> None:
    with pytest.raises(BadRequest, match="context"):
        key(ctx, bad)


def test_dockerfile_symlinks_inside_are_resolved_outside_refused(ctx: Path, tmp_path: Path) -> None:
    (ctx / "docker").mkdir()
    (ctx / "docker" / "Dockerfile.dev").symlink_to("../Dockerfile")
    with opened(ctx) as fd:
        assert hash_context(fd, "docker/Dockerfile.dev").dockerfile == "Dockerfile"
    (tmp_path / "outside").write_text("FROM scratch\n")
    (ctx / "abs").symlink_to(tmp_path / "outside")
    (ctx / "up").symlink_to("../outside")
    (ctx / "loop").symlink_to("loop")
    for name in ("abs", "up", "loop", "src"):
        with pytest.raises(BadRequest):
            key(ctx, name)
    with pytest.raises(BadRequest, match="does not exist"):
        key(ctx, "nope/Dockerfile")


def test_caller_must_be_able_to_read_every_kept_entry(ctx: Path) -> None:
    nobody = Caller(65534, 65534)
    os.chmod(ctx.parent, 0o755)
    for p in [ctx, *ctx.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    key(ctx, caller=nobody)
    os.chmod(ctx / "src" / "b.txt", 0o600)
    with pytest.raises(Forbidden, match=r"src/b\.txt"):
        key(ctx, caller=nobody)
    os.chmod(ctx / "src" / "b.txt", 0o644)
    os.chmod(ctx / "logs", 0o700)  # ignored: not needed
    key(ctx, caller=nobody)
    os.chmod(ctx / "src", 0o700)
    with pytest.raises(Forbidden, match="src"):
        key(ctx, caller=nobody)
    # the owner's and group's bits apply to them
    st = os.stat(ctx / "src")
    key(ctx, caller=Caller(st.st_uid, 4242))


def test_warm_cache_skips_reading_unchanged_files(tmp_path: Path) -> None:
    files = {f"d{i % 10}/f{i}.txt": str(i) for i in range(200)}
    ctx = write_context(tmp_path / "big", {"Dockerfile": "FROM scratch\n", **files})
    cache = HashCache()
    cold = key(ctx, cache=cache)
    assert cache.misses == 201 and cache.hits == 0  # with the Dockerfile
    assert key(ctx, cache=cache) == cold
    assert cache.hits == 201
    (ctx / "d3" / "f3.txt").write_text("changed")
    assert key(ctx, cache=cache) != cold
    assert key(ctx) == key(ctx, cache=cache)  # cached and uncached agree


def _tree(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """path -> (kind, mode, mtime_ns, content or link target) of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("l", 0, st.st_mtime_ns, os.readlink(p))
        elif p.is_dir():
            out[rel] = ("d", st.st_mode & 0o7777, st.st_mtime_ns, "")
        else:
            out[rel] = ("f", st.st_mode & 0o7777, st.st_mtime_ns, p.read_text())
    return out


def test_staged_copy_is_the_kept_tree_with_modes_times_and_the_same_key(tmp_path: Path) -> None:
    src = write_context(
        tmp_path / "src",
        {
            "build/Dockerfile": "FROM scratch\nCOPY . /\n",
            "a.txt": "a",
            "bin/run.sh": "#!/bin/sh\n",
            "logs/x.log": "noise",
            "logs/keep.log": "kept by an exception",
            "secret.tmp": "left out",
            ".dockerignore": "logs\n!logs/keep.log\n*.tmp\nbuild\n.dockerignore\n",
        },
    )
    (src / "bin/run.sh").chmod(0o755)
    (src / "link").symlink_to("a.txt")
    (src / "empty").mkdir(mode=0o750)
    os.utime(src / "a.txt", ns=(1_000_000_000, 1_234_567_891_000))
    want_key = key(src, "build/Dockerfile")
    dest = tmp_path / "staged"
    dest.mkdir()
    with opened(src) as s, opened(dest) as d:
        got = hash_context(s, "build/Dockerfile", stage_into=d)
    assert got.key == want_key  # the copy is what the key describes
    tree = _tree(dest)
    # Kept entries, as they were; .dockerignore's exclusions are not there at all.
    expected = {k: v for k, v in _tree(src).items() if k not in ("logs/x.log", "secret.tmp")}
    # The Dockerfile and .dockerignore are there although excluded (the builder reads them);
    # they, and the directories made to hold them, are new files, so only content counts.
    for made in ("build", "build/Dockerfile", ".dockerignore"):
        assert tree.pop(made)[3] == expected.pop(made)[3]
    assert tree == expected
    assert tree["a.txt"][2] == 1_234_567_891_000 and tree["bin/run.sh"][1] == 0o755
    assert tree["link"][0] == "l" and tree["empty"][1] == 0o750


def test_staging_a_context_that_changed_gives_another_key(ctx: Path, tmp_path: Path) -> None:
    before = key(ctx)
    (ctx / "a.txt").write_text("changed after the request")
    dest = tmp_path / "staged"
    dest.mkdir()
    with opened(ctx) as s, opened(dest) as d:
        got = hash_context(s, "Dockerfile", stage_into=d)
    assert got.key != before and got.key == key(ctx)
    assert (dest / "a.txt").read_text() == "changed after the request"


def test_staging_checks_the_callers_read_permission(ctx: Path, tmp_path: Path) -> None:
    (ctx / "a.txt").chmod(0o600)
    dest = tmp_path / "staged"
    dest.mkdir()
    with opened(ctx) as s, opened(dest) as d, pytest.raises(Forbidden):
        hash_context(s, "Dockerfile", stage_into=d, caller=Caller(65534, 65534))


def test_the_flow_refuses_a_context_that_changed_since_the_request(
    ctx: Path, tmp_path: Path
) -> None:
    from agent.build.flow import Flow, Plan
    from agent.errors import BuildFailed
    from agent.reference import Reference

    lines: list[str] = []

    class Sink:
        def line(self, text: str) -> None:
            lines.append(text)

    staging = tmp_path / "contexts"
    with opened(ctx) as fd:
        requested = hash_context(fd, "Dockerfile").key
        plan = Plan(
            target_ref=None,
            target_repo="reg.example/team/ws",
            base_ref=Reference("reg.example/team/base", requested),
            dockerfile="Dockerfile",
            context_fd=fd,
        )
        flow = Flow(None, None, None, sink=Sink(), phase=lambda _: None, staging=str(staging))  # type: ignore[arg-type]
        staged_fd, staged = flow._stage(plan, os.dup(fd))  # unchanged: staged, and said so
        os.close(staged_fd)
        assert Path(staged).parent == staging and (Path(staged) / "a.txt").read_text() == "a"
        assert any("context copied for the builder" in ln for ln in lines)
        (ctx / "a.txt").write_text("changed after the request")
        src = os.dup(fd)
        with pytest.raises(BuildFailed, match="the context changed after the build was requested"):
            flow._stage(plan, src)
        with pytest.raises(OSError):
            os.fstat(src)  # _stage closed its duplicate
    assert os.listdir(staging) == [Path(staged).name]  # the refused copy is gone
