#!/usr/bin/env bash
# Idempotent set-up: Debian packages by name, then a Python venv from pinned requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

want=$(grep -vE '^\s*(#|$)' scripts/apt-packages.txt)
missing=()
for p in $want; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.setup-$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "setup: building .venv from requirements-dev.txt"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    pipq() { .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; return "${PIPESTATUS[0]}"; }
    pipq -r requirements-dev.txt
    pipq --no-deps --no-build-isolation -e .
    .venv/bin/python -c "import oe_router, cryptography, dns, pyroute2, pytest, hypothesis, atheris"
    rm -f .venv/.setup-*
    touch "$stamp"
fi
echo "setup: ok"
