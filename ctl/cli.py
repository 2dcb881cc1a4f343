"""agentctl's command line: global options, the subcommand groups, errors -> exit codes.

Exit codes (DESIGN section 6): 0 ok, 1 the daemon refused or the operation failed, 2 usage error,
3 the daemon cannot be reached, 130 interrupted (Ctrl-C).

Adding a group of subcommands (the hook for other features): write ``ctl/commands/<group>.py``::

    def register(sub: Subcommands) -> None:
        p = sub.add_parser("status", help="show a build")   # gets --socket/--json/--timeout
        p.add_argument("id")
        p.set_defaults(run=_status)

    def _status(opts: argparse.Namespace, ctx: Context) -> int:
        with ctx.connect() as client:
            result = client.call("status", {"id": opts.id})
        ctx.emit(result, lambda r: f"{r['id']} {r['state']}")
        return 0

and append its ``register`` to :data:`COMMAND_GROUPS` below. A handler returns the exit code and
lets ``ctl.client`` errors propagate: :func:`main` turns them into messages and exit codes.
Keep command modules light: agentctl must not import aiohttp, uvloop, pyroute2 or
prometheus-client, and its start-up time is measured (bench/control_plane.py).
"""

from __future__ import annotations

import argparse
import sys

from ctl.client import (
    Client,
    DaemonUnreachable,
    ProtocolError,
    RequestFailed,
    default_socket_path,
)
from ctl.commands import basic, builds, explain, resolve, top

# No typing/dataclasses at run time: agentctl's start-up is measured (bench/control_plane.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class Context:
    """What a command handler gets besides its parsed options."""

    def __init__(
        self,
        socket: str,
        json: bool = False,
        timeout: float | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.socket = socket
        self.json = json
        self.timeout = timeout
        self.out: TextIO = out or sys.stdout
        self.err: TextIO = err or sys.stderr

    def connect(self, timeout: float | None = None) -> Client:
        return Client.connect(self.socket, timeout=timeout if timeout is not None else self.timeout)

    def emit(self, result: Any, human: Callable[[Any], str]) -> None:
        """Print ``result`` as JSON with --json, else ``human(result)``."""
        if self.json:
            import json

            self.out.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
        else:
            text = human(result)
            if text:
                self.out.write(text if text.endswith("\n") else text + "\n")

    def error(self, text: str) -> None:
        self.err.write(f"agentctl: {text}\n")


class Subcommands:
    """Wraps argparse's subparsers so every subcommand accepts the global options too."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self._action = action
        self._common = common

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("parents", [])
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs["parents"] = [*kwargs["parents"], self._common]
        parser: argparse.ArgumentParser = self._action.add_parser(name, **kwargs)
        return parser


# Each group module's register(); add yours here.
COMMAND_GROUPS: list[Callable[[Subcommands], None]] = [
    basic.register,
    builds.register,
    explain.register,
    resolve.register,
    top.register,
]


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter without its ``import shutil`` (2.5 ms of every agentctl start:
    argparse builds a formatter for each add_argument)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24) -> None:
        import os

        try:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError):
            width = int(os.environ.get("COLUMNS", "0") or 0) or 80
        super().__init__(prog, indent_increment, max_help_position, max(width - 2, 40))


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    # On subcommands the defaults are SUPPRESS so that `agentctl --json ping` is not undone.
    d = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False, formatter_class=_Formatter)
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=d,
        help="daemon socket (default $AGENT_SOCKET or /run/build-agent/agent.sock)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output",
    )
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=d, help="give up after")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentctl",
        description="Client of the build-agent daemon.",
        formatter_class=_Formatter,
        parents=[_common_options(False)],
    )
    action = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub = Subcommands(action, _common_options(True))
    for register in COMMAND_GROUPS:
        register(sub)
    return parser


def _explain(exc: RequestFailed) -> str:
    text = f"{exc.code}: {exc.message}"
    if exc.code == "forbidden":
        text += " (ask an operator, or run the command as a permitted user)"
    elif exc.code == "unsupported_version":
        text += " (agentctl and the daemon are from different releases)"
    elif "daemon.max_frame" in exc.message:
        text += (
            " (the request is larger than the daemon takes; build secrets travel inside it: "
            "pass fewer or smaller ones, or have the operator raise daemon.max_frame)"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    run = getattr(opts, "run", None)
    if run is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    ctx = Context(socket=opts.socket or default_socket_path(), json=opts.json, timeout=opts.timeout)
    try:
        code: int = run(opts, ctx)
        return code
    except KeyboardInterrupt:
        ctx.error("interrupted")
        return EXIT_INTERRUPTED
    except DaemonUnreachable as exc:
        ctx.error(exc.message)
        if ctx.json:
            _json_error(ctx, "unreachable", exc.message, {"path": exc.path, "reason": exc.reason})
        return EXIT_UNREACHABLE
    except RequestFailed as exc:
        ctx.error(_explain(exc))
        if ctx.json:
            _json_error(ctx, exc.code, exc.message, exc.details)
        return EXIT_FAILED
    except ProtocolError as exc:
        ctx.error(f"protocol error: {exc}")
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_FAILED


def _json_error(ctx: Context, code: str, message: str, details: dict[str, Any]) -> None:
    import json

    error = {"code": code, "message": message, "details": details}
    ctx.out.write(json.dumps({"error": error}, sort_keys=True, default=str) + "\n")
