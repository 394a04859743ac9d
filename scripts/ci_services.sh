#!/usr/bin/env bash
# Services the end-to-end tests need on the CI machine: Debian `chromium` (driven by the playwright
# package, no browser download), `postgresql` and `redis-server` (throw-away servers started by the tests;
# Redis is the Celery broker of tests/e2e/test_celery_backfill.py).
# Idempotent: installs only what is missing. Needs root (or passwordless sudo) and apt.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)

if [ ${#missing[@]} -eq 0 ]; then
    echo "ci_services: chromium, postgresql and redis-server already installed"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo_cmd=()
elif command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo -n)
else
    echo "ci_services: need root to install ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
fi

echo "ci_services: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

command -v chromium >/dev/null 2>&1 || { echo "ci_services: chromium still missing" >&2; exit 1; }
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || {
    echo "ci_services: postgresql initdb still missing" >&2
    exit 1
}
command -v redis-server >/dev/null 2>&1 || { echo "ci_services: redis-server still missing" >&2; exit 1; }
echo "ci_services: ready ($(chromium --version 2>/dev/null || echo chromium), $(ls -d /usr/lib/postgresql/*/ | xargs -n1 basename | tr '\n' ' '), $(redis-server --version | cut -d' ' -f1-3))"
