"""Asset jobs. Model-backed jobs use the in-process executor so every step shares one model load."""

from __future__ import annotations

import dagster as dg

from emotion_assets.partitions import (
    causal_model_profile_partitions,
    model_profile_partitions,
    pair_profile_partitions,
    profile_partitions,
)

# Asset groups, one per family of the study.
DATASET_GROUP = "dataset"
REPRESENTATION_GROUP = "representations"
STEERING_GROUP = "steering"
HEADS_GROUP = "heads"
ALIGNMENT_GROUP = "alignment"
REPORT_GROUP = "reports"

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.groups(DATASET_GROUP),
    partitions_def=profile_partitions,
    executor_def=dg.in_process_executor,
    description="Phase 1 for one profile: the validated prompt set and evaluator quality.",
)

representation_job = dg.define_asset_job(
    "representation_job",
    selection=dg.AssetSelection.groups(REPRESENTATION_GROUP),
    partitions_def=model_profile_partitions,
    executor_def=dg.in_process_executor,
    description="Phases 2-3 for one model × profile: model card, activations, vectors, subspaces.",
)

ALL_JOBS = [dataset_job, representation_job]

# The order in which the main command runs the jobs for one model × profile.
STUDY_PLAN: list[tuple[str, str]] = [
    ("dataset_job", "profile"),
    ("representation_job", "model|profile"),
]

__all__ = [
    "ALIGNMENT_GROUP",
    "ALL_JOBS",
    "DATASET_GROUP",
    "HEADS_GROUP",
    "REPORT_GROUP",
    "REPRESENTATION_GROUP",
    "STEERING_GROUP",
    "STUDY_PLAN",
    "causal_model_profile_partitions",
    "pair_profile_partitions",
]
