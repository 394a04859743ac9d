"""Phase 6: ``head_screening``, every attention head scored per emotion on each half of its prompt pairs.

Prompt pairs: :mod:`emotion_assets.science.head_pairs`; readout and screen: :mod:`emotion_assets.science.head_screen`.
"""

import dagster as dg
import pandas as pd

from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, all_emotion_words, json_metadata, refuse_failing_checks
from emotion_assets.confounds import confound_audit
from emotion_assets.context import Phase
from emotion_assets.dataset import emotion_dataset
from emotion_assets.io import SCREENING_FILE, SPLIT_FILE, ArtifactHandle, audit_flags, vectors_of
from emotion_assets.partitions import (
    REGISTRY,
    causal_model_profile_partitions,
    model_and_profile,
    profile_to_model_profile,
)
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.crossfit import HALVES
from emotion_assets.science.head_checks import screening_outcome
from emotion_assets.science.head_pairs import crossfit_split, emotions_of, final_direction, prompt_pair
from emotion_assets.science.head_screen import screen_emotion, screening_table
from emotion_assets.science.heads import head_layout
from emotion_assets.science.statistics import stable_seed
from emotion_assets.science.steering_analysis import TARGET_METRICS
from emotion_assets.vectors import emotion_vectors
from jobs.jobs import HEADS_GROUP
from resources.models import ModelResource
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource

SCREENING_ASSET = "head_screening"
TOP_HEADS_SHOWN = ["emotion", "label", "rank", "layer", "head", "selection_effect", "held_out_effect",
                   "held_out_ci_low", "held_out_ci_high", "n_held_out"]  # fmt: skip


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    deps=config_deps("head_screening", causal_model_profile_partitions),
    group_name=HEADS_GROUP,
    ins={
        "emotion_vectors": dg.AssetIn(emotion_vectors.key),
        "audit": dg.AssetIn(confound_audit.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    },
    kinds={"pytorch", "parquet"},
    code_version="4",
    description="Every attention head scored per emotion on each half of a seeded split of the eval prompt "
    "pairs (cross-fitting): forward-only zero-ablation effect on the final-boundary emotion readout and the "
    "attribution-patching estimate; each half's top-N heads with their held-out effect on the other half.",
)
def head_screening(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    emotion_vectors: ArtifactHandle,
    audit: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    """Ablation screening and attribution for every ``(layer, head)``, on each half of the prompts.

    Split. Each emotion's eval prompt pairs are split into halves ``A`` and ``B`` by a seeded hash of the
    emotion prompt's id (``split.parquet``: pair, both prompt ids, half, seed). Every score below is
    computed on each half separately (``screening.parquet`` has one row per emotion × half × head; ``rank``
    is within the half): heads chosen on one half are measured by ``head_patching`` and
    ``emotion_circuits`` on the other (``science/crossfit.py``).

    ``ablation_effect``: mean change of the readout on the half's emotion prompts when the head's output is
    zeroed at every position (``screen_heads_by_ablation``). ``attribution``: the linear estimate of the
    readout change on the paired neutral prompts when the head's output is copied from the emotion prompts
    at shared positions (``attribution_scores``). Heads that carry the emotion have opposite signs on the
    two scores: agreement shows as a **negative** correlation.

    Honest maxima (``top_heads.parquet``): each half's top-N heads, labelled with the half that selected
    them, with the selection effect (a maximum, biased away from 0) beside the held-out per-prompt effect on
    the other half and its bootstrap CI, the number to report.
    """
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="6-heads", models=models)
    handle, profile = phase.handle, phase.profile
    frame = phase.prompts(dataset)
    vectors, boundaries = vectors_of(emotion_vectors)
    strategy = profile.pooling[0]
    layout = head_layout(handle.model)
    n_layers = layout.n_layers
    every_head = [(ly, h) for ly in range(n_layers) for h in range(layout.n_heads)]
    emotions = emotions_of(vectors, strategy, list(TARGET_METRICS))
    top_n = profile.heads.top_n
    with phase.recorded(throughput_unit="head_scores") as rec:
        screens = []
        # cpu_workers > 1: the two halves of each emotion are screened in processes with their own model.
        with models.workers(handle, profile.cpu_workers) as workers:
            for number, emotion in enumerate(emotions, start=1):
                context.log.info(
                    f"Screening {len(every_head)} heads for {emotion} ({number} of {len(emotions)})"
                )
                pair = prompt_pair(
                    handle.tokenizer, handle.device, frame, emotion, profile.heads.max_prompts,
                    profile.max_prompt_tokens, all_emotion_words(),
                )  # fmt: skip
                screens.append(screen_emotion(
                    handle.model, pair, crossfit_split(pair, emotion, profile.seed),
                    final_direction(vectors, boundaries, strategy, emotion, n_layers), every_head,
                    profile.heads.screening, top_n=top_n, n_boot=profile.n_bootstrap,
                    seed=stable_seed(profile.seed, "head_screening", phase.model), workers=workers,
                ))  # fmt: skip
        rec.timing.samples = len(every_head) * len(emotions) * len(HALVES)
        screening = screening_table([s.scores for s in screens], n_layers, strategy)
        split = pd.concat([s.split for s in screens], ignore_index=True)
        top = pd.concat([s.top for s in screens], ignore_index=True)
        correlations = pd.DataFrame([row for s in screens for row in s.correlations])
        # The blocking check's logic runs on the staged table: an incomplete screen is never published.
        refuse_failing_checks(
            SCREENING_ASSET,
            str(context.partition_key),
            {"head_screening_complete": screening_check(screening, split, layout.n_layers, layout.n_heads)},
        )

        out = phase.directory(SCREENING_ASSET)
        rec.artifacts(out)
        write_table(out / "screening.parquet", screening, csv=True)
        write_table(out / "split.parquet", split, csv=True)
        write_table(out / "top_heads.parquet", top, csv=True)
        write_table(out / "correlations.parquet", correlations, csv=True)
        plots = {}
        for emotion in emotions:
            for half in HALVES:
                rows = screening[(screening["emotion"] == emotion) & (screening["half"] == half)]
                grid = rows.pivot_table(index="layer", columns="head", values="ablation_effect")
                plots[f"ablation_effect_heatmap_{emotion}_{half}"] = save_figure(
                    heatmap(grid.to_numpy(), list(grid.index), list(grid.columns),
                            f"{phase.model}: zero-ablation effect on the {emotion} readout, half {half}",
                            "head", "layer"),
                    out / f"ablation_effect_heatmap_{emotion}_{half}.png",
                )  # fmt: skip
        rec.metrics(
            **{f"spearman_{r.emotion}_{r.half}": r.spearman for r in correlations.itertuples()},
            **{f"top_set_overlap_{r.emotion}": r.top_set_overlap for r in correlations.itertuples()},
            **{f"mean_shrinkage_{e}": float(g["shrinkage"].mean()) for e, g in top.groupby("emotion")},
        )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "screening.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(screening)),
            "n_heads": dg.MetadataValue.int(len(every_head)),
            "readout_boundary": dg.MetadataValue.int(n_layers),
            "crossfit_split": markdown_table(
                split.groupby(["emotion", "half"]).size().rename("pairs").reset_index()
            ),
            # The readout is the emotion vector at the final boundary: what the confound audit says of it.
            "confound_flags": json_metadata(audit_flags(audit, strategy, [n_layers])),
            "top_heads": markdown_table(
                top[TOP_HEADS_SHOWN], max_rows=len(HALVES) * top_n * max(len(emotions), 1)
            ),
            "correlations": markdown_table(correlations),
            **plots,
            **rec.metadata(),
        }
    )


