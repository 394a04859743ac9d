#!/usr/bin/env bash
# Start one dagster-celery worker for this project: one worker process, one step at a time, so the
# process's model cache loads each model at most once however many steps it runs.
#   deploy/celery/worker.sh [NAME] [extra celery worker options...]
# Run it from the project root (or any folder: it changes there) with the project's environment:
# DAGSTER_HOME (holding deploy/celery/dagster.yaml), DAGSTER_PG_*, EMOTION_RESULTS_DIR on shared storage,
# MLFLOW_TRACKING_URI, and EMOTION_CELERY_BROKER / EMOTION_CELERY_BACKEND (defaults as in jobs/executors.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
name="${1:-emotion-$(hostname -s)-$$}"
shift || true

export EMOTION_CELERY_BROKER="${EMOTION_CELERY_BROKER:-redis://localhost:6379/0}"
export EMOTION_CELERY_BACKEND="${EMOTION_CELERY_BACKEND:-$EMOTION_CELERY_BROKER}"
: "${DAGSTER_HOME:?set DAGSTER_HOME to the folder holding deploy/celery/dagster.yaml as dagster.yaml}"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || {
    echo "worker.sh: $DAGSTER_HOME/dagster.yaml is missing; copy deploy/celery/dagster.yaml there" >&2
    exit 1
}
bin="$(pwd)/.venv/bin"
[ -x "$bin/dagster-celery" ] || bin="$(dirname "$(command -v dagster-celery || echo /missing/dagster-celery)")"
[ -x "$bin/dagster-celery" ] || {
    echo "worker.sh: dagster-celery is not installed; run: pip install -e .[scale]" >&2
    exit 1
}
# The worker imports the project's code location by module name.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$bin:$PATH"
exec "$bin/dagster-celery" worker start -A dagster_celery.app -y deploy/celery/celery_config.yaml \
    -q dagster -n "$name" -- --concurrency 1 --without-gossip --without-mingle "$@"
