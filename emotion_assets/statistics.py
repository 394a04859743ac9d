"""Phase 7: effect sizes, corrected tests and power for the patching results; k-selection for alignment."""

import dagster as dg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emotion_assets.alignment import beyond_embeddings, subspace_alignment
from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, effective_profile, recorded
from emotion_assets.heads import PATCHING_ASSET, head_patching, head_screening
from emotion_assets.io import COMPARISONS_FILE, GENERATIONS_FILE, SCREENING_FILE, SWEEP_FILE, ArtifactHandle
from emotion_assets.partitions import (
    causal_model_profile_partitions,
    model_and_profile,
    pair_and_profile,
    pair_profile_partitions,
)
from emotion_assets.patching import TARGET_METRICS, residual_patching
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.control_ledger import (
    headline_maxima,
    ledger,
    top_head_selection_tests,
    uncontrolled_steering_family,
)
from emotion_assets.science.crossfit import heads_by_fold, split_ids
from emotion_assets.science.statistics import (
    correct_family,
    paired_family,
    paired_t_power,
    power_table,
    select_k_from_bounds,
    stable_seed,
    two_sample_t_power,
    unpaired_comparison,
)
from emotion_assets.science.steering_analysis import specificity_summary, steering_comparisons
from jobs.jobs import ALIGNMENT_GROUP, STATISTICS_GROUP
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource

# Scores tested for every condition: the three emotion probabilities, sentiment and politeness.
FAMILY_METRICS = [*TARGET_METRICS.values(), "sentiment_compound", "politeness"]
CONDITION_KEYS = ["condition", "kind", "emotion", "layer", "alpha", "seed"]


