"""The control ledger: an uncontrolled reading of the same data beside the controlled one (known answers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from emotion_assets.science.control_ledger import (
    controlled_cells,
    headline_maxima,
    ledger,
    top_head_selection_tests,
    uncontrolled_cells,
    uncontrolled_steering_family,
)
from emotion_assets.science.statistics import paired_family
from emotion_assets.science.steering_analysis import per_prompt_scores, shift_table, steering_comparisons
from tests.unit.test_steering_analysis import METRICS, TARGETS, sweep_table


def _controlled_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """The study's residual family on ``frame`` (as ``patching_statistics`` builds it), BH over all rows."""
    from emotion_assets.science.statistics import bh_fdr, bonferroni

    table = per_prompt_scores(frame, METRICS)
    specs, control, treatment, _ = steering_comparisons(table, METRICS, TARGETS)
    family = pd.concat([pd.DataFrame(specs), paired_family(control, treatment, n_boot=50, seed=1)], axis=1)
    return family.assign(
        source="residual", p_bh=bh_fdr(family["p_t"]), p_bonferroni=bonferroni(family["p_t"])
    )


def _shared_direction(kind, emotion, layer, alpha):
    """Every emotion vector raises the gratitude score alike; random directions do nothing."""
    return {"emotion_gratitude": 0.3 * np.sign(alpha)} if kind == "emotion" else {}


def _specific_direction(kind, emotion, layer, alpha):
    """Only the gratitude vector raises the gratitude score."""
    return {"emotion_gratitude": 0.3 * np.sign(alpha)} if emotion == "gratitude" else {}


def test_pooled_random_control_is_the_mean_of_both_kinds_and_p_is_students_t():
    frame = sweep_table(effect=_specific_direction)
    table = per_prompt_scores(frame, METRICS)
    family = uncontrolled_steering_family(table, METRICS, TARGETS, seed=3)
    row = family[
        (family["comparison"] == "vs_random_pooled") & (family["condition"] == "gratitude|L1|a+0.2")
    ].iloc[0]
    wide = table.pivot_table(index="prompt_id", columns="condition", values="emotion_gratitude")
    randoms = [c for c in wide.columns if c.startswith("random_") and c.endswith("|L1|a+0.2")]
    assert len(randoms) == 4  # two seeds of each kind, pooled
    diffs = wide["gratitude|L1|a+0.2"] - wide[randoms].mean(axis=1)
    assert row["mean_diff"] == pytest.approx(diffs.mean())
    assert row["p"] == pytest.approx(
        stats.ttest_rel(wide["gratitude|L1|a+0.2"], wide[randoms].mean(axis=1)).pvalue
    )
    assert set(family["comparison"]) == {"vs_baseline", "vs_random_pooled"}  # no other-emotion contrast


def test_constant_shifts_get_p_zero_under_the_uncontrolled_rules():
    frame = sweep_table(effect=_specific_direction, noise=0.0)
    family = uncontrolled_steering_family(per_prompt_scores(frame, METRICS), METRICS, TARGETS, seed=3)
    constant = family[(family["comparison"] == "vs_baseline") & (family["condition"] == "gratitude|L1|a+0.2")
                      & (family["metric"] == "emotion_gratitude")]  # fmt: skip
    assert constant["p"].iloc[0] == 0.0  # the flaw the sign-flip p of the controlled family removes


def test_a_direction_shared_by_every_emotion_is_a_finding_only_without_the_other_emotion_contrast():
    frame = sweep_table(effect=_shared_direction)
    table = per_prompt_scores(frame, METRICS)
    naive = uncontrolled_cells(uncontrolled_steering_family(table, METRICS, TARGETS, seed=3), TARGETS)
    fluent = dict.fromkeys(frame["condition"].unique(), True)
    kept = controlled_cells(_controlled_stats(frame), fluent, TARGETS)
    assert (
        set(naive["emotion"]) == {"gratitude"} and len(naive) == 6
    )  # 2 layers × 3 α (α < 0 lowers it, as intended)
    assert kept.empty


def test_a_specific_fluent_direction_survives_both_readings_and_a_broken_cell_only_the_uncontrolled():
    frame = sweep_table(effect=_specific_direction)
    table = per_prompt_scores(frame, METRICS)
    naive = uncontrolled_cells(uncontrolled_steering_family(table, METRICS, TARGETS, seed=3), TARGETS)
    fluent = dict.fromkeys(frame["condition"].unique(), True) | {"gratitude|L2|a+0.4": False}
    kept = controlled_cells(_controlled_stats(frame), fluent, TARGETS)
    assert set(naive["condition"]) == {
        f"gratitude|L{layer}|a{a:+g}" for layer in (1, 2) for a in (-0.2, 0.2, 0.4)
    }
    assert set(kept["condition"]) == set(naive["condition"]) - {"gratitude|L2|a+0.4"}


