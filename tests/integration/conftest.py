"""Integration fixtures: one smoke study of the embedded model, materialized once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from dagster import DagsterInstance

SMOKE = "smoke"
MODEL = "smollm2-135m"


@dataclass
class SmokeStudy:
    results: Path
    tracking_uri: str
    instance: DagsterInstance
    runs: dict[str, object]
    load_counts: dict[str, int]


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory: pytest.TempPathFactory) -> SmokeStudy:
    """Materialize every job of the study plan for the embedded model on ``smoke`` in one session."""
    results = tmp_path_factory.mktemp("smoke-results")
    mp = pytest.MonkeyPatch()
    mp.setenv("EMOTION_RESULTS_DIR", str(results))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{results.parent / 'mlflow.db'}")
    mp.setenv("EMOTION_MLFLOW_ARTIFACTS", str(results.parent / "mlartifacts"))
    from emotion_assets.definitions import defs
    from jobs.jobs import study_plan
    from resources.models import LOAD_COUNTS, clear_model_cache

    clear_model_cache()
    before = dict(LOAD_COUNTS)
    instance = DagsterInstance.ephemeral()
    runs = {}
    for job_name, partition in study_plan(MODEL, SMOKE):
        result = defs.resolve_job_def(job_name).execute_in_process(partition_key=partition, instance=instance)
        assert result.success, (job_name, partition)
        runs[f"{job_name}:{partition}"] = result
    counts = {k: LOAD_COUNTS[k] - before.get(k, 0) for k in LOAD_COUNTS}
    yield SmokeStudy(
        results=results,
        tracking_uri=f"sqlite:///{results.parent / 'mlflow.db'}",
        instance=instance,
        runs=runs,
        load_counts=counts,
    )
    mp.undo()
