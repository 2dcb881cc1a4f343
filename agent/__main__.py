"""``build-agent``: the daemon's command line (``run``, ``check-config``).

Exit codes: 0 stopped cleanly, 1 stopped by a second signal, 2 usage error, 70 (EX_SOFTWARE) a
component failed to start, 78 (EX_CONFIG) the configuration is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent import __version__
from agent.errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build-agent", description="Per-node daemon that builds and pushes workspace images."
    )
    p.add_argument("--version", action="version", version=f"build-agent {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the daemon in the foreground (systemd's ExecStart)")
    run.add_argument(
        "--config", metavar="FILE", help="TOML config (default /etc/build-agent/config.toml)"
    )
    # Set by `build-agent dev` for the daemon it starts; `info` reports it.
    run.add_argument("--dev", action="store_true", help=argparse.SUPPRESS)
    check = sub.add_parser(
        "check-config", help="validate the config and print it as the daemon would use it"
    )
    check.add_argument("--config", metavar="FILE")
    check.add_argument("--json", action="store_true", help="print JSON instead of TOML-like text")
    dev = sub.add_parser(
        "dev",
        help="development mode: local registry, base image, daemon with temporary state",
    )
    dev.add_argument(
        "--demo", action="store_true", help="build examples/ twice with agentctl, then stop"
    )
    dev.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return p


def _print_effective(data: dict[str, object], source: str) -> None:
    print(f"# effective configuration (from {source}; secrets masked)")
    for section, values in data.items():
        assert isinstance(values, dict)
        plain = {k: v for k, v in values.items() if not _is_table_list(v)}
        print(f"\n[{section}]")
        for key, value in plain.items():
            print(f"{key} = {json.dumps(value)}")
        for key, value in values.items():
            if _is_table_list(value):
                for entry in value:
                    print(f"\n[[{section}.{key}]]")
                    for k, v in entry.items():
                        print(f"{k} = {json.dumps(v)}")


def _is_table_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def main(argv: list[str] | None = None) -> int:
    # systemd's variables are for this process alone: take them before anything can fork.
    from agent.notify import take_environment

    sd = take_environment()
    parser = _parser()
    opts = parser.parse_args(argv)
    if opts.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE

    if opts.command == "dev":
        from agent import devmode

        return devmode.main(demo=opts.demo, keep=opts.keep)

    from agent import config as config_mod

    try:
        config = config_mod.load(opts.config)
    except ConfigError as exc:
        print(f"build-agent: invalid configuration: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG

    if opts.command == "check-config":
        data = config.effective(mask_secrets=True)
        if opts.json:
            print(json.dumps({"source": config.source, "config": data}, indent=2))
        else:
            _print_effective(data, config.source)
        return EXIT_OK

    from agent import _logsetup, daemon

    _logsetup.setup(config.daemon.log_level, config.daemon.log_format)
    return daemon.run(config, sd, dev_mode=opts.dev)


if __name__ == "__main__":
    sys.exit(main())
