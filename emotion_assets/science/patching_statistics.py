"""Statistics of the patching results (``patching_statistics``): which comparisons are tested, how they are
paired, and the corrected family with its power.

Residual steering comparisons come from :func:`science.steering_analysis.steering_comparisons`; head
comparisons are built here from the cross-fitted ``head_patching`` rows. Every comparison of one model ×
profile forms one family: BH-FDR and Bonferroni run over all of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from emotion_assets.science.crossfit import heads_by_fold, split_ids
from emotion_assets.science.statistics import (
    correct_family,
    paired_family,
    paired_t_power,
    stable_seed,
    two_sample_t_power,
    unpaired_comparison,
)
from emotion_assets.science.steering_analysis import TARGET_METRICS, steering_comparisons

# Scores tested for every condition: the three emotion probabilities, sentiment and politeness.
FAMILY_METRICS = [*TARGET_METRICS.values(), "sentiment_compound", "politeness"]
#: Columns within which a family's comparisons are told apart (each row is one comparison).
WITHIN_FAMILY = ["source", "comparison", "emotion", "other_emotion", "metric", "condition"]


def metrics_to_test(scored: pd.DataFrame, source: str) -> tuple[list[str], dict[str, str]]:
    """The family metrics ``scored`` has for every row, and why each other one is not tested."""
    tested, untested = [], {}
    for metric in FAMILY_METRICS:
        if metric not in scored:
            untested[f"{source}.{metric}"] = "not scored (evaluator not configured for this profile)"
        elif scored[metric].isna().any():
            untested[f"{source}.{metric}"] = (
                f"null for {int(scored[metric].isna().sum())} of {len(scored)} rows"
            )
        else:
            tested.append(metric)
    return tested, untested


def observed_power(stats: pd.DataFrame) -> list[float]:
    """Power at each row's |effect_size| and n: paired noncentral t for d_z, two-sample for Hedges' g.

    ``n_a``/``n_b`` exist only when some row is unpaired; a frame without them is all paired.
    """
    arms = stats.reindex(columns=["n_a", "n_b"])
    return [
        (two_sample_t_power(abs(g), int(na), int(nb)) if measure == "hedges_g" else paired_t_power(abs(g), int(n)))
        if np.isfinite(g) else np.nan
        for g, measure, n, na, nb in zip(stats["effect_size"], stats["effect_measure"], stats["n"], arms["n_a"],
                                          arms["n_b"], strict=True)
    ]  # fmt: skip


def vs_baseline_specs(
    wide: dict[str, pd.DataFrame], conditions: pd.DataFrame, metrics: list[str]
) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:
    """Every non-baseline condition against the (single) baseline condition of ``conditions``, every metric.

    ``wide[metric]``: [prompt, condition] scores; ``conditions``: one row per condition (index = name).
    """
    baseline = conditions.index[conditions["kind"] == "baseline"][0]
    specs, control, treatment = [], [], []
    for name, cond in conditions.iterrows():
        if cond["kind"] == "baseline":
            continue
        for metric in metrics:
            specs.append({"comparison": "vs_baseline", "metric": metric, "condition": name, **cond.to_dict()})
            control.append(wide[metric][baseline].to_numpy())
            treatment.append(wide[metric][name].to_numpy())
    return specs, control, treatment


def comparison_matrices(
    table: pd.DataFrame, metrics: list[str]
) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """Control and treatment [n_prompts, G] for every declared steering comparison of one model × profile:
    ``vs_baseline``, ``vs_random_isotropic`` and ``vs_random_covariance`` (each kind on its own, never
    pooled) and ``vs_other_emotion`` (see :func:`steering_comparisons`)."""
    return steering_comparisons(table, metrics, TARGET_METRICS)


HEAD_CONDITION_KEYS = [
    "condition", "kind", "mode", "direction", "scope", "heads", "seed", "destination", "selection",
]  # fmt: skip
CROSSFIT_COLUMNS = ["fold", "selection_half", "measurement_half", "selected_on_prompt_ids"]
SELECTION_LABELS = {
    "ablation": "top heads selected on the other half (cross-fitted, held out)",
    "patch": "top heads selected on the other half (cross-fitted, held out)",
    "random_ablation": "random heads (per fold, never a top head of the fold)",
    "random_patch": "random heads (per fold, never a top head of the fold)",
    "baseline": "no heads",
}


def crossfit_attributes(scored: pd.DataFrame) -> pd.DataFrame:
    """One row per emotion × condition: the condition's fields, ``heads`` of every fold and ``selection``.

    Refuses rows without the cross-fitting columns or where a head set was measured on a prompt that
    selected it (``selected_on_prompt_ids``): such a statistic would report a maximum on its own data.
    """
    missing = [c for c in CROSSFIT_COLUMNS if c not in scored]
    if missing:
        raise ValueError(
            f"head_patching rows lack the cross-fitting columns {missing}; re-materialize head_screening and "
            "head_patching."
        )
    leaking = [
        (row.emotion, row.condition)
        for row in scored.itertuples(index=False)
        if {str(row.prompt_id), str(row.source_prompt_id)} & split_ids(row.selected_on_prompt_ids)
    ]
    if leaking:
        raise ValueError(
            f"{len(leaking)} head_patching rows measure heads on a prompt that selected them (first: "
            f"{leaking[0]}); re-materialize head_patching from the current head_screening split."
        )
    attributes = scored.drop_duplicates(["emotion", "condition"]).set_index(["emotion", "condition"])
    attributes["heads"] = pd.Series(
        {key: heads_by_fold(rows) for key, rows in scored.groupby(["emotion", "condition"], sort=False)}
    )
    attributes["selection"] = attributes["kind"].map(SELECTION_LABELS)
    return attributes


def _head_specs(
    wide: dict[str, pd.DataFrame], conditions: pd.DataFrame, emotion: str, metrics: list[str]
) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:
    """Paired comparisons on one emotion's destination prompts (see :func:`head_comparisons`)."""
    specs, control, treatment = vs_baseline_specs(wide, conditions, metrics)
    target = TARGET_METRICS.get(emotion)
    if target not in wide:
        return specs, control, treatment
    same_direction = conditions["direction"].fillna("")
    for name, cond in conditions[conditions["kind"].isin(["ablation", "patch"]) & (conditions["scope"] == "joint")
                                 ].iterrows():  # fmt: skip
        randoms = conditions[
            (conditions["kind"] == f"random_{cond['kind']}")
            & (conditions["mode"] == cond["mode"])
            & (same_direction == ("" if pd.isna(cond["direction"]) else cond["direction"]))
        ].index
        if len(randoms) == 0:
            continue
        specs.append({"comparison": "vs_random_heads", "metric": target, "condition": name, **cond.to_dict()})
        control.append(wide[target][list(randoms)].mean(axis=1).to_numpy())
        treatment.append(wide[target][name].to_numpy())
    return specs, control, treatment


