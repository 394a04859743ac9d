"""MLflow through dagster-mlflow: the Dagster run is the parent MLflow run, each materialization a nested run
with its params, metrics and artifacts, and every run ends FINISHED or FAILED (a temporary SQLite store)."""

from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

from emotion_assets.common import recorded
from emotion_assets.profiles import get_profile
from resources.storage import ArtifactStore, write_table
from resources.tracking import PARENT_KEY_TAG, TrackingResource

PARTITION = "m|smoke"
PARENT_TAG = "mlflow.parentRunId"


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One MLflow store for the module (its schema takes seconds to create); each test its own experiment."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlruns.db'}", root / "artifacts"


@pytest.fixture
def tracking(store_uri, request) -> TrackingResource:
    uri, artifacts = store_uri
    return TrackingResource(tracking_uri=uri, artifact_root=str(artifacts), experiment=request.node.name)


def _tracked_asset(name: str, *, fail: str = "", deps: tuple[str, ...] = ()) -> dg.AssetsDefinition:
    """An asset that writes one table inside ``recorded``; ``fail`` = "inside" raises in the tracked block,
    "outside" before it."""

    @dg.asset(name=name, deps=list(deps), partitions_def=dg.StaticPartitionsDefinition([PARTITION]))
    def _asset(context: dg.AssetExecutionContext, store: ArtifactStore, tracking: TrackingResource):
        if fail == "outside":
            raise RuntimeError(f"{name} failed before its tracked block")
        profile = get_profile("smoke")
        with recorded(
            context,
            tracking=tracking,
            store=store,
            phase="0",
            model="m",
            profile=profile,
            device="cpu",
            config=None,
        ) as rec:
            out = store.directory(profile.name, name)
            write_table(out / "t.parquet", pd.DataFrame({"v": [1.0, 2.0]}))
            rec.metrics(rows=2, not_finite=float("nan"))
            rec.artifacts(out)
            rec.timing.samples = 2
            if fail == "inside":
                raise RuntimeError(f"{name} failed inside its tracked block")
        return dg.MaterializeResult(metadata=rec.metadata())

    return _asset


def _materialize(assets, tracking: TrackingResource, root: Path, instance=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        partition_key=PARTITION,
        resources={"store": ArtifactStore(root_dir=str(root)), "tracking": tracking},
        instance=instance or dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _runs(tracking: TrackingResource) -> tuple[dict, dict]:
    """(parents by Dagster run id, children by asset name: one per name) of the tracking's experiment."""
    client = tracking._client()
    experiment = client.get_experiment_by_name(tracking.experiment).experiment_id
    runs = client.search_runs([experiment], max_results=100)
    parents = {r.data.tags[PARENT_KEY_TAG]: r for r in runs if PARENT_KEY_TAG in r.data.tags}
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    assert len(parents) + len(children) == len(runs)
    assert {c.data.tags[PARENT_TAG] for c in children} <= {p.info.run_id for p in parents.values()}
    return parents, {c.data.tags["dagster.asset"]: c for c in children}


def test_dagster_run_is_the_parent_of_one_nested_run_per_materialization(tracking, tmp_path):
    result = _materialize(
        [_tracked_asset("first"), _tracked_asset("second", deps=("first",))], tracking, tmp_path
    )
    assert result.success
    parents, children = _runs(tracking)
    (parent,) = parents.values()
    assert parent.data.tags[PARENT_KEY_TAG] == result.run_id
    assert parent.data.tags["dagster.partition"] == PARTITION
    assert parent.data.tags["dagster.job"] == result.job_def.name
    assert parent.info.status == "FINISHED" and parent.info.end_time is not None
    assert sorted(children) == ["first", "second"]
    client = tracking._client()
    for name, child in children.items():
        assert child.data.tags[PARENT_TAG] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.info.end_time is not None
        assert child.data.params["profile"] == "smoke" and child.data.params["model"] == "m"
        assert child.data.metrics["rows"] == 2.0 and "not_finite" not in child.data.metrics
        assert child.data.metrics["samples_per_s"] > 0 and "elapsed_s" in child.data.metrics
        assert "t.parquet" in [a.path for a in client.list_artifacts(child.info.run_id)]
        (materialization,) = result.asset_materializations_for_node(name)
        assert materialization.metadata["mlflow_run_id"].value == child.info.run_id
    assert mlflow.active_run() is None  # nothing left open in this process


def test_a_failure_inside_a_tracked_block_fails_its_run_and_the_parent(tracking, tmp_path):
    assets = [_tracked_asset("first"), _tracked_asset("second", fail="inside", deps=("first",))]
    result = _materialize(assets, tracking, tmp_path)
    assert not result.success
    parents, children = _runs(tracking)
    assert parents[result.run_id].info.status == "FAILED"
    assert children["first"].info.status == "FINISHED"
    assert children["second"].info.status == "FAILED" and children["second"].info.end_time is not None
    assert mlflow.active_run() is None


def test_a_step_failing_outside_any_tracked_block_fails_the_parent(tracking, tmp_path):
    assets = [_tracked_asset("first"), _tracked_asset("broken", fail="outside", deps=("first",))]
    result = _materialize(assets, tracking, tmp_path)
    assert not result.success
    parents, children = _runs(tracking)
    assert parents[result.run_id].info.status == "FAILED"  # read from the run's step failure record
    assert sorted(children) == ["first"] and children["first"].info.status == "FINISHED"


def test_each_dagster_run_gets_its_own_parent_and_a_resumed_parent_keeps_its_id(tracking, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    runs = [_materialize([_tracked_asset("first")], tracking, tmp_path, instance) for _ in range(2)]
    parents, _ = _runs(tracking)
    assert sorted(parents) == sorted(r.run_id for r in runs)
    first, second = (r.asset_materializations_for_node("first")[0].metadata for r in runs)
    assert first["estimated_seconds"].value == "no record yet"
    assert second["estimated_seconds"].value == round(first["timing_elapsed_s"].value, 1)  # from the instance
    assert all(p.info.status == "FINISHED" for p in parents.values())

    # A second step process of the same Dagster run (multiprocess executor) resumes the same MLflow run.
    dagster_run = runs[0].run_id
    with tracking.parent_run(dagster_run, job="j", partition=PARTITION) as resumed:
        assert resumed.run_id == parents[dagster_run].info.run_id
        assert tracking._client().get_run(resumed.run_id).info.status == "RUNNING"
    with pytest.raises(RuntimeError, match="boom"), tracking.parent_run(dagster_run, job="j") as again:
        raise RuntimeError("boom")
    assert again.run_id == resumed.run_id
    assert tracking._client().get_run(again.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_an_mlflow_run_already_active_in_the_process_is_refused(tracking, tmp_path):
    mlflow.set_tracking_uri(tracking.uri())
    with mlflow.start_run(experiment_id=tracking._experiment_id(tracking._client())) as stray:
        refused = pytest.raises(RuntimeError, match=f"{stray.info.run_id}.*mlflow.end_run")
        with refused, tracking.parent_run("some-dagster-run", job="j"):
            pass
    assert mlflow.active_run() is None
