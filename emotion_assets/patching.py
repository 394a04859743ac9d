"""Phase 5: residual steering sweeps (emotion × layer × α, random controls), scored by the evaluators."""

import dagster as dg
import numpy as np
import pandas as pd
import torch

from emotion_assets.activations import check_steering_layers, load_activations
from emotion_assets.common import (
    RunConfig,
    effective_profile,
    json_metadata,
    limit_for_run,
    load_dataset,
    progress_logger,
    recorded,
    refuse_failing_checks,
)
from emotion_assets.confounds import audit_flags, confound_audit
from emotion_assets.dataset import emotion_dataset, evaluator_suite_for
from emotion_assets.partitions import (
    causal_model_profile_partitions,
    model_and_profile,
    profile_to_model_profile,
)
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.prompts import fitting_mask, steering_starts
from emotion_assets.science.steering import build_conditions, generate_sweep
from emotion_assets.vectors import emotion_vectors, load_vectors
from jobs.jobs import STEERING_GROUP
from resources.evaluators import EvaluatorResource
from resources.models import ModelResource
from resources.storage import ArtifactStore, read_table, write_table
from resources.tracking import TrackingResource

NEUTRAL = "neutral"
# The evaluator score each emotion's steering should move (all are probabilities in [0, 1]).
TARGET_METRICS = {"gratitude": "emotion_gratitude", "anger": "emotion_anger", "apology": "emotion_apology"}
CONDITION_COLUMNS = ["condition", "kind", "emotion", "layer", "alpha", "seed"]


def steering_prompts(frame: pd.DataFrame, max_prompts: int | None) -> tuple[pd.DataFrame, str]:
    """Eval-split ``steering_prompt`` rows (else eval neutral fitting rows), in id order, optionally capped,
    and the role they have; neither was used to fit the vectors."""
    prompts, role = steering_starts(frame)
    return (prompts.head(max_prompts) if max_prompts else prompts), role


