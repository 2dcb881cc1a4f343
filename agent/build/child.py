"""Running toolchain children: scrubbed environment, own process group, sandbox wrapping, output
streamed line by line, killed as a whole tree on cancellation, exit status decoded into words.

Every child of the daemon (buildkitd, buildctl, crane, buildah, skopeo) starts through
:func:`spawn`, so these guarantees hold in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat as stat_mod
import subprocess
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from agent.build.toolchain import LogSink
from agent.contracts import CgroupPort, ProxyLogin, SandboxPort

log = logging.getLogger("agent.build")

# Variables a child may inherit from the daemon; everything else (credentials, LISTEN_FDS,
# NOTIFY_SOCKET, AGENT_*, proxies, cloud tokens) is dropped.
_KEEP = ("PATH", "LANG", "LC_ALL", "TZ")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_LINE = 64 * 1024


def child_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a child. ``home`` is an empty directory owned by the daemon: it is
    HOME and DOCKER_CONFIG, so no tool finds a credential file there."""
    env = {k: os.environ[k] for k in _KEEP if k in os.environ}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.setdefault("LANG", "C.UTF-8")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    (home / "docker").mkdir(exist_ok=True, mode=0o700)
    # buildah/skopeo refuse to run when DOCKER_CONFIG has no config.json ("checking authfile").
    empty = home / "docker" / "config.json"
    if not empty.exists():
        empty.write_text('{"auths": {}}\n')
    env["HOME"] = str(home)
    env["DOCKER_CONFIG"] = str(home / "docker")
    env["XDG_RUNTIME_DIR"] = str(home)
    env["TMPDIR"] = str(home)
    if extra:
        env.update(extra)
    return env


def write_login(directory: Path, login: ProxyLogin | None) -> Path | None:
    """``login`` as ``directory/config.json`` (mode 0600): the docker config that buildctl and
    crane read from ``DOCKER_CONFIG``, and the auth file buildah and skopeo take with
    ``--authfile``. The capability stays off every argv. None when there is no login."""
    if login is None:
        return None
    path = directory / "config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(login.docker_config())
    return path


def describe_exit(returncode: int | None) -> str:
    """'exited with status 3', 'was killed by signal 9 (SIGKILL)'."""
    if returncode is None:
        return "is still running"
    if returncode >= 0:
        return f"exited with status {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = "unknown signal"
    return f"was killed by signal {signum} ({name})"


def proc_read(name: str) -> Iterator[tuple[int, bytes]]:
    """``(pid, contents of /proc/<pid>/<name>)`` for every process still there to be read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/{name}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        yield int(entry.name), data


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (by walking /proc's parent links), deepest last."""
    children: dict[int, list[int]] = {}
    for p, stat in proc_read("stat"):
        # The command name may hold spaces and parens: the fields after the last ')' are fixed.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(p)
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid``'s process group and every descendant (some tools start their own sessions)."""
    pids = descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for p in [pid, *pids]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


class Child:
    """One running child, started with :func:`popen`. Reap it with :meth:`wait`; its output, when
    piped, is :attr:`stdout`."""

    def __init__(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        stdout: asyncio.StreamReader | None = None,
        pipe: asyncio.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.stdout = stdout
        self._pipe = pipe
        self._exited: asyncio.Future[int] | None = None

    def close_pipe(self) -> None:
        """Close the output pipe (it closes itself at EOF; this is for a child stopped early).
        The transport, not the Popen's file object, must close the fd: both closing it is a
        double close that hits whatever reused the number."""
        if self._pipe is not None and not self._pipe.is_closing():
            self._pipe.close()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def wait(self) -> int:
        """The exit status, once the child is gone: the one reaping path of every child.

        A pidfd says when the process exited (its pipes may stay open: a grandchild such as a
        RUN step's ``sleep`` can hold them). What it left in its process group is killed before
        it is reaped, while the group's id cannot belong to anyone else, so nothing of the
        child outlives it and its output ends."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        if self._exited is None:
            self._exited = self._watch_exit()
        return await asyncio.shield(self._exited)

    def _watch_exit(self) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        try:
            pidfd = os.pidfd_open(self.pid)  # the pid is ours until we reap it: no reuse race
        except ProcessLookupError:  # reaped behind our back: the group may be someone else's
            exited.set_result(self.proc.wait())
            return exited

        def gone() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            if not exited.done():
                exited.set_result(self.proc.wait())  # exited already: does not block

        loop.add_reader(pidfd, gone)
        return exited

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM the tree, then SIGKILL what is left after ``grace`` seconds."""
        if self.proc.returncode is None:
            kill_tree(self.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), grace)
        kill_tree(self.pid, signal.SIGKILL)
        code = await self.wait()
        self.close_pipe()
        return code


