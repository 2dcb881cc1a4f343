"""Stand-in for BuildKit ``buildctl``, v0.11.6 or v0.24.0 (``STANDIN_BUILDKIT_VERSION``; the real
one cannot be installed here).

REPLAYED from tests/fixtures/toolchain (read at run time): the global and ``build`` flag
tables (``buildctl-help.txt``, ``buildctl-build-help.txt``; other flags are refused as urfave/cli
does), ``debug workers`` output (``workers.txt`` / ``workers.json`` for ``--format '{{json .}}'``),
the unreachable-daemon error (``buildctl-daemon-unreachable.txt``, with this socket path), and the
``failed to receive status ... EOF`` line of ``build-daemon-killed-plain.txt`` when the daemon's
stream ends early. ``--progress`` accepts the modes the recorded help names (v0.11.6 refuses
``rawjson``). Not recorded, so modeled: ``debug workers`` flags (``--format``, ``--filter``,
``--verbose``) and the ``listing workers for Build:`` prefix of the unreachable error of ``build``.

REAL: the ``--addr`` Unix socket is really connected to (the stand-in buildkitd answers); the
Dockerfile is really read from the ``--local dockerfile=`` directory (``/dev/fd/N`` works) and
``--opt filename=``; ``--metadata-file`` is really written on success.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import UsageError, fixture, fixture_lines, parse_urfave, record, urfave_flags

_WORKERS_FLAGS = {"--format": True, "--filter": True, "--verbose": False, "-v": False}


def _usage(exc: Exception, help_text: str) -> int:
    print(f"Incorrect Usage: {exc}\n\n{help_text}", file=sys.stderr)
    return 1


def _connect(addr: str) -> socket.socket | str:
    path = addr[len("unix://") :] if addr.startswith("unix://") else addr
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        why = (
            "no such file or directory"
            if isinstance(exc, FileNotFoundError)
            else "connection refused"
        )
        lines, _ = fixture_lines("buildctl-daemon-unreachable.txt")
        line = lines[0].replace(
            "dial unix /run/buildkit/missing.sock: connect: no such file or directory",
            f"dial unix {path}: connect: {why}",
        )
        return line
    return s


def _exchange(s: socket.socket, req: dict[str, object]):  # type: ignore[no-untyped-def]
    s.sendall((json.dumps(req) + "\n").encode())
    f = s.makefile("rb")
    for raw in f:
        yield json.loads(raw)


def workers(addr: str, args: list[str]) -> int:
    try:
        flags, _ = parse_urfave(args, _WORKERS_FLAGS, stop_at_positional=False)
    except UsageError as exc:
        return _usage(exc, "")
    conn = _connect(addr)
    if isinstance(conn, str):
        print(conn, file=sys.stderr)
        return 1
    with conn:
        for msg in _exchange(conn, {"cmd": "workers"}):
            if "workers" in msg:
                if dict(flags).get("--format") == "{{json .}}":
                    print(json.dumps(msg["workers"], separators=(",", ":")))
                else:
                    print(fixture("workers.txt"), end="")
                return 0
    print(
        fixture_lines("build-daemon-killed-plain.txt")[0][-1].replace(
            "receive status", "list workers"
        ),
        file=sys.stderr,
    )
    return 1


def _read_secrets(values: list[str]) -> dict[str, str] | str:
    """MODELED on buildctl's ``--secret`` (cmd/buildctl/build/secret.go: id, src/source, env,
    type) and its file store (read whole, at most MaxSecretSize = 500 KiB). The values are read
    as buildkitd would get them; only their sha256 is recorded (prog ``buildctl.secrets``), so
    tests can prove a value arrived without the value touching disk."""
    hashes: dict[str, str] = {}
    for value in values:
        fields = dict(f.split("=", 1) for f in value.split(",") if "=" in f)
        sid, src = fields.get("id", ""), fields.get("src") or fields.get("source")
        try:
            data = Path(src).read_bytes() if src else os.environ[fields.get("env") or sid].encode()
        except (OSError, KeyError) as exc:
            return f"failed to read secret {sid}: {exc}"
        if len(data) > 500 * 1024:
            return f"invalid secret size {len(data)}"
        hashes[sid] = hashlib.sha256(data).hexdigest()
    path = os.environ.get("STANDIN_RECORD")
    if path and hashes:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"prog": "buildctl.secrets", "sha256": hashes}) + "\n")
    return hashes


def build(addr: str, args: list[str]) -> int:
    help_text = fixture("buildctl-build-help.txt")
    try:
        flags, rest = parse_urfave(args, urfave_flags(help_text), stop_at_positional=False)
    except UsageError as exc:
        return _usage(exc, help_text)
    if rest:
        return _usage(UsageError(f"unexpected arguments: {' '.join(rest)}"), help_text)
    opts: dict[str, list[str]] = {}
    for k, v in flags:
        opts.setdefault({"-o": "--output"}.get(k, k), []).append(v)
    progress = (opts.get("--progress") or ["auto"])[-1]
    # The modes the recorded help names ("auto, plain, tty" in v0.11.6; v0.24.0 adds rawjson).
    modes = re.search(r"Set type of progress \(([^)]*)\)", help_text)
    if progress not in (modes.group(1).split(", ") if modes else ("auto", "plain", "tty")):
        print(f"error: invalid progress mode {progress}", file=sys.stderr)
        return 1
    locals_ = dict(v.split("=", 1) for v in opts.get("--local", []) if "=" in v)
    fopts = dict(v.split("=", 1) for v in opts.get("--opt", []) if "=" in v)
    output: dict[str, str] = {}
    for v in opts.get("--output", []):
        output = dict(p.split("=", 1) for p in v.split(",") if "=" in p)
    if (opts.get("--frontend") or [""])[-1] != "dockerfile.v0":
        print("error: invalid frontend; the stand-in knows dockerfile.v0 only", file=sys.stderr)
        return 1
    for name in ("context", "dockerfile"):
        if name not in locals_ or not Path(locals_[name]).is_dir():
            print(
                f"error: invalid local: {name}: not a directory: {locals_.get(name)}",
                file=sys.stderr,
            )
            return 1
    filename = fopts.get("filename", "Dockerfile")
    try:
        dockerfile: str | None = (Path(locals_["dockerfile"]) / filename).read_text()
    except OSError:
        dockerfile = None
    secrets = _read_secrets(opts.get("--secret", []))
    if isinstance(secrets, str):
        print(f"error: {secrets}", file=sys.stderr)
        return 1
    conn = _connect(addr)
    if isinstance(conn, str):
        print(conn.replace("error: ", "error: listing workers for Build: ", 1), file=sys.stderr)
        return 1
    # buildctl's session offers buildkitd the credentials of $DOCKER_CONFIG/config.json.
    config = Path(os.environ.get("DOCKER_CONFIG", "/nonexistent")) / "config.json"
    req = {
        "cmd": "build",
        "auths": json.loads(config.read_text()).get("auths", {}) if config.is_file() else {},
        "dockerfile": dockerfile,
        "filename": filename,
        "output": output,
        "opts": fopts,
    }
    with conn:
        for msg in _exchange(conn, req):
            if "out" in msg:
                print(msg["out"], file=sys.stderr, flush=True)
                continue
            for line in msg.get("error", []):
                print(line, file=sys.stderr, flush=True)
            if msg.get("rc") == 0 and "--metadata-file" in opts:
                Path(opts["--metadata-file"][-1]).write_text(json.dumps(msg["metadata"], indent=2))
            return int(msg.get("rc", 1))
    # The daemon's stream ended without a result: it died (build-daemon-killed-plain.txt).
    print(fixture_lines("build-daemon-killed-plain.txt")[0][-1], file=sys.stderr, flush=True)
    return 1


def prune(args: list[str]) -> int:
    """``buildctl prune``: the flags the real one takes; it has nothing to free (the stand-in
    keeps no cache), so it prints what the real one prints then (prune-nothing.txt)."""
    help_text = fixture("buildctl-prune-help.txt")
    try:
        parse_urfave(args, urfave_flags(help_text), stop_at_positional=False)
    except UsageError as exc:
        return _usage(exc, help_text)
    print(fixture("prune-nothing.txt"), end="")
    return 0


def main() -> int:
    record("buildctl")
    help_text = fixture("buildctl-help.txt")
    try:
        flags, rest = parse_urfave(sys.argv[1:], urfave_flags(help_text), stop_at_positional=True)
    except UsageError as exc:
        return _usage(exc, help_text)
    opts = dict(flags)
    if "--version" in opts or "-v" in opts:
        print("buildctl github.com/moby/buildkit v0.11.6 2951a28cd7085eb18979b1f710678623d94ed578")
        return 0
    if not rest or "--help" in opts or "-h" in opts:
        print(help_text)
        return 0
    addr = opts.get("--addr", "unix:///run/buildkit/buildkitd.sock")
    if rest[0] in ("build", "b"):
        return build(addr, rest[1:])
    if rest[:2] == ["debug", "workers"]:
        return workers(addr, rest[2:])
    if rest[0] == "prune":
        return prune(rest[1:])
    print(f"No help topic for '{rest[0]}'", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
