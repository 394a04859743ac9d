#!/usr/bin/env bash
# Install everything (idempotent) and run the main job: every asset for the default embedded model on
# the smoke profile. Extra arguments go to `python -m jobs.study` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$(pwd)/dagster_home}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m jobs.study "$@"
