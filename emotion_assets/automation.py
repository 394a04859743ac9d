"""Declarative Automation: when each asset partition is (re)built, and the configuration it is built from.

Configuration enters the graph as three partitioned observable source assets whose data version is the
sha256 of exactly one piece of configuration:

- ``model_config[<model>]``: the model's entry of the registry (``data/models.yaml``);
- ``profile_config[<profile>]``: the profile's block of ``data/profiles.yaml``;
- ``prompt_files[<profile>]``: the bytes of the profile's dataset file and validation sets.

Every partitioned asset depends on ``profile_config`` through its ``profile`` dimension, every asset with a
``model`` dimension on ``model_config`` through that dimension, and the assets that read the prompt files
on ``prompt_files``; so a changed block reaches exactly the partitions built from it (pair assets follow
their two models' representations). ``config_sensor`` reports a new observation only when a hash changes.

The condition of each study asset (``study_condition``) requests a partition that can run here when

- it is missing and the nightly cron tick has passed since it was last requested (the backlog), or it
  became missing since the last evaluation (a partition added by a reload: a new model or profile);
- it exists and is stale: its code version changed, or a dependency (upstream asset or configuration
  source) has a new data version,

and waits while a buildable dependency is missing or any dependency or the partition itself is in
progress. Cross-model roll-ups (profile partitions reading model partitions) refresh once a night instead
(``rollup_condition``), so they are not rebuilt as each model finishes. ``RunnableHere`` is the one custom
condition: Declarative Automation has no notion of model weights on disk, and its evaluation metadata
names every skipped model with the reason and how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from emotion_assets.partitions import model_partitions, profile_partitions
from emotion_assets.profiles import Profile, load_profiles
from emotion_assets.registry import ModelRegistry, load_registry, split_pair_key
from jobs.jobs import HEADS_GROUP, MODEL_RUN_TAGS, REPRESENTATION_GROUP, STATISTICS_GROUP, STEERING_GROUP
from resources.availability import model_availability
from resources.storage import json_sha256, tree_sha256

CRON_ENV = "EMOTION_AUTOMATION_CRON"
TIMEZONE_ENV = "EMOTION_AUTOMATION_TIMEZONE"
PROFILES_ENV = "EMOTION_AUTOMATION_PROFILES"
DEFAULT_CRON = "0 1 * * *"

MODEL_CONFIG = dg.AssetKey("model_config")
PROFILE_CONFIG = dg.AssetKey("profile_config")
PROMPT_FILES = dg.AssetKey("prompt_files")
CONFIG_SOURCES = (MODEL_CONFIG, PROFILE_CONFIG, PROMPT_FILES)
CONFIG_GROUP = "configuration"
# Assets that open the profile's prompt files themselves (the dataset, and the confound audit's
# validation sets); everything else reads them through these assets.
READS_PROMPT_FILES = frozenset({dg.AssetKey("emotion_dataset"), dg.AssetKey("confound_audit")})
# Groups whose assets put a model on the accelerator: their runs carry MODEL_RUN_TAGS.
MODEL_GROUPS = (REPRESENTATION_GROUP, STEERING_GROUP, HEADS_GROUP, STATISTICS_GROUP)

MODEL_DIMENSIONS = ("model", "model_pair")
PROFILE_DIMENSION = "profile"
DATA_VERSION_TAG = "dagster/data_version"


# --------------------------------------------------------------------------------------------------
# Configuration as observable source assets
# --------------------------------------------------------------------------------------------------


def files_sha256(paths: Iterable[Path]) -> str:
    """sha256 over each path and its content hash (a folder by :func:`tree_sha256`), in the given order; a
    missing path hashes as absent."""
    return json_sha256([[str(p), tree_sha256(p) if p.exists() else "<absent>"] for p in paths])


def model_versions(registry: ModelRegistry) -> dict[str, str]:
    """Model name -> sha256 of its registry entry."""
    return {name: json_sha256(spec.model_dump(mode="json")) for name, spec in registry.models.items()}


def profile_versions(profiles: Mapping[str, Profile]) -> dict[str, str]:
    """Profile name -> sha256 of its block of the profile file."""
    return {name: json_sha256(profile.model_dump(mode="json")) for name, profile in profiles.items()}


def prompt_file_versions(profiles: Mapping[str, Profile]) -> dict[str, str]:
    """Profile name -> sha256 of its dataset file and validation sets."""
    return {
        name: files_sha256([p.dataset.resolved_path(), *p.resolved_validation_sets()])
        for name, p in profiles.items()
    }


def config_versions() -> dict[dg.AssetKey, dict[str, str]]:
    """Current data version of every partition of the configuration sources, read from the files now.

    Only partitions the code location knows are returned; entries added since it loaded get partitions
    on the next reload (``reload_hint``).
    """
    registry, profiles = load_registry(), load_profiles()
    known_models, known_profiles = set(model_partitions.get_partition_keys()), set(profiles_known())
    return {
        MODEL_CONFIG: {k: v for k, v in model_versions(registry).items() if k in known_models},
        PROFILE_CONFIG: {k: v for k, v in profile_versions(profiles).items() if k in known_profiles},
        PROMPT_FILES: {k: v for k, v in prompt_file_versions(profiles).items() if k in known_profiles},
    }


def profiles_known() -> list[str]:
    return list(profile_partitions.get_partition_keys())


def reload_hint() -> str:
    """Registry models and profiles in the files that have no partitions yet ("" when none)."""
    new_models = sorted(set(load_registry().names) - set(model_partitions.get_partition_keys()))
    new_profiles = sorted(set(load_profiles()) - set(profiles_known()))
    if not new_models and not new_profiles:
        return ""
    named = ", ".join([*(f"model {m}" for m in new_models), *(f"profile {p}" for p in new_profiles)])
    return f"{named}: not partitions yet; reload the code location (UI: Deployment → Reload)"


def _observer(key: dg.AssetKey, partitions_def: dg.PartitionsDefinition, description: str):
    @dg.observable_source_asset(
        key=key, partitions_def=partitions_def, group_name=CONFIG_GROUP, description=description
    )
    def observe() -> dg.DataVersionsByPartition:
        versions = config_versions()[key]
        return dg.DataVersionsByPartition({k: dg.DataVersion(v) for k, v in versions.items()})

    return observe


model_config = _observer(MODEL_CONFIG, model_partitions, "A model's entry of data/models.yaml (sha256).")
profile_config = _observer(
    PROFILE_CONFIG, profile_partitions, "A profile's block of data/profiles.yaml (sha256)."
)
prompt_files = _observer(
    PROMPT_FILES, profile_partitions, "A profile's dataset file and validation sets (sha256 of the bytes)."
)
CONFIG_ASSETS = [model_config, profile_config, prompt_files]


def changed_observations(instance: dg.DagsterInstance) -> list[dg.AssetObservation]:
    """Observations for every configuration partition whose hash differs from its latest recorded one."""
    events = []
    for key, versions in config_versions().items():
        for partition, version in sorted(versions.items()):
            if recorded_version(instance, key, partition) != version:
                tags = {DATA_VERSION_TAG: version}
                events.append(dg.AssetObservation(asset_key=key, partition=partition, tags=tags))
    return events


def recorded_version(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str) -> str | None:
    """Data version of the latest observation of ``key[partition]`` (None if never observed)."""
    record = instance.get_latest_data_version_record(key, is_source=True, partition_key=partition)
    observation = record.asset_observation if record is not None else None
    return (observation.tags or {}).get(DATA_VERSION_TAG) if observation is not None else None


@dg.sensor(
    name="config_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Observes the registry entries, profile blocks and prompt files; records a new data version "
    "(sha256) only when one changed, which makes the partitions built from it stale.",
)
def config_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    events = changed_observations(context.instance)
    hint = reload_hint()
    if hint:
        context.log.warning(hint)
    if not events:
        return dg.SkipReason("Configuration unchanged." + (f" {hint}." if hint else ""))
    return dg.SensorResult(asset_events=events)


# --------------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------------


def automated_profiles() -> list[str] | None:
    """Profiles automation builds: ``$EMOTION_AUTOMATION_PROFILES`` (comma-separated), or None for all."""
    wanted = [p.strip() for p in os.environ.get(PROFILES_ENV, "").split(",") if p.strip()]
    return wanted or None


def partition_dimensions(partitions_def: dg.PartitionsDefinition | None, key: str) -> dict[str, str]:
    """``{"model": ..., "profile": ...}`` of a partition key; a profile-partitioned key is its profile."""
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        return dict(partitions_def.get_partition_key_from_str(key).keys_by_dimension)
    if partitions_def is not None and set(partitions_def.get_partition_keys()) <= set(profiles_known()):
        return {PROFILE_DIMENSION: key}
    return {}


def models_of(dimensions: Mapping[str, str]) -> list[str]:
    """The registry models a partition runs: its ``model``, or both sides of its ``model_pair``."""
    models = [dimensions["model"]] if "model" in dimensions else []
    if "model_pair" in dimensions:
        models.extend(split_pair_key(dimensions["model_pair"]))
    return models


class RunnableHere(dg.AutomationCondition[dg.AssetKey]):
    """True for partitions whose models have weights on this machine and whose profile is automated here.

    Declarative Automation knows nothing of model weights, hence this condition. Its evaluation metadata
    names each model (or profile) it holds back, with the reason and how to provide the model.
    """

    @property
    def name(self) -> str:
        return "runnable_here"

    @property
    def description(self) -> str:
        return "models available on this machine (weights present) and profile automated here"

    def evaluate(self, context: Any) -> dg.AutomationResult:
        candidate = context.candidate_subset
        partitions_def = context.partitions_def
        if partitions_def is None:
            return dg.AutomationResult(context, candidate)
        registry = load_registry()
        profiles = automated_profiles()
        held: dict[str, str] = {}
        keep: set[str] = set()
        for key in candidate.expensively_compute_partition_keys():
            dims = partition_dimensions(partitions_def, key)
            profile = dims.get(PROFILE_DIMENSION)
            if profiles is not None and profile is not None and profile not in profiles:
                held[f"profile {profile}"] = f"not in ${PROFILES_ENV} ({', '.join(profiles)})"
                continue
            blocked = False
            for model in models_of(dims):
                found = model_availability(model, registry)
                if not found.available:
                    held[model] = found.reason + (f". To provide it: {found.hint}" if found.hint else "")
                    blocked = True
            if not blocked:
                keep.add(key)
        true_subset = candidate.compute_intersection_with_partition_keys(keep)
        metadata = {name: dg.MetadataValue.text(why) for name, why in sorted(held.items())}
        return dg.AutomationResult(context, true_subset, metadata=metadata)


def _ready() -> dg.AutomationCondition:
    """No buildable dependency is missing and nothing it reads, nor the partition, is in progress."""
    missing_here = (
        dg.AutomationCondition.missing() & ~dg.AutomationCondition.will_be_requested() & RunnableHere()
    )
    blocking = dg.AutomationCondition.any_deps_match(missing_here).ignore(
        dg.AssetSelection.keys(*CONFIG_SOURCES)
    )
    return (
        ~blocking.with_label("any_buildable_deps_missing")
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    )


def _backlog(cron: str, timezone: str) -> dg.AutomationCondition:
    """Missing, and the nightly tick passed since it was last handled; or newly missing (a reload added it)."""
    nightly = dg.AutomationCondition.cron_tick_passed(cron, timezone).since_last_handled()
    return (dg.AutomationCondition.missing() & nightly).with_label(
        f"missing at the nightly tick ({cron})"
    ) | dg.AutomationCondition.newly_missing().since_last_handled().with_label("new partition")


def _stale() -> dg.AutomationCondition:
    """Built before, and its code version or a dependency's data version changed since it was handled."""
    changed = (
        dg.AutomationCondition.code_version_changed() | dg.AutomationCondition.any_deps_updated()
    ).since_last_handled()
    return (~dg.AutomationCondition.missing() & changed).with_label("stale")


