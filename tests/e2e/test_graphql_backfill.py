"""Partitioned backfills launched through the webserver's GraphQL API and run through the run queue.

``dataset_job`` is backfilled for ``smoke`` first, then ``representation_job`` for ``minilm-l6|smoke``
(the representations read the dataset); every run of each backfill must end SUCCESS. The backfill daemon of `dagster dev` submits the runs (it ticks every 30 s) and the run-queue
daemon launches them.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import REPOSITORY, DagsterServer, run_failure_details, runs

pytestmark = pytest.mark.e2e

BACKFILL_TIMEOUT = 300
FAILED = {"COMPLETED_FAILED", "FAILED", "CANCELED"}
PROFILE = "smoke"
MODEL_PARTITION = "minilm-l6|smoke"

LAUNCH = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message stack }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
    ... on PartitionSetNotFoundError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { stepKey invalidOutputName }
    ... on RunConflict { message }
    ... on ConflictingExecutionParamsError { message }
    ... on PresetNotFoundError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on NoModeProvidedError { message }
  }
}
"""

BACKFILL = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status partitionNames partitionSetName error { message } }
    ... on PythonError { message }
    ... on BackfillNotFoundError { message }
  }
}
"""


def launch_job_backfill(server: DagsterServer, job: str, partitions: list[str]) -> str:
    params = {
        "selector": {
            "partitionSetName": f"{job}_partition_set",
            "repositorySelector": {"repositoryLocationName": server.location, "repositoryName": REPOSITORY},
        },
        "partitionNames": partitions,
        "title": f"e2e {job}",
        "tags": [{"key": "emotion/test", "value": "graphql-backfill"}],
    }
    launched = server.graphql(LAUNCH, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    return launched["backfillId"]


def wait_for_backfill(server: DagsterServer, backfill_id: str, n_partitions: int) -> list[dict]:
    """Poll until every run of the backfill is SUCCESS; fail fast on a failed run or the timeout."""
    started = time.monotonic()
    backfill: dict = {}
    backfill_runs: list[dict] = []
    while time.monotonic() - started < BACKFILL_TIMEOUT:
        backfill = server.graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        assert not backfill.get("error"), backfill["error"]
        backfill_runs = runs(server, {"tags": [{"key": "dagster/backfill", "value": backfill_id}]})
        failed = [r for r in backfill_runs if r["status"] in ("FAILURE", "CANCELED")]
        if failed:
            details = "\n".join(f"{r['runId']}: {run_failure_details(server, r['runId'])}" for r in failed)
            pytest.fail(f"backfill {backfill_id} has failed runs:\n{details}\n{server.log_tail(40)}")
        if backfill["status"] in FAILED:
            pytest.fail(f"backfill {backfill_id} ended {backfill['status']}\n{server.log_tail(40)}")
        all_succeeded = all(r["status"] == "SUCCESS" for r in backfill_runs)
        if len(backfill_runs) >= n_partitions and all_succeeded:
            print(
                f"backfill {backfill_id} ({backfill['partitionSetName']}): {len(backfill_runs)} run(s) "
                f"SUCCESS after {time.monotonic() - started:.1f} s, backfill status {backfill['status']}"
            )
            return backfill_runs
        time.sleep(2)
    pytest.fail(
        f"backfill {backfill_id} not done after {BACKFILL_TIMEOUT} s: status {backfill.get('status')}, runs "
        f"{[(r['runId'][:8], r['status']) for r in backfill_runs]}\n{server.log_tail(60)}"
    )


def _partition(run: dict) -> str:
    return next((t["value"] for t in run["tags"] if t["key"] == "dagster/partition"), "")


def test_job_backfills_through_graphql_run_every_partition_to_success(dagster_dev: DagsterServer):
    dataset = launch_job_backfill(dagster_dev, "dataset_job", [PROFILE])
    dataset_runs = wait_for_backfill(dagster_dev, dataset, 1)
    assert {(r["jobName"], _partition(r)) for r in dataset_runs} == {("dataset_job", PROFILE)}

    representation = launch_job_backfill(dagster_dev, "representation_job", [MODEL_PARTITION])
    representation_runs = wait_for_backfill(dagster_dev, representation, 1)
    assert {(r["jobName"], _partition(r)) for r in representation_runs} == {
        ("representation_job", MODEL_PARTITION)
    }

    results = dagster_dev.root / "results" / PROFILE
    assert (results / "emotion_dataset" / "prompts.parquet").exists()
    for asset in ("model_card", "activations", "emotion_vectors", "emotion_subspaces"):
        assert any((results / asset / "minilm-l6").iterdir()), f"{asset} wrote nothing for minilm-l6"
