#!/usr/bin/env bash
# Install everything (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The end-to-end tests drive Debian's chromium and start throw-away PostgreSQL and Redis servers.
bash scripts/ci_services.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