def study_condition(cron: str, timezone: str = "UTC") -> dg.AutomationCondition:
    """Condition of a per-model, per-pair or per-profile asset (see the module docstring)."""
    return (RunnableHere() & (_backlog(cron, timezone) | _stale()) & _ready()).with_label("study")


def rollup_condition(cron: str, timezone: str = "UTC") -> dg.AutomationCondition:
    """Condition of a cross-model roll-up: rebuilt once a night when any input updated since it was handled.

    Not ``on_cron``: its rule that every dependency updated since the tick would wait on inputs that do
    not change each night (the evaluator quality, the configuration sources), so nothing would refresh.
    """
    nightly = dg.AutomationCondition.cron_tick_passed(cron, timezone).since_last_handled()
    inputs_updated = dg.AutomationCondition.any_deps_updated().since_last_handled()
    refresh = (nightly & ~dg.AutomationCondition.missing() & inputs_updated).with_label(
        f"nightly refresh ({cron}) after inputs updated"
    )
    code_changed = (
        ~dg.AutomationCondition.missing() & dg.AutomationCondition.code_version_changed().since_last_handled()
    ).with_label("code version changed")
    triggers = refresh | _backlog(cron, timezone) | code_changed
    return (RunnableHere() & triggers & _ready()).with_label("nightly roll-up")


