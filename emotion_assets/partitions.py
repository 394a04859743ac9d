"""Partition dimensions built from the model registry and the profile file."""

from __future__ import annotations

import warnings

import dagster as dg

from emotion_assets.profiles import load_profiles
from emotion_assets.registry import load_registry, split_pair_key

warnings.filterwarnings("ignore", category=dg.BetaWarning)

REGISTRY = load_registry()
PROFILES = load_profiles()

profile_partitions = dg.StaticPartitionsDefinition(list(PROFILES))
model_partitions = dg.StaticPartitionsDefinition(REGISTRY.names)
causal_model_partitions = dg.StaticPartitionsDefinition(
    [name for name, spec in REGISTRY.models.items() if spec.can_generate]
)
pair_partitions = dg.StaticPartitionsDefinition(REGISTRY.pair_keys or ["none__none"])

# Dimensions are ordered by name in keys: "smollm2-135m|smoke".
model_profile_partitions = dg.MultiPartitionsDefinition(
    {"model": model_partitions, "profile": profile_partitions}
)
causal_model_profile_partitions = dg.MultiPartitionsDefinition(
    {"model": causal_model_partitions, "profile": profile_partitions}
)
pair_profile_partitions = dg.MultiPartitionsDefinition(
    {"model_pair": pair_partitions, "profile": profile_partitions}
)

# A per-profile asset and a (model or model_pair) × profile asset: same profile, every model / pair.
profile_to_model_profile = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="profile")


def model_and_profile(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> tuple[str, str]:
    """(model, profile) of the partition being materialized."""
    keys = context.partition_key.keys_by_dimension  # type: ignore[union-attr]
    return keys["model"], keys["profile"]


def pair_and_profile(context: dg.AssetExecutionContext) -> tuple[str, str, str]:
    """(model_a, model_b, profile) of a model-pair partition."""
    keys = context.partition_key.keys_by_dimension  # type: ignore[union-attr]
    model_a, model_b = split_pair_key(keys["model_pair"])
    return model_a, model_b, keys["profile"]


def partition_folder(model: str) -> str:
    """Folder name of a model partition under ``results/<profile>/<asset>/``."""
    return model
