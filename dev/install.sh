#!/usr/bin/env bash
# Installs what build-agent needs on Debian bookworm: system packages (as root) and a virtualenv
# in .venv with the project and its test extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(docker-registry buildah skopeo runc busybox-static iproute2 nftables apache2-utils nginx
      prometheus systemd util-linux procps curl python3-venv gcc libc6-dev)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install: need root to apt-get install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # The docker-registry and nginx packages try to start their services; we start our own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,dev]'
  touch "$stamp"
fi
