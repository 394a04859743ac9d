"""Phase 8: ``emotion_circuits``, the top heads of each emotion as circuit parts, cross-fitted.

Readouts, roles and circuit effects: :mod:`emotion_assets.science.circuit_effects`.
"""

import dagster as dg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, all_emotion_words
from emotion_assets.context import Phase
from emotion_assets.head_screening import screened_head_inputs
from emotion_assets.io import SCREENING_FILE, SPLIT_FILE, ArtifactHandle, vectors_of
from emotion_assets.partitions import causal_model_profile_partitions
from emotion_assets.plots import markdown_table, save_figure
from emotion_assets.science.circuit_effects import (
    CircuitInputs,
    circuit_summary,
    effects_table,
    fold_circuit,
    pooled_circuit_effects,
)
from emotion_assets.science.crossfit import fold_plans
from emotion_assets.science.head_pairs import (
    check_split_matches,
    emotions_of,
    final_direction,
    prompt_pair,
    sub_pair,
)
from emotion_assets.science.heads import head_layout
from emotion_assets.science.steering_analysis import TARGET_METRICS
from jobs.jobs import HEADS_GROUP
from resources.models import ModelResource
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource

CIRCUITS_ASSET = "emotion_circuits"
HEADS_SHOWN = ["emotion", "fold", "rank", "layer", "head", "role", "selection_effect", "ablation_effect", "ov_gain",
               "ov_cosine_own", "attention_emotion_words", "attention_neutral_same_positions", "ov_top_tokens"]  # fmt: skip


def _joint_vs_sum_plot(effects: pd.DataFrame, title: str) -> plt.Figure:
    emotions = list(dict.fromkeys(effects["emotion"]))
    fig, axes = plt.subplots(1, len(emotions), figsize=(3.6 * len(emotions), 3.4), squeeze=False)
    for ax, emotion in zip(axes[0], emotions, strict=True):
        rows = effects[effects["emotion"] == emotion]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, rows["joint_effect"], width=0.4, label="joint")
        ax.bar(x + 0.2, rows["sum_single_effects"], width=0.4, label="sum of singles")
        ax.set_xticks(x, [name.replace("_", "\n") for name in rows["intervention"]], fontsize=7)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(emotion)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("Δ readout (final boundary)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    deps=config_deps("emotion_circuits", causal_model_profile_partitions),
    group_name=HEADS_GROUP,
    ins=screened_head_inputs(),
    kinds={"pytorch", "parquet"},
    code_version="3",
    pool="model",
    description="The top heads per emotion as circuit parts, cross-fitted (heads chosen on one half of the "
    "prompts, measured on the other): OV image of the emotion vector (gain, cosine, promoted tokens), "
    "attention from the final token to emotion words, a role, and joint vs summed single effects of "
    "ablating the heads (with and without their layers' MLPs) and of patching them.",
)
def emotion_circuits(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    head_screening: ArtifactHandle,
    emotion_vectors: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    """OV, QK, roles and circuit effects of each emotion's top-N heads, per cross-fitted fold.

    Folds: the top-N heads of half ``A`` (``head_screening``) are analysed on the pairs of half ``B`` and
    vice versa (``fold_circuit``); every row stores its fold, halves and the prompt ids that selected and
    measured it. ``circuit_effects.parquet`` adds fold ``both``: the folds pooled per prompt.

    OV: ``ov_circuit`` of the emotion vector at the head's ``resid_pre`` boundary (the last captured one
    before it when that block was not captured: ``boundary_in``), cosines with every emotion's vector at
    the first captured boundary ``>= layer + 1`` (``boundary_out``). QK: attention mass from the final
    token to emotion-word tokens on the emotion prompts. Neutral prompts contain no emotion words (their
    own value would be 0 by construction), so the neutral reference is the attention of the paired
    neutral prompt to the **same positions** (same distance from the end under left padding, real tokens
    only): it separates attending to the emotion word from attending to that position. Rows whose emotion
    prompt has no emotion-word token are left out of both means. Role: ``role_heuristic`` with the effect
    threshold at the 75th percentile of |ablation effect| over every head screened on the measurement
    half. Circuit effects: see ``circuit_effects``.
    """
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="8-circuits", models=models)
    handle, profile = phase.handle, phase.profile
    frame = phase.prompts(dataset)
    screening = head_screening.table(SCREENING_FILE)
    splits = head_screening.table(SPLIT_FILE)
    vectors, boundaries = vectors_of(emotion_vectors)
    strategy = profile.pooling[0]
    emotions = [
        e for e in emotions_of(vectors, strategy, list(TARGET_METRICS)) if e in set(screening["emotion"])
    ]
    n_layers = head_layout(handle.model).n_layers
    with phase.recorded(throughput_unit="heads") as rec:
        head_rows, effect_tables = [], []
        for emotion in emotions:
            pair = prompt_pair(
                handle.tokenizer, handle.device, frame, emotion, profile.heads.max_prompts,
                profile.max_prompt_tokens, all_emotion_words(),
            )  # fmt: skip
            split = splits[splits["emotion"] == emotion]
            check_split_matches(split, pair)
            inputs = CircuitInputs(
                vectors, boundaries, strategy, emotions,
                final_direction(vectors, boundaries, strategy, emotion, n_layers), n_layers,
                profile.batch_size,
            )  # fmt: skip
            for plan in fold_plans(split, screening, profile.heads.top_n):
                rows, table = fold_circuit(
                    handle.model,
                    handle.tokenizer,
                    plan,
                    sub_pair(pair, plan.measurement_pairs),
                    screening,
                    inputs,
                )
                head_rows += rows
                effect_tables.append(table)
        rec.timing.samples = len(head_rows)
        heads_table = pd.DataFrame(head_rows)
        folds = pd.concat(effect_tables, ignore_index=True)
        pooled = pooled_circuit_effects(folds)
        effects = effects_table(folds, pooled)
        summary = circuit_summary(heads_table, pooled)

        out = phase.directory(CIRCUITS_ASSET)
        rec.artifacts(out)
        write_table(out / "heads.parquet", heads_table, csv=True)
        write_table(out / "circuit_effects.parquet", effects, csv=True)
        write_table(out / "summary.parquet", summary, csv=True)
        plot = save_figure(
            _joint_vs_sum_plot(
                pooled, f"{phase.model}: joint vs summed single effects (top heads, held out)"
            ),
            out / "joint_vs_sum.png",
        )
        rec.metrics(**{f"ratio_{r.emotion}_{r.intervention}": r.ratio for r in pooled.itertuples()})
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "heads.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(heads_table)),
            "selection": dg.MetadataValue.text(
                "Cross-fitted: each fold's heads were selected on one half of the prompt pairs "
                "(selection_half) and every number here is measured on the other half (measurement_half)."
            ),
            "summary": markdown_table(summary),
            "heads": markdown_table(heads_table[HEADS_SHOWN], max_rows=60),
            "circuit_effects": markdown_table(
                effects.drop(columns=["heads", "selected_on_prompt_ids", "measured_on_prompt_ids"]),
                max_rows=60,
            ),
            "joint_vs_sum": plot,
            **rec.metadata(),
        }
    )
