"""Reading what ``buildctl --progress=plain`` and ``crane`` print, to turn a failure into an error a
user can act on.

The shapes handled are the ones BuildKit v0.11.6 and crane v0.20.2 really print
(``fixtures/toolchain/build-*-plain.txt``, ``crane-*.txt``):

- the last line is ``error: <what failed>`` (``failed to solve: ...`` for anything the solver did);
- a Dockerfile problem comes with a source box: ``Dockerfile:2`` then ``   2 | >>> RUN ...``;
- a failed RUN says ``process "/bin/sh -c ..." did not complete successfully: exit code: 3``;
- a refused push says ``failed to push <ref>: unexpected status: 401 Unauthorized``;
- a buildkitd that died says ``failed to receive status: rpc error: code = Unavailable desc =
  error reading from server: EOF``; one that is not there says ``connection error: ... dial unix``.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.build._sources import missing_source, missing_source_message
from agent.build.toolchain import LogSink
from agent.errors import (
    AgentError,
    BuildErrorDetails,
    BuildFailed,
    InternalError,
    NotFound,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    build_details,
)

_SOURCE = re.compile(r"^(?P<file>\S+):(?P<line>\d+)$")
_MARKED = re.compile(r"^\s*(?P<line>\d+) \| >>> (?P<text>.*)$")
_PROCESS = re.compile(
    r'process "(?P<cmd>.*)" did not complete successfully: exit code: (?P<code>\d+)'
)
_PARSE = re.compile(r"dockerfile parse error on line (?P<line>\d+): (?P<why>.*)")
_PUSH = re.compile(r"failed to push (?P<ref>\S+): (?P<why>.*)")
_STATUS = re.compile(r"\b(?P<status>[1-5]\d\d) (?P<text>[A-Z][A-Za-z ]+)")
_METADATA = re.compile(r"^#\d+ \[internal\] load metadata for (?P<ref>\S+)$")
_URL_HOST = re.compile(r"https?://(?P<host>[^/\s\"]+)/")
# "<dst>: digest: sha256:... size: N", or, when the destination already holds that manifest,
# "existing manifest: <tag>@sha256:..." (crane v0.20.2, fixtures crane-copy-ok/-existing.txt).
_DIGEST = re.compile(r"(?:digest: |existing manifest: \S*@)(?P<digest>sha256:[0-9a-f]{64})")


@dataclass
class Transcript:
    """A :class:`LogSink` that passes every line on and keeps the last ``keep`` for diagnosis."""

    sink: LogSink
    keep: int = 400
    lines: deque[str] = field(init=False)

    def __post_init__(self) -> None:
        self.lines = deque(maxlen=self.keep)

    def line(self, text: str) -> None:
        self.lines.append(text)
        self.sink.line(text)


def _host_of(ref: str) -> str:
    m = _URL_HOST.search(ref)
    if m:
        return m.group("host")
    first = ref.split("/", 1)[0]
    return first if ("." in first or ":" in first or first == "localhost") else "docker.io"


def _tail(lines: list[str], n: int) -> list[str]:
    """The last ``n`` lines worth reading. BuildKit repeats a failed step's own log between two
    ``------`` rules (`` > [2/2] RUN ...:`` then its lines): that is the tail when present.
    Otherwise the lines before the Dockerfile source box (which the message already quotes),
    without blank lines and box rules."""
    for i, ln in enumerate(lines):
        if ln == "------" and i + 1 < len(lines) and lines[i + 1].startswith(" > "):
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == "------"), len(lines))
            step = [x for x in lines[i + 1 : end] if x.strip()]
            if len(step) > 1:  # the header and at least one line of the step's output
                return step[-n:]
    end = len(lines)
    for i, ln in enumerate(lines):
        if _SOURCE.match(ln.strip()) and i + 1 < len(lines) and lines[i + 1].startswith("---"):
            end = i
            break
    kept = [ln for ln in lines[:end] if ln.strip() and not set(ln.strip()) <= {"-"}]
    return kept[-n:]


def _with_tail(message: str, tail: list[str]) -> str:
    if not tail:
        return message
    return message + "\nlast log lines:\n" + "\n".join("  " + ln for ln in tail)


def build_error(
    lines: list[str],
    returncode: int,
    *,
    tail_lines: int,
    scrub: Callable[[str], str] = lambda s: s,
    exit_words: str = "",
) -> AgentError:
    """The error for a ``buildctl build`` that exited non-zero, from its output."""
    failure = _Failure.read(lines, returncode, tail_lines, scrub)
    for classify in _CLASSIFIERS:
        err = classify(failure)
        if err is not None:
            return err
    error = failure.error
    summary = scrub(error) if error else f"buildctl {exit_words or f'exited with {returncode}'}"
    return BuildFailed(failure.message(summary), details=failure.details("build_failed"))


@dataclass
class _Failure:
    """What a failed ``buildctl build`` printed: its ``error:`` line, the step BuildKit marked
    in the Dockerfile's source box (``Dockerfile:2`` then ``   2 | >>> RUN ...``), the tail."""

    lines: list[str]
    returncode: int
    scrub: Callable[[str], str]
    error: str  # the last ``error: `` line, without that prefix
    tail: list[str]  # scrubbed
    source: str = ""  # the file the source box names
    line: int | None = None
    text: str = ""  # the marked instruction, as written (not scrubbed)

    @classmethod
    def read(
        cls, lines: list[str], returncode: int, tail_lines: int, scrub: Callable[[str], str]
    ) -> _Failure:
        error = next(
            (ln[len("error: ") :] for ln in reversed(lines) if ln.startswith("error: ")), ""
        )
        body = [ln for ln in lines if not ln.startswith("error: ")]
        out = cls(lines, returncode, scrub, error, [scrub(ln) for ln in _tail(body, tail_lines)])
        for i, ln in enumerate(lines):
            m = _MARKED.match(ln)
            if m:
                out.line, out.text = int(m.group("line")), m.group("text").strip()
                back = (_SOURCE.match(b.strip()) for b in reversed(lines[:i]))
                sm = next((m for m in back if m), None)
                out.source = sm.group("file") if sm else out.source
        return out

    @property
    def at(self) -> str:
        """``Dockerfile:2: `` when BuildKit marked a line, else nothing."""
        return f"{self.source or 'Dockerfile'}:{self.line}: " if self.line else ""

    def message(self, text: str) -> str:
        return _with_tail(f"{self.at}{text}", self.tail)

    def details(
        self,
        reason: str,
        *,
        step: str | None = None,
        exit_code: int | None = None,
        missing_path: str | None = None,
    ) -> BuildErrorDetails:
        marked = self.scrub(self.text) if self.line and self.text else None
        return build_details(
            log_tail=self.tail,
            tool_exit_code=self.returncode,
            reason=reason,
            step=marked or step,
            line=self.line,
            exit_code=exit_code,
            missing_path=missing_path,
        )