def _dimensions(partitions_def: dg.PartitionsDefinition | None) -> tuple[str, ...]:
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        return tuple(partitions_def.partition_dimension_names)
    if partitions_def is not None and set(partitions_def.get_partition_keys()) <= set(profiles_known()):
        return (PROFILE_DIMENSION,)
    return ()


def _on(
    source: dg.AssetKey,
    source_def: dg.PartitionsDefinition,
    child_def: dg.PartitionsDefinition,
    dimension: str,
) -> list[dg.AssetDep]:
    """Dependency of each ``child_def`` partition on the ``source`` partition named by its ``dimension``.

    None when the dimension holds only a subset of the source's keys (causal models): Dagster maps a
    single dimension only onto the same partitions definition, and those assets see a changed entry
    through their upstream representations, which depend on the source directly.
    """
    if not isinstance(child_def, dg.MultiPartitionsDefinition):
        return [dg.AssetDep(source)]
    if child_def.get_partitions_def_for_dimension(dimension) != source_def:
        return []
    return [dg.AssetDep(source, partition_mapping=dg.MultiToSingleDimensionPartitionMapping(dimension))]


def _config_deps(key: dg.AssetKey, partitions_def: dg.PartitionsDefinition | None) -> list[dg.AssetDep]:
    """The configuration sources each partition of an asset is built from."""
    dimensions = _dimensions(partitions_def)
    if partitions_def is None or not dimensions:
        return []
    deps = []
    if PROFILE_DIMENSION in dimensions:
        deps.extend(_on(PROFILE_CONFIG, profile_partitions, partitions_def, PROFILE_DIMENSION))
        if key in READS_PROMPT_FILES:
            deps.extend(_on(PROMPT_FILES, profile_partitions, partitions_def, PROFILE_DIMENSION))
    if "model" in dimensions:
        deps.extend(_on(MODEL_CONFIG, model_partitions, partitions_def, "model"))
    return deps


