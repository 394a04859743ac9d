"""Phase 7: effect sizes, corrected tests and power for the patching results; k-selection for alignment."""

from pathlib import Path

import dagster as dg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emotion_assets.alignment import subspace_alignment
from emotion_assets.common import RunConfig, effective_profile, recorded
from emotion_assets.partitions import (
    causal_model_profile_partitions,
    model_and_profile,
    pair_and_profile,
    pair_profile_partitions,
)
from emotion_assets.patching import TARGET_METRICS, residual_patching
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.statistics import (
    correct_family,
    paired_family,
    paired_t_power,
    power_table,
    select_k_from_bounds,
    stable_seed,
)
from jobs.jobs import ALIGNMENT_GROUP, STATISTICS_GROUP
from resources.storage import ArtifactStore, read_table, write_table
from resources.tracking import TrackingResource

# Scores tested for every condition: the three emotion probabilities, sentiment and politeness.
FAMILY_METRICS = [*TARGET_METRICS.values(), "sentiment_compound", "politeness"]
CONDITION_KEYS = ["condition", "kind", "emotion", "layer", "alpha", "seed"]


def per_prompt(scored: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per unique prompt × condition (duplicates averaged), so repeated prompts never add n."""
    keys = ["prompt_id", *CONDITION_KEYS]
    return scored.groupby(keys, dropna=False, sort=False)[metrics].mean().reset_index()


def comparison_matrices(
    table: pd.DataFrame, metrics: list[str]
) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """Control and treatment [n_prompts, G] for every declared comparison of one model × profile.

    - ``vs_baseline``: every steered condition against the unsteered baseline, for every metric.
    - ``vs_random``: every emotion condition (α ≠ 0) against the mean of the random directions at the same
      layer and α, per prompt (paired), for its target metric.
    """
    prompts = np.sort(table["prompt_id"].unique())
    wide = {m: table.pivot_table(index="prompt_id", columns="condition", values=m, dropna=False).reindex(prompts)
            for m in metrics}  # fmt: skip
    conditions = table.drop_duplicates("condition").set_index("condition")[CONDITION_KEYS[1:]]
    baseline = conditions.index[conditions["kind"] == "baseline"][0]
    specs, control, treatment = [], [], []
    for name, cond in conditions.iterrows():
        if cond["kind"] == "baseline":
            continue
        for metric in metrics:
            specs.append({"comparison": "vs_baseline", "metric": metric, "condition": name, **cond.to_dict()})
            control.append(wide[metric][baseline].to_numpy())
            treatment.append(wide[metric][name].to_numpy())
    randoms = conditions[conditions["kind"].str.startswith("random")]
    for name, cond in conditions[(conditions["kind"] == "emotion") & (conditions["alpha"] != 0)].iterrows():
        metric = TARGET_METRICS.get(cond["emotion"])
        same = randoms[
            (randoms["layer"] == cond["layer"]) & np.isclose(randoms["alpha"], cond["alpha"])
        ].index
        if metric not in wide or len(same) == 0:
            continue
        specs.append({"comparison": "vs_random", "metric": metric, "condition": name, **cond.to_dict()})
        control.append(wide[metric][list(same)].mean(axis=1).to_numpy())
        treatment.append(wide[metric][name].to_numpy())
    return specs, np.column_stack(control), np.column_stack(treatment), prompts


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    group_name=STATISTICS_GROUP,
    deps=[residual_patching],
    kinds={"scipy", "parquet"},
    code_version="1",
    description="Per unique prompt, paired: every steered condition vs the unsteered baseline (all scores) "
    "and every emotion vector vs its norm-matched random controls (target score). Mean difference, Cohen's "
    "d_z with a variance floor, paired t, Wilcoxon, seeded bootstrap CIs, BH-FDR and Bonferroni across the "
    "declared family, exact noncentral-t power.",
)
def patching_statistics(
    context: dg.AssetExecutionContext, config: RunConfig, store: ArtifactStore, tracking: TrackingResource
) -> dg.MaterializeResult:
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    scored = read_table(store.existing(profile_name, "residual_patching", model_name) / "generations.parquet")
    metrics = [m for m in FAMILY_METRICS if m in scored and scored[m].notna().all()]
    with recorded(
        context, tracking=tracking, store=store, phase="7-statistics", model=model_name, profile=profile,
        device="cpu", config=config, throughput_unit="comparisons",
    ) as rec:  # fmt: skip
        table = per_prompt(scored, metrics)
        specs, control, treatment, _ = comparison_matrices(table, metrics)
        seed = stable_seed("patching_statistics", model_name, profile_name, profile.seed)
        results = paired_family(control, treatment, n_boot=profile.n_bootstrap, seed=seed)
        results = results.rename(columns={"seed": "bootstrap_seed"})
        stats = pd.concat([pd.DataFrame(specs), results], axis=1)
        stats.insert(0, "profile", profile_name)
        stats.insert(0, "model", model_name)
        stats = correct_family(
            stats, "p_t", ["model", "profile"], within_columns=["comparison", "metric", "condition"]
        )
        stats = stats.rename(columns={"family": "family_t", "family_size": "family_size_t"})
        stats = correct_family(stats, "p_wilcoxon", ["model", "profile"], within_columns=["comparison", "metric",
                               "condition"], suffix="_wilcoxon")  # fmt: skip
        stats["power_at_n"] = [paired_t_power(abs(d), int(n)) if np.isfinite(d) else np.nan
                               for d, n in zip(stats["d_z"], stats["n"], strict=True)]  # fmt: skip
        stats["survives_bh"] = stats["p_bh"] < 0.05
        rec.timing.samples = len(stats)

        out = store.directory(profile_name, "patching_statistics", model_name)
        rec.artifacts(out)
        write_table(out / "comparisons.parquet", stats, csv=True)
        power = power_table(None, int(stats["n"].iloc[0]))
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
        rec.metrics(n_comparisons=len(stats), n_survive_bh=int(stats["survives_bh"].sum()),
                    n_prompts=int(stats["n"].iloc[0]))  # fmt: skip
    headline = ["comparison", "metric", "emotion", "layer", "alpha", "n", "mean_diff", "d_z",
                "diff_ci_low", "diff_ci_high", "p_bh", "p_bonferroni"]  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out / "comparisons.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(stats)),
            "n_unique_prompts": dg.MetadataValue.int(int(stats["n"].iloc[0])),
            "family": dg.MetadataValue.text(str(stats["family_t"].iloc[0])),
            "n_survive_bh": dg.MetadataValue.int(int(stats["survives_bh"].sum())),
            "n_survive_bonferroni": dg.MetadataValue.int(int((stats["p_bonferroni"] < 0.05).sum())),
            "top_effects": markdown_table(
                survivors[headline] if len(survivors) else stats.nsmallest(10, "p_t")[headline]
            ),
            "power": markdown_table(power),
            **plots,
            **rec.metadata(),
        }
    )


def _volcano(stats: pd.DataFrame, model: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for kind, group in stats.groupby("kind"):
        ax.scatter(group["d_z"], -np.log10(group["p_bh"].clip(lower=1e-300)), s=10, alpha=0.6, label=kind)
    ax.axhline(-np.log10(0.05), color="grey", ls="--", lw=1, label="BH q = 0.05")
    ax.set_xlabel("Cohen's d_z")
    ax.set_ylabel("−log10 BH-corrected p")
    ax.set_title(f"{model}: every comparison of the family")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _p_histogram(stats: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    ax.hist(stats["p_t"].dropna(), bins=20, range=(0, 1), color="steelblue", edgecolor="white")
    ax.set_xlabel("uncorrected paired-t p")
    ax.set_ylabel("comparisons")
    ax.set_title("p-value histogram (uniform under the null)")
    return fig


@dg.asset_check(asset=patching_statistics, description="Every p lies in [0, 1], corrected p ≥ raw p, and "
                "every d_z is finite.")  # fmt: skip
def patching_statistics_sane(
    context: dg.AssetCheckExecutionContext, store: ArtifactStore
) -> dg.AssetCheckResult:
    model_name, profile_name = model_and_profile(context)
    stats = read_table(
        store.existing(profile_name, "patching_statistics", model_name) / "comparisons.parquet"
    )
    p_ok = bool(stats["p_t"].between(0, 1).all() and (stats["p_bh"] >= stats["p_t"] - 1e-12).all())
    d_ok = bool(np.isfinite(stats["d_z"]).all())
    return dg.AssetCheckResult(passed=p_ok and d_ok, metadata={"p_values_ok": p_ok, "d_z_finite": d_ok})


@dg.asset(
    partitions_def=pair_profile_partitions,
    group_name=ALIGNMENT_GROUP,
    deps=[subspace_alignment],
    kinds={"pandas"},
    code_version="1",
    description="Per method and emotion at the best-aligned layer pair: the subspace dimension k chosen by a "
    "stated rule from the bootstrap overlap over prompts compared with the null band.",
)
def k_selection(
    context: dg.AssetExecutionContext, config: RunConfig, store: ArtifactStore, tracking: TrackingResource
) -> dg.MaterializeResult:
    model_a, model_b, profile_name = pair_and_profile(context)
    profile = effective_profile(profile_name, config)
    pair = f"{model_a}__{model_b}"
    sweep = read_table(store.existing(profile_name, "subspace_alignment", pair) / "alignment_sweep.parquet")
    with recorded(
        context, tracking=tracking, store=store, phase="7-statistics", model=pair, profile=profile,
        device="cpu", config=config, throughput_unit="selections",
    ) as rec:  # fmt: skip
        margin = sweep.assign(margin=sweep["overlap"] - sweep["null_p95"])
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
            "path": dg.MetadataValue.path(str(out / "chosen_k.parquet")),
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


def rollup_frames(root: Path, profile: str) -> pd.DataFrame:
    """Every model's patching statistics for ``profile`` that exist on disk, stacked."""
    files = sorted((root / profile / "patching_statistics").glob("*/comparisons.parquet"))
    return pd.concat([read_table(f) for f in files], ignore_index=True) if files else pd.DataFrame()
