"""Stand-in for crane v0.20.2 (go-containerregistry; the real one cannot be installed here).

REPLAYED from tests/fixtures/toolchain (read at run time): the flag tables of
``crane-help.txt``, ``crane-copy-help.txt`` and ``crane-digest-help.txt`` (other flags are refused
with cobra's ``Error: unknown flag``), the help texts, and the shapes of ``crane-copy-ok.txt``,
``crane-copy-notfound.txt``, ``crane-copy-unauthorized.txt``, ``crane-digest-ok.txt`` and
``crane-digest-notfound.txt`` with this call's refs and digests substituted.

REAL: the copy and the digest are done with ``skopeo`` against the real registry (plain HTTP for
``--insecure`` and loopback hosts, as crane does), with the credentials of
``$DOCKER_CONFIG/config.json`` as crane's keychain reads them (the daemon puts only the build
route's login there). The ``mounted blob`` lines are not printed: skopeo does not say which
blobs it mounted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import UsageError, cobra_flags, fixture, fixture_lines, record


def _stamp() -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S")


def _parse(args: list[str], table: dict[str, bool]) -> tuple[dict[str, str], list[str]]:
    opts: dict[str, str] = {}
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and a != "-":
            name, eq, value = a.partition("=")
            if name not in table:
                raise UsageError(
                    f"unknown flag: {name}"
                    if name.startswith("--")
                    else f"unknown shorthand flag: '{name[1:]}' in {a}"
                )
            if table[name] and not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"flag needs an argument: {name}")
                value = args[i]
            opts[name] = value or "true"
        else:
            pos.append(a)
        i += 1
    return opts, pos


def _split(ref: str) -> tuple[str, str, str]:
    host, _, rest = ref.partition("/")
    repo, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag:
        repo, tag = rest, "latest"
    return host, repo, tag


def _plain(host: str, insecure: bool) -> bool:
    name = host.split(":")[0]
    return insecure or name == "localhost" or name.startswith("127.")


def _skopeo(*args: str) -> subprocess.CompletedProcess[bytes]:
    # crane's keychain reads $DOCKER_CONFIG/config.json; skopeo takes the same file.
    config = Path(os.environ.get("DOCKER_CONFIG", "/nonexistent")) / "config.json"
    auth = ["--authfile", str(config)] if config.is_file() else []
    return subprocess.run(["skopeo", args[0], *auth, *args[1:]], capture_output=True, timeout=120)


def _fetch_error(ref: str, err: str, method: str = "GET") -> str:
    host, repo, tag = _split(ref)
    url = f"http://{host}/v2/{repo}/manifests/{tag}"
    if "manifest unknown" in err or "not found" in err.lower():
        return f"{method} {url}: MANIFEST_UNKNOWN: manifest unknown; map[Tag:{tag}]"
    if "401" in err or "unauthorized" in err.lower() or "authentication required" in err:
        return (
            f"HEAD {url}: unexpected status code 401 Unauthorized (HEAD responses have no "
            "body, use GET for details)"
        )
    return err.strip().splitlines()[-1] if err.strip() else "failed"


def copy(args: list[str], insecure: bool) -> int:
    src, dst = args
    print(f"{_stamp()} Copying from {src} to {dst}", file=sys.stderr, flush=True)
    sp = _plain(src.split("/")[0], insecure)
    dp = _plain(dst.split("/")[0], insecure)
    probe = _skopeo("inspect", "--raw", f"--tls-verify={str(not sp).lower()}", f"docker://{src}")
    if probe.returncode != 0:
        print(
            f'Error: fetching "{src}": {_fetch_error(src, probe.stderr.decode(errors="replace"))}',
            file=sys.stderr,
        )
        return 1
    manifest = probe.stdout
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    there = _skopeo("inspect", "--raw", f"--tls-verify={str(not dp).lower()}", f"docker://{dst}")
    if there.returncode == 0 and hashlib.sha256(there.stdout).hexdigest() == digest[7:]:
        # As recorded (crane-copy-existing.txt): nothing is copied, the digest is named.
        tag = dst.rsplit("/", 1)[-1].partition(":")[2] or "latest"
        print(f"{_stamp()} existing manifest: {tag}@{digest}", file=sys.stderr)
        return 0
    done = _skopeo(
        "copy",
        "--quiet",
        "--all",
        f"--src-tls-verify={str(not sp).lower()}",
        f"--dest-tls-verify={str(not dp).lower()}",
        f"docker://{src}",
        f"docker://{dst}",
    )
    if done.returncode != 0:
        print(
            f"Error: {_fetch_error(dst, done.stderr.decode(errors='replace'), 'HEAD')}",
            file=sys.stderr,
        )
        return 1
    print(f"{_stamp()} {dst}: digest: {digest} size: {len(manifest)}", file=sys.stderr)
    return 0


def digest(args: list[str], insecure: bool) -> int:
    (ref,) = args
    plain = _plain(ref.split("/")[0], insecure)
    got = _skopeo("inspect", "--raw", f"--tls-verify={str(not plain).lower()}", f"docker://{ref}")
    if got.returncode != 0:
        err = got.stderr.decode(errors="replace")
        host, repo, tag = _split(ref)
        url = f"http://{host}/v2/{repo}/manifests/{tag}"
        if "manifest unknown" in err or "not found" in err.lower():
            print(
                f"{_stamp()} HEAD request failed, falling back on GET: HEAD {url}: unexpected "
                "status code 404 Not Found (HEAD responses have no body, use GET for details)",
                file=sys.stderr,
            )
        print(f"Error: {_fetch_error(ref, err)}", file=sys.stderr)
        return 1
    print("sha256:" + hashlib.sha256(got.stdout).hexdigest())
    return 0


def main() -> int:
    record("crane")
    argv = sys.argv[1:]
    cmd = next((a for a in argv if not a.startswith("-")), "")
    helps = {
        "copy": "crane-copy-help.txt",
        "cp": "crane-copy-help.txt",
        "digest": "crane-digest-help.txt",
    }
    help_text = fixture(helps.get(cmd, "crane-help.txt"))
    rest = [a for a in argv if a != cmd] if cmd else argv
    try:
        opts, pos = _parse(rest, cobra_flags(help_text))
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if "--help" in opts or "-h" in opts or not cmd:
        print(help_text)
        return 0
    insecure = "--insecure" in opts
    if cmd in ("copy", "cp"):
        if len(pos) != 2:
            print(f"Error: accepts 2 arg(s), received {len(pos)}", file=sys.stderr)
            return 1
        return copy(pos, insecure)
    if cmd == "digest":
        if len(pos) != 1:
            print(f"Error: accepts 1 arg(s), received {len(pos)}", file=sys.stderr)
            return 1
        return digest(pos, insecure)
    if fixture_lines("crane-help.txt")[0] and f"  {cmd} " in help_text:
        print(f"Error: the stand-in does not implement 'crane {cmd}'", file=sys.stderr)
        return 1
    print(f'Error: unknown command "{cmd}" for "crane"', file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
