"""Stand-in for BuildKit ``buildkitd``, v0.11.6 or v0.24.0 (``STANDIN_BUILDKIT_VERSION``): the
real one cannot be installed here (no Debian package).

REPLAYED from tests/fixtures/toolchain (read at run time):
- the flag table (``buildkitd-help.txt``): any other flag is refused as urfave/cli does;
- the startup log lines (``buildkitd-startup.log``), with this run's socket path;
- per build, the plain progress and error text of ``build-ok-plain.txt``,
  ``build-fail-run-plain.txt``, ``build-fail-syntax-plain.txt``, ``build-fail-base-plain.txt``,
  ``build-push-unauthorized-plain.txt`` and the slow context of ``build-daemon-killed-plain.txt``,
  with this build's refs, RUN text, exit
  code and digests substituted; the worker list of ``workers.json``.

REAL:
- ``--config`` is parsed as TOML; ``--root`` is created (a root that cannot be created makes it
  exit at once with status 1, as the real one does); the ``--addr`` Unix socket is really
  listened on, and the stand-in ``buildctl`` really talks to it (so a killed buildkitd really
  ends the client's stream with EOF);
- which fixture a build replays is decided like the real daemon would: an unknown instruction is a
  syntax error; a ``target`` stage that no ``FROM ... AS`` names fails as recorded; the FROM image
  is really resolved over HTTP, with the hosts, URL forms (a mirror with a path: ``/<path>/v2/``
  in v0.11.6, ``/v2/<path>/`` in v0.24.0), ``?ns=`` queries, schemes and error texts of the
  version impersonated, from the ``mirrors``/``http``/``insecure`` settings of buildkitd.toml
  (``_registry.py``); a RUN containing ``exit N`` fails with N; a RUN with ``sleep N`` really
  runs ``sleep`` as a child of this process (an orphan when this process is SIGKILLed);
- the push: the FROM image's manifest and blobs are really pulled from the host that resolved it
  and pushed to the output name with the session's login (no layers are built: the pushed image
  is the base image), so the image exists afterwards and the metadata digest is the real one; a
  registry that refuses (401) fails with the version's recorded text;
- a ``--root`` that cannot be created: the recorded error and Go stack trace, exit status 1.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _registry
from _common import (
    VERSION,
    UsageError,
    fixture,
    fixture_lines,
    parse_urfave,
    record,
    source_box,
    urfave_flags,
)

_KNOWN = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}
_FIXTURE_BASE = "localhost:5000/base:latest"
_FIXTURE_BASE_DIGEST = "sha256:267b2fb34bc536b2ce048f3d6fe23a600d27c1acb5c0a83e925afd96a039c6e3"
_FIXTURE_NAME = "localhost:5000/fixture-ok:plain"


class Daemon:
    def __init__(self, config: dict[str, Any], root: Path) -> None:
        self.registries: dict[str, dict[str, Any]] = config.get("registry", {})
        self.root = root
        self.children: list[subprocess.Popen[bytes]] = []

    # --- registry access as buildkitd.toml configures it ------------------------------------

    def _plain(self, host: str) -> bool:
        conf = self.registries.get(host, {})
        return bool(conf.get("http") or conf.get("insecure"))

    # --- one build ----------------------------------------------------------------------------

    def build(self, req: dict[str, Any], out: Any) -> None:
        name = req.get("output", {}).get("name", "")
        filename = req.get("filename") or "Dockerfile"
        text = req.get("dockerfile")

        def emit(line: str) -> None:
            out({"out": line})

        if text is None:
            out(
                {
                    "rc": 1,
                    "error": [
                        f"error: failed to solve: failed to read dockerfile: open "
                        f"{filename}: no such file or directory"
                    ],
                }
            )
            return
        lines = text.split("\n")
        instrs = [
            (i + 1, ln.strip())
            for i, ln in enumerate(lines)
            if ln.strip() and not ln.strip().startswith("#")
        ]
        # 1. syntax: the frontend parses the whole file first.
        for lineno, ins in instrs:
            word = ins.split()[0].upper()
            if word not in _KNOWN:
                pre, _ = fixture_lines("build-fail-syntax-plain.txt")
                for ln in pre[: next(i for i, x in enumerate(pre) if x.startswith("Dockerfile:"))]:
                    emit(ln)
                close = difflib.get_close_matches(word, sorted(_KNOWN), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                out(
                    {
                        "rc": 1,
                        "error": [
                            *source_box(filename, text, lineno),
                            f"error: failed to solve: dockerfile parse error on line {lineno}: "
                            f"unknown instruction: {ins.split()[0]}{hint}",
                        ],
                    }
                )
                return
        froms = [(n, ins) for n, ins in instrs if ins.split()[0].upper() == "FROM"]
        if not froms:
            out({"rc": 1, "error": ["error: failed to solve: no build stage in current context"]})
            return
        target = (req.get("opts") or {}).get("target") or ""
        stages = [ins.split()[3] for _, ins in froms if len(ins.split()) > 3]
        if target and target not in stages:
            pre, _ = fixture_lines("build-fail-target-plain.txt")
            for ln in pre[:-1]:
                emit(ln)
            out({"rc": 1, "error": [pre[-1].replace("final", target)]})
            return
        from_line, from_ins = froms[0]
        base = from_ins.split()[1]
        ok_lines, _ = fixture_lines("build-ok-plain.txt")
        # 2. the base image, asked for as this BuildKit version asks (_registry.py).
        registry, repo, tag = _split_ref(base)
        try:
            src = _registry.resolve(self.registries, registry, repo, tag, VERSION)
        except _registry.RegistryError as exc:
            self._fail_base(base, str(exc), filename, text, from_line, emit, out)
            return
        base_digest = src.digest
        # 3. the steps, in the recorded shapes.
        steps = [(n, ins) for n, ins in instrs if (n, ins) != (from_line, from_ins)]
        total = len(steps) + 1
        at_from = next(i for i, x in enumerate(ok_lines) if re.match(r"#\d+ \[1/\d+\] FROM ", x))
        from_vertex = ok_lines[at_from].split()[0]
        for ln in ok_lines[:at_from]:
            emit(ln.replace(_FIXTURE_BASE, base))
        resolved = next(x for x in ok_lines if x.startswith(f"{from_vertex} resolve "))
        pinned = base if "@" in base else f"{base}@{base_digest}"
        emit(f"{from_vertex} [1/{total}] FROM {pinned}")
        emit(re.sub(r"resolve \S+", f"resolve {pinned}", resolved))
        emit(f"{from_vertex} DONE 0.0s")
        emit("")
        vertex = int(next(x for x in ok_lines if "] RUN " in x).split()[0][1:])
        for i, (lineno, ins) in enumerate(steps, start=2):
            word, _, rest = ins.partition(" ")
            if word.upper() in ("ENV", "ARG", "LABEL", "CMD", "ENTRYPOINT", "USER", "EXPOSE"):
                continue  # metadata only: no vertex in the plain output
            emit(f"#{vertex} [{i}/{total}] {ins}")
            logs: list[str] = []
            if word.upper() == "RUN":
                started = time.monotonic()
                for part in re.split(r"\s*(?:&&|;)\s*", rest):
                    words = part.split()
                    if not words:
                        continue
                    if words[0] == "echo":
                        at = time.monotonic() - started + 0.089
                        # v0.11.6 labels a step's first log line "#0" (as recorded); in the error
                        # box v0.24.0 shows the lines without their label.
                        label = "#0" if not logs and VERSION == "v0.11.6" else f"#{vertex}"
                        logs.append(f"{label} {at:.3f} {' '.join(words[1:])}")
                        emit(logs[-1])
                    elif words[0] == "sleep" and len(words) > 1:
                        proc = subprocess.Popen(["sleep", words[1]])
                        self.children.append(proc)
                        proc.wait()
                    elif words[0] == "exit" and len(words) > 1 and words[1] != "0":
                        code = words[1]
                        cmd = f"/bin/sh -c {rest}"
                        why = f'process "{cmd}" did not complete successfully: exit code: {code}'
                        emit(f"#{vertex} ERROR: {why}")
                        boxed = logs if VERSION == "v0.11.6" else [x.split(" ", 1)[1] for x in logs]
                        out(
                            {
                                "rc": 1,
                                "error": [
                                    "------",
                                    f" > [{i}/{total}] {ins}:",
                                    *boxed,
                                    "------",
                                    *source_box(filename, text, lineno),
                                    f"error: failed to solve: {why}",
                                ],
                            }
                        )
                        return
            emit(f"#{vertex} DONE 0.1s")
            emit("")
            vertex += 1
        # 4. export and push: the base image's manifest and blobs, pushed as they are.
        dest_host = name.split("/", 1)[0]
        export = [ln for ln in ok_lines if ln.startswith("#8 ")]
        config_digest = json.loads(src.manifest).get("config", {}).get("digest", "")
        try:
            digest = _registry.copy_image(
                src, name, req.get("auths") or {}, self._plain(dest_host), VERSION
            )
        except _registry.RegistryError as exc:
            for ln in export[:5]:
                ln = ln.replace("#8 ", f"#{vertex} ", 1)
                ln = re.sub(r"manifest sha256:[0-9a-f]{64}", f"manifest {src.digest}", ln)
                emit(re.sub(r"config sha256:[0-9a-f]{64}", f"config {config_digest}", ln))
            emit(f"#{vertex} ERROR: {exc}")
            out(
                {
                    "rc": 1,
                    "error": [
                        "------",
                        " > exporting to image:",
                        "------",
                        f"error: failed to solve: {exc}",
                    ],
                }
            )
            return
        for ln in export:
            ln = ln.replace("#8 ", f"#{vertex} ", 1).replace(_FIXTURE_NAME, name)
            ln = re.sub(r"manifest sha256:[0-9a-f]{64}", f"manifest {digest}", ln)
            ln = re.sub(r"@sha256:[0-9a-f]{64}", f"@{digest}", ln)
            ln = re.sub(r"config sha256:[0-9a-f]{64}", f"config {config_digest}", ln)
            emit(ln)
        meta = json.loads(fixture("ok-metadata.json"))
        if "containerimage.buildinfo" in meta:
            meta["containerimage.buildinfo"]["attrs"]["filename"] = filename
            meta["containerimage.buildinfo"]["sources"][0].update(ref=base, pin=base_digest)
        meta["containerimage.config.digest"] = config_digest
        meta["containerimage.descriptor"].update(digest=digest, size=len(src.manifest))
        meta["containerimage.digest"] = digest
        meta["image.name"] = name
        out({"rc": 0, "metadata": meta})

    def _fail_base(
        self,
        base: str,
        why: str,
        filename: str,
        text: str,
        from_line: int,
        emit: Any,
        out: Any,
    ) -> None:
        """The base image could not be resolved: the recorded failure, with this ``why``."""
        pre, _ = fixture_lines("build-fail-base-plain.txt")
        final = next(x for x in pre if x.startswith("error: failed to solve: "))
        stop = next(i for i, x in enumerate(pre) if x.startswith("Dockerfile:"))
        missing = "localhost:5000/does-not-exist:latest"
        for ln in pre[:stop]:
            ln = ln.replace(missing, base)
            if " ERROR: " in ln:
                ln = ln.split(" ERROR: ")[0] + " ERROR: " + why
            emit(ln)
        # v0.24.0 wraps it: "<ref>: failed to resolve source metadata for <ref>: <why>".
        wrapped = "failed to resolve source metadata for" in final
        detail = f"failed to resolve source metadata for {base}: {why}" if wrapped else why
        out(
            {
                "rc": 1,
                "error": [
                    *source_box(filename, text, from_line),
                    f"error: failed to solve: {base}: {detail}",
                ],
            }
        )


def _split_ref(ref: str) -> tuple[str, str, str]:
    """(registry, repository, tag or digest) of a FROM reference, with Docker's defaults; a ref
    pinned by digest (``name[:tag]@sha256:...``) is asked for by its digest, as BuildKit does."""
    name, at, digest = ref.partition("@")
    if at:
        name = name.rpartition(":")[0] if ":" in name.rsplit("/", 1)[-1] else name
        host, path, _ = _split_ref(name)
        return host, path, digest
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    host, _, path = name.partition("/")
    if not path or ("." not in host and ":" not in host and host != "localhost"):
        host, path = "docker.io", name if "/" in name else f"library/{name}"
    return host, path, tag


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        daemon: Daemon = self.server.daemon  # type: ignore[attr-defined]
        lock = threading.Lock()

        def out(msg: dict[str, Any]) -> None:
            with lock:
                self.wfile.write((json.dumps(msg) + "\n").encode())
                self.wfile.flush()

        try:
            req = json.loads(self.rfile.readline() or b"{}")
            if req.get("cmd") == "workers":
                out({"rc": 0, "workers": json.loads(fixture("workers.json"))})
            elif req.get("cmd") == "build":
                daemon.build(req, out)
            else:
                out({"rc": 1, "error": ["error: unknown request"]})
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> int:
    record("buildkitd")
    help_text = fixture("buildkitd-help.txt")
    table = urfave_flags(help_text)
    try:
        flags, rest = parse_urfave(sys.argv[1:], table, stop_at_positional=True)
    except UsageError as exc:
        print(f"Incorrect Usage: {exc}\n\n{help_text}", file=sys.stderr)
        return 1
    opts = dict(flags)
    if "--help" in opts or "-h" in opts:
        print(help_text)
        return 0
    if "--version" in opts or "-v" in opts:
        print(f"buildkitd github.com/moby/buildkit {VERSION}")
        return 0
    if rest:
        print(f"No help topic for '{rest[0]}'", file=sys.stderr)
        return 3
    config: dict[str, Any] = {}
    cfg_path = opts.get("--config", "/etc/buildkit/buildkitd.toml")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path, "rb") as f:
                config = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            print(f"buildkitd: failed to load config from {cfg_path}: {exc}", file=sys.stderr)
            return 1
    elif "--config" in opts:
        print(
            f"buildkitd: failed to load config from {cfg_path}: open {cfg_path}: "
            "no such file or directory",
            file=sys.stderr,
        )
        return 1
    root = Path(opts.get("--root") or config.get("root") or "/var/lib/buildkit")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        why = (
            "not a directory"
            if isinstance(exc, (FileExistsError, NotADirectoryError))
            else exc.strerror
        )
        # As recorded: pkg/errors' "%+v", the message and then the Go stack trace.
        lines, rc = fixture_lines("buildkitd-root-not-dir.txt")
        for ln in lines:
            ln = ln.replace("/tmp/rec/notdir", str(root)).replace("not a directory", why)
            print(ln, file=sys.stderr)
        return rc
    addr = (
        opts.get("--addr")
        or (config.get("grpc", {}).get("address") or ["unix:///run/buildkit/buildkitd.sock"])[0]
    )
    if not addr.startswith("unix://"):
        print(f"buildkitd: stand-in serves unix:// addresses only, not {addr}", file=sys.stderr)
        return 1
    sock_path = addr[len("unix://") :]
    with contextlib.suppress(FileNotFoundError):
        os.remove(sock_path)  # the real daemon removes a stale socket too
    os.makedirs(os.path.dirname(sock_path), exist_ok=True)
    server = _Server(sock_path, _Handler)
    daemon = Daemon(config, root)
    server.daemon = daemon  # type: ignore[attr-defined]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for ln in fixture("buildkitd-startup.log").splitlines():
        if "using host network" in ln and opts.get("--oci-worker-net", "auto") != "auto":
            continue
        ln = re.sub(r'time="[^"]+"', f'time="{now}"', ln)
        ln = re.sub(r"running server on \S+?(\"?)$", rf"running server on {sock_path}\1", ln)
        print(ln, file=sys.stderr, flush=True)
        if "running server on" in ln:
            break

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
        for proc in daemon.children:
            if proc.poll() is None:
                proc.kill()
        with contextlib.suppress(FileNotFoundError):
            os.remove(sock_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
