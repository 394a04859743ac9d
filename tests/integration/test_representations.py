"""Phases 1-3 materialized with Dagster on the smoke profile with the embedded model."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import MODEL, SMOKE

pytestmark = pytest.mark.integration


def _materializations(result, asset: str) -> list:
    return [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]


def test_model_loaded_once_for_a_run_of_several_model_backed_assets(smoke_study):
    run = smoke_study.runs[f"representation_job:{MODEL}|{SMOKE}"]
    assets = {e.asset_key.to_user_string() for e in run.get_asset_materialization_events()}
    assert {"model_card", "activations"} <= assets  # two model-backed assets in one run
    assert smoke_study.load_counts.get(MODEL) == 1


def test_dataset_has_both_splits_and_unique_prompts(smoke_study):
    frame = pd.read_parquet(smoke_study.results / SMOKE / "emotion_dataset" / "prompts.parquet")
    counts = frame.groupby(["emotion", "split"]).size().unstack()
    assert set(counts.index) == {"gratitude", "anger", "apology", "neutral"}
    assert (counts["train"] > 0).all() and (counts["eval"] > 0).all()
    assert frame["text"].str.lower().is_unique
    checks = smoke_study.runs[f"dataset_job:{SMOKE}"].get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)


def test_activations_shapes_and_metadata(smoke_study):
    folder = smoke_study.results / SMOKE / "activations" / MODEL
    tensors = load_file(str(folder / "activations.safetensors"))
    index = pd.read_parquet(folder / "index.parquet")
    boundaries = tensors.pop("boundaries").tolist()
    assert boundaries[-1] == 30 and 12 in boundaries  # final pre-norm residual and the steered layer
    assert set(tensors) == {"last", "mean", "emotion_tokens"}
    for value in tensors.values():
        assert value.shape == (len(index), len(boundaries), 576)
        assert torch.isfinite(value).all()
    (event,) = _materializations(smoke_study.runs[f"representation_job:{MODEL}|{SMOKE}"], "activations")
    metadata = event.materialization.metadata
    assert metadata["tokens_per_s"].value > 0
    assert "residual_norm_by_layer" in metadata and metadata["device"].value == "cpu"


def test_vectors_subspaces_and_checks(smoke_study):
    vectors = load_file(str(smoke_study.results / SMOKE / "emotion_vectors" / MODEL / "vectors.safetensors"))
    assert {"last/gratitude", "last/anger", "last/apology"} <= set(vectors)
    probe = pd.read_parquet(
        smoke_study.results / SMOKE / "emotion_vectors" / MODEL / "probe_accuracy.parquet"
    )
    assert probe["accuracy"].between(0, 1).all()
    subspaces = load_file(
        str(smoke_study.results / SMOKE / "emotion_subspaces" / MODEL / "subspaces.safetensors")
    )
    basis = subspaces["last/gratitude/basis"].double()  # [n_boundaries, k, d]
    gram = basis @ basis.transpose(-1, -2)
    assert torch.allclose(gram, torch.eye(basis.shape[1], dtype=gram.dtype).expand_as(gram), atol=1e-4)
    checks = smoke_study.runs[f"representation_job:{MODEL}|{SMOKE}"].get_asset_check_evaluations()
    blocking = [c for c in checks if c.check_name != "emotion_vectors_unconfounded"]
    assert len(blocking) >= 3 and all(c.passed for c in blocking)
    # The confound audit's check warns (never blocks) and names what it flags when it fails.
    (audit,) = [c for c in checks if c.check_name == "emotion_vectors_unconfounded"]
    assert audit.severity.value == "WARN"


def test_timing_records_every_phase(smoke_study):
    from emotion_assets.timing import profile_timings

    timings = profile_timings(smoke_study.instance, SMOKE)
    assert {"emotion_dataset", "activations", "emotion_vectors", "emotion_subspaces"} <= set(timings["asset"])
    assert (timings["elapsed_s"] > 0).all()


def test_every_materialization_has_an_ended_mlflow_run_under_its_dagster_runs_run(smoke_study):
    from mlflow.tracking import MlflowClient

    from resources.tracking import PARENT_KEY_TAG

    client = MlflowClient(tracking_uri=smoke_study.tracking_uri)
    experiment = client.get_experiment_by_name("emotion-circuits")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = {r.data.tags[PARENT_KEY_TAG]: r for r in runs if PARENT_KEY_TAG in r.data.tags}
    children = [r for r in runs if PARENT_KEY_TAG not in r.data.tags]
    assert parents and set(parents) <= {result.run_id for result in smoke_study.runs.values()}
    materialized = [
        e for result in smoke_study.runs.values() for e in result.get_asset_materialization_events()
    ]
    assert len(children) == len(materialized)
    for parent in parents.values():
        assert parent.info.status == "FINISHED"
    for run in children:
        assert run.info.status == "FINISHED"
        assert parents[run.data.tags["dagster.run_id"]].info.run_id == run.data.tags["mlflow.parentRunId"]
        assert run.data.params["profile"] == SMOKE and "model" in run.data.params
        assert "elapsed_s" in run.data.metrics
        assert client.list_artifacts(run.info.run_id), run.info.run_name
    for event in materialized:
        run_id = event.materialization.metadata["mlflow_run_id"].value
        assert client.get_run(run_id).info.status == "FINISHED"