def head_comparisons(
    scored: pd.DataFrame, metrics: list[str], *, n_boot: int, seed_parts: tuple[str | int, ...]
) -> pd.DataFrame:
    """Statistics of ``head_patching``: one row per comparison, fields of ``paired_family`` or unpaired ones.

    Per emotion, on the prompts each condition continued (its ``destination``):

    - ``vs_baseline``: every ablation, patch and random-head condition against the unintervened
      continuation of the same prompts, paired per unique prompt, every metric;
    - ``vs_random_heads``: each joint top-N intervention that has random-head controls of the same mode and
      direction (``head_patching`` runs them for zero ablation and ``z`` patching in both directions)
      against their mean on the same prompts, paired, the emotion's target score;
    - ``emotion_vs_neutral_prompts`` (unpaired: different prompts): unintervened continuations of the
      emotion prompts against those of the neutral prompts, Welch t and Hedges' g on the target score, the
      gap the patches try to move.

    Cross-fitted (``head_patching``): each condition's rows concatenate two folds, so every prompt is
    measured once, with heads selected on the half it is not in; the effects and CIs of the top heads are
    therefore held-out estimates. ``heads`` names every fold's heads (``A_to_B: ... | B_to_A: ...``) and
    ``selection`` says how they were chosen (:func:`crossfit_attributes`).

    Bootstrap seeds come from ``seed_parts`` + emotion + destination, so reruns reproduce every CI.
    """
    attributes = crossfit_attributes(scored)
    table = scored.groupby(["emotion", "destination", "prompt_id", "condition"], sort=False)[metrics].mean()
    table = table.reset_index()
    frames = []
    for (emotion, destination), group in table.groupby(["emotion", "destination"], sort=False):
        prompts = np.sort(group["prompt_id"].unique())
        wide = {m: group.pivot_table(index="prompt_id", columns="condition", values=m, dropna=False)
                .reindex(prompts) for m in metrics}  # fmt: skip
        names = list(dict.fromkeys(group["condition"]))
        conditions = attributes.loc[emotion].loc[names, HEAD_CONDITION_KEYS[1:]]
        specs, control, treatment = _head_specs(wide, conditions, emotion, metrics)
        if not specs:
            continue
        seed = stable_seed(*seed_parts, "heads", emotion, destination)
        results = paired_family(
            np.column_stack(control), np.column_stack(treatment), n_boot=n_boot, seed=seed
        )
        results = results.rename(columns={"seed": "bootstrap_seed"})
        frame = pd.concat([pd.DataFrame(specs), results], axis=1).assign(emotion=emotion)
        frames.append(frame.assign(effect_size=frame["d_z"], effect_measure="d_z"))
    unpaired = []
    for emotion, group in scored[scored["kind"] == "baseline"].groupby("emotion", sort=False):
        metric = TARGET_METRICS.get(emotion)
        if metric not in metrics:
            continue
        per_prompt_scores = group.groupby(["destination", "prompt_id"])[metric].mean()
        seed = stable_seed(*seed_parts, "heads", emotion, "emotion_vs_neutral_prompts")
        result = unpaired_comparison(
            per_prompt_scores.loc["neutral"].to_numpy(), per_prompt_scores.loc["emotion"].to_numpy(),
            n_boot=n_boot, seed=seed,
        )  # fmt: skip
        unpaired.append({
            "comparison": "emotion_vs_neutral_prompts", "metric": metric, "condition": "baseline",
            "kind": "baseline", "emotion": emotion, "destination": "emotion vs neutral",
            **{("bootstrap_seed" if k == "seed" else k): v for k, v in result.items()},
            "n": result["n_a"] + result["n_b"], "effect_size": result["hedges_g"], "effect_measure": "hedges_g",
        })  # fmt: skip
    return pd.concat([*frames, pd.DataFrame(unpaired)], ignore_index=True)


