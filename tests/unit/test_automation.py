"""Declarative Automation through Dagster's own evaluation API, on ephemeral instances (no model).

Each test plants materializations or configuration observations, evaluates the conditions with
``dg.evaluate_automation_conditions`` tick by tick (cursor carried over, evaluation times chosen around the
nightly cron ``0 1 * * *``) and checks exactly which partitions are requested.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import dagster as dg
import pytest

from emotion_assets.automation import (
    CONFIG_ASSETS,
    MODEL_CONFIG,
    PROFILE_CONFIG,
    PROMPT_FILES,
    automate,
    changed_observations,
    config_deps,
)
from emotion_assets.partitions import model_partitions, profile_partitions

CRON = "0 1 * * *"
AVAILABLE, OTHER_AVAILABLE, UNAVAILABLE = "minilm-l6", "smollm2-135m", "gpt2"
SMOKE, BASELINE = "smoke", "baseline"
DAY = dt.datetime(2030, 1, 7, tzinfo=dt.UTC)


def at(hour: int, minute: int = 0, day: int = 0) -> dt.datetime:
    return DAY + dt.timedelta(days=day, hours=hour, minutes=minute)


def graph(models: list[str] | None, card_version: str = "1") -> list[dg.AssetsDefinition]:
    """A dataset per profile, a model card per model × profile and a cross-model roll-up per profile
    (``models=None``: the registry's model dimension itself, which ``model_config`` maps onto)."""
    dimension = model_partitions if models is None else model_dimension(models)
    per_model = dg.MultiPartitionsDefinition({"model": dimension, "profile": profile_partitions})

    @dg.asset(
        partitions_def=profile_partitions,
        code_version="1",
        deps=config_deps("emotion_dataset", profile_partitions),
    )
    def emotion_dataset() -> None: ...

    @dg.asset(
        partitions_def=per_model,
        code_version=card_version,
        deps=[
            dg.AssetDep(
                "emotion_dataset", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("profile")
            ),
            *config_deps("model_card", per_model),
        ],
    )
    def model_card() -> None: ...

    @dg.asset(
        partitions_def=profile_partitions,
        deps=[
            dg.AssetDep("model_card", partition_mapping=dg.MultiToSingleDimensionPartitionMapping("profile")),
            *config_deps("rollup", profile_partitions),
        ],
    )
    def rollup() -> None: ...

    return [*automate([emotion_dataset, model_card, rollup], cron=CRON), *CONFIG_ASSETS]


def model_dimension(models: list[str]) -> dg.StaticPartitionsDefinition:
    """The registry's model dimension, shrunk to ``models`` (the registry as the code location saw it)."""
    return dg.StaticPartitionsDefinition([m for m in model_partitions.get_partition_keys() if m in models])


class Ticks:
    """Evaluates the conditions tick after tick on one instance, carrying the cursor."""

    def __init__(self, instance: dg.DagsterInstance, defs: list[dg.AssetsDefinition]) -> None:
        self.instance, self.defs, self.cursor = instance, defs, None

    def __call__(self, when: dt.datetime, defs: list[dg.AssetsDefinition] | None = None):
        self.defs = defs or self.defs
        result = dg.evaluate_automation_conditions(
            defs=self.defs, instance=self.instance, cursor=self.cursor, evaluation_time=when
        )
        self.cursor = result.cursor
        return result

    def requested(self, result, asset: str) -> set[str]:
        return {str(k) for k in result.get_requested_partitions(dg.AssetKey(asset))}


def materialize(instance: dg.DagsterInstance, asset: str, partition: str, data_version: str = "v1", code="1"):
    tags = {"dagster/data_version": data_version, "dagster/code_version": code}
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition, tags=tags))


def observe(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str, version: str) -> None:
    tags = {"dagster/data_version": version}
    instance.report_runless_asset_event(dg.AssetObservation(key, partition=partition, tags=tags))