def shift_table(scored: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per condition: mean score and mean paired shift against the unsteered baseline, per metric."""
    baseline = scored[scored["kind"] == "baseline"].set_index("prompt_index")[metrics]
    rows = []
    for keys, group in scored.groupby(CONDITION_COLUMNS, dropna=False, sort=False):
        paired = group.set_index("prompt_index")[metrics] - baseline.loc[group["prompt_index"]].to_numpy()
        row = dict(zip(CONDITION_COLUMNS, keys, strict=True))
        row["n_prompts"] = group["prompt_index"].nunique()
        for metric in metrics:
            row[f"{metric}_mean"] = float(group[metric].mean())
            row[f"{metric}_shift"] = float(paired[metric].mean())
        rows.append(row)
    return pd.DataFrame(rows)


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    group_name=STEERING_GROUP,
    deps=[
        emotion_vectors,
        confound_audit,
        dg.AssetDep(emotion_dataset, partition_mapping=profile_to_model_profile),
    ],
    kinds={"pytorch", "parquet"},
    code_version="2",
    pool="model",
    description="Steered generations on eval steering prompts (unfinished neutral openings; eval neutral "
    "fitting prompts when the dataset has none, recorded as steering_prompts_role): baseline, every "
    "emotion × layer × α (α relative to the layer's residual norm, 0 and negative included) and "
    "norm-matched random directions (isotropic, covariance-matched), one row per prompt × condition with every evaluator score.",
)
def residual_patching(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    evaluators: EvaluatorResource,
    store: ArtifactStore,
    tracking: TrackingResource,
) -> dg.MaterializeResult:
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    handle = models.get(model_name, device=config.device)
    frame = limit_for_run(load_dataset(store, profile_name), profile)
    prompts, prompts_role = steering_prompts(frame, profile.steering.max_prompts)
    strategy = profile.pooling[0]
    vectors, boundaries = load_vectors(store, profile_name, model_name)
    pooled, index, act_bounds = load_activations(store, profile_name, model_name)
    check_steering_layers(profile, model_name, handle.geometry.n_layers)  # the right advice comes first
    missing = [layer for layer in profile.steering.layers if layer not in boundaries]
    if missing:
        raise ValueError(
            f"Steering layers {missing} have no emotion vectors for {model_name} (captured: {boundaries}). "
            "Re-materialize activations and emotion_vectors for this profile."
        )
    layers = list(profile.steering.layers)
    emotions = sorted({key.split("/")[1] for key in vectors if key.startswith(f"{strategy}/")})
    per_emotion = {e: {L: vectors[f"{strategy}/{e}"][boundaries.index(L)] for L in layers} for e in emotions}
    norms = read_table(store.existing(profile_name, "activations", model_name) / "residual_norms.parquet")
    resid_norms = {L: float(norms.loc[norms["boundary"] == L, "mean_residual_norm"].iloc[0]) for L in layers}
    neutral_train = torch.as_tensor(
        ((index["split"] == "train") & (index["emotion"] == NEUTRAL)).to_numpy() & fitting_mask(index)
    )
    neutral_centered = {}
    for layer in layers:
        x = pooled[strategy][neutral_train, act_bounds.index(layer)]  # [m, d_model]
        neutral_centered[layer] = x - x.mean(dim=0, keepdim=True)
    conditions = build_conditions(
        per_emotion, resid_norms, layers, profile.steering.alpha_grid, profile.steering.n_random_directions,
        profile.seed, neutral_centered,
    )  # fmt: skip
    gen = profile.generation
    with recorded(
        context, tracking=tracking, store=store, phase="5-steering", model=model_name, profile=profile,
        device=str(handle.device), config=config, throughput_unit="generated_tokens",
    ) as rec:  # fmt: skip
        sweep = generate_sweep(
            handle.model, handle.tokenizer, prompts["text"].tolist(), conditions,
            max_new_tokens=gen.max_new_tokens, batch_size=profile.batch_size, decoding=gen.decoding,
            temperature=gen.temperature, top_p=gen.top_p, seed=profile.seed,
            prompt_positions=profile.steering.prompt_positions, device=handle.device,
            progress=progress_logger(context, "generations"),
        )  # fmt: skip
        rec.timing.samples = int(sweep["n_new_tokens"].sum())
        suite = evaluator_suite_for(evaluators, profile, frame)
        scores = suite.score(
            sweep["continuation"].tolist()
        )  # continuation only; the prompt is kept, unscored
        scored = pd.concat([sweep.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
        scored.insert(1, "prompt_id", prompts["id"].to_numpy()[scored["prompt_index"].to_numpy()])
        # `degenerate` (broken-text flag of the suite) stays in the generations table; it is not a score.
        metrics = [m for m in scores.columns if m != "degenerate" and scores[m].notna().any()]
        shifts = shift_table(scored, metrics)
        # The blocking check's logic runs on the staged table: a failing sweep is never published.
        refuse_failing_checks(
            "residual_patching",
            str(context.partition_key),
            {"residual_patching_alpha_zero": alpha_zero_check(scored)},
        )

        out = store.directory(profile_name, "residual_patching", model_name)
        rec.artifacts(out)
        write_table(out / "generations.parquet", scored, csv=True)
        write_table(out / "condition_shifts.parquet", shifts, csv=True)
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
        best = _best_per_emotion(shifts)
        write_table(out / "best_per_emotion.parquet", best, csv=True)
        examples = _examples(scored, best)
        rec.metrics(**{f"best_shift_{r.emotion}": r.target_shift for r in best.itertuples()})
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out / "generations.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(scored)),
            "n_prompts": dg.MetadataValue.int(len(prompts)),
            "steering_prompts_role": dg.MetadataValue.text(prompts_role),
            # What the confound audit says of the steered vectors: read every shift with it.
            "confound_flags": json_metadata(audit_flags(store, profile_name, model_name, strategy, layers)),
            "n_conditions": dg.MetadataValue.int(len(conditions)),
            "generated_tokens_per_s": dg.MetadataValue.float(round(rec.timing.throughput_per_s, 1)),
            "best_per_emotion": markdown_table(best),
            "examples": markdown_table(examples, max_rows=12),
            "null_metrics": dg.MetadataValue.json(suite.null_reasons),
            **plots,
            **rec.metadata(),
        }
    )


def _best_per_emotion(shifts: pd.DataFrame) -> pd.DataFrame:
    """Per emotion: the (layer, α) with the largest shift in its target score, next to the random controls
    at the same (layer, α) (mean and max over control directions)."""
    rows = []
    for emotion, metric in TARGET_METRICS.items():
        column = f"{metric}_shift"
        candidates = shifts[
            (shifts["kind"] == "emotion") & (shifts["emotion"] == emotion) & (shifts["alpha"] != 0)
        ]
        if candidates.empty or column not in shifts:
            continue
        top = candidates.loc[candidates[column].idxmax()]
        controls = shifts[shifts["kind"].str.startswith("random") & (shifts["layer"] == top["layer"])
                          & np.isclose(shifts["alpha"], top["alpha"])]  # fmt: skip
        rows.append({
            "emotion": emotion, "metric": metric, "layer": int(top["layer"]), "alpha": float(top["alpha"]),
            "target_shift": float(top[column]),
            "random_mean_shift": float(controls[column].mean()) if len(controls) else float("nan"),
            "random_max_shift": float(controls[column].max()) if len(controls) else float("nan"),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _examples(scored: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Baseline and best-condition continuations for the first few prompts."""
    rows = []
    for item in best.itertuples():
        chosen = scored[(scored["kind"] == "emotion") & (scored["emotion"] == item.emotion)
                        & (scored["layer"] == item.layer) & np.isclose(scored["alpha"], item.alpha)]  # fmt: skip
        for row in chosen.head(3).itertuples():
            base = scored[(scored["kind"] == "baseline") & (scored["prompt_index"] == row.prompt_index)]
            rows.append({"emotion": item.emotion, "layer": item.layer, "alpha": item.alpha, "prompt": row.prompt,
                         "baseline": base["continuation"].iloc[0], "steered": row.continuation})  # fmt: skip
    return pd.DataFrame(rows)


@dg.asset_check(asset=residual_patching, blocking=True, description="α = 0 rows reproduce the unsteered "
                "baseline continuation for every prompt (greedy decoding).")  # fmt: skip
def residual_patching_alpha_zero(
    context: dg.AssetCheckExecutionContext, store: ArtifactStore
) -> dg.AssetCheckResult:
    model_name, profile_name = model_and_profile(context)
    scored = read_table(store.existing(profile_name, "residual_patching", model_name) / "generations.parquet")
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