def comparison_family(
    table: pd.DataFrame,
    metrics: list[str],
    head_scored: pd.DataFrame,
    head_metrics: list[str],
    *,
    model: str,
    profile: str,
    n_boot: int,
    seed_parts: tuple[str | int, ...],
) -> pd.DataFrame:
    """Every comparison of one model × profile, corrected as one family, with the power at each row's n.

    ``table``: per-prompt steering scores (``per_prompt_scores``), tested with :func:`comparison_matrices`
    (``source`` = ``residual``); ``head_scored``: the ``head_patching`` rows (:func:`head_comparisons`,
    ``source`` = ``heads``). BH-FDR and Bonferroni run over the whole family, once on the t (or sign-flip)
    p and once on the Wilcoxon p; the family and its size are written beside each p. Bootstrap seeds come
    from ``seed_parts``.
    """
    specs, control, treatment, _ = comparison_matrices(table, metrics)
    results = paired_family(control, treatment, n_boot=n_boot, seed=stable_seed(*seed_parts))
    results = results.rename(columns={"seed": "bootstrap_seed"})
    residual = pd.concat([pd.DataFrame(specs), results], axis=1)
    residual = residual.assign(source="residual", effect_size=residual["d_z"], effect_measure="d_z")
    heads = head_comparisons(head_scored, head_metrics, n_boot=n_boot, seed_parts=seed_parts).assign(
        source="heads"
    )
    stats = pd.concat([residual, heads], ignore_index=True)
    stats.insert(0, "profile", profile)
    stats.insert(0, "model", model)
    stats = correct_family(stats, "p_t", ["model", "profile"], within_columns=WITHIN_FAMILY)
    stats = stats.rename(columns={"family": "family_t", "family_size": "family_size_t"})
    stats = correct_family(stats, "p_wilcoxon", ["model", "profile"], within_columns=WITHIN_FAMILY,
                           suffix="_wilcoxon")  # fmt: skip
    # the same family; m differs only where a comparison has no Wilcoxon p (the unpaired ones)
    stats = stats.rename(columns={"family": "family_wilcoxon", "family_size": "family_size_wilcoxon"})
    stats["power_at_n"] = observed_power(stats)
    stats["survives_bh"] = stats["p_bh"] < 0.05
    return stats