def config_deps(asset: str, partitions_def: dg.PartitionsDefinition) -> list[dg.AssetDep]:
    """The configuration sources an asset declares (``deps=config_deps(...)`` in its decorator), so a changed
    registry entry, profile block or prompt file reaches exactly the partitions built from it. Declared in
    the decorator because Dagster turns an asset's data inputs into ``Nothing`` deps when its deps are
    rewritten afterwards (``map_asset_specs``)."""
    return _config_deps(dg.AssetKey(asset), partitions_def)


def automate(
    assets: Sequence[dg.AssetsDefinition], cron: str | None = None, timezone: str | None = None
) -> list[dg.AssetsDefinition]:
    """``assets`` with their automation conditions attached (their configuration dependencies are declared
    in their decorators, :func:`config_deps`).

    Cron and timezone default to ``$EMOTION_AUTOMATION_CRON`` (``0 1 * * *``) and
    ``$EMOTION_AUTOMATION_TIMEZONE`` (UTC). A profile-partitioned asset that reads model or pair partitions
    is a roll-up (``rollup_condition``); every other asset gets ``study_condition``.
    """
    cron = cron or os.environ.get(CRON_ENV, "").strip() or DEFAULT_CRON
    timezone = timezone or os.environ.get(TIMEZONE_ENV, "").strip() or "UTC"
    partitions = {spec.key: spec.partitions_def for a in assets for spec in a.specs}

    def attach(spec: dg.AssetSpec) -> dg.AssetSpec:
        dims = _dimensions(spec.partitions_def)
        parents = [partitions.get(dep.asset_key) for dep in spec.deps]
        rollup = dims == (PROFILE_DIMENSION,) and any(
            set(_dimensions(p)) & set(MODEL_DIMENSIONS) for p in parents
        )
        condition = rollup_condition(cron, timezone) if rollup else study_condition(cron, timezone)
        return spec.replace_attributes(automation_condition=condition)

    return list(dg.map_asset_specs(attach, assets))


def automation_sensors() -> list[dg.SensorDefinition]:
    """The automation sensors: model-backed assets (runs tagged for the accelerator limit) and the rest.

    Both evaluate in the code server (``use_user_code_server``), which ``RunnableHere`` needs.
    """
    model_assets = dg.AssetSelection.groups(*MODEL_GROUPS)
    common = {
        "use_user_code_server": True,
        "minimum_interval_seconds": 60,
        "default_status": dg.DefaultSensorStatus.STOPPED,
    }
    return [
        dg.AutomationConditionSensorDefinition(
            "model_automation",
            target=model_assets,
            run_tags=MODEL_RUN_TAGS,
            description="Declarative Automation of the assets that load a model (representations, steering, "
            "heads, statistics); runs carry the emotion/accelerator tag. See docs/operations.md.",
            **common,
        ),
        dg.AutomationConditionSensorDefinition(
            "study_automation",
            target=dg.AssetSelection.all() - model_assets,
            description="Declarative Automation of the dataset, alignment and report assets. "
            "See docs/operations.md.",
            **common,
        ),
    ]
