"""Steering analysis: specificity contrasts, fluency gates, selected-then-confirmed best cells and per-prompt
steerability, each against a by-hand computation on a small synthetic generations table."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from emotion_assets.science.patching_statistics import comparison_matrices
from emotion_assets.science.statistics import paired_comparison, paired_family, stable_seed
from emotion_assets.science.steering import build_conditions, generate_sweep
from emotion_assets.science.steering_analysis import (
    CONDITION_COLUMNS,
    RANDOM_KINDS,
    SELECTION_LABEL,
    FluencyBounds,
    attach_fluency,
    condition_fluency,
    continuation_fluency,
    per_prompt_scores,
    select_cells,
    selected_and_confirmed,
    shift_table,
    specificity_summary,
    split_halves,
    steering_comparisons,
)
from tests.artifacts import materialize
from tests.tiny_models import byte_tokenizer, tiny_llama

TARGETS = {"gratitude": "emotion_gratitude", "anger": "emotion_anger", "apology": "emotion_apology"}
METRICS = [*TARGETS.values(), "sentiment_compound"]
BOUNDS = FluencyBounds(max_perplexity_ratio=2.0, max_degenerate_share=0.1)
Effect = Callable[[str, str | None, int | None, float], dict[str, float]]


def _conditions(layers=(1, 2), alphas=(-0.2, 0.2, 0.4), n_random=2) -> list[tuple]:
    out = [("baseline", "baseline", None, None, 0.0, None)]
    for layer in layers:
        for emotion in TARGETS:
            out += [
                (f"{emotion}|L{layer}|a{a:+g}", "emotion", emotion, layer, a, None) for a in (0.0, *alphas)
            ]
        for kind, i, a in itertools.product(RANDOM_KINDS, range(n_random), alphas):
            out.append((f"{kind}{i}|L{layer}|a{a:+g}", kind, None, layer, a, 1000 * layer + i))
    return out


def sweep_table(
    n_prompts: int = 12, effect: Effect | None = None, noise: float = 0.05, seed: int = 0, **grid
) -> pd.DataFrame:
    """A generations table: baseline scores per prompt; every steered row = baseline + noise + effect."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i:02d}" for i in range(n_prompts)]
    base = {m: rng.uniform(0.2, 0.5, n_prompts) for m in METRICS}
    rows = []
    for cond in _conditions(**grid):
        _, kind, emotion, layer, alpha, _ = cond
        planted = effect(kind, emotion, layer, alpha) if effect and alpha else {}
        for i, pid in enumerate(ids):
            row = {"prompt_index": i, "prompt_id": pid, **dict(zip(CONDITION_COLUMNS, cond, strict=True))}
            for m in METRICS:
                jitter = rng.normal(0.0, noise) if alpha else 0.0
                row[m] = base[m][i] + jitter + planted.get(m, 0.0)
            rows.append(row)
    return pd.DataFrame(rows)


def with_fluency(frame: pd.DataFrame, broken: dict[str, tuple[int, float]] | None = None) -> pd.DataFrame:
    """Fluent text everywhere (log-prob −2 per token), except ``broken[condition] = (n degenerate prompts,
    mean log-prob)``."""
    out = frame.copy()
    out["generated_tokens"], out["degenerate"], out["mean_logprob"] = 8, False, -2.0
    for condition, (n_bad, logprob) in (broken or {}).items():
        rows = out.index[out["condition"] == condition]
        out.loc[rows[:n_bad], "degenerate"] = True
        out.loc[rows, "mean_logprob"] = logprob
    return out


def _sign_flip_by_hand(diffs: np.ndarray) -> float:
    """Exact two-sided sign-flip p, every one of the 2^n patterns enumerated."""
    observed = abs(diffs.sum())
    hits = sum(
        abs(np.dot(signs, diffs)) >= observed - 1e-12
        for signs in itertools.product([1, -1], repeat=diffs.size)
    )
    return hits / 2**diffs.size


# ------------------------------------------------------------------------------------- 1. specificity


def _family(frame: pd.DataFrame) -> pd.DataFrame:
    table = per_prompt_scores(frame, METRICS)
    specs, control, treatment, prompts = steering_comparisons(table, METRICS, TARGETS)
    results = paired_family(control, treatment, n_boot=200, seed=7)
    return pd.concat([pd.DataFrame(specs), results], axis=1).assign(prompts=[list(prompts)] * len(specs))


