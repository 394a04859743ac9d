"""Phase 5: residual steering sweeps (emotion × layer × α, random controls), scored by the evaluators."""

import dagster as dg
import pandas as pd

from emotion_assets.activations import activations, check_steering_layers
from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, json_metadata, progress_logger, refuse_failing_checks
from emotion_assets.confounds import confound_audit
from emotion_assets.context import Phase, evaluator_suite_for
from emotion_assets.dataset import emotion_dataset
from emotion_assets.io import (
    GENERATIONS_FILE,
    RESIDUAL_NORMS_FILE,
    ArtifactHandle,
    activations_of,
    audit_flags,
    vectors_of,
)
from emotion_assets.partitions import causal_model_profile_partitions, profile_to_model_profile
from emotion_assets.plots import heatmap, markdown_table, prompt_shift_plot, save_figure
from emotion_assets.science.statistics import stable_seed
from emotion_assets.science.steering import (
    build_conditions,
    generate_sweep,
    layer_vectors,
    neutral_centered_activations,
    steering_prompts,
)
from emotion_assets.science.steering_analysis import (
    CONDITION_COLUMNS,
    SELECTION_LABEL,
    TARGET_METRICS,
    FluencyBounds,
    attach_fluency,
    condition_fluency,
    continuation_fluency,
    selected_and_confirmed,
    shift_table,
    split_halves,
    steering_examples,
)
from emotion_assets.vectors import emotion_vectors
from jobs.jobs import STEERING_GROUP
from resources.evaluators import EvaluatorResource
from resources.models import ModelResource
from resources.resume import ResumeFolder
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource

# Columns of the best-cell table shown in the asset's metadata (the parquet has them all).
BEST_SHOWN = ["emotion", "status", "layer", "alpha", "selection_shift", "target_shift", "shift_ci_low",
              "shift_ci_high", "p", "p_bh", "random_isotropic_shift", "random_covariance_shift",
              "share_degenerate", "perplexity_ratio", "n_cells_excluded"]  # fmt: skip