def per_prompt(scored: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per unique prompt × condition (duplicates averaged), so repeated prompts never add n."""
    keys = ["prompt_id", *CONDITION_KEYS]
    return scored.groupby(keys, dropna=False, sort=False)[metrics].mean().reset_index()


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


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    deps=config_deps("patching_statistics", causal_model_profile_partitions),
    group_name=STATISTICS_GROUP,
    ins={
        "residual_patching": dg.AssetIn(residual_patching.key),
        "head_patching": dg.AssetIn(head_patching.key),
        "head_screening": dg.AssetIn(head_screening.key),
    },
    kinds={"scipy", "parquet"},
    code_version="5",
    description="Per unique prompt, paired: every steered condition vs the unsteered baseline (all scores), "
    "every emotion vector vs its norm-matched random controls, isotropic and covariance-matched separately, "
    "and vs every other emotion's vector at the same layer and α (its own target score), every head "
    "ablation/patch vs the unintervened continuation and the top heads vs random-head controls; unpaired emotion vs neutral "
    "prompts (Welch, Hedges' g). Mean difference, Cohen's d_z with a variance floor, paired t, Wilcoxon, "
    "seeded bootstrap CIs, BH-FDR and Bonferroni across the whole declared family, exact noncentral-t power. "
    "The control ledger counts the survivors an uncontrolled reading of the same data would report beside "
    "the survivors of the controls.",
)
def patching_statistics(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    residual_patching: ArtifactHandle,
    head_patching: ArtifactHandle,
    head_screening: ArtifactHandle,
) -> dg.MaterializeResult:
    """Effect sizes, tests and corrections for ``residual_patching`` and ``head_patching`` of one model.

    Family: every row of this model and profile (both sources, every comparison × emotion × metric ×
    condition); BH-FDR and Bonferroni run over all of it and the family is written beside each p.
    """
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    scored = residual_patching.table(GENERATIONS_FILE)
    condition_shifts = residual_patching.table("condition_shifts.parquet")
    best_cells = residual_patching.table("best_per_emotion.parquet")
    head_scored = head_patching.table(GENERATIONS_FILE)
    screening = head_screening.table(SCREENING_FILE)
    metrics, untested = metrics_to_test(scored, "residual_patching")
    head_metrics, head_untested = metrics_to_test(head_scored, PATCHING_ASSET)
    with recorded(
        context, tracking=tracking, store=store, phase="7-statistics", model=model_name, profile=profile,
        device="cpu", config=config, throughput_unit="comparisons",
    ) as rec:  # fmt: skip
        table = per_prompt(scored, metrics)
        specs, control, treatment, _ = comparison_matrices(table, metrics)
        seed = stable_seed("patching_statistics", model_name, profile_name, profile.seed)
        results = paired_family(control, treatment, n_boot=profile.n_bootstrap, seed=seed)
        results = results.rename(columns={"seed": "bootstrap_seed"})
        residual = pd.concat([pd.DataFrame(specs), results], axis=1)
        residual = residual.assign(source="residual", effect_size=residual["d_z"], effect_measure="d_z")
        heads = head_comparisons(
            head_scored, head_metrics, n_boot=profile.n_bootstrap,
            seed_parts=("patching_statistics", model_name, profile_name, profile.seed),
        ).assign(source="heads")  # fmt: skip
        stats = pd.concat([residual, heads], ignore_index=True)
        stats.insert(0, "profile", profile_name)
        stats.insert(0, "model", model_name)
        within = ["source", "comparison", "emotion", "other_emotion", "metric", "condition"]
        stats = correct_family(stats, "p_t", ["model", "profile"], within_columns=within)
        stats = stats.rename(columns={"family": "family_t", "family_size": "family_size_t"})
        stats = correct_family(stats, "p_wilcoxon", ["model", "profile"], within_columns=within,
                               suffix="_wilcoxon")  # fmt: skip
        # the same family; m differs only where a comparison has no Wilcoxon p (the unpaired ones)
        stats = stats.rename(columns={"family": "family_wilcoxon", "family_size": "family_size_wilcoxon"})
        stats["power_at_n"] = observed_power(stats)
        stats["survives_bh"] = stats["p_bh"] < 0.05
        rec.timing.samples = len(stats)

        uncontrolled = uncontrolled_steering_family(
            table, metrics, TARGET_METRICS, seed=stable_seed(seed, "uncontrolled"), n_boot=profile.n_bootstrap
        )
        head_tests = top_head_selection_tests(
            screening, profile.heads.top_n, seed=stable_seed(seed, "top_head_selection")
        )
        fluent = dict(
            zip(condition_shifts["condition"], condition_shifts["fluent"].astype(bool), strict=True)
        )
        control_ledger = ledger(uncontrolled, stats, fluent, TARGET_METRICS, head_tests)
        maxima = headline_maxima(condition_shifts, best_cells)

        out = store.directory(profile_name, "patching_statistics", model_name)
        rec.artifacts(out)
        write_table(out / COMPARISONS_FILE, stats, csv=True)
        write_table(out / "control_ledger.parquet", control_ledger, csv=True)
        write_table(out / "uncontrolled_comparisons.parquet", uncontrolled, csv=True)
        write_table(out / "head_selection_tests.parquet", head_tests, csv=True)
        write_table(out / "headline_maxima.parquet", maxima, csv=True)
        paired_n = sorted(stats.loc[stats["effect_measure"] == "d_z", "n"].astype(int).unique())
        power = pd.concat([power_table(None, n) for n in paired_n], ignore_index=True)
        write_table(out / "power.parquet", power, csv=True)
        plots = {
            "volcano": save_figure(_volcano(stats, model_name), out / "volcano.png"),
            "p_histogram": save_figure(_p_histogram(stats), out / "p_histogram.png"),
        }
        target = stats[(stats["comparison"] == "vs_baseline") & (stats["kind"] == "emotion")]
        for emotion, metric in TARGET_METRICS.items():
            rows = target[(target["emotion"] == emotion) & (target["metric"] == metric)]
            if rows.empty:
                continue
            grid = rows.pivot_table(index="layer", columns="alpha", values="d_z")
            plots[f"effect_heatmap_{emotion}"] = save_figure(
                heatmap(grid.to_numpy(), list(grid.index), list(grid.columns),
                        f"d_z of {metric}, steering {emotion} vs baseline", "α", "layer"),
                out / f"effect_heatmap_{emotion}.png",
            )  # fmt: skip
        survivors = stats[stats["survives_bh"]].sort_values("p_bh")
        n_by_source = stats[stats["effect_measure"] == "d_z"].groupby("source")["n"].max()
        rec.metrics(n_comparisons=len(stats), n_survive_bh=int(stats["survives_bh"].sum()),
                    n_prompts=int(n_by_source.get("residual", 0)))  # fmt: skip
    headline = ["source", "comparison", "metric", "emotion", "other_emotion", "condition", "n", "mean_diff",
                "effect_size", "diff_ci_low", "diff_ci_high", "p_bh", "p_bonferroni"]  # fmt: skip
    by_source = stats.groupby(["source", "comparison"]).agg(
        comparisons=("p_t", "size"), survive_bh=("survives_bh", "sum"),
        survive_bonferroni=("p_bonferroni", lambda p: int((p < 0.05).sum())),
    ).reset_index()  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / COMPARISONS_FILE)),
            "dg.row_count": dg.MetadataValue.int(len(stats)),
            "n_unique_prompts": dg.MetadataValue.json({k: int(v) for k, v in n_by_source.items()}),
            "family": dg.MetadataValue.text(str(stats["family_t"].iloc[0])),
            "metrics_not_tested": dg.MetadataValue.json({**untested, **head_untested}),
            "n_survive_bh": dg.MetadataValue.int(int(stats["survives_bh"].sum())),
            "n_survive_bonferroni": dg.MetadataValue.int(int((stats["p_bonferroni"] < 0.05).sum())),
            "by_comparison": markdown_table(by_source),
            "top_effects": markdown_table(
                survivors[headline] if len(survivors) else stats.nsmallest(10, "p_t")[headline], max_rows=30
            ),
            "power": markdown_table(power),
            # What the controls changed: survivors of an uncontrolled reading of the same data beside the study's.
            "control_ledger": markdown_table(control_ledger.drop(columns=["rules"]), max_rows=20),
            "headline_maxima": markdown_table(maxima, max_rows=20),
            # Specificity: does an emotion's vector move its own score more than the other emotions' vectors?
            "specificity": markdown_table(specificity_summary(stats), max_rows=30),
            **plots,
            **rec.metadata(),
        }
    )


def _volcano(stats: pd.DataFrame, model: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (source, comparison), group in stats.groupby(["source", "comparison"]):
        ax.scatter(group["effect_size"], -np.log10(group["p_bh"].clip(lower=1e-300)), s=10, alpha=0.6,
                   label=f"{source}: {comparison}")  # fmt: skip
    ax.axhline(-np.log10(0.05), color="grey", ls="--", lw=1, label="BH q = 0.05")
    ax.set_xlabel("effect size (Cohen's d_z; Hedges' g for unpaired)")
    ax.set_ylabel("−log10 BH-corrected p")
    ax.set_title(f"{model}: every comparison of the family")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _p_histogram(stats: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.hist(stats["p_t"].dropna(), bins=20, range=(0, 1), color="steelblue", edgecolor="white")
    ax.set_xlabel("uncorrected p (t, or sign-flip where t breaks down; see p_method)")
    ax.set_ylabel("comparisons")
    ax.set_title("p-value histogram (uniform under the null)")
    return fig


@dg.asset_check(asset=patching_statistics, description="Every p lies in [0, 1], corrected p ≥ raw p, and "
                "every effect size (d_z or Hedges' g) is finite.")  # fmt: skip
def patching_statistics_sane(patching_statistics: ArtifactHandle) -> dg.AssetCheckResult:
    stats = patching_statistics.table(COMPARISONS_FILE)
    p_ok = bool(stats["p_t"].between(0, 1).all() and (stats["p_bh"] >= stats["p_t"] - 1e-12).all())
    d_ok = bool(np.isfinite(stats["effect_size"]).all())
    return dg.AssetCheckResult(
        passed=p_ok and d_ok, metadata={"p_values_ok": p_ok, "effect_sizes_finite": d_ok}
    )


@dg.asset(
    partitions_def=pair_profile_partitions,
    deps=config_deps("k_selection", pair_profile_partitions),
    group_name=ALIGNMENT_GROUP,
    ins={"subspace_alignment": dg.AssetIn(subspace_alignment.key)},
    kinds={"pandas"},
    code_version="1",
    description="Per method and emotion at the best-aligned layer of model A past the token embeddings (largest "
    "mean overlap above the null p95): the subspace dimension k chosen by a stated rule from the bootstrap "
    "overlap over prompts compared with the null band.",
)
def k_selection(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    subspace_alignment: ArtifactHandle,
) -> dg.MaterializeResult:
    model_a, model_b, profile_name = pair_and_profile(context)
    profile = effective_profile(profile_name, config)
    pair = f"{model_a}__{model_b}"
    sweep = subspace_alignment.table(SWEEP_FILE)
    with recorded(
        context, tracking=tracking, store=store, phase="7-statistics", model=pair, profile=profile,
        device="cpu", config=config, throughput_unit="selections",
    ) as rec:  # fmt: skip
        margin = beyond_embeddings(sweep).assign(margin=lambda f: f["overlap"] - f["null_p95"])
        best_layer = margin.groupby("layer_a")["margin"].mean().idxmax()
        tables, decisions = [], []
        for (method, emotion), group in sweep[sweep["layer_a"] == best_layer].groupby(["method", "emotion"]):
            summary = group.rename(columns={"overlap": "median", "boot_lo": "lo", "boot_hi": "hi"})
            k, table = select_k_from_bounds(summary[["k", "median", "lo", "hi", "null_p95", "chance"]])
            table.insert(0, "emotion", emotion)
            table.insert(0, "method", method)
            tables.append(table)
            decisions.append({"method": method, "emotion": emotion, "layer_a": int(best_layer), "k": k,
                              "decision": table.attrs["decision"]})  # fmt: skip
        rec.timing.samples = len(decisions)
        out = store.directory(profile_name, "k_selection", pair)
        rec.artifacts(out)
        full = pd.concat(tables, ignore_index=True)
        chosen = pd.DataFrame(decisions)
        write_table(out / "k_sweep.parquet", full, csv=True)
        write_table(out / "chosen_k.parquet", chosen, csv=True)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "chosen_k.parquet")),
            "layer_a": dg.MetadataValue.int(int(best_layer)),
            "rule": dg.MetadataValue.text(
                "k passes when the 5th percentile of the bootstrap overlap (emotion prompts resampled) exceeds "
                "the null 95th percentile (random k-dim subspaces through the same map); the chosen k is the "
                "smallest passing k whose overlap is within 0.05 of the best passing overlap."
            ),
            "chosen_k": markdown_table(chosen),
            **rec.metadata(),
        }
    )