def test_other_emotion_contrasts_equal_a_paired_computation_by_hand():
    def effect(kind, emotion, layer, alpha):  # gratitude's vector raises gratitude; the others do nothing
        return {"emotion_gratitude": 0.2 * np.sign(alpha)} if emotion == "gratitude" else {}

    frame = sweep_table(effect=effect)
    stats_ = _family(pd.concat([frame, frame[frame["prompt_id"] == "p03"]]))  # a repeated prompt adds no n
    contrasts = stats_[stats_["comparison"] == "vs_other_emotion"]
    # 3 emotions × 2 layers × 3 α ≠ 0 × 2 other emotions, each on the first emotion's own target score.
    assert len(contrasts) == 36 and (contrasts["n"] == 12).all()
    assert set(contrasts["other_emotion"]) == set(TARGETS)
    assert (contrasts["metric"] == contrasts["emotion"].map(TARGETS)).all()
    assert (contrasts["other_emotion"] != contrasts["emotion"]).all()

    row = contrasts[
        (contrasts["condition"] == "gratitude|L2|a+0.4") & (contrasts["other_emotion"] == "anger")
    ]
    assert len(row) == 1 and row["control"].iloc[0] == "anger|L2|a+0.4"
    wide = frame.pivot_table(index="prompt_id", columns="condition", values="emotion_gratitude")
    a, b = wide["anger|L2|a+0.4"].to_numpy(), wide["gratitude|L2|a+0.4"].to_numpy()
    diffs = b - a
    got = row.iloc[0]
    assert got["mean_diff"] == pytest.approx(diffs.mean()) and got["mean_a"] == pytest.approx(a.mean())
    assert got["d_z"] == pytest.approx(diffs.mean() / np.std(diffs, ddof=1))
    assert got["t_stat"] == pytest.approx(stats.ttest_rel(b, a).statistic)
    assert got["p_method"] == "sign_flip_exact" and got["p_t"] == pytest.approx(_sign_flip_by_hand(diffs))
    ref = paired_comparison(a, b, n_boot=200, seed=7)  # the family shares the single call's resamples
    assert got["diff_ci_low"] == pytest.approx(ref["diff_ci_low"])
    assert got["diff_ci_high"] == pytest.approx(ref["diff_ci_high"])
    assert 0.15 < got["mean_diff"] < 0.25 and got["p_t"] < 0.01  # the planted specificity is found

    # Where nothing was planted, the contrast is noise: anger vs apology on anger's score.
    null = contrasts[(contrasts["emotion"] == "anger") & (contrasts["other_emotion"] == "apology")]
    assert (null["mean_diff"].abs() < 0.06).all()
    summary = specificity_summary(stats_.assign(p_bh=stats_["p_t"]))
    gratitude = summary[summary["emotion"] == "gratitude"].set_index("other_emotion")
    # α = +0.2, +0.4 at two layers raise gratitude more than the others; α = −0.2 lowers it.
    assert gratitude["cells"].tolist() == [6, 6] and gratitude["larger_survive_bh"].tolist() == [4, 4]


def test_random_controls_are_split_by_kind_never_pooled():
    frame = sweep_table()
    iso_shift = {"random_isotropic": 0.3}  # only the isotropic directions move the score
    frame.loc[frame["kind"] == "random_isotropic", "emotion_anger"] += iso_shift["random_isotropic"]
    stats_ = _family(frame)
    assert "vs_random" not in set(stats_["comparison"])
    for kind in RANDOM_KINDS:
        rows = stats_[stats_["comparison"] == f"vs_{kind}"]
        assert len(rows) == 3 * 2 * 3  # every emotion cell with α ≠ 0
        row = rows[rows["condition"] == "anger|L1|a-0.2"].iloc[0]
        wide = frame.pivot_table(index="prompt_id", columns="condition", values="emotion_anger")
        controls = [f"{kind}{i}|L1|a-0.2" for i in range(2)]
        assert row["control"] == f"mean({', '.join(controls)})"
        expected = (wide["anger|L1|a-0.2"] - wide[controls].mean(axis=1)).mean()
        assert row["mean_diff"] == pytest.approx(expected)
    iso = stats_[(stats_["comparison"] == "vs_random_isotropic") & (stats_["emotion"] == "anger")]
    cov = stats_[(stats_["comparison"] == "vs_random_covariance") & (stats_["emotion"] == "anger")]
    assert (iso["mean_diff"] < -0.2).all() and (cov["mean_diff"].abs() < 0.06).all()


