"""Asset jobs. They run in process (every step shares one model load) unless ``$EMOTION_EXECUTOR`` names a
distributed executor (celery, k8s), whose worker processes each load a model at most once."""

from __future__ import annotations

import dagster as dg

from emotion_assets.partitions import (
    causal_model_profile_partitions,
    model_profile_partitions,
    pair_profile_partitions,
    profile_partitions,
)
from jobs.executors import job_executor

# Asset groups, one per family of the study.
DATASET_GROUP = "dataset"
REPRESENTATION_GROUP = "representations"
STEERING_GROUP = "steering"
HEADS_GROUP = "heads"
ALIGNMENT_GROUP = "alignment"
STATISTICS_GROUP = "statistics"
REPORT_GROUP = "reports"

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.groups(DATASET_GROUP),
    partitions_def=profile_partitions,
    executor_def=job_executor(),
    description="Phase 1 for one profile: the validated prompt set and evaluator quality.",
)

# Runs that put a model on the accelerator carry this tag; dagster_home/dagster.yaml limits it to 1 run.
MODEL_RUN_TAGS = {"emotion/accelerator": "model"}

representation_job = dg.define_asset_job(
    "representation_job",
    tags=MODEL_RUN_TAGS,
    selection=dg.AssetSelection.groups(REPRESENTATION_GROUP),
    partitions_def=model_profile_partitions,
    executor_def=job_executor(),
    description="Phases 2-3 for one model × profile: model card, activations, vectors, subspaces.",
)

alignment_job = dg.define_asset_job(
    "alignment_job",
    selection=dg.AssetSelection.groups(ALIGNMENT_GROUP),
    partitions_def=pair_profile_partitions,
    executor_def=job_executor(),
    description="Phase 4 for one model pair × profile: cross-model subspace alignment with null controls.",
)

intervention_job = dg.define_asset_job(
    "intervention_job",
    tags=MODEL_RUN_TAGS,
    selection=dg.AssetSelection.groups(STEERING_GROUP, HEADS_GROUP, STATISTICS_GROUP),
    partitions_def=causal_model_profile_partitions,
    executor_def=job_executor(),
    description="Phases 5-8 for one causal LM × profile: steering sweeps, head screening and patching, "
    "statistics and circuits (generation needs a causal LM; encoders are not partitions of these assets).",
)

report_job = dg.define_asset_job(
    "report_job",
    selection=dg.AssetSelection.groups(REPORT_GROUP),
    partitions_def=profile_partitions,
    executor_def=job_executor(),
    description="Cross-model roll-up and the findings report for one profile.",
)

ALL_JOBS = [dataset_job, representation_job, alignment_job, intervention_job, report_job]


def study_plan(model: str, profile: str) -> list[tuple[str, str]]:
    """(job, partition key) in the order the main command runs them for one model × profile.

    The model's controls come along: every registered pair in which one side is the model or one of its
    twins (``random_twin`` / ``rotated_twin`` with ``of: model``), so a null or positive control is never
    missing beside the pair it controls. Cross-model steps need both sides: every partner's
    representations run before any alignment.
    """
    from emotion_assets.partitions import REGISTRY

    plan = [("dataset_job", profile), ("representation_job", f"{model}|{profile}")]
    if REGISTRY.get(model).can_generate:
        plan.append(("intervention_job", f"{model}|{profile}"))
    family = {model, *REGISTRY.twins_of(model)}
    pairs = [(a, b) for a, b in REGISTRY.pairs if family & {a, b}]
    for partner in dict.fromkeys(side for pair in pairs for side in pair if side != model):
        plan.append(("representation_job", f"{partner}|{profile}"))
    plan.extend(("alignment_job", f"{a}__{b}|{profile}") for a, b in pairs)
    if REGISTRY.get(model).can_generate:
        plan.append(("report_job", profile))
    return plan


__all__ = [
    "ALIGNMENT_GROUP",
    "ALL_JOBS",
    "DATASET_GROUP",
    "HEADS_GROUP",
    "REPORT_GROUP",
    "REPRESENTATION_GROUP",
    "STEERING_GROUP",
    "causal_model_profile_partitions",
    "pair_profile_partitions",
    "study_plan",
]