STEERABILITY_SHOWN = ["emotion", "layer", "alpha", "n_confirmation", "target_shift", "share_intended",
                      "share_anti", "shift_sd", "shift_iqr"]  # fmt: skip


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    deps=config_deps("residual_patching", causal_model_profile_partitions),
    group_name=STEERING_GROUP,
    ins={
        "emotion_vectors": dg.AssetIn(emotion_vectors.key),
        "activations": dg.AssetIn(activations.key),
        "audit": dg.AssetIn(confound_audit.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    },
    kinds={"pytorch", "parquet"},
    code_version="3",
    pool="model",
    description="Steered generations on eval steering prompts (unfinished neutral openings; eval neutral "
    "fitting prompts when the dataset has none, recorded as steering_prompts_role): baseline, every "
    "emotion × layer × α (α relative to the layer's residual norm, 0 and negative included) and "
    "norm-matched random directions (isotropic, covariance-matched), one row per prompt × condition with every "
    "evaluator score and the continuation's fluency (length, distinct-2, repetition, degenerate, unsteered "
    "log-likelihood). Per condition: shifts with their per-prompt spread and share of prompts moved each way, "
    "share degenerate and perplexity ratio. The best fluent (layer, α) per emotion is selected on half A of "
    "the prompts and its shift, CI and p are reported on half B.",
)
def residual_patching(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    evaluators: EvaluatorResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    emotion_vectors: ArtifactHandle,
    activations: ArtifactHandle,
    audit: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="5-steering", models=models)
    model_name, profile, handle = phase.model, phase.profile, phase.handle
    frame = phase.prompts(dataset)
    prompts, prompts_role = steering_prompts(frame, profile.steering.max_prompts)
    strategy = profile.pooling[0]
    vectors, boundaries = vectors_of(emotion_vectors)
    pooled, index, act_bounds = activations_of(activations)
    check_steering_layers(profile, model_name, handle.geometry.n_layers)  # the right advice comes first
    layers = profile.steering.blocks(handle.geometry.n_layers)
    per_emotion = layer_vectors(vectors, boundaries, strategy, layers, model_name)
    norms = activations.table(RESIDUAL_NORMS_FILE)
    resid_norms = {L: float(norms.loc[norms["boundary"] == L, "mean_residual_norm"].iloc[0]) for L in layers}
    neutral_centered = neutral_centered_activations(pooled[strategy], index, act_bounds, layers)
    conditions = build_conditions(
        per_emotion, resid_norms, layers, profile.steering.alpha_grid, profile.steering.n_random_directions,
        profile.seed, neutral_centered,
    )  # fmt: skip
    gen = profile.generation
    # Batches finished by an interrupted run of this partition are reused, bit for bit (science.batch_cache).
    resume = ResumeFolder.of(store, profile.name, "residual_patching", model_name)
    with phase.recorded(throughput_unit="generated_tokens") as rec:
        # cpu_workers > 1: the sweep's batches spread over processes, each with its own copy of the model.
        with models.workers(handle, profile.cpu_workers) as workers:
            sweep = generate_sweep(
                handle.model, handle.tokenizer, prompts["text"].tolist(), conditions,
                max_new_tokens=gen.max_new_tokens, batch_size=profile.batch_size, decoding=gen.decoding,
                temperature=gen.temperature, top_p=gen.top_p, seed=profile.seed,
                prompt_positions=profile.steering.prompt_positions, device=handle.device,
                progress=progress_logger(context, "generations"), cache=resume, fingerprint=handle.fingerprint,
                workers=workers,
            )  # fmt: skip
            # The unsteered model's log-likelihood of each continuation, batched over the same workers.
            fluency = continuation_fluency(
                handle.model, handle.tokenizer, sweep["prompt"].tolist(), sweep["continuation"].tolist(),
                sweep["n_new_tokens"].tolist(), batch_size=profile.batch_size, device=handle.device,
                cache=resume, fingerprint=handle.fingerprint, workers=workers,
            )  # fmt: skip
        if resume.reused or resume.unreadable:
            context.log.info(
                f"Resumed {resume.reused} generation batches from {resume.path}; generated {resume.written}."
                + (f" Not reusable (computed again): {resume.unreadable}" if resume.unreadable else "")
            )
        rec.timing.samples = int(sweep["n_new_tokens"].sum())
        suite = evaluator_suite_for(evaluators, profile, frame)
        scores = suite.score(
            sweep["continuation"].tolist()
        )  # continuation only; the prompt is kept, unscored
        scored = pd.concat([sweep.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
        scored.insert(1, "prompt_id", prompts["id"].to_numpy()[scored["prompt_index"].to_numpy()])
        # What each continuation costs: text fluency and the unsteered model's log-likelihood (above).
        scored = attach_fluency(scored, fluency)
        split_seed = stable_seed("steering_selection_split", profile.seed)
        halves = split_halves(prompts["id"], split_seed)
        split_record = {
            "seed": split_seed,
            "rule": "unique prompt ids sorted, permuted by numpy default_rng(seed); the first floor(n/2) are A",
            **{half: ids["prompt_id"].tolist() for half, ids in halves.groupby("half")},
        }
        scored.insert(2, "half", scored["prompt_id"].map(halves.set_index("prompt_id")["half"]))
        # `degenerate` (broken-text flag of the suite) is a fluency column, not a score.
        metrics = [m for m in scores.columns if m != "degenerate" and scores[m].notna().any()]
        bounds = FluencyBounds(**profile.steering.fluency.model_dump())
        by_condition = condition_fluency(scored, bounds)
        per_condition = by_condition.drop(columns=CONDITION_COLUMNS[1:])
        shifts = shift_table(scored, metrics, TARGET_METRICS).merge(per_condition, on="condition", how="left")
        best, cells, prompt_shifts = selected_and_confirmed(
            scored, halves, TARGET_METRICS, bounds, n_boot=profile.n_bootstrap,
            seed=stable_seed("residual_patching", model_name, profile.name, profile.seed),
        )  # fmt: skip
        # The blocking check's logic runs on the staged table: a failing sweep is never published.
        refuse_failing_checks(
            "residual_patching",
            str(context.partition_key),
            {"residual_patching_alpha_zero": alpha_zero_check(scored)},
        )

        out = phase.directory("residual_patching")
        rec.artifacts(out)
        write_table(out / "generations.parquet", scored, csv=True)
        write_table(out / "condition_shifts.parquet", shifts, csv=True)
        write_table(out / "prompt_split.parquet", halves, csv=True)
        write_table(out / "selection_cells.parquet", cells, csv=True)
        write_table(out / "best_per_emotion.parquet", best, csv=True)
        write_table(out / "best_cell_prompt_shifts.parquet", prompt_shifts, csv=True)
        emotion_rows = shifts[shifts["kind"] == "emotion"]
        plots = {}
        for emotion, metric in TARGET_METRICS.items():
            rows = emotion_rows[emotion_rows["emotion"] == emotion]
            if rows.empty or f"{metric}_shift" not in rows:
                continue
            grid = rows.pivot_table(index="layer", columns="alpha", values=f"{metric}_shift")
            plots[f"heatmap_{emotion}"] = save_figure(
                heatmap(grid.to_numpy(), list(grid.index), list(grid.columns),
                        f"{model_name}: shift in {metric} when steering {emotion}", "α", "layer"),
                out / f"shift_heatmap_{emotion}.png",
            )  # fmt: skip
        if len(prompt_shifts):
            plots["prompt_shift_distribution"] = save_figure(
                prompt_shift_plot(prompt_shifts, best, model_name), out / "prompt_shift_distribution.png"
            )
        confirmed = best[best["status"] == "confirmed"]
        examples = steering_examples(scored, confirmed)
        excluded = cells.loc[~cells["fluent"], ["emotion", "layer", "alpha", "selection_shift", "share_degenerate",
                                                "perplexity_ratio", "fluency_exclusion"]]  # fmt: skip
        baseline = by_condition[by_condition["kind"] == "baseline"].iloc[0]
        rec.metrics(**{f"best_shift_{r.emotion}": r.target_shift for r in confirmed.itertuples()})
    resumed = resume.describe()
    resume.clear()  # the version is published: its batches are no longer needed
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "generations.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(scored)),
            "n_prompts": dg.MetadataValue.int(len(prompts)),
            "steering_prompts_role": dg.MetadataValue.text(prompts_role),
            # What the confound audit says of the steered vectors: read every shift with it.
            "confound_flags": json_metadata(audit_flags(audit, strategy, layers)),
            "n_conditions": dg.MetadataValue.int(len(conditions)),
            "generated_tokens_per_s": dg.MetadataValue.float(round(rec.timing.throughput_per_s, 1)),
            "selection": dg.MetadataValue.text(
                f"{SELECTION_LABEL}: per emotion the fluent (layer, α) with the largest shift of its target "
                "score on half A; shift, CI and p measured on half B only"
            ),
            "selection_split": json_metadata(split_record),
            "best_per_emotion": markdown_table(best.reindex(columns=BEST_SHOWN)),
            "fluency_bounds": json_metadata(bounds.describe()),
            "baseline_fluency": json_metadata(
                {k: baseline[k] for k in ("share_degenerate", "perplexity", "distinct_2", "repetition_rate")}
            ),
            "n_cells": dg.MetadataValue.int(len(cells)),
            "n_cells_excluded": dg.MetadataValue.int(len(excluded)),
            "cells_excluded": markdown_table(excluded, max_rows=40),
            "steerability": markdown_table(confirmed.reindex(columns=STEERABILITY_SHOWN)),
            "examples": markdown_table(examples, max_rows=12),
            "null_metrics": dg.MetadataValue.json(suite.null_reasons),
            "resumed_batches": json_metadata(resumed),
            **plots,
            **rec.metadata(),
        }
    )


