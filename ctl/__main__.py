"""``agentctl`` / ``python -m ctl``."""

from __future__ import annotations

import sys


def main() -> None:
    from ctl.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
