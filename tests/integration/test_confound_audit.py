"""The confound audit materialized for the embedded model on a few smoke prompts, and its section in the
findings report (no session smoke study: this builds only what it needs)."""

from __future__ import annotations

import json

import dagster as dg
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
PARTITION = f"{MODEL}|smoke"
FEW = {"ops": {"activations": {"config": {"max_samples_per_emotion": 8}}}}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("confounds") / "results"
    mp = pytest.MonkeyPatch()
    mp.setenv("EMOTION_RESULTS_DIR", str(root))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.parent / 'mlflow.db'}")
    mp.setenv("EMOTION_MLFLOW_ARTIFACTS", str(root.parent / "mlartifacts"))
    from emotion_assets.activations import activations
    from emotion_assets.confounds import confound_audit, emotion_vectors_unconfounded
    from emotion_assets.dataset import emotion_dataset
    from emotion_assets.vectors import emotion_vectors
    from resources.evaluators import EvaluatorResource
    from resources.models import ModelResource
    from resources.storage import ArtifactStore
    from resources.tracking import TrackingResource
    from tests.artifacts import materialize

    store = ArtifactStore()
    resources = {"store": store, "tracking": TrackingResource(), "models": ModelResource(),
                 "evaluators": EvaluatorResource()}  # fmt: skip
    instance = dg.DagsterInstance.ephemeral()
    assert materialize(
        [emotion_dataset], store=store, partition_key="smoke", instance=instance, resources=resources
    ).success
    # The representation assets the audit reads, then the audit and its check, as representation_job runs them.
    result = materialize(
        [activations, emotion_vectors, confound_audit, emotion_vectors_unconfounded], store=store,
        partition_key=PARTITION, run_config=FEW, instance=instance, resources=resources,
    )  # fmt: skip
    assert result.success
    yield root, result
    mp.undo()


def test_confound_audit_tables_summary_and_check(audited):
    root, result = audited
    folder = root / "smoke" / "confound_audit" / MODEL
    audit = pd.read_parquet(folder / "vector_audit.parquet")
    assert {"cos_final_punctuation", "cos_exclamation", "cos_question", "share_left", "flagged"} <= set(audit)
    assert len(audit) == 3 * 3 * audit["boundary"].nunique()  # pooling × emotion × boundary
    zero = audit["vector_norm"] == 0  # e.g. `last` at the embeddings when final tokens are balanced
    assert audit.loc[~zero, "share_left"].between(0, 1).all() and audit.loc[zero, "share_left"].isna().all()
    baselines = pd.read_parquet(folder / "surface_baselines.parquet")
    assert set(baselines["baseline"]) == {"bag_of_words", "keyword_rule", "punctuation_length"}
    validation = pd.read_parquet(folder / "validation_scores.parquet")
    assert set(validation["validation_set"]) == {"emotion_validation"}
    evaluator = validation[validation["scorer"] == "evaluator"].iloc[0]
    assert evaluator["n"] == 60 and 0 <= evaluator["accuracy"] <= 1
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["focus_boundaries"] == [12]  # the smoke profile's steering layer
    assert 0 <= summary["max_abs_punctuation_cosine"] <= 1
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "confound_audit"
    ]
    metadata = event.materialization.metadata
    assert {"max_abs_punctuation_cosine", "min_norm_share_left", "nuisance_cosine_heatmap"} <= set(metadata)
    (check,) = [
        c for c in result.get_asset_check_evaluations() if c.check_name == "emotion_vectors_unconfounded"
    ]
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.passed == (not audit["flagged"].any())
    assert check.metadata["n_flagged"].value == int(audit["flagged"].sum())


def test_findings_report_confoundsection_markdown(audited):
    from emotion_assets.alignment import subspace_alignment
    from emotion_assets.confounds import confound_audit
    from emotion_assets.io import ProfileArtifacts
    from emotion_assets.report_tables import alignment_control_table, confounds_markdown
    from resources.storage import ArtifactStore

    root, _ = audited
    inputs = ProfileArtifacts.published(
        ArtifactStore(root_dir=str(root)), "smoke",
        {"confound_audit": confound_audit.partitions_def, "subspace_alignment": subspace_alignment.partitions_def},
    )  # fmt: skip
    markdown = confounds_markdown(inputs)
    assert markdown.startswith("## Confounds")
    assert MODEL in markdown and "probe (last, boundary 12)" in markdown and "emotion_validation" in markdown
    controls = alignment_control_table(inputs)
    assert len(controls) == 5 and (controls["status"] == "not materialized").all()


def test_representation_job_runs_the_audit():
    from emotion_assets.definitions import defs

    job = defs.resolve_job_def("representation_job")
    assert "confound_audit" in job.graph.node_dict
