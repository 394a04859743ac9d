"""MLflow tracking: one MLflow run per asset materialization, always ended FINISHED, FAILED or KILLED.

dagster-mlflow's ``mlflow_tracking`` resource keeps a single process-global active run per Dagster run;
here several partitions and assets share a process, so runs are created and ended explicitly through
``MlflowClient`` with their own ids, and the ``finally`` of :meth:`TrackingResource.track` guarantees a
terminal status whether the materialization came from the UI, a job, a schedule or a test.

A process killed outright (SIGKILL, out-of-memory killer, power loss) runs no ``finally``. Every run
therefore records the host and process id that own it, and each new tracked run first ends the runs of
this host's experiment that are still RUNNING although their process is gone (or its id now belongs to a
younger process): status KILLED, with a note saying which process died and which run noticed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from emotion_assets.registry import PROJECT_ROOT

EXPERIMENT = "emotion-circuits"
HOST_TAG = "emotion.host"
PID_TAG = "emotion.pid"
NOTE_TAG = "mlflow.note.content"  # shown as the run's description in the MLflow UI
ORPHAN_TAG = "emotion.orphaned"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT_ROOT / 'mlruns.db'}")


def default_artifact_root() -> str:
    return os.environ.get("EMOTION_MLFLOW_ARTIFACTS", str(PROJECT_ROOT / "mlartifacts"))


@dataclass
class TrackedRun:
    """What an asset hands to MLflow while it runs."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    run_id: str = ""
    url: str = ""
    orphans_ended: list[str] = field(default_factory=list)  # runs of dead processes this run closed

    def log_metrics(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(float(value)):
                self.metrics[key] = float(value)

    def log_artifacts(self, *paths: Path) -> None:
        self.artifacts.extend(Path(p) for p in paths)

    def metadata(self) -> dict[str, dg.MetadataValue]:
        if not self.run_id:
            return {"mlflow_run_id": dg.MetadataValue.text("(tracking disabled)")}
        orphans = (
            {"mlflow_orphans_ended": dg.MetadataValue.json(self.orphans_ended)} if self.orphans_ended else {}
        )
        return {
            "mlflow_run_id": dg.MetadataValue.text(self.run_id),
            "mlflow_run": dg.MetadataValue.url(self.url)
            if self.url.startswith("http")
            else dg.MetadataValue.text(self.url),
            **orphans,
        }


def host_name() -> str:
    return socket.gethostname()


def process_is_gone(pid: int, run_start_ms: int) -> bool:
    """Whether process ``pid`` of this host, which started a run at ``run_start_ms``, has ended: no such
    process, a zombie, or a process created after the run began (the id was reused). A process that
    exists but cannot be inspected counts as alive."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        created_ms = process.create_time() * 1000
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False
    return created_ms > run_start_ms + 1000  # create_time is rounded; a reused id is much younger


def end_orphaned_runs(client, experiment_id: str, noticed_by: str) -> list[str]:
    """End as KILLED, with a note, every RUNNING run of ``experiment_id`` owned by a process of this host
    that is gone (:func:`process_is_gone`). Runs of other hosts, and runs without an owner tag (written
    before owners were recorded), are left alone. Returns the ids of the runs ended."""
    host = host_name()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    ended = []
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or not process_is_gone(int(pid), run.info.start_time):
            continue
        now = datetime.now(UTC).isoformat(timespec="seconds")
        note = (
            f"Process {pid} on {host} ended without closing this run (killed or crashed): no metrics or "
            f"artifacts were logged. Marked KILLED at {now} when {noticed_by} started. The Dagster run "
            f"{run.data.tags.get('dagster.run_id', '?')} may still show STARTED until run monitoring ends "
            "it (docs/operations.md)."
        )
        client.set_tag(run.info.run_id, NOTE_TAG, note)
        client.set_tag(run.info.run_id, ORPHAN_TAG, "true")
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    return ended


class TrackingResource(dg.ConfigurableResource):
    """Logs params, key metrics and artifact files of each materialization to MLflow."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite in the project."
    )
    artifact_root: str = Field(
        default="", description="Artifact folder for a new experiment; empty = <project>/mlartifacts."
    )
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Where `mlflow ui` serves, for links.")
    enabled: bool = Field(default=True, description="Set false to skip MLflow entirely.")
    experiment: str = Field(default=EXPERIMENT, description="MLflow experiment name.")

    def uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()

    def _client(self):
        """A client on a store whose schema exists; the first creation is serialised by a file lock.

        Two processes creating a brand-new SQLite store at once race on MLflow's schema migration.
        """
        from mlflow.tracking import MlflowClient

        uri = self.uri()
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            with open(db.with_name(db.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)  # creates the schema on first use
            return client
        return MlflowClient(tracking_uri=uri)

    def _experiment_id(self, client) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        root = Path(self.artifact_root or default_artifact_root())
        root.mkdir(parents=True, exist_ok=True)
        try:
            return client.create_experiment(self.experiment, artifact_location=root.as_uri())
        except Exception:  # another process created it first
            return client.get_experiment_by_name(self.experiment).experiment_id

    @contextlib.contextmanager
    def track(
        self, context: dg.AssetExecutionContext, asset: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[TrackedRun]:
        """Open an MLflow run for this materialization; log and end it (FINISHED / FAILED) on exit."""
        tracked = TrackedRun(params=dict(params or {}))
        if not self.enabled:
            yield tracked
            return
        client = self._client()
        experiment_id = self._experiment_id(client)
        partition = context.partition_key if context.has_partition_key else ""
        run_name = f"{asset}[{partition}]" if partition else asset
        tracked.orphans_ended = end_orphaned_runs(client, experiment_id, noticed_by=run_name)
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            tags={
                "dagster.run_id": context.run_id,
                "dagster.asset": asset,
                "dagster.partition": partition,
                "dagster.job": context.job_name or "",
                HOST_TAG: host_name(),
                PID_TAG: str(os.getpid()),
            },
        )
        tracked.run_id = run.info.run_id
        tracked.url = f"{self.ui_url}/#/experiments/{experiment_id}/runs/{tracked.run_id}"
        status = "FAILED"
        try:
            yield tracked
            status = "FINISHED"
        finally:
            try:
                self._flush(client, tracked)
            finally:
                client.set_terminated(tracked.run_id, status=status)

    @staticmethod
    def _flush(client, tracked: TrackedRun) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params = [Param(k, str(v)[:6000]) for k, v in tracked.params.items()]
        metrics = [Metric(k, v, now, 0) for k, v in tracked.metrics.items()]
        for start in range(0, max(len(params), len(metrics)), 100):
            client.log_batch(
                tracked.run_id, metrics=metrics[start : start + 100], params=params[start : start + 100]
            )
        for path in tracked.artifacts:
            if path.is_dir():
                client.log_artifacts(tracked.run_id, str(path))
            elif path.is_file():
                client.log_artifact(tracked.run_id, str(path))
