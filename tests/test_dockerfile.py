"""The Dockerfile reader and the stage analysis on a corpus of real Dockerfile shapes
(tests/fixtures/dockerfiles/<name>.Dockerfile, expectations in <name>.json), and the pinned
copy the builder gets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.build.cachekey import Pin, content_key, pin_text, resolve_uses
from agent.build.dockerfile import parse
from agent.build.stages import analyse, expand, node_platform
from agent.errors import BadRequest, BuildFailed, NotFound, UpstreamUnauthorized

CORPUS = Path(__file__).parent / "fixtures" / "dockerfiles"
NAMES = sorted(p.stem for p in CORPUS.glob("*.Dockerfile"))


def _cases(name: str) -> list[dict[str, Any]]:
    spec = json.loads((CORPUS / f"{name}.json").read_text())
    return spec.get("cases") or [spec]


@pytest.mark.parametrize("name", NAMES)
def test_corpus(name: str) -> None:
    text = (CORPUS / f"{name}.Dockerfile").read_text()
    df = parse(text)
    for case in _cases(name):
        kw = {"build_args": case.get("args"), "target": case.get("target"),
              "platform": case.get("platform")}
        if "error" in case:
            with pytest.raises(BadRequest, match=case["error"]):
                analyse(df, **kw)
            continue
        a = analyse(df, **kw)
        assert [[u.kind, u.ref, u.line] for u in a.images] == case["images"], a.images
        assert bool(a.unknown) == case.get("unknown", False), a.unknown
        if "stages" in case:
            assert len(a.stages) == case["stages"]
        if "needed" in case:
            assert a.needed == case["needed"]
        if "instructions" in case:
            assert len(df.instructions) == case["instructions"], df.instructions
        if "syntax" in case:
            assert df.syntax == case["syntax"]
        if "escape" in case:
            assert df.escape == case["escape"]
        if "platforms" in case:
            want = [node_platform() if p == "$BUILDPLATFORM" else p for p in case["platforms"]]
            assert [u.platform for u in a.images] == want
        for line in case.get("unknown_lines", []):
            assert any(u.startswith(f"line {line}:") for u in a.unknown), a.unknown


def test_every_fixture_has_expectations() -> None:
    assert len(NAMES) >= 20
    for name in NAMES:
        assert (CORPUS / f"{name}.json").is_file(), name


def test_directives_only_at_the_top() -> None:
    df = parse("# syntax=docker/dockerfile:1\n\n# escape=`\nFROM a\n")
    assert df.syntax == "docker/dockerfile:1" and df.escape == "\\"
    df = parse("# Comment first\n# syntax=x/y\nFROM a\n")
    assert df.syntax is None
    df = parse("# SYNTAX = docker/dockerfile:1.6\nFROM a\n")
    assert df.syntax == "docker/dockerfile:1.6"


def test_continuation_lines_and_spans() -> None:
    df = parse("FROM a \\\n  AS b\nRUN x \\\n\n# c\n y\n")
    from_, run = df.instructions
    assert (from_.line, from_.cmd_end, from_.args) == (1, 2, ("a", "AS", "b"))
    assert (run.line, run.cmd_end, run.text) == (3, 6, "x  y")


def test_expansion_forms() -> None:
    env = {"A": "x", "E": ""}
    assert expand("${A}-$A-${E:-d}-${E-d}-${A:+y}-${U:-z}", env, strict=False) == "x-x-d--y-z"
    assert expand("'$A'\\$A", env) == "$A$A"


def _pins(text: str, digests: dict[str, str], **kw: Any) -> tuple[list[Pin], Any]:
    a = analyse(parse(text), **kw)

    async def lookup(ref: str, max_age: float) -> tuple[str, bool, float]:
        if ref not in digests:
            raise NotFound(f"{ref} does not exist")
        return digests[ref], False, 0.0

    return asyncio.run(resolve_uses(a.images, lookup, max_age=0, dockerfile="Dockerfile")), a


D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_pinned_copy_keeps_lines_and_pins_every_use() -> None:
    text = (
        "ARG B=localhost:5000/base:latest\n"
        "FROM --platform=$BUILDPLATFORM ${B} \\\n"
        "  AS build\n"
        "RUN --mount=type=bind,from=localhost:5000/tools:1,target=/t \\\n"
        "    /t/run <<EOF\n"
        "FROM inside-heredoc:1\n"
        "EOF\n"
        "FROM build\n"
        "COPY --chown=1 --from=localhost:5000/tools:1 /a /a\n"
    )
    digests = {"localhost:5000/base:latest": D1, "localhost:5000/tools:1": D2}
    pins, a = _pins(text, digests)
    assert [p.digest for p in pins] == [D1, D2, D2]
    out = pin_text(text, a.images, pins)
    lines = out.splitlines()
    assert len(lines) == len(text.splitlines())
    assert lines[1] == f"FROM --platform=$BUILDPLATFORM localhost:5000/base@{D1} AS build"
    assert lines[2] == ""
    assert lines[3] == (
        f"RUN --mount=type=bind,from=localhost:5000/tools@{D2},target=/t     /t/run <<EOF"
    )
    assert lines[5:8] == ["FROM inside-heredoc:1", "EOF", "FROM build"]
    assert lines[8] == f"COPY --chown=1 --from=localhost:5000/tools@{D2} /a /a"
    # the pinned copy reads back as the same images, now by digest
    again = analyse(parse(out))
    assert [u.ref.rsplit("@", 1)[1] for u in again.images] == [D1, D2, D2]


def test_key_moves_with_a_digest_and_not_with_a_lookup_source() -> None:
    p1 = Pin("from", "a:1", "docker.io/library/a", D1, 1, None, "registry")
    p2 = Pin("from", "a:1", "docker.io/library/a", D2, 1, None, "registry")
    p1c = Pin("from", "a:1", "docker.io/library/a", D1, 1, None, "cache", 3.0)
    assert content_key("c", [p1], None) == content_key("c", [p1c], None)
    assert content_key("c", [p1], None) != content_key("c", [p2], None)
    assert content_key("c", [p1], None) != content_key("c", [p1], "docker/dockerfile:1")


def test_unresolvable_images_name_line_ref_and_registry() -> None:
    with pytest.raises(BuildFailed, match=r"line 2: COPY --from image not found") as info:
        _pins("FROM scratch\nCOPY --from=localhost:5000/gone:1 / /\n", {})
    assert info.value.details["registry"] == "localhost:5000"
    assert "does not exist in localhost:5000" in info.value.message

    async def refuse(ref: str, max_age: float) -> tuple[str, bool, float]:
        raise UpstreamUnauthorized("no", registry="localhost:5000")

    a = analyse(parse("FROM localhost:5000/private:1\n"))
    with pytest.raises(UpstreamUnauthorized, match="refused"):
        asyncio.run(resolve_uses(a.images, refuse, max_age=0, dockerfile="Dockerfile"))
    with pytest.raises(BadRequest, match="not an image reference"):
        _pins("FROM Upper/Case\n", {})