@pytest.fixture
def instance(monkeypatch) -> Iterator[dg.DagsterInstance]:
    monkeypatch.setenv("EMOTION_AUTOMATION_PROFILES", SMOKE)
    with dg.instance_for_test() as fresh:
        yield fresh


def built_world(instance: dg.DagsterInstance, models: list[str]) -> None:
    """Every partition of every profile built once, configuration observed."""
    for profile in (SMOKE, BASELINE):
        materialize(instance, "emotion_dataset", profile)
        observe(instance, PROFILE_CONFIG, profile, "p1")
        materialize(instance, "rollup", profile)
        for model in models:
            materialize(instance, "model_card", f"{model}|{profile}")
    for model in models:
        observe(instance, MODEL_CONFIG, model, "m1")


def test_missing_partitions_wait_for_the_nightly_tick_then_are_requested_for_available_models(instance):
    tick = Ticks(instance, graph([AVAILABLE, UNAVAILABLE]))
    assert tick(at(0, 10)).total_requested == 0  # first evaluation: nothing handled yet
    assert tick(at(0, 40)).total_requested == 0  # no nightly tick passed
    result = tick(at(1, 5))
    assert tick.requested(result, "emotion_dataset") == {SMOKE}  # baseline is not automated here
    assert tick.requested(result, "model_card") == set()  # waits for its dataset (another run)
    assert tick(at(1, 10)).total_requested == 0  # the dataset is handled: not requested twice
    materialize(instance, "emotion_dataset", SMOKE)
    result = tick(at(1, 15))
    assert tick.requested(result, "model_card") == {f"{AVAILABLE}|{SMOKE}"}  # still owed from tonight
    assert tick.requested(result, "rollup") == set()  # waits for its model cards


def test_unavailable_model_is_skipped_with_the_reason_in_the_evaluation(instance):
    tick = Ticks(instance, graph([AVAILABLE, UNAVAILABLE]))
    tick(at(0, 10))
    result = tick(at(1, 5))
    assert f"{UNAVAILABLE}|{SMOKE}" not in tick.requested(result, "model_card")
    evaluation = next(r for r in result.results if r.key == dg.AssetKey("model_card")).serializable_evaluation
    found = [node.metadata for node in _walk(evaluation) if node.condition_snapshot.label is None
             and node.condition_snapshot.name == "runnable_here" and node.metadata]  # fmt: skip
    assert found, "the runnable_here node carries the reasons"
    reason = found[0][UNAVAILABLE].value
    assert "not in the local Hugging Face cache" in reason and "huggingface-cli download" in reason
    assert "profile baseline" in found[0]


def _walk(evaluation):
    yield evaluation
    for child in evaluation.child_evaluations:
        yield from _walk(child)


def test_new_upstream_data_version_restales_exactly_the_existing_partitions_reading_it(instance):
    tick = Ticks(instance, graph([AVAILABLE, OTHER_AVAILABLE]))
    built_world(instance, [AVAILABLE])  # OTHER_AVAILABLE was never built
    tick(at(0, 1))
    assert tick(at(0, 2)).total_requested == 0  # nothing changed: fresh

    materialize(instance, "emotion_dataset", SMOKE, data_version="v2")  # rebuilt elsewhere, new data
    result = tick(at(0, 3))
    assert tick.requested(result, "model_card") == {f"{AVAILABLE}|{SMOKE}"}  # not the never-built one
    assert tick.requested(result, "emotion_dataset") == set()
    assert tick(at(0, 4)).total_requested == 0


def test_changed_profile_block_requests_exactly_that_profiles_partitions(instance):
    tick = Ticks(instance, graph([AVAILABLE]))
    built_world(instance, [AVAILABLE])
    tick(at(0, 1))
    observe(instance, PROFILE_CONFIG, SMOKE, "p1")  # same hash again: not a change
    assert tick(at(0, 2)).total_requested == 0

    observe(instance, PROFILE_CONFIG, SMOKE, "p2")
    result = tick(at(0, 3))
    assert tick.requested(result, "emotion_dataset") == {SMOKE}
    assert tick.requested(result, "model_card") == {f"{AVAILABLE}|{SMOKE}"}
    assert tick.requested(result, "rollup") == set()  # the roll-up refreshes at the nightly tick