@dg.asset_check(asset=residual_patching, blocking=True, description="α = 0 rows reproduce the unsteered "
                "baseline continuation for every prompt (greedy decoding).")  # fmt: skip
def residual_patching_alpha_zero(residual_patching: ArtifactHandle) -> dg.AssetCheckResult:
    scored = residual_patching.table(GENERATIONS_FILE)
    return alpha_zero_check(scored)


def alpha_zero_check(scored: pd.DataFrame) -> dg.AssetCheckResult:
    """The logic of ``residual_patching_alpha_zero`` on a generations table: every α = 0 row continues its
    prompt exactly as the baseline row of that prompt does."""
    base = scored[scored["kind"] == "baseline"].set_index("prompt_index")["continuation"]
    zero = scored[(scored["kind"] == "emotion") & (scored["alpha"] == 0)]
    missing = sorted(set(zero["prompt_index"]) - set(base.index))
    present = zero[zero["prompt_index"].isin(base.index)]
    differs = present["continuation"].to_numpy() != base.loc[present["prompt_index"]].to_numpy()
    mismatches = int(differs.sum()) + len(missing)
    return dg.AssetCheckResult(
        passed=mismatches == 0,
        description=(
            f"{mismatches} of {len(zero)} α = 0 rows differ from the unsteered baseline"
            + (f" or have none ({len(missing)} prompts)" if missing else "")
            + ": the steering hook changes the model even when it adds nothing (check the hook and decoding)."
            if mismatches
            else "Every α = 0 row equals the unsteered baseline."
        ),
        metadata={"alpha_zero_rows": len(zero), "mismatches": mismatches},
    )
