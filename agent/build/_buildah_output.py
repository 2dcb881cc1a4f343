"""buildah's and skopeo's output: the tail of it kept for the error message (:class:`Tail`), and a
failed run turned into a message a user can act on (:func:`diagnose`): the failing step and its
exit status, which registry refused and why, and the last lines of the log.
"""

from __future__ import annotations

import re
from typing import Any

from agent.build._sources import missing_source, missing_source_message
from agent.build.toolchain import LogSink
from agent.errors import (
    AgentError,
    BuildErrorDetails,
    BuildFailed,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    build_details,
)

_STEP_FAIL = re.compile(r'building at STEP "(?P<step>.*?)": (?P<why>.*)$')
_EXIT = re.compile(r"exit status (\d+)")
_UNKNOWN = re.compile(r'Unknown instruction: "?(?P<word>[^"\s]+)"?', re.IGNORECASE)
# buildah's line when the runtime failed to create a step's container (buildah 1.28).
_RUNTIME_FAIL = re.compile(r"^error running container: from \S+ creating container for \[.*?\]: ")
_REGISTRY_IN = re.compile(r"(?:docker://|in |registry )(?P<host>[A-Za-z0-9.-]+(?::\d+)?)")


class Tail:
    """A LogSink that forwards every line and keeps the last ``n`` for the error message."""

    def __init__(self, sink: LogSink, n: int) -> None:
        self._sink = sink
        self._n = max(n, 1)
        self.lines: list[str] = []
        self.steps: list[str] = []  # bud's "STEP n/m: ..." lines (which images FROM named)

    def line(self, text: str) -> None:
        self._sink.line(text)
        self.lines.append(text)
        if "STEP " in text and ": FROM " in text:
            self.steps.append(text)
        if len(self.lines) > self._n * 4:
            del self.lines[: len(self.lines) - self._n]

    def last(self) -> list[str]:
        return self.lines[-self._n :]


def diagnose(what: str, code: int, tail: list[str], exit_words: str) -> AgentError:
    """The error for a failed buildah/skopeo run, from its last lines."""
    last_error = next(
        (ln for ln in reversed(tail) if ln.startswith("Error:") or "level=fatal" in ln),
        tail[-1] if tail else "",
    )
    # Only the tool's own error line is classified: a RUN step's output may say anything.
    m = _STEP_FAIL.search(last_error)
    if m:
        return _step_failed(m.group("step"), m.group("why"), code, tail)
    return _tool_failed(what, last_error, code, tail, exit_words)


def _step_failed(step: str, why: str, code: int, tail: list[str]) -> BuildFailed:
    """A Dockerfile step failed (``building at STEP "<step>": <why>``)."""

    def failed(message: str, reason: str, **known: Any) -> BuildFailed:
        details = build_details(
            log_tail=tail, tool_exit_code=code, reason=reason, step=step, **known
        )
        return BuildFailed(message, details=details)

    refusal = next((ln for ln in tail if _RUNTIME_FAIL.match(ln)), None)
    if refusal is not None and "while running runtime" in why:
        # The step's container never started: the runtime said why (cgroups, namespaces, a
        # missing program), which the step's exit status would hide. (A step printing such a
        # line only rewords its own build's error.)
        reason = _RUNTIME_FAIL.sub("", refusal)
        return failed(
            f"{step} could not start its container: {_short(reason)} (the OCI runtime refused; "
            "if every RUN step fails so, check that runc works on this node: cgroups, namespaces)",
            "runtime_refused",
        )
    unknown = _UNKNOWN.search(why)
    if unknown:
        return failed(
            f"Dockerfile syntax error at {step.strip()!r}: unknown instruction "
            f"{unknown.group('word')!r}",
            "dockerfile_syntax",
        )
    status = _EXIT.search(why)
    if status:
        return failed(
            f"{step} failed with exit status {status.group(1)}",
            "run_failed",
            exit_code=int(status.group(1)),
        )
    missing = missing_source(why)
    if missing is not None:
        return failed(
            missing_source_message(step, missing), "copy_source_missing", missing_path=missing
        )
    return failed(f"{step} failed: {_short(why)}", "build_failed")


def _tool_failed(
    what: str, last_error: str, code: int, tail: list[str], exit_words: str
) -> AgentError:
    """buildah or skopeo failed outside a step: a registry refused, an image is missing."""
    low = last_error.lower()
    host_match = _REGISTRY_IN.search(last_error)
    host = host_match.group("host") if host_match else ""

    def details(reason: str) -> BuildErrorDetails:
        return build_details(log_tail=tail, tool_exit_code=code, reason=reason)

    if "unauthorized" in low or "authentication required" in low or "denied" in low:
        why = re.search(r"(unauthorized|denied|forbidden)[^;]*$", last_error, re.IGNORECASE)
        return UpstreamUnauthorized(
            f"{what} was refused by the registry ({why.group(0) if why else 'unauthorized'}); "
            "give the proxy credentials for it (build.docker_config) or use a repository "
            "they cover",
            registry=host,
            details=details("registry_refused"),
        )
    if "manifest unknown" in low or "name unknown" in low or "not found" in low:
        return BuildFailed(
            f"{what}: an image it needs does not exist: {_short(last_error)}; "
            "check the FROM line or the base reference",
            details=details("image_missing"),
        )
    if (
        "connection refused" in low
        or "no such host" in low
        or "i/o timeout" in low
        or ("503" in low and "service unavailable" in low)
    ):
        return UpstreamUnavailable(
            f"{what}: a registry could not be reached: {_short(last_error)}",
            registry=host,
            details=details("registry_unreachable"),
        )
    return BuildFailed(
        f"{what} {exit_words}: {_short(last_error) or 'no output'}",
        details=details("build_failed"),
    )


def _short(text: str, limit: int = 400) -> str:
    text = text.strip()
    for prefix in ("Error: ", "error: "):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    m = re.search(r'level=fatal msg="(.*)"\s*$', text)
    if m:
        text = m.group(1).replace('\\"', '"')
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = ["Tail", "diagnose"]