def _builder_died(f: _Failure) -> AgentError | None:
    if (
        "failed to receive status" not in f.error
        and "error reading from server: EOF" not in f.error
    ):
        return None
    return BuildFailed(
        _with_tail(
            "buildkitd stopped during the build (killed or crashed); the daemon restarts it: "
            "build again",
            f.tail,
        ),
        details=f.details("builder_died"),
    )


def _builder_unreachable(f: _Failure) -> AgentError | None:
    if "connection error" not in f.error or not ("dial unix" in f.error or "connect:" in f.error):
        return None
    return InternalError(
        "buildctl could not reach buildkitd ("
        + f.scrub(f.error.split("desc = ", 1)[-1].strip('"'))
        + "); the daemon restarts buildkitd: build again, and check the daemon log if it "
        "persists",
        details=f.details("builder_unreachable"),
    )


def _push_refused(f: _Failure) -> AgentError | None:
    push = _PUSH.search(f.error)
    if not push:
        return None
    ref, why = f.scrub(push.group("ref")), f.scrub(push.group("why"))
    registry = _host_of(ref)
    status = _STATUS.search(why)
    if status and status.group("status") in ("401", "403"):
        return UpstreamUnauthorized(
            f"the registry {registry} refused the push of {ref}: {why}; give the agent "
            "credentials that may push there (build.docker_config)",
            registry=registry,
            details=f.details("push_refused"),
        )
    return UpstreamUnavailable(
        f"pushing {ref} to {registry} failed: {why}; check that the registry is up",
        registry=registry,
        details=f.details("push_refused"),
    )


def _syntax(f: _Failure) -> AgentError | None:
    parse = _PARSE.search(f.error)
    if not parse:
        return None
    where = f.at or f"Dockerfile:{parse.group('line')}: "
    shown = f": {f.scrub(f.text)}" if f.text else ""
    return BuildFailed(
        _with_tail(f"{where}syntax error: {parse.group('why')}{shown}", f.tail),
        details=f.details("dockerfile_syntax"),
    )


