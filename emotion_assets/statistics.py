"""Phase 7: effect sizes, corrected tests and power for the patching results; k-selection for alignment."""

import dagster as dg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emotion_assets.alignment import subspace_alignment
from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, effective_profile
from emotion_assets.context import Phase
from emotion_assets.head_patching import PATCHING_ASSET, head_patching
from emotion_assets.head_screening import head_screening
from emotion_assets.io import COMPARISONS_FILE, GENERATIONS_FILE, SCREENING_FILE, SWEEP_FILE, ArtifactHandle
from emotion_assets.partitions import (
    causal_model_profile_partitions,
    pair_and_profile,
    pair_profile_partitions,
)
from emotion_assets.patching import residual_patching
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.alignment import beyond_embeddings
from emotion_assets.science.control_ledger import (
    headline_maxima,
    ledger,
    top_head_selection_tests,
    uncontrolled_steering_family,
)
from emotion_assets.science.patching_statistics import comparison_family, metrics_to_test
from emotion_assets.science.statistics import power_table, select_k_at_best_layer, stable_seed
from emotion_assets.science.steering_analysis import TARGET_METRICS, per_prompt_scores, specificity_summary
from jobs.jobs import ALIGNMENT_GROUP, STATISTICS_GROUP
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource


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
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="7-statistics")
    model_name, profile = phase.model, phase.profile
    scored = residual_patching.table(GENERATIONS_FILE)
    condition_shifts = residual_patching.table("condition_shifts.parquet")
    best_cells = residual_patching.table("best_per_emotion.parquet")
    head_scored = head_patching.table(GENERATIONS_FILE)
    screening = head_screening.table(SCREENING_FILE)
    metrics, untested = metrics_to_test(scored, "residual_patching")
    head_metrics, head_untested = metrics_to_test(head_scored, PATCHING_ASSET)
    with phase.recorded(throughput_unit="comparisons") as rec:
        table = per_prompt_scores(scored, metrics)
        seed_parts = ("patching_statistics", model_name, profile.name, profile.seed)
        seed = stable_seed(*seed_parts)
        stats = comparison_family(
            table, metrics, head_scored, head_metrics, model=model_name, profile=profile.name,
            n_boot=profile.n_bootstrap, seed_parts=seed_parts,
        )  # fmt: skip
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

        out = phase.directory("patching_statistics")
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
    pair = f"{model_a}__{model_b}"
    phase = Phase(
        context, config, store, tracking, "7-statistics", pair, effective_profile(profile_name, config)
    )
    sweep = subspace_alignment.table(SWEEP_FILE)
    with phase.recorded(throughput_unit="selections") as rec:
        best_layer, full, chosen = select_k_at_best_layer(sweep, beyond_embeddings(sweep))
        rec.timing.samples = len(chosen)
        out = phase.directory("k_selection")
        rec.artifacts(out)
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
