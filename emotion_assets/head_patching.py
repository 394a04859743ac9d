"""Phase 6: ``head_patching``, greedy continuations with an emotion's top heads ablated or patched.

Conditions, folds and the shift tables: :mod:`emotion_assets.science.head_conditions`.
"""

import dagster as dg
import pandas as pd

from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, all_emotion_words, refuse_failing_checks
from emotion_assets.context import Phase, evaluator_suite_for
from emotion_assets.head_screening import head_screening, screened_head_inputs
from emotion_assets.io import GENERATIONS_FILE, SCREENING_FILE, SPLIT_FILE, ArtifactHandle, vectors_of
from emotion_assets.partitions import causal_model_profile_partitions
from emotion_assets.plots import markdown_table
from emotion_assets.science.crossfit import fold_plans
from emotion_assets.science.head_checks import crossfit_outcome, patching_outcome
from emotion_assets.science.head_conditions import (
    POOLED_FOLD,
    fold_generations,
    neutral_mean_head_outputs,
    shift_table,
    top_vs_random,
)
from emotion_assets.science.head_pairs import check_split_matches, emotions_of, prompt_pair, sub_pair
from emotion_assets.science.heads import head_layout
from emotion_assets.science.steering_analysis import TARGET_METRICS
from jobs.jobs import HEADS_GROUP
from resources.evaluators import EvaluatorResource
from resources.models import ModelResource
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource

