"""Phases 6 and 8 on smoke: head screening, generation-level head patching and circuits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.integration.conftest import MODEL, SMOKE

pytestmark = pytest.mark.integration

EMOTIONS = {"gratitude", "anger", "apology"}
N_LAYERS, N_HEADS, TOP_N = 30, 9, 3
RUN = f"intervention_job:{MODEL}|{SMOKE}"


def folder(smoke_study, asset: str):
    return smoke_study.results / SMOKE / asset / MODEL


def test_screening_covers_every_head_with_finite_scores(smoke_study):
    screening = pd.read_parquet(folder(smoke_study, "head_screening") / "screening.parquet")
    assert set(screening["emotion"]) == EMOTIONS
    every_head = {(ly, h) for ly in range(N_LAYERS) for h in range(N_HEADS)}
    for _, rows in screening.groupby("emotion"):
        assert len(rows) == N_LAYERS * N_HEADS
        assert set(zip(rows["layer"], rows["head"], strict=True)) == every_head
        assert sorted(rows["rank_by_abs_ablation"]) == list(range(1, N_LAYERS * N_HEADS + 1))
        assert (rows["kv_head"] == rows["head"] // 3).all()  # 9 query heads share 3 key/value heads
    assert np.isfinite(screening[["ablation_effect", "attribution"]].to_numpy()).all()
    assert (screening["ablation_effect"] != 0).any() and (screening["attribution"] != 0).any()
    assert (screening["readout_boundary"] == N_LAYERS).all()
    correlations = pd.read_parquet(folder(smoke_study, "head_screening") / "correlations.parquet")
    assert set(correlations["emotion"]) == EMOTIONS
    assert np.isfinite(correlations[["pearson", "spearman"]].to_numpy()).all()
    assert (correlations[["pearson", "spearman"]].abs() <= 1).all().all()


def test_head_patching_has_every_condition_for_every_prompt(smoke_study):
    scored = pd.read_parquet(folder(smoke_study, "head_patching") / "generations.parquet")
    assert set(scored["emotion"]) == EMOTIONS
    assert {"prompt", "continuation", "emotion_gratitude", "sentiment_compound", "heads"} <= set(
        scored.columns
    )
    assert {"baseline", "ablation", "patch", "random_ablation", "random_patch"} == set(scored["kind"])
    assert set(scored.loc[scored["kind"] == "patch", "mode"]) == {"z", "v_only", "pattern_v"}
    assert set(scored["direction"].dropna()) == {"neutral_to_emotion", "emotion_to_neutral"}
    for emotion, rows in scored.groupby("emotion"):
        n_prompts = rows.loc[rows["kind"] == "baseline", "pair_index"].nunique()
        assert n_prompts > 0
        assert not rows.duplicated(["condition", "pair_index"]).any()
        assert (rows.groupby("condition")["pair_index"].nunique() == n_prompts).all()
        # 2 baselines, 3 heads × 2 single ablations + 2 joint, 2 directions × 3 modes, 2 seeds × 3 controls
        assert rows["condition"].nunique() == 2 + (2 * TOP_N + 2) + 6 + 6, emotion
        top = rows.loc[(rows["kind"] == "patch"), "heads"].iloc[0].split(",")
        assert len(top) == TOP_N
        randoms = rows[rows["kind"].str.startswith("random")]
        assert set(randoms["seed"]) == {0, 1}
        for heads in randoms["heads"].unique():
            assert len(heads.split(",")) == TOP_N and not set(heads.split(",")) & set(top)
        # Patches run on the destination prompts of their direction.
        patches = rows[rows["kind"].isin(["patch", "random_patch"])]
        expected = patches["direction"].map(
            {"neutral_to_emotion": "neutral", "emotion_to_neutral": "emotion"}
        )
        assert (patches["destination"] == expected).all()
    shifts = pd.read_parquet(folder(smoke_study, "head_patching") / "condition_shifts.parquet")
    assert len(shifts) == scored.groupby(["emotion", "condition"]).ngroups
    baseline = shifts[shifts["kind"] == "baseline"]
    assert np.allclose(baseline[["target_shift", "sentiment_shift"]].to_numpy(), 0)
    assert (baseline["n_changed"] == 0).all()


def test_circuits_give_a_role_per_top_head_and_joint_vs_sum(smoke_study):
    heads = pd.read_parquet(folder(smoke_study, "emotion_circuits") / "heads.parquet")
    screening = pd.read_parquet(folder(smoke_study, "head_screening") / "screening.parquet")
    for emotion in EMOTIONS:
        rows = heads[heads["emotion"] == emotion].sort_values("rank")
        top = screening[(screening["emotion"] == emotion) & (screening["rank_by_abs_ablation"] <= TOP_N)]
        assert len(rows) == TOP_N
        assert set(zip(rows["layer"], rows["head"], strict=True)) == set(
            zip(top["layer"], top["head"], strict=True)
        )
    assert set(heads["role"]) <= {"mover", "writer", "reader", "other"}
    assert np.isfinite(heads[["ov_gain", "ov_cosine_own", "single_patch_effect"]].to_numpy()).all()
    assert (heads["ov_gain"] > 0).all() and heads["ov_top_tokens"].str.len().gt(0).all()
    effects = pd.read_parquet(folder(smoke_study, "emotion_circuits") / "circuit_effects.parquet")
    assert set(effects["emotion"]) == EMOTIONS
    for _, rows in effects.groupby("emotion"):
        assert set(rows["intervention"]) == {"ablate_heads", "ablate_heads_and_mlps", "patch_heads_z"}
    assert np.isfinite(effects[["joint_effect", "sum_single_effects", "difference"]].to_numpy()).all()
    # The summed single ablation effects are the screening scores of the same heads.
    for emotion, rows in heads.groupby("emotion"):
        row = effects[(effects["emotion"] == emotion) & (effects["intervention"] == "ablate_heads")]
        assert row["sum_single_effects"].iloc[0] == pytest.approx(rows["ablation_effect"].sum())


def test_head_asset_checks_passed(smoke_study):
    run = smoke_study.runs[RUN]
    checks = {c.check_name: c.passed for c in run.get_asset_check_evaluations()}
    assert checks.get("head_screening_complete") is True
    assert checks.get("head_patching_complete") is True
    assert all(checks.values())
