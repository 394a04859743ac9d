"""Per-run config knobs, and reproducibility checked with the comparison command."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance

from jobs.compare import compare_trees

pytestmark = pytest.mark.integration

ENCODER = "minilm-l6"
PARTITION = f"{ENCODER}|smoke"


def _run_study(
    root: Path, monkeypatch: pytest.MonkeyPatch, run_config: dict | None = None, raise_on_error=True
):
    from emotion_assets.definitions import defs

    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.parent / (root.name + '-mlflow.db')}")
    monkeypatch.setenv("EMOTION_MLFLOW_ARTIFACTS", str(root.parent / (root.name + "-mlartifacts")))
    instance = DagsterInstance.ephemeral()
    if not (root / "smoke" / "emotion_dataset").exists():
        assert (
            defs.resolve_job_def("dataset_job")
            .execute_in_process(partition_key="smoke", instance=instance)
            .success
        )
    return defs.resolve_job_def("representation_job").execute_in_process(
        partition_key=PARTITION, instance=instance, run_config=run_config or {}, raise_on_error=raise_on_error
    )


def test_override_changes_only_that_run(tmp_path, monkeypatch):
    root = tmp_path / "results"
    quick = {"ops": {"activations": {"config": {"max_samples_per_emotion": 4, "batch_size": 4}}}}
    result = _run_study(root, monkeypatch, quick)
    index = pd.read_parquet(root / "smoke" / "activations" / ENCODER / "index.parquet")
    assert len(index) == 20  # 4 fitting prompts per emotion + 4 neutral steering prompts
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["activations"]]
    assert event.materialization.metadata["run_config_overrides"].value == {
        "batch_size": 4,
        "max_samples_per_emotion": 4,
    }
    _run_study(root, monkeypatch)
    index = pd.read_parquet(root / "smoke" / "activations" / ENCODER / "index.parquet")
    assert len(index) == 100  # the profile's 20 per emotion again, + 20 neutral steering prompts


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"batch_size": -2}, "batch_size"),
        ({"device": "tpu"}, "device 'tpu' is not available"),
        ({"n_jobs": 0}, "n_jobs must be >= 1"),
    ],
)
def test_invalid_override_is_refused_before_running(tmp_path, monkeypatch, config, message):
    with pytest.raises(Exception, match=message):
        _run_study(tmp_path / "results", monkeypatch, {"ops": {"activations": {"config": config}}})


def test_unknown_layer_override_names_the_valid_range(tmp_path, monkeypatch):
    result = _run_study(
        tmp_path / "results", monkeypatch, {"ops": {"activations": {"config": {"layers": [0, 99]}}}}, False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = failure.event_specific_data.error.message + str(failure.event_specific_data.error.cause)
    assert "[99]" in text and "valid boundaries 0..6" in text


def test_two_runs_with_the_same_seed_compare_identical(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    _run_study(first, monkeypatch)
    _run_study(second, monkeypatch)
    report = compare_trees(first, second, atol=1e-6, rtol=1e-6)
    assert report.summary().startswith("compared") and not report.differences and not report.errors
    assert not report.missing_in_a and not report.missing_in_b and len(report.identical) > 5