def test_nothing_planted_nothing_found_in_either_reading():
    frame = sweep_table()
    table = per_prompt_scores(frame, METRICS)
    naive = uncontrolled_cells(uncontrolled_steering_family(table, METRICS, TARGETS, seed=3), TARGETS)
    kept = controlled_cells(
        _controlled_stats(frame), dict.fromkeys(frame["condition"].unique(), True), TARGETS
    )
    assert naive.empty and kept.empty


def _screening(planted: dict[tuple[int, int], float], n_layers: int = 6, n_heads: int = 8, seed: int = 0):
    """Per emotion × half × head: noise around 1, plus ``planted`` effects present on both halves."""
    rng = np.random.default_rng(seed)
    rows = []
    for half in "AB":
        for layer in range(n_layers):
            for head in range(n_heads):
                effect = rng.normal(0.0, 1.0) + planted.get((layer, head), 0.0)
                rows.append({"emotion": "gratitude", "half": half, "layer": layer, "head": head,
                             "ablation_effect": effect, "attribution": np.nan})  # fmt: skip
    return pd.DataFrame(rows)


def test_real_heads_replicate_on_the_held_out_half():
    planted = {(1, 2): -8.0, (3, 5): 7.0, (4, 0): -9.0}
    tests = top_head_selection_tests(_screening(planted), top_n=3, seed=2, n_sets=2000)
    held_out = tests[tests["reading"] == "held_out"]
    assert (held_out["p"] < 0.01).all()
    assert set(tests["heads"].iloc[0].split(",")) == {"L1H2", "L3H5", "L4H0"}


def test_noise_heads_look_important_only_on_the_prompts_that_chose_them():
    tests = top_head_selection_tests(_screening({}), top_n=3, seed=2, n_sets=2000)
    same = tests[tests["reading"] == "same_prompts"]
    held_out = tests[tests["reading"] == "held_out"]
    assert (same["p"] < 0.01).all()  # winner's curse: the maxima of their own half
    assert (held_out["p"] > 0.05).all()
    assert (same["p"] >= 1 / 2001).all()  # never 0


def test_screening_without_every_exact_effect_uses_attribution_and_refuses_gaps():
    screening = _screening({(1, 2): -8.0}).assign(attribution=lambda f: f["ablation_effect"] * 2)
    screening.loc[3, "ablation_effect"] = np.nan  # an AtP* run: exact effects only on the shortlist
    tests = top_head_selection_tests(screening, top_n=2, seed=2, n_sets=200)
    assert (tests["effect_column"] == "attribution").all()
    with_atp = screening.assign(atp_star=screening["attribution"])
    assert (
        top_head_selection_tests(with_atp, top_n=2, seed=2, n_sets=200)["effect_column"] == "atp_star"
    ).all()
    screening.loc[4, "attribution"] = np.nan
    with pytest.raises(ValueError, match="every head of each half"):
        top_head_selection_tests(screening, top_n=2, seed=2, n_sets=200)


def test_ledger_counts_and_headline_maxima():
    frame = sweep_table(effect=_shared_direction)
    table = per_prompt_scores(frame, METRICS)
    uncontrolled = uncontrolled_steering_family(table, METRICS, TARGETS, seed=3)
    controlled = _controlled_stats(frame)
    heads = top_head_selection_tests(_screening({}), top_n=3, seed=2, n_sets=500)
    book = ledger(uncontrolled, controlled, dict.fromkeys(frame["condition"].unique(), True), TARGETS, heads)
    cells = book[book["family"] == "steering cells (target score)"].set_index("reading")
    assert cells.loc["uncontrolled", "survive_bh"] == 6 and cells.loc["controlled", "survive_bh"] == 0
    assert (
        cells.loc["uncontrolled", "tests"] == cells.loc["controlled", "tests"] == 18
    )  # 3 emotions × 2 × 3 α
    head_rows = book[book["family"].str.startswith("top heads")].set_index("reading")
    assert head_rows.loc["uncontrolled", "survive_bh"] == 2 and head_rows.loc["controlled", "survive_bh"] == 0

    shifts = shift_table(frame, METRICS, TARGETS)
    best = pd.DataFrame([{"emotion": "gratitude", "condition": "gratitude|L1|a+0.2", "selection_shift": 0.31,
                          "target_shift": 0.28, "shift_ci_low": 0.2, "shift_ci_high": 0.36, "status": "confirmed"}])  # fmt: skip
    maxima = headline_maxima(shifts, best).set_index("emotion")
    cells = shifts[
        (shifts["kind"] == "emotion") & (shifts["emotion"] == "gratitude") & (shifts["alpha"] != 0)
    ]
    top = cells.loc[(cells["target_shift"] * np.sign(cells["alpha"])).idxmax()]
    assert maxima.loc["gratitude", "uncontrolled_cell"] == top["condition"]
    assert maxima.loc["gratitude", "confirmed_shift"] == 0.28
    assert pd.isna(maxima.loc["anger", "confirmed_shift"])
