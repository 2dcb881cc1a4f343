#!/usr/bin/env bash
# The README's test command: install what is needed, then lint, type-check and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/install.sh
.venv/bin/ruff check agent ctl tests bench
.venv/bin/mypy
# The benches are scripts, not a package: checked on their own (a wrong call there only shows
# when someone runs them).
.venv/bin/mypy --strict --explicit-package-bases bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