SENTIMENT = "sentiment_compound"
PATCHING_ASSET = "head_patching"


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    deps=config_deps("head_patching", causal_model_profile_partitions),
    group_name=HEADS_GROUP,
    ins=screened_head_inputs(),
    kinds={"pytorch", "parquet"},
    code_version="3",
    pool="model",
    description="Greedy continuations with the top-N screened heads ablated (zero, mean; single and joint) "
    "or patched between paired emotion and neutral prompts (z, v_only, pattern_v), next to random-head "
    "controls; one row per prompt × condition with every evaluator score of the continuation.",
)
def head_patching(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    evaluators: EvaluatorResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    head_screening: ArtifactHandle,
    emotion_vectors: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    """Does removing or transplanting an emotion's top heads change what the model writes?

    Cross-fitted: per emotion and fold, the top-N heads by |ablation effect| on one half of the prompt pairs
    (``head_screening``) are measured on the other half (fold ``A_to_B``: chosen on A, measured on B; and
    ``B_to_A``). The folds' rows are concatenated: every prompt is continued once per condition, with heads
    chosen on the half it is not in. Each row stores ``fold``, ``selection_half``, ``measurement_half`` and
    ``selected_on_prompt_ids`` (every prompt id of the selecting half) beside its own ``prompt_id`` and
    ``source_prompt_id``; the blocking check ``head_patching_crossfit`` verifies from them that no head set
    was measured on a prompt that selected it. Random-head controls are drawn per fold, never a top head of
    that fold. Conditions:

    - ``baseline``: no intervention, on the emotion prompts and on the neutral prompts;
    - ``ablation``: each top head alone and all jointly, zero and mean (mean over train neutral prompts),
      on the emotion prompts;
    - ``patch``: the top heads jointly, ``neutral_to_emotion`` (destination = neutral prompts, source = the
      paired emotion prompts) and ``emotion_to_neutral`` (destination = emotion prompts, source = neutral
      prompts), modes ``z``, ``v_only``, ``pattern_v``, at positions where both prompts have real tokens;
    - ``random_ablation`` / ``random_patch``: 2 seeds of N random heads (never a top head), joint zero
      ablation and joint ``z`` patching in both directions.

    When interventions act. Ablations act on every forward, prompt and generated tokens alike. Patches act
    on the **prefill** only: their source tensors exist for the prompt's positions, not for tokens the
    destination has not generated yet. The patched prompt still shapes every generated token, through the
    residual stream of later layers and their key/value cache; the patched heads' own outputs at generated
    tokens are the destination's. Greedy decoding, ``profile.generation.max_new_tokens``; the continuation
    only is scored. ``condition_shifts`` pairs every condition with the baseline on the same prompts.
    """
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="6-heads", models=models)
    handle, profile = phase.handle, phase.profile
    frame = phase.prompts(dataset)
    screening = head_screening.table(SCREENING_FILE)
    splits = head_screening.table(SPLIT_FILE)
    vectors, _ = vectors_of(emotion_vectors)
    emotions = [
        e
        for e in emotions_of(vectors, profile.pooling[0], list(TARGET_METRICS))
        if e in set(screening["emotion"])
    ]
    layout = head_layout(handle.model)
    with phase.recorded(throughput_unit="generations") as rec:
        mean_z = neutral_mean_head_outputs(
            handle.model, handle.tokenizer, handle.device, frame, profile.max_prompt_tokens
        )
        rows = []
        # cpu_workers > 1: each batch of rows runs in one of that many processes, each with the model.
        with models.workers(handle, profile.cpu_workers) as workers:
            for number, emotion in enumerate(emotions, start=1):
                context.log.info(f"Generating the {emotion} conditions ({number} of {len(emotions)})")
                pair = prompt_pair(
                    handle.tokenizer, handle.device, frame, emotion, profile.heads.max_prompts,
                    profile.max_prompt_tokens, all_emotion_words(),
                )  # fmt: skip
                split = splits[splits["emotion"] == emotion]
                check_split_matches(split, pair)
                for plan in fold_plans(split, screening, profile.heads.top_n):
                    rows += fold_generations(
                        handle.model, handle.tokenizer, plan, sub_pair(pair, plan.measurement_pairs), layout,
                        mean_z, profile.generation.max_new_tokens, profile.seed, profile.batch_size, workers,
                    )  # fmt: skip
        generations = pd.DataFrame(rows)
        rec.timing.samples = len(generations)
        suite = evaluator_suite_for(evaluators, profile, frame)
        scores = suite.score(generations["continuation"].tolist())  # the continuation only
        scored = pd.concat([generations.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
        scored["seed"] = scored["seed"].astype("Int64")
        metrics = {e: [m for m in (TARGET_METRICS[e], SENTIMENT) if m in scored] for e in emotions}
        shifts = shift_table(scored, metrics)
        comparison = top_vs_random(shifts)
        # The blocking check's logic runs on the staged table: an incomplete sweep is never published.
        refuse_failing_checks(
            PATCHING_ASSET,
            str(context.partition_key),
            {
                "head_patching_complete": patching_check(scored),
                "head_patching_crossfit": crossfit_check(scored, splits),
            },
        )

        out = phase.directory(PATCHING_ASSET)
        rec.artifacts(out)
        write_table(out / "generations.parquet", scored, csv=True)
        write_table(out / "condition_shifts.parquet", shifts, csv=True)
        write_table(out / "top_vs_random.parquet", comparison, csv=True)
        rec.metrics(**{
            f"top_target_shift_{r.emotion}_{r.intervention.replace(' ', '_')}": r.top_target_shift
            for r in comparison.itertuples()
        })  # fmt: skip
        examples = scored[
            scored["kind"].isin(["baseline", "ablation", "patch"]) & (scored["pair_index"] == 0)
        ]
        examples = examples[examples["scope"] != "single"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "generations.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(scored)),
            "n_conditions": dg.MetadataValue.int(int(scored.groupby(["emotion", "condition"]).ngroups)),
            "top_vs_random": markdown_table(comparison),
            "selection": dg.MetadataValue.text(
                "Cross-fitted: top heads chosen on one half of each emotion's prompt pairs, measured on the "
                "other; every number pools both folds (see condition_shifts fold = both)."
            ),
            "heads_by_fold": markdown_table(
                scored[scored["kind"] == "patch"].drop_duplicates(["emotion", "fold"])[
                    ["emotion", "fold", "selection_half", "measurement_half", "heads"]
                ]
            ),
            "condition_shifts": markdown_table(
                shifts.loc[
                    shifts["fold"] == POOLED_FOLD,
                    ["emotion", "condition", "n_prompts", "n_changed", "target_shift", "sentiment_shift"],
                ],
                max_rows=40,
            ),
            "examples": markdown_table(
                examples[["emotion", "condition", "prompt", "continuation"]], max_rows=30
            ),
            "null_metrics": dg.MetadataValue.json(suite.null_reasons),
            **rec.metadata(),
        }
    )


@dg.asset_check(asset=head_patching, blocking=True, description="Every condition of every emotion has a "
                "continuation for every prompt of its prompt set, exactly once.")  # fmt: skip
def head_patching_complete(head_patching: ArtifactHandle) -> dg.AssetCheckResult:
    scored = head_patching.table(GENERATIONS_FILE)
    return patching_check(scored)


def patching_check(scored: pd.DataFrame) -> dg.AssetCheckResult:
    """``head_patching_complete`` on a generations table (``science.head_checks.patching_outcome``)."""
    return dg.AssetCheckResult(**vars(patching_outcome(scored)))


@dg.asset_check(asset=head_patching, blocking=True, description="Cross-fitting holds row by row: no head set "
                "is measured on a prompt of the half that selected it, and every prompt is measured by each "
                "condition in exactly one fold.",
                additional_ins={"head_screening": dg.AssetIn(head_screening.key)})  # fmt: skip
def head_patching_crossfit(
    head_patching: ArtifactHandle, head_screening: ArtifactHandle
) -> dg.AssetCheckResult:
    return crossfit_check(head_patching.table(GENERATIONS_FILE), head_screening.table(SPLIT_FILE))


def crossfit_check(scored: pd.DataFrame, split: pd.DataFrame) -> dg.AssetCheckResult:
    """``head_patching_crossfit`` on the tables (``science.head_checks.crossfit_outcome``)."""
    return dg.AssetCheckResult(**vars(crossfit_outcome(scored, split)))