def _run_failed(f: _Failure) -> AgentError | None:
    proc = _PROCESS.search(f.error)
    if not proc:
        return None
    what = f.scrub(f.text) if f.text else f"RUN {f.scrub(proc.group('cmd'))}"
    return BuildFailed(
        f.message(f"{what} failed: the command exited with status {proc.group('code')}"),
        details=f.details("run_failed", step=what, exit_code=int(proc.group("code"))),
    )


def _copy_source_missing(f: _Failure) -> AgentError | None:
    missing = missing_source(f.error)
    if missing is None:
        return None
    what = f.scrub(f.text) if f.text else "COPY"
    return BuildFailed(
        f.message(missing_source_message(what, missing)),
        details=f.details("copy_source_missing", missing_path=missing),
    )


def _base_image(f: _Failure) -> AgentError | None:
    if not (f.text.upper().startswith("FROM") or _failed_metadata_ref(f.lines)):
        return None
    image = f.text.split()[1] if len(f.text.split()) > 1 else ""
    image = image or _failed_metadata_ref(f.lines)
    why = f.error.removeprefix("failed to solve: ")
    why = why.removeprefix(f"{image}: ") if image else why
    return BuildFailed(
        f.message(
            f"the base image {f.scrub(image)} could not be pulled: {f.scrub(why)}; check the "
            "FROM line and that the image exists"
        ),
        details=f.details("base_image"),
    )


# In this order: the first that recognises the failure words the error.
_CLASSIFIERS: tuple[Callable[[_Failure], AgentError | None], ...] = (
    _builder_died,
    _builder_unreachable,
    _push_refused,
    _syntax,
    _run_failed,
    _copy_source_missing,
    _base_image,
)


def _failed_metadata_ref(lines: list[str]) -> str:
    """The image whose ``load metadata`` step is followed by an ``ERROR``."""
    steps: dict[str, str] = {}
    for ln in lines:
        m = _METADATA.match(ln)
        if m:
            steps[ln.split(" ", 1)[0]] = m.group("ref")
        elif " ERROR: " in ln:
            ref = steps.get(ln.split(" ", 1)[0])
            if ref:
                return ref
    return ""


def copy_error(
    lines: list[str],
    returncode: int,
    src: str,
    dst: str,
    *,
    tail_lines: int,
    scrub: Callable[[str], str] = lambda s: s,
    exit_words: str = "",
) -> AgentError:
    """The error for a ``crane copy`` that exited non-zero (crane prints ``Error: ...``)."""
    error = next((ln[len("Error: ") :] for ln in reversed(lines) if ln.startswith("Error: ")), "")
    tail = [scrub(ln) for ln in _tail(lines, tail_lines)]
    shown = scrub(error) or f"crane {exit_words or f'exited with {returncode}'}"
    registry = _host_of(error) if _URL_HOST.search(error) else _host_of(dst)
    if "MANIFEST_UNKNOWN" in error or "NAME_UNKNOWN" in error or "404 Not Found" in error:
        return NotFound(
            f"the image {scrub(src)} to copy does not exist: {shown}",
            details=build_details(log_tail=tail, tool_exit_code=returncode, reason="image_missing"),
        )
    if re.search(r"\b(401|403)\b|UNAUTHORIZED|DENIED", error):
        details = build_details(log_tail=tail, tool_exit_code=returncode, reason="registry_refused")
        return UpstreamUnauthorized(
            f"the registry {scrub(registry)} refused the copy of {scrub(src)} to {scrub(dst)}: "
            f"{shown}; give the agent credentials for it (build.docker_config)",
            registry=scrub(registry),
            details=details,
        )
    if re.search(r"connection refused|no such host|i/o timeout|\b50[0234]\b", error):
        details = build_details(
            log_tail=tail, tool_exit_code=returncode, reason="registry_unreachable"
        )
        return UpstreamUnavailable(
            f"copying {scrub(src)} to {scrub(dst)} failed, {scrub(registry)} is not answering: "
            f"{shown}",
            registry=scrub(registry),
            details=details,
        )
    return BuildFailed(
        _with_tail(f"copying {scrub(src)} to {scrub(dst)} failed: {shown}", tail),
        details=build_details(log_tail=tail, tool_exit_code=returncode, reason="build_failed"),
    )


def copied_digest(lines: list[str]) -> str | None:
    """``sha256:...`` from crane's ``<dst>: digest: sha256:... size: N`` line, or from its
    ``existing manifest: <tag>@sha256:...`` line when the destination had it already."""
    for ln in reversed(lines):
        m = _DIGEST.search(ln)
        if m:
            return m.group("digest")
    return None
