#!/usr/bin/env bash
# The README's first command: install what is needed, start a local docker-registry as the
# upstream, make the busybox base image, start the daemon in development mode (temporary state, no
# config), build examples/ with agentctl twice (the second is a cache hit), then stop everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/install.sh
exec .venv/bin/python -m agent dev --demo "$@"
