"""agent.build.child.popen under the daemon's loop (uvloop): the output pipe is closed exactly
once, by its transport, at EOF or when the child is stopped; a pidfd wakes the reaper."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

import uvloop

from agent.build.child import Child, popen

ENV = {"PATH": "/usr/bin:/bin"}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _closed(child: Child) -> bool:
    """Whether the child's pipe file gets closed within 1000 turns of the loop (the transport
    closes it on a later turn than the one that delivered EOF; it takes one or two)."""
    assert child.proc.stdout is not None
    for _ in range(1000):
        if child.proc.stdout.closed:
            return True
        await asyncio.sleep(0)
    return child.proc.stdout.closed


async def _baseline() -> int:
    """Open fds once the loop has made its own (uvloop adds one with its first pipe)."""
    warm = await popen("true", ["true"], env=ENV)
    assert warm.stdout is not None
    await warm.stdout.read()
    await warm.wait()
    assert await _closed(warm)
    gc.collect()
    return _open_fds()


def test_output_pipe_is_closed_at_eof_and_nothing_leaks() -> None:
    async def main() -> None:
        before = await _baseline()
        for _ in range(20):
            child = await popen("echo", ["echo", "hi"], env=ENV)
            assert child.stdout is not None and child.proc.stdout is not None
            assert await child.stdout.read() == b"hi\n"
            assert await child.wait() == 0
            # Closed through the file object: its finalizer cannot close the number again
            # (under uvloop the pipe stayed open after EOF, to be closed twice at collection).
            assert await _closed(child)
        gc.collect()
        assert _open_fds() <= before

    uvloop.run(main())


def test_stopped_child_is_reaped_and_its_pipe_closed() -> None:
    async def main() -> None:
        before = await _baseline()
        child = await popen("sleep", ["sh", "-c", "echo started; exec sleep 30"], env=ENV)
        assert child.stdout is not None and child.proc.stdout is not None
        assert await child.stdout.readline() == b"started\n"
        code = await asyncio.wait_for(child.stop(grace=0.2), 10)
        assert code == -signal.SIGTERM and child.returncode == code
        assert child.proc.stdout.closed
        # wait() again answers at once from the reaped status.
        assert await asyncio.wait_for(child.wait(), 1) == code
        gc.collect()
        assert _open_fds() <= before

    uvloop.run(main())


def test_wait_answers_when_the_child_exits_and_its_group_dies_with_it() -> None:
    # The shell exits at once; the sleep it left in its process group holds the output pipe.
    # wait() answers from the pidfd (not at EOF) and kills the group before the reap, so the
    # pipe then ends (EOF: the sleep, its last writer, is gone). The supervisor and run() both
    # rely on this one path.
    async def main() -> None:
        child = await popen("sh", ["sh", "-c", "sleep 30 & echo started; exit 3"], env=ENV)
        assert child.stdout is not None
        assert await child.stdout.readline() == b"started\n"
        assert await asyncio.wait_for(child.wait(), 5) == 3
        assert await asyncio.wait_for(child.stdout.read(), 5) == b""

    uvloop.run(main())


def test_run_returns_when_the_child_exits_though_a_leftover_holds_its_output() -> None:
    # run() reads the output to its end; the end comes only once the leftover sleep is killed,
    # and that kill comes from wait(). Waiting only after the output ended hung for the sleep.
    from agent.build.child import run
    from agent.sandbox import OffSandbox

    class Lines:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def line(self, text: str) -> None:
            self.lines.append(text)

    async def main() -> None:
        sink = Lines()
        argv = ["sh", "-c", "sleep 30 & echo started; exit 3"]
        code = await asyncio.wait_for(
            run("sh", argv, sandbox=OffSandbox(), env=ENV, sink=sink), 10
        )
        assert code == 3 and sink.lines == ["started"]

    uvloop.run(main())
