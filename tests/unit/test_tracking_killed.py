"""A materialization killed with SIGKILL runs no ``finally``: its MLflow run and the Dagster run's parent MLflow
run stay RUNNING until the next tracked run of this host notices that the owning process is gone and ends
both as KILLED, with a note.

Four owners are planted: a child process killed mid-run and a run whose process id was reused (both
gone: ended), a live process and a process of another host (both left RUNNING).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

from resources.tracking import (
    EXPERIMENT,
    HOST_TAG,
    NOTE_TAG,
    PID_TAG,
    TrackingResource,
    host_name,
    process_is_gone,
)

PROJECT = Path(__file__).resolve().parents[2]
ASSET, PARTITION = "activations", "tiny|smoke"

CHILD = """
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace
from resources.tracking import TrackingResource

uri, artifacts, run_file = sys.argv[1:4]
context = SimpleNamespace(run_id="dagster-run-killed", job_name="representation_job",
                          partition_key="{partition}", has_partition_key=True)
tracking = TrackingResource(tracking_uri=uri, artifact_root=artifacts)
with tracking.parent_run(context.run_id, job=context.job_name, partition="{partition}") as parent:
    with tracking.track(context, "{asset}") as tracked:
        Path(run_file).write_text(tracked.run_id + " " + parent.run_id)
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would: no finally runs
"""


def _context(run_id: str) -> SimpleNamespace:
    return SimpleNamespace(run_id=run_id, job_name="j", partition_key=PARTITION, has_partition_key=True)


def test_runs_of_killed_processes_are_ended_as_killed_with_a_note(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking = TrackingResource(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts"))
    run_file = tmp_path / "run_id"
    script = textwrap.dedent(CHILD).format(asset=ASSET, partition=PARTITION)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    child = subprocess.run(
        [sys.executable, "-c", script, uri, str(tmp_path / "artifacts"), str(run_file)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    killed, killed_parent = run_file.read_text().split()

    client = tracking._client()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    left = client.get_run(killed)
    assert left.info.status == "RUNNING"  # what a killed run leaves behind
    assert client.get_run(killed_parent).info.status == "RUNNING"
    assert left.data.tags["mlflow.parentRunId"] == killed_parent
    assert left.data.tags[HOST_TAG] == host_name() and left.data.tags[PID_TAG] != str(os.getpid())
    assert process_is_gone(int(left.data.tags[PID_TAG]), left.info.start_time)
    assert not process_is_gone(os.getpid(), left.info.start_time)

    now_ms = int(time.time() * 1000)
    planted = {
        # This test's own process: alive, so never touched.
        "alive": {HOST_TAG: host_name(), PID_TAG: str(os.getpid())},
        # Another machine's run: its process cannot be checked from here.
        "other_host": {HOST_TAG: "another-host.invalid", PID_TAG: "1"},
        # Same pid as a live process, but the run began a day before that process: the id was reused.
        "reused_pid": {HOST_TAG: host_name(), PID_TAG: str(os.getpid())},
    }
    ids = {}
    for name, tags in planted.items():
        start = now_ms - 86_400_000 if name == "reused_pid" else now_ms
        ids[name] = client.create_run(experiment, start_time=start, tags=tags, run_name=name).info.run_id

    with tracking.track(_context("dagster-run-next"), ASSET) as tracked:
        tracked.log_metrics({"x": 1.0})
    assert sorted(tracked.orphans_ended) == sorted([killed, killed_parent, ids["reused_pid"]])
    assert client.get_run(tracked.run_id).info.status == "FINISHED"
    next_parent = client.get_run(client.get_run(tracked.run_id).data.tags["mlflow.parentRunId"])
    assert next_parent.info.status == "FINISHED"  # opened for this one materialization (no Dagster set-up)
    assert tracked.metadata()["mlflow_orphans_ended"].value == tracked.orphans_ended

    for run_id in (killed, killed_parent, ids["reused_pid"]):
        run = client.get_run(run_id)
        note = run.data.tags[NOTE_TAG]
        assert run.info.status == "KILLED" and run.info.end_time is not None
        assert f"Process {run.data.tags[PID_TAG]} on {host_name()} ended without closing this run" in note
        assert f"{ASSET}[{PARTITION}]" in note
    for run_id in (killed, killed_parent):
        assert "dagster-run-killed" in client.get_run(run_id).data.tags[NOTE_TAG]
    for name in ("alive", "other_host"):
        assert client.get_run(ids[name]).info.status == "RUNNING", name

    # Nothing left to end: the next run closes nothing.
    with tracking.track(_context("dagster-run-third"), ASSET) as third:
        pass
    assert third.orphans_ended == [] and "mlflow_orphans_ended" not in third.metadata()


def test_instance_configs_enable_run_monitoring(tmp_path):
    """Both instance files turn on the daemon that ends runs whose process died; the local one loads into a
    working instance (the PostgreSQL one is validated against the schema only: it needs a server)."""
    import shutil

    import dagster as dg
    from dagster._core.instance.config import dagster_instance_config

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.run_monitoring_enabled
    assert instance.run_monitoring_max_runtime_seconds == 86_400
    assert instance.run_monitoring_start_timeout_seconds == 180
    postgres, _ = dagster_instance_config(str(PROJECT / "docs"), "dagster.postgres.yaml")
    assert postgres["run_monitoring"]["enabled"] is True
