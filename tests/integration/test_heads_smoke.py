"""Phases 6 and 8 on smoke: head screening, generation-level head patching and circuits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emotion_assets.science.crossfit import HALVES, leaked_rows, split_ids, top_of_half
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
    for (_, half), rows in screening.groupby(["emotion", "half"]):
        assert half in HALVES
        assert len(rows) == N_LAYERS * N_HEADS
        assert set(zip(rows["layer"], rows["head"], strict=True)) == every_head
        assert sorted(rows["rank_by_abs_ablation"]) == list(range(1, N_LAYERS * N_HEADS + 1))
        assert (rows["kv_head"] == rows["head"] // 3).all()  # 9 query heads share 3 key/value heads
    assert screening.groupby("emotion")["half"].nunique().eq(2).all()
    assert np.isfinite(screening[["ablation_effect", "attribution"]].to_numpy()).all()
    assert (screening["ablation_effect"] != 0).any() and (screening["attribution"] != 0).any()
    assert (screening["readout_boundary"] == N_LAYERS).all()
    correlations = pd.read_parquet(folder(smoke_study, "head_screening") / "correlations.parquet")
    assert set(correlations["emotion"]) == EMOTIONS and set(correlations["half"]) == set(HALVES)
    assert np.isfinite(correlations[["pearson", "spearman"]].to_numpy()).all()
    assert (correlations[["pearson", "spearman"]].abs() <= 1).all().all()


def test_screening_halves_are_disjoint_and_scored_on_their_own_prompts(smoke_study):
    screening = pd.read_parquet(folder(smoke_study, "head_screening") / "screening.parquet")
    split = pd.read_parquet(folder(smoke_study, "head_screening") / "split.parquet")
    for emotion, rows in split.groupby("emotion"):
        halves = {h: set(rows.loc[rows["half"] == h, "prompt_id"]) for h in HALVES}
        assert halves["A"] and halves["B"] and not halves["A"] & halves["B"]
        assert abs(len(halves["A"]) - len(halves["B"])) <= 1
        assert not set(rows.loc[rows["half"] == "A", "neutral_prompt_id"]) & set(
            rows.loc[rows["half"] == "B", "neutral_prompt_id"]
        )
        for half in HALVES:
            scored = screening[(screening["emotion"] == emotion) & (screening["half"] == half)]
            assert set(scored["prompt_ids"]) == {",".join(sorted(halves[half]))}


def test_top_heads_are_labelled_and_reported_held_out(smoke_study):
    screening = pd.read_parquet(folder(smoke_study, "head_screening") / "screening.parquet")
    top = pd.read_parquet(folder(smoke_study, "head_screening") / "top_heads.parquet")
    assert set(top["emotion"]) == EMOTIONS
    for (emotion, selected), rows in top.groupby(["emotion", "selected_on"]):
        measured = rows["measured_on"].iloc[0]
        assert measured != selected and len(rows) == TOP_N
        assert (rows["label"] == f"selected on half {selected}, measured on half {measured}").all()
        assert list(zip(rows["layer"], rows["head"], strict=True)) == top_of_half(
            screening, emotion, selected, TOP_N
        )
        other = screening[(screening["emotion"] == emotion) & (screening["half"] == measured)]
        held_out = other.set_index(["layer", "head"]).loc[list(zip(rows["layer"], rows["head"], strict=True))]
        # The held-out mean is the other half's screening score of the same heads.
        assert rows["held_out_effect"].to_numpy() == pytest.approx(
            held_out["ablation_effect"].to_numpy(), rel=1e-3, abs=1e-3
        )
    assert (top["held_out_ci_low"] <= top["held_out_ci_high"]).all()


def test_head_patching_has_every_condition_for_every_prompt(smoke_study):
    scored = pd.read_parquet(folder(smoke_study, "head_patching") / "generations.parquet")
    assert set(scored["emotion"]) == EMOTIONS
    assert {"prompt", "continuation", "emotion_gratitude", "sentiment_compound", "heads", "fold", "selection_half",
            "measurement_half", "selected_on_prompt_ids"} <= set(scored.columns)  # fmt: skip
    assert {"baseline", "ablation", "patch", "random_ablation", "random_patch"} == set(scored["kind"])
    assert set(scored.loc[scored["kind"] == "patch", "mode"]) == {"z", "v_only", "pattern_v"}
    assert set(scored["direction"].dropna()) == {"neutral_to_emotion", "emotion_to_neutral"}
    assert set(scored["fold"]) == {"A_to_B", "B_to_A"}
    for emotion, rows in scored.groupby("emotion"):
        n_prompts = rows.loc[rows["kind"] == "baseline", "pair_index"].nunique()
        assert n_prompts > 0
        assert not rows.duplicated(["condition", "pair_index"]).any()
        assert (rows.groupby("condition")["pair_index"].nunique() == n_prompts).all()
        # 2 baselines, 3 heads × 2 single ablations + 2 joint, 2 directions × 3 modes, 2 seeds × 3 controls
        assert rows["condition"].nunique() == 2 + (2 * TOP_N + 2) + 6 + 6, emotion
        for _, fold in rows.groupby("fold"):
            top = fold.loc[(fold["kind"] == "patch"), "heads"].iloc[0].split(",")
            assert len(top) == TOP_N
            randoms = fold[fold["kind"].str.startswith("random")]
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
    assert len(shifts) == 3 * scored.groupby(["emotion", "condition"]).ngroups  # two folds and both pooled
    baseline = shifts[shifts["kind"] == "baseline"]
    assert np.allclose(baseline[["target_shift", "sentiment_shift"]].to_numpy(), 0)
    assert (baseline["n_changed"] == 0).all()


def test_no_head_is_patched_on_a_prompt_that_selected_it(smoke_study):
    scored = pd.read_parquet(folder(smoke_study, "head_patching") / "generations.parquet")
    screening = pd.read_parquet(folder(smoke_study, "head_screening") / "screening.parquet")
    split = pd.read_parquet(folder(smoke_study, "head_screening") / "split.parquet")
    assert leaked_rows(scored, split).empty
    for row in scored.itertuples():
        selected = split_ids(row.selected_on_prompt_ids)
        assert row.prompt_id not in selected and (
            row.source_prompt_id is None or row.source_prompt_id not in selected
        )
    chosen = scored[scored["kind"] == "patch"].drop_duplicates(["emotion", "fold"])
    for row in chosen.itertuples():
        top = top_of_half(screening, row.emotion, row.selection_half, TOP_N)
        assert row.heads == ",".join(f"L{ly}H{h}" for ly, h in top)


def test_circuits_give_a_role_per_top_head_and_joint_vs_sum(smoke_study):
    heads = pd.read_parquet(folder(smoke_study, "emotion_circuits") / "heads.parquet")
    screening = pd.read_parquet(folder(smoke_study, "head_screening") / "screening.parquet")
    for emotion in EMOTIONS:
        for half in HALVES:
            rows = heads[(heads["emotion"] == emotion) & (heads["selection_half"] == half)].sort_values(
                "rank"
            )
            assert len(rows) == TOP_N
            assert list(zip(rows["layer"], rows["head"], strict=True)) == top_of_half(
                screening, emotion, half, TOP_N
            )
            assert (rows["measurement_half"] != half).all()
    for row in heads.itertuples():  # measured only on prompts that did not select the head
        assert not split_ids(row.measured_on_prompt_ids) & split_ids(row.selected_on_prompt_ids)
    # A head whose input boundary carries no emotion direction (a zero vector, allowed at boundary 0 only)
    # has no OV readout: its role says so instead of a number.
    undetermined = heads["role"].str.startswith("undetermined")
    assert (heads.loc[undetermined, "boundary_in"] == 0).all()
    determined = heads[~undetermined]
    assert set(determined["role"]) <= {"mover", "writer", "reader", "other"}
    assert np.isfinite(heads["single_patch_effect"].to_numpy()).all()
    assert np.isfinite(determined[["ov_gain", "ov_cosine_own"]].to_numpy()).all()
    assert (determined["ov_gain"] > 0).all() and determined["ov_top_tokens"].str.len().gt(0).all()
    effects = pd.read_parquet(folder(smoke_study, "emotion_circuits") / "circuit_effects.parquet")
    assert set(effects["emotion"]) == EMOTIONS
    assert set(effects["fold"]) == {"A_to_B", "B_to_A", "both"}
    for _, rows in effects.groupby(["emotion", "fold"]):
        assert set(rows["intervention"]) == {"ablate_heads", "ablate_heads_and_mlps", "patch_heads_z"}
    assert np.isfinite(effects[["joint_effect", "sum_single_effects", "difference"]].to_numpy()).all()
    # The summed single ablation effects are the held-out screening scores of the same heads.
    for (emotion, fold), rows in heads.groupby(["emotion", "fold"]):
        row = effects[
            (effects["emotion"] == emotion)
            & (effects["fold"] == fold)
            & (effects["intervention"] == "ablate_heads")
        ]
        assert row["sum_single_effects"].iloc[0] == pytest.approx(rows["ablation_effect"].sum())


def test_head_asset_checks_passed(smoke_study):
    run = smoke_study.runs[RUN]
    checks = {c.check_name: c.passed for c in run.get_asset_check_evaluations()}
    assert checks.get("head_screening_complete") is True
    assert checks.get("head_patching_complete") is True
    assert checks.get("head_patching_crossfit") is True
    assert all(checks.values())