class _PipeProtocol(asyncio.StreamReaderProtocol):
    def eof_received(self) -> bool:
        super().eof_received()
        # Nothing follows EOF on a pipe: let the transport close now (uvloop keeps a read pipe
        # open after EOF when the protocol asks to, which StreamReaderProtocol does).
        return False


async def popen(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    pass_fds: Iterable[int] = (),
    cwd: str | None = None,
    stdout: int | None = subprocess.PIPE,
) -> Child:
    """Start ``argv`` as is, in a new session (its own process group), stdin from /dev/null and
    stderr with stdout.

    Started with :class:`subprocess.Popen` (vfork, and the fds closed with ``close_range``), not
    the loop's subprocess support: uvloop's closes every fd number up to ``RLIMIT_NOFILE`` in the
    child, 4.6 ms a spawn at 20,000 and more at the unit's 65,536, against 0.5 ms here, and a
    build starts four children."""
    try:
        proc = subprocess.Popen(  # noqa: ASYNC220 -- returns once the child has exec()d (sub-ms)
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout == subprocess.PIPE else None,
            env=dict(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        from agent.errors import StartupError

        raise StartupError(
            f"{name}: program {argv[0]!r} not found; install it or fix PATH"
        ) from exc
    if proc.stdout is None:
        return Child(name, proc)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_LINE, loop=loop)
    protocol = _PipeProtocol(reader, loop=loop)
    pipe, _ = await loop.connect_read_pipe(lambda: protocol, proc.stdout)
    return Child(name, proc, reader, pipe)


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    sandbox: SandboxPort,
    env: Mapping[str, str],
    pass_fds: Iterable[int] = (),
    cwd: str | None = None,
    pid_namespace: bool = False,
    stdout: int | None = subprocess.PIPE,
    visible: Sequence[str] = (),
    cgroup: CgroupPort | None = None,
) -> Child:
    """Start ``argv`` inside the sandbox in a new session (so it is its own process group), and
    inside the build's ``cgroup`` from before its first instruction when there is one.

    ``visible``: this build's directories under the sandbox's per-build staging roots (its work
    directory); every directory passed in ``pass_fds`` (its context copy) is added, so a tool
    that turns ``/dev/fd/N`` back into a path finds it. No other build's are visible."""
    fds = tuple(pass_fds)
    full = sandbox.wrap(
        list(argv), pid_namespace=pid_namespace, visible=[*visible, *_dir_paths(fds)]
    )
    if cgroup is not None:
        full = cgroup.join_argv(full)
    child = await popen(name, full, env=env, pass_fds=fds, cwd=cwd, stdout=stdout)
    log.info("%s started (pid %d)", name, child.pid)
    return child


def _dir_paths(fds: Sequence[int]) -> list[str]:
    out: list[str] = []
    for fd in fds:
        with contextlib.suppress(OSError):
            if stat_mod.S_ISDIR(os.fstat(fd).st_mode):
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


async def run(
    name: str,
    argv: Sequence[str],
    *,
    sandbox: SandboxPort,
    env: Mapping[str, str],
    sink: LogSink,
    pass_fds: Iterable[int] = (),
    cwd: str | None = None,
    visible: Sequence[str] = (),
    cgroup: CgroupPort | None = None,
) -> int:
    """Run a child to completion, sending each output line to ``sink``; return its exit code.
    If the calling task is cancelled, the child's whole tree is killed before re-raising."""
    child = await spawn(
        name,
        argv,
        sandbox=sandbox,
        env=env,
        pass_fds=pass_fds,
        cwd=cwd,
        visible=visible,
        cgroup=cgroup,
    )
    try:
        assert child.stdout is not None
        # Waiting from the start: once the child exits, what it left in its group is killed,
        # so a leftover holding the pipe cannot keep the output (and this call) open.
        exited = asyncio.ensure_future(child.wait())
        await _pump(child.stdout, sink)
        code = await exited
    except BaseException:
        await asyncio.shield(child.stop(grace=1.0))
        log.info("%s (pid %d) killed: the build was stopped", name, child.pid)
        raise
    log.info("%s (pid %d) %s", name, child.pid, describe_exit(code))
    return code


async def _pump(stream: asyncio.StreamReader, sink: LogSink) -> None:
    async for line in output_lines(stream):
        sink.line(line)


async def output_lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """A child's output, line by line, without the line ending, until EOF."""
    while True:
        try:
            raw = await stream.readline()
        except ValueError:  # a line longer than the limit: pass it on in pieces
            raw = await stream.read(_MAX_LINE)
        if not raw:
            return
        yield raw.decode("utf-8", "replace").rstrip("\r\n")