def test_statistics_asset_declares_the_split_family():
    table = per_prompt_scores(sweep_table(), METRICS)
    specs, control, treatment, prompts = comparison_matrices(table, METRICS)
    counts = pd.DataFrame(specs)["comparison"].value_counts().to_dict()
    n_steered = table["condition"].nunique() - 1
    assert counts == {"vs_baseline": n_steered * len(METRICS), "vs_other_emotion": 36,
                      "vs_random_isotropic": 18, "vs_random_covariance": 18}  # fmt: skip
    assert control.shape == treatment.shape == (12, len(specs)) and len(prompts) == 12


# ----------------------------------------------------------------------------------------- 2. fluency


def test_fluency_gate_excludes_cells_and_says_why():
    frame = with_fluency(sweep_table(n_prompts=10), {"gratitude|L1|a+0.4": (2, -2.0),
                                                    "anger|L2|a+0.4": (0, -2.0 - math.log(3.0)),
                                                    "apology|L1|a+0.2": (0, math.nan)})  # fmt: skip
    gated = condition_fluency(frame, BOUNDS).set_index("condition")
    assert gated.loc["baseline", "perplexity_ratio"] == pytest.approx(1.0) and gated.loc["baseline", "fluent"]
    assert gated.loc["gratitude|L1|a+0.4", "share_degenerate"] == pytest.approx(0.2)
    assert gated.loc["gratitude|L1|a+0.4", "fluency_exclusion"] == "share_degenerate 0.2 > 0.1"
    assert gated.loc["anger|L2|a+0.4", "perplexity_ratio"] == pytest.approx(3.0)
    assert gated.loc["anger|L2|a+0.4", "fluency_exclusion"] == "perplexity_ratio 3 > 2"
    assert "undefined" in gated.loc["apology|L1|a+0.2", "fluency_exclusion"]
    assert gated["fluent"].sum() == len(gated) - 3
    # Exactly at the bounds is fluent.
    edge = with_fluency(sweep_table(n_prompts=10), {"anger|L1|a+0.2": (1, -2.0 - math.log(2.0))})
    assert condition_fluency(edge, BOUNDS).set_index("condition").loc["anger|L1|a+0.2", "fluent"]


def test_best_cell_is_chosen_among_fluent_cells_only():
    def effect(kind, emotion, layer, alpha):  # the largest shifts: a broken cell and a negative α
        if emotion != "gratitude":
            return {}
        return {"emotion_gratitude": {(2, 0.4): 0.5, (1, 0.4): 0.3, (1, -0.2): 0.6}.get((layer, alpha), 0.0)}

    frame = with_fluency(sweep_table(n_prompts=10, effect=effect), {"gratitude|L2|a+0.4": (5, -4.0)})
    cells = select_cells(frame, TARGETS, BOUNDS)
    assert len(cells) == 3 * 2 * 2 and (cells["alpha"] > 0).all()  # candidates push towards the emotion
    broken = cells.set_index("condition").loc["gratitude|L2|a+0.4"]
    assert not broken["fluent"] and not broken["selected"] and broken["selection_shift"] > 0.45
    assert "share_degenerate 0.5 > 0.1" in broken["fluency_exclusion"]
    chosen = cells[cells["selected"] & (cells["emotion"] == "gratitude")]
    assert chosen["condition"].tolist() == ["gratitude|L1|a+0.4"]
    assert cells.groupby("emotion")["selected"].sum().tolist() == [1, 1, 1]
    # No fluent cell at all: nothing is selected and the best table says so.
    all_broken = with_fluency(
        frame, {c: (5, -2.0) for c in frame.loc[frame["kind"] != "baseline", "condition"]}
    )
    halves = split_halves(all_broken["prompt_id"], seed=1)
    best, cells, _ = selected_and_confirmed(all_broken, halves, TARGETS, BOUNDS, n_boot=100, seed=0)
    assert (best["status"] == "no fluent cell on half A").all() and (best["n_cells_excluded"] == 4).all()


