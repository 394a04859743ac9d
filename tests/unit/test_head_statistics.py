"""Statistics of head_patching: which comparisons are declared, on which prompts, with which numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emotion_assets.science.patching_statistics import head_comparisons, metrics_to_test, observed_power
from emotion_assets.science.statistics import (
    paired_comparison,
    paired_t_power,
    stable_seed,
    two_sample_t_power,
    unpaired_comparison,
)

METRICS = ["emotion_gratitude", "sentiment_compound"]
N = 6
# condition -> (kind, mode, direction, destination)
CONDITIONS = {
    "baseline_emotion": ("baseline", None, None, "emotion"),
    "baseline_neutral": ("baseline", None, None, "neutral"),
    "ablate_zero_top2": ("ablation", "zero", None, "emotion"),
    "ablate_mean_top2": ("ablation", "mean", None, "emotion"),
    "random0_ablate_zero": ("random_ablation", "zero", None, "emotion"),
    "random1_ablate_zero": ("random_ablation", "zero", None, "emotion"),
    "patch_z_neutral_to_emotion_top2": ("patch", "z", "neutral_to_emotion", "neutral"),
    "random0_patch_z_neutral_to_emotion": ("random_patch", "z", "neutral_to_emotion", "neutral"),
}


# Cross-fitted folds: pairs 0-2 form half A, 3-5 half B; each pair is measured with the heads of the other half.
HALF = {i: "A" if i < N // 2 else "B" for i in range(N)}
FOLD_HEADS = {"A": "L1H2,L3H4", "B": "L0H1,L2H0"}  # heads selected on each half


def _half_ids(half: str) -> str:
    return ",".join(sorted(f"{p}{i}" for i in range(N) if HALF[i] == half for p in "en"))


@pytest.fixture(scope="module")
def scored() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for name, (kind, mode, direction, destination) in CONDITIONS.items():
        for i in range(N):
            prefix = "e" if destination == "emotion" else "n"
            measured, selected = HALF[i], "B" if HALF[i] == "A" else "A"
            rows.append({
                "emotion": "gratitude", "condition": name, "kind": kind, "mode": mode, "direction": direction,
                "scope": None if kind == "baseline" else "joint",
                "heads": "" if kind == "baseline" else FOLD_HEADS[selected], "seed": None,
                "destination": destination, "pair_index": i, "prompt_id": f"{prefix}{i}",
                "source_prompt_id": f"{'n' if prefix == 'e' else 'e'}{i}" if kind.endswith("patch") else None,
                "fold": f"{selected}_to_{measured}", "selection_half": selected, "measurement_half": measured,
                "selected_on_prompt_ids": _half_ids(selected),
                "emotion_gratitude": rng.uniform(), "sentiment_compound": rng.uniform(-1, 1),
            })  # fmt: skip
    frame = pd.DataFrame(rows)
    duplicate = frame[frame["prompt_id"] == "e0"]  # the same prompt twice must not add n
    return pd.concat([frame, duplicate], ignore_index=True)


def _wide(scored: pd.DataFrame, metric: str) -> pd.DataFrame:
    return scored.pivot_table(index="prompt_id", columns="condition", values=metric, aggfunc="mean")


def test_declares_every_comparison_once_on_unique_prompts(scored):
    stats = head_comparisons(scored, METRICS, n_boot=200, seed_parts=("t", 1))
    counts = stats.groupby("comparison").size().to_dict()
    # 6 non-baseline conditions x 2 metrics; joint zero ablation, joint mean ablation has no random match
    # (randoms are zero-ablated), z patch: 2 vs random; one unpaired gap per emotion.
    assert counts == {"vs_baseline": 12, "vs_random_heads": 2, "emotion_vs_neutral_prompts": 1}
    paired = stats[stats["effect_measure"] == "d_z"]
    assert (paired["n"] == N).all()
    assert set(stats.loc[stats["comparison"] == "vs_random_heads", "condition"]) == {
        "ablate_zero_top2",
        "patch_z_neutral_to_emotion_top2",
    }


def test_numbers_match_the_one_comparison_functions(scored):
    stats = head_comparisons(scored, METRICS, n_boot=200, seed_parts=("t", 1))
    wide = _wide(scored, "emotion_gratitude")
    emotion_prompts = [f"e{i}" for i in range(N)]
    control = wide.loc[emotion_prompts, ["random0_ablate_zero", "random1_ablate_zero"]].mean(axis=1)
    row = stats[(stats["comparison"] == "vs_random_heads") & (stats["condition"] == "ablate_zero_top2")].iloc[
        0
    ]
    ref = paired_comparison(control.to_numpy(), wide.loc[emotion_prompts, "ablate_zero_top2"].to_numpy(),
                            n_boot=200, seed=stable_seed("t", 1, "heads", "gratitude", "emotion"))  # fmt: skip
    assert row["mean_diff"] == pytest.approx(ref["mean_diff"])
    assert row["d_z"] == pytest.approx(ref["d_z"])
    assert row["p_t"] == pytest.approx(ref["p_t"])

    gap = stats[stats["comparison"] == "emotion_vs_neutral_prompts"].iloc[0]
    neutral = wide.loc[[f"n{i}" for i in range(N)], "baseline_neutral"].to_numpy()
    emotion = wide.loc[emotion_prompts, "baseline_emotion"].to_numpy()
    ref = unpaired_comparison(neutral, emotion, n_boot=200, seed=int(gap["bootstrap_seed"]))
    assert gap["effect_measure"] == "hedges_g" and gap["effect_size"] == pytest.approx(ref["hedges_g"])
    assert gap["p_t"] == pytest.approx(ref["p_t"]) and gap["n"] == 2 * N
    assert (gap["n_a"], gap["n_b"]) == (N, N)


def test_same_seed_parts_give_identical_cis(scored):
    first = head_comparisons(scored, METRICS, n_boot=300, seed_parts=("t", 1))
    again = head_comparisons(scored, METRICS, n_boot=300, seed_parts=("t", 1))
    other = head_comparisons(scored, METRICS, n_boot=300, seed_parts=("t", 2))
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["diff_ci_low"], other["diff_ci_low"])


def test_unmetrics_to_test_are_named_with_a_reason(scored):
    frame = scored.copy()
    frame.loc[frame.index[:3], "sentiment_compound"] = np.nan
    tested, untested = metrics_to_test(frame, "head_patching")
    assert tested == ["emotion_gratitude"]
    assert untested["head_patching.sentiment_compound"] == f"null for 3 of {len(frame)} rows"
    assert untested["head_patching.politeness"].startswith("not scored")


def test_observed_power_uses_the_test_of_each_row_and_needs_no_unpaired_columns(scored):
    stats = head_comparisons(scored, METRICS, n_boot=200, seed_parts=("t", 1))
    power = observed_power(stats)
    gap = stats.index[stats["effect_measure"] == "hedges_g"][0]
    row = stats.loc[gap]
    assert power[gap] == pytest.approx(two_sample_t_power(abs(row["hedges_g"]), N, N))
    paired = stats[stats["effect_measure"] == "d_z"].drop(columns=["n_a", "n_b"])
    assert observed_power(paired) == pytest.approx([paired_t_power(abs(d), N) for d in paired["d_z"]])


def test_cross_fitted_rows_pool_both_folds_and_say_so(scored):
    stats = head_comparisons(scored, METRICS, n_boot=200, seed_parts=("t", 1))
    top = stats[(stats["comparison"] == "vs_random_heads") & (stats["condition"] == "ablate_zero_top2")].iloc[
        0
    ]
    assert top["heads"] == "A_to_B: L1H2,L3H4 | B_to_A: L0H1,L2H0"
    assert top["selection"].startswith("top heads selected on the other half") and top["n"] == N
    baseline = stats[stats["comparison"] == "emotion_vs_neutral_prompts"].iloc[0]
    assert baseline["n"] == 2 * N  # both folds' unintervened prompts


def test_rows_that_reuse_selecting_prompts_or_lack_fold_columns_are_refused(scored):
    leaking = scored.copy()
    leaking.loc[0, "selected_on_prompt_ids"] = _half_ids(leaking.loc[0, "measurement_half"])
    with pytest.raises(ValueError, match="prompt that selected them"):
        head_comparisons(leaking, METRICS, n_boot=50, seed_parts=("t", 1))
    with pytest.raises(ValueError, match="re-materialize head_screening"):
        head_comparisons(scored.drop(columns=["fold"]), METRICS, n_boot=50, seed_parts=("t", 1))