def test_changed_registry_entry_requests_that_models_partitions(instance, monkeypatch):
    monkeypatch.delenv("EMOTION_AUTOMATION_PROFILES")
    tick = Ticks(instance, graph(None))
    built_world(instance, [AVAILABLE, OTHER_AVAILABLE])
    tick(at(0, 1))
    observe(instance, MODEL_CONFIG, AVAILABLE, "m2")
    result = tick(at(0, 2))
    assert tick.requested(result, "model_card") == {f"{AVAILABLE}|{SMOKE}", f"{AVAILABLE}|{BASELINE}"}
    assert tick.requested(result, "emotion_dataset") == set()


def test_code_version_change_restales_the_asset(instance):
    tick = Ticks(instance, graph([AVAILABLE]))
    built_world(instance, [AVAILABLE])
    tick(at(0, 1))
    result = tick(at(0, 2), defs=graph([AVAILABLE], card_version="2"))
    assert tick.requested(result, "model_card") == {f"{AVAILABLE}|{SMOKE}"}
    assert tick.requested(result, "emotion_dataset") == set()


def test_new_registry_model_partitions_are_requested_after_a_reload(instance):
    tick = Ticks(instance, graph([AVAILABLE]))
    built_world(instance, [AVAILABLE])
    tick(at(0, 1))
    assert tick(at(0, 2)).total_requested == 0
    result = tick(at(0, 3), defs=graph([AVAILABLE, OTHER_AVAILABLE]))  # the code location reloaded
    assert tick.requested(result, "model_card") == {f"{OTHER_AVAILABLE}|{SMOKE}"}


def test_rollup_refreshes_at_the_nightly_tick_after_its_inputs_updated(instance):
    tick = Ticks(instance, graph([AVAILABLE]))
    built_world(instance, [AVAILABLE])
    tick(at(0, 1))
    materialize(instance, "model_card", f"{AVAILABLE}|{SMOKE}", data_version="v2")
    assert tick.requested(tick(at(0, 30)), "rollup") == set()  # not before the nightly tick
    assert tick.requested(tick(at(1, 5)), "rollup") == {SMOKE}


def test_config_observations_are_recorded_only_when_a_hash_changes(instance):
    first = changed_observations(instance)
    keys = {(e.asset_key, e.partition) for e in first}
    assert (
        (MODEL_CONFIG, AVAILABLE) in keys
        and (PROFILE_CONFIG, SMOKE) in keys
        and (PROMPT_FILES, SMOKE) in keys
    )
    for event in first:
        instance.report_runless_asset_event(event)
    assert changed_observations(instance) == []
    observe(instance, PROFILE_CONFIG, SMOKE, "an older hash")
    assert [(e.asset_key, e.partition) for e in changed_observations(instance)] == [(PROFILE_CONFIG, SMOKE)]


def test_definitions_carry_the_conditions_sources_and_sensors():
    from emotion_assets.definitions import defs

    graph_ = defs.resolve_asset_graph()
    for key in graph_.materializable_asset_keys:
        assert graph_.get(key).automation_condition is not None, key
    assert PROFILE_CONFIG in graph_.get(dg.AssetKey("activations")).parent_keys
    assert MODEL_CONFIG in graph_.get(dg.AssetKey("activations")).parent_keys
    assert PROMPT_FILES in graph_.get(dg.AssetKey("emotion_dataset")).parent_keys
    assert graph_.get(dg.AssetKey("findings_report")).automation_condition.get_label() == "nightly roll-up"
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {"config_sensor", "model_automation", "study_automation"}
    assert sensors["model_automation"].run_tags == {"emotion/accelerator": "model"}