@dg.asset_check(asset=head_screening, blocking=True, description="Every (layer, head) of the model is "
                "scored for every emotion on both halves of its prompt pairs, every score is finite, and the "
                "halves are disjoint.")  # fmt: skip
def head_screening_complete(
    context: dg.AssetCheckExecutionContext, head_screening: ArtifactHandle
) -> dg.AssetCheckResult:
    model_name, _ = model_and_profile(context)
    spec = REGISTRY.get(model_name)
    screening = head_screening.table(SCREENING_FILE)
    split = head_screening.table(SPLIT_FILE)
    return screening_check(screening, split, spec.layers, spec.heads)


def screening_check(
    screening: pd.DataFrame, split: pd.DataFrame, n_layers: int, n_heads: int
) -> dg.AssetCheckResult:
    """``head_screening_complete`` on the tables (``science.head_checks.screening_outcome``)."""
    return dg.AssetCheckResult(**vars(screening_outcome(screening, split, n_layers, n_heads)))


def screened_head_inputs() -> dict[str, dg.AssetIn]:
    """The inputs of the assets that intervene on the screened heads (``head_patching``,
    ``emotion_circuits``): the screening, the emotion vectors and the profile's dataset."""
    return {
        "head_screening": dg.AssetIn(head_screening.key),
        "emotion_vectors": dg.AssetIn(emotion_vectors.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    }