def test_an_unscored_target_is_reported_not_selected():
    frame = with_fluency(sweep_table(n_prompts=8)).assign(emotion_apology=np.nan)
    best = selected_and_confirmed(
        frame, split_halves(frame["prompt_id"], 0), TARGETS, BOUNDS, n_boot=50, seed=0
    )[0]
    status = best.set_index("emotion")["status"]
    assert status["apology"] == "target score not scored" and status["anger"] == "confirmed"


def test_suite_flag_is_kept_and_must_agree_with_the_text():
    scored = pd.DataFrame(
        {"continuation": ["fine text here", "...", "Thanks!"], "degenerate": [False, True, True]}
    )
    fluency = pd.DataFrame({"generated_tokens": [3, 1, 2], "degenerate": [False, True, True],
                            "degenerate_reason": [None, "no_words", "single_word"]})  # fmt: skip
    out = attach_fluency(scored, fluency)
    assert out["scored_as_neutral"].tolist() == [False, True, True] and "degenerate_reason" in out
    with pytest.raises(ValueError, match="disagrees"):
        attach_fluency(scored.assign(degenerate=[False, False, True]), fluency)
    with pytest.raises(ValueError, match="2 rows for 3"):
        attach_fluency(scored, fluency.head(2))


def test_sweep_fluency_on_a_tiny_model():
    model, tok = tiny_llama(seed=3), byte_tokenizer()
    vectors = {"gratitude": {1: torch.randn(64)}}
    conditions = build_conditions(vectors, {1: 10.0}, [1], [-1.0, 0.0, 1.0], 1, seed=0)
    prompts = ["Hello there", "The cat sat", "We went to"]
    sweep = generate_sweep(model, tok, prompts, conditions, max_new_tokens=6, batch_size=8)
    fluency = continuation_fluency(model, tok, sweep["prompt"].tolist(), sweep["continuation"].tolist(),
                                   sweep["n_new_tokens"].tolist(), batch_size=4)  # fmt: skip
    scored = attach_fluency(sweep.assign(prompt_id=[f"p{i}" for i in sweep["prompt_index"]]), fluency)
    assert {"generated_tokens", "distinct_2", "repetition_rate", "degenerate", "mean_logprob"} <= set(scored)
    assert scored["generated_tokens"].tolist() == sweep["n_new_tokens"].tolist()
    summary = condition_fluency(scored, BOUNDS).set_index("condition")
    # α = 0 reproduces the baseline text, so its unsteered likelihood is the baseline's exactly.
    assert summary.loc["gratitude|L1|a+0", "perplexity_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(summary.loc["gratitude|L1|a+1", "perplexity_ratio"])


# -------------------------------------------------------------------------------- 3. honest maxima


def _planted(kind, emotion, layer, alpha):
    return {"emotion_gratitude": 0.25} if (emotion, layer, alpha) == ("gratitude", 2, 0.2) else {}


def test_split_is_seeded_disjoint_and_order_free():
    ids = [f"p{i:02d}" for i in range(9)]
    halves = split_halves(ids, seed=5)
    assert halves["half"].value_counts().to_dict() == {"B": 5, "A": 4}
    pd.testing.assert_frame_equal(halves, split_halves(list(reversed(ids)) + ids[:3], seed=5))
    assert not split_halves(ids, seed=6)["half"].equals(halves["half"])
    with pytest.raises(ValueError, match="at least 4"):
        split_halves(ids[:3], seed=0)


def test_best_cell_is_selected_on_half_a_and_confirmed_on_half_b_only():
    frame = with_fluency(sweep_table(n_prompts=24, effect=_planted, noise=0.1, seed=2))
    halves = split_halves(frame["prompt_id"], seed=11)
    best, _, per_prompt = selected_and_confirmed(frame, halves, TARGETS, BOUNDS, n_boot=300, seed=4)
    gratitude = best.set_index("emotion").loc["gratitude"]
    assert gratitude["status"] == "confirmed" and gratitude["selection"] == SELECTION_LABEL
    assert (gratitude["layer"], gratitude["alpha"]) == (2, 0.2)  # the planted cell is found

    # Disjoint halves, asserted from the ids stored with the numbers.
    selection_ids = set(json.loads(gratitude["selection_prompt_ids"]))
    confirmation_ids = set(json.loads(gratitude["confirmation_prompt_ids"]))
    assert selection_ids.isdisjoint(confirmation_ids)
    assert selection_ids | confirmation_ids == set(frame["prompt_id"])
    assert selection_ids == set(halves.loc[halves["half"] == "A", "prompt_id"])
    assert set(per_prompt["prompt_id"]) == confirmation_ids

    # The confirmation numbers are a paired comparison on half B alone, computed here by hand.
    on_b = frame[frame["prompt_id"].isin(confirmation_ids)]
    wide = on_b.pivot_table(index="prompt_id", columns="condition", values="emotion_gratitude")
    ref = paired_comparison(wide["baseline"].to_numpy(), wide["gratitude|L2|a+0.2"].to_numpy(), n_boot=300,
                            seed=stable_seed(4, "gratitude", "vs_baseline"))  # fmt: skip
    assert gratitude["n_confirmation"] == len(confirmation_ids) == 12
    for ours, theirs in [("target_shift", "mean_diff"), ("shift_ci_low", "diff_ci_low"),
                         ("shift_ci_high", "diff_ci_high"), ("p", "p_t"), ("d_z", "d_z")]:  # fmt: skip
        assert gratitude[ours] == pytest.approx(ref[theirs])
    assert gratitude["shift_ci_low"] > 0.1 and gratitude["p"] < 0.01

    # Changing half A's scores of the chosen cell moves the selection number, never the confirmation.
    tampered = frame.copy()
    rows = (tampered["condition"] == "gratitude|L2|a+0.2") & tampered["prompt_id"].isin(selection_ids)
    tampered.loc[rows, "emotion_gratitude"] += 0.3
    again = selected_and_confirmed(tampered, halves, TARGETS, BOUNDS, n_boot=300, seed=4)[0]
    again = again.set_index("emotion").loc["gratitude"]
    assert again["selection_shift"] == pytest.approx(gratitude["selection_shift"] + 0.3)
    for column in ("target_shift", "shift_ci_low", "shift_ci_high", "p"):
        assert again[column] == gratitude[column]

    assert (best["p_bonferroni"] >= best["p"]).all() and best["confirmation_family"].str.contains("m=3").all()


def test_where_nothing_is_planted_half_b_does_not_confirm_the_half_a_maximum():
    selected, confirmed = [], []
    for replicate in range(10):
        frame = with_fluency(sweep_table(n_prompts=24, noise=0.1, seed=100 + replicate))
        halves = split_halves(frame["prompt_id"], seed=replicate)
        best = selected_and_confirmed(frame, halves, TARGETS, BOUNDS, n_boot=20, seed=replicate)[0]
        selected += best["selection_shift"].tolist()
        confirmed += best["target_shift"].tolist()
    # A cell's half mean is noise with SD σ = 0.1 / √12. The maximum of 4 such cells on half A is biased
    # upwards (expected ≈ +1.03 σ, standard error of the mean over 30 emotions ≈ 0.11 σ); the same cell on
    # half B is unbiased (expected 0, standard error ≈ 0.18 σ).
    sigma = 0.1 / np.sqrt(12)
    assert np.mean(selected) > 0.6 * sigma and abs(np.mean(confirmed)) < 0.5 * sigma


# ------------------------------------------------------------------------------ 4. steerability


def test_share_of_prompts_moved_each_way_and_spread():
    frame = sweep_table(n_prompts=4, noise=0.0, layers=(1,), alphas=(-0.2, 0.2), n_random=1)
    moved = np.array([0.2, 0.1, 0.0, -0.1])
    for condition in ("gratitude|L1|a+0.2", "gratitude|L1|a-0.2", "random_isotropic0|L1|a+0.2"):
        frame.loc[frame["condition"] == condition, "emotion_gratitude"] += moved
    table = shift_table(frame, METRICS, TARGETS).set_index("condition")
    up, down = table.loc["gratitude|L1|a+0.2"], table.loc["gratitude|L1|a-0.2"]
    q25, q75 = np.quantile(moved, [0.25, 0.75])
    for row in (up, down):
        assert row["emotion_gratitude_shift"] == pytest.approx(moved.mean())
        assert row["emotion_gratitude_shift_sd"] == pytest.approx(np.std(moved, ddof=1))
        assert row["emotion_gratitude_shift_iqr"] == pytest.approx(q75 - q25)
        assert (row["emotion_gratitude_share_up"], row["emotion_gratitude_share_down"]) == (0.5, 0.25)
        assert row["target_metric"] == "emotion_gratitude" and row["n_prompts"] == 4
    # α > 0 should raise the target score, α < 0 lower it: the same shifts are steerable or anti-steerable.
    assert (up["share_intended"], up["share_anti"]) == (0.5, 0.25)
    assert (down["share_intended"], down["share_anti"]) == (0.25, 0.5)
    assert math.isnan(table.loc["random_isotropic0|L1|a+0.2", "share_intended"])
    assert table.loc["random_isotropic0|L1|a+0.2", "emotion_gratitude_share_up"] == 0.5
    assert table.loc["gratitude|L1|a+0", "emotion_gratitude_share_up"] == 0.0  # α = 0 moves nothing


def test_best_cells_carry_steerability_on_the_confirmation_half():
    frame = with_fluency(sweep_table(n_prompts=24, effect=_planted, noise=0.1, seed=2))
    halves = split_halves(frame["prompt_id"], seed=11)
    best, _, per_prompt = selected_and_confirmed(frame, halves, TARGETS, BOUNDS, n_boot=100, seed=4)
    gratitude = best.set_index("emotion").loc["gratitude"]
    shifts = per_prompt[(per_prompt["emotion"] == "gratitude") & (per_prompt["series"] == "emotion vector")]
    values = shifts["shift"].to_numpy()
    assert gratitude["share_intended"] == pytest.approx((values > 0).mean())
    assert gratitude["share_anti"] == pytest.approx((values < 0).mean())
    assert gratitude["shift_sd"] == pytest.approx(np.std(values, ddof=1))
    assert gratitude["target_shift"] == pytest.approx(values.mean())
    others = sorted(set(TARGETS) - {"gratitude"})
    assert set(per_prompt["series"]) == {"emotion vector", *RANDOM_KINDS, *(f"{o} vector" for o in TARGETS)}
    iso = per_prompt[(per_prompt["emotion"] == "gratitude") & (per_prompt["series"] == "random_isotropic")]
    assert gratitude["random_isotropic_shift"] == pytest.approx(iso["shift"].mean())
    assert gratitude["vs_random_isotropic_diff"] == pytest.approx(values.mean() - iso["shift"].mean())
    # Against each other emotion's vector at the same (layer, α), on gratitude's own score, half B only.
    assert others
    for other in others:
        theirs = per_prompt[
            (per_prompt["emotion"] == "gratitude") & (per_prompt["series"] == f"{other} vector")
        ]
        assert list(theirs["prompt_id"]) == list(shifts["prompt_id"])
        by_hand = values - theirs["shift"].to_numpy()
        assert gratitude[f"vs_emotion_{other}_diff"] == pytest.approx(by_hand.mean())
        assert (
            gratitude[f"vs_emotion_{other}_ci_low"]
            < by_hand.mean()
            < gratitude[f"vs_emotion_{other}_ci_high"]
        )
        assert 0 < gratitude[f"vs_emotion_{other}_p"] <= 1


def _head_generations() -> pd.DataFrame:
    """A minimal head_patching table: one emotion, baselines on both prompt sets and one ablation."""
    rng = np.random.default_rng(1)
    rows = []
    for name, kind, destination in [("baseline_emotion", "baseline", "emotion"),
                                    ("baseline_neutral", "baseline", "neutral"),
                                    ("ablate_zero_top2", "ablation", "emotion")]:  # fmt: skip
        for i in range(6):
            # Cross-fitted like head_patching: pairs 0-2 form half A, 3-5 half B; each is measured with the
            # heads selected on the other half.
            half, other = ("A", "B") if i < 3 else ("B", "A")
            selecting = range(3, 6) if half == "A" else range(3)
            rows.append({
                "emotion": "gratitude", "condition": name, "kind": kind, "mode": "zero" if kind != "baseline" else None,
                "direction": None, "scope": None if kind == "baseline" else "joint", "heads": "L1H2", "seed": None,
                "destination": destination, "pair_index": i, "prompt_id": f"{destination[0]}{i}",
                "source_prompt_id": None, "fold": f"{other}_to_{half}", "selection_half": other,
                "measurement_half": half,
                "selected_on_prompt_ids": ",".join(sorted(f"{d}{j}" for d in "en" for j in selecting)),
                **{m: rng.uniform() for m in METRICS}, "politeness": rng.uniform(),
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_patching_statistics_asset_reports_the_split_family_and_specificity(tmp_path):
    import dagster as dg

    from emotion_assets.head_patching import PATCHING_ASSET
    from emotion_assets.statistics import patching_statistics
    from resources.storage import ArtifactStore, write_table
    from resources.tracking import TrackingResource

    def effect(kind, emotion, layer, alpha):
        return {"emotion_gratitude": 0.2 * np.sign(alpha)} if emotion == "gratitude" else {}

    store = ArtifactStore(root_dir=str(tmp_path))
    residual = sweep_table(effect=effect).assign(politeness=0.5)
    with store.publishing():
        write_table(
            store.directory("smoke", "residual_patching", "smollm2-135m") / "generations.parquet", residual
        )
        write_table(store.directory("smoke", PATCHING_ASSET, "smollm2-135m") / "generations.parquet",
                    _head_generations())  # fmt: skip
        residual_dir = store.directory("smoke", "residual_patching", "smollm2-135m")
        write_table(residual_dir / "condition_shifts.parquet",
                    shift_table(residual, METRICS, TARGETS).assign(fluent=True))  # fmt: skip
        write_table(residual_dir / "best_per_emotion.parquet", pd.DataFrame([{
            "emotion": "gratitude", "condition": "gratitude|L1|a+0.2", "selection_shift": 0.2, "target_shift": 0.2,
            "shift_ci_low": 0.1, "shift_ci_high": 0.3, "status": "confirmed"}]))  # fmt: skip
        write_table(store.directory("smoke", "head_screening", "smollm2-135m") / "screening.parquet",
                    pd.DataFrame([{"emotion": "gratitude", "half": half, "layer": layer, "head": head,
                                   "ablation_effect": float(layer - head), "attribution": 0.0}
                                  for half in "AB" for layer in range(2) for head in range(4)]))  # fmt: skip
    result = materialize(
        [patching_statistics], store=store,
        partition_key=dg.MultiPartitionKey({"model": "smollm2-135m", "profile": "smoke"}),
        resources={"store": store, "tracking": TrackingResource(enabled=False)},
        instance=dg.DagsterInstance.ephemeral(),
    )  # fmt: skip
    stats_ = pd.read_parquet(
        tmp_path / "smoke" / "patching_statistics" / "smollm2-135m" / "comparisons.parquet"
    )
    residual_rows = stats_[stats_["source"] == "residual"]
    assert set(residual_rows["comparison"]) == {"vs_baseline", "vs_random_isotropic", "vs_random_covariance",
                                                "vs_other_emotion"}  # fmt: skip
    assert (stats_["family_size_t"] == len(stats_)).all() and stats_["family_t"].str.contains(
        "other_emotion"
    ).all()
    row = residual_rows[(residual_rows["condition"] == "gratitude|L1|a+0.2")
                        & (residual_rows["other_emotion"] == "apology")].iloc[0]  # fmt: skip
    wide = residual.pivot_table(index="prompt_id", columns="condition", values="emotion_gratitude")
    assert row["mean_diff"] == pytest.approx((wide["gratitude|L1|a+0.2"] - wide["apology|L1|a+0.2"]).mean())
    assert row["p_bh"] >= row["p_t"] and row["metric"] == "emotion_gratitude"
    metadata = result.asset_materializations_for_node("patching_statistics")[0].metadata
    assert (
        "gratitude" in metadata["specificity"].value and "vs_other_emotion" in metadata["by_comparison"].value
    )
    out = tmp_path / "smoke" / "patching_statistics" / "smollm2-135m"
    book = pd.read_parquet(out / "control_ledger.parquet")
    assert {"uncontrolled", "controlled"} == set(book["reading"]) and "uncontrolled" in metadata[
        "control_ledger"
    ].value
    maxima = pd.read_parquet(out / "headline_maxima.parquet").set_index("emotion")
    assert maxima.loc["gratitude", "controlled_cell"] == "gratitude|L1|a+0.2"
