"""MLflow tracking through dagster-mlflow: the Dagster run is the parent MLflow run, each materialization a
nested child run; every run ends FINISHED, FAILED or KILLED.

The parent run comes from ``dagster_mlflow.mlflow_tracking`` (it starts the run, or resumes the one tagged
with this Dagster run id when another step process of the same run opened it first). :class:`TrackingResource`
opens it when Dagster initializes the resource and ends it at teardown: FAILED when a step of the Dagster run
failed (read from the instance's step records, so a failure outside any tracked block counts too) or a
tracked block raised, else FINISHED. Under the multiprocess executor each step process resumes the parent and
ends it again; a failure stays visible because it is read from the run's records, not from the process.

A process killed outright (SIGKILL, out-of-memory killer, power loss) runs no ``finally``. Every run
therefore records the host and process id that own it, and each new tracked run first ends the runs of
this host's experiment that are still RUNNING although their process is gone (or its id now belongs to a
younger process): status KILLED, with a note saying which process died and which run noticed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from emotion_assets.registry import PROJECT_ROOT

EXPERIMENT = "emotion-circuits"
HOST_TAG = "emotion.host"
PID_TAG = "emotion.pid"
NOTE_TAG = "mlflow.note.content"  # shown as the run's description in the MLflow UI
ORPHAN_TAG = "emotion.orphaned"
PARENT_KEY_TAG = "dagster_run_id"  # the tag dagster-mlflow finds a Dagster run's MLflow run by


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


@dataclass
class ParentRun:
    """The MLflow run of one Dagster run, open in this process; ``failed`` once a tracked block raised."""

    run_id: str
    dagster_run_id: str
    experiment_id: str
    failed: bool = False


def step_failures(instance: dg.DagsterInstance | None, dagster_run_id: str) -> int:
    """How many steps of the Dagster run have failed so far, from the instance's event records."""
    if instance is None:
        return 0
    records = instance.get_records_for_run(dagster_run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    return len(records.records)


class TrackingResource(dg.ConfigurableResource):
    """The Dagster run's MLflow run (through dagster-mlflow) and one nested run per materialization, with
    its params, key metrics and artifact files."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite in the project."
    )
    artifact_root: str = Field(
        default="", description="Artifact folder for a new experiment; empty = <project>/mlartifacts."
    )
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Where `mlflow ui` serves, for links.")
    enabled: bool = Field(default=True, description="Set false to skip MLflow entirely.")
    experiment: str = Field(default=EXPERIMENT, description="MLflow experiment name.")

    _parent: ParentRun | None = PrivateAttr(default=None)

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
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator[TrackingResource]:
        """Hold the Dagster run's MLflow run open while Dagster uses this resource (the whole run in process,
        one step under the multiprocess executor)."""
        run = context.dagster_run
        if not self.enabled or run is None:
            yield self
            return
        partition = run.tags.get("dagster/partition", "")
        with self.parent_run(
            run.run_id, job=run.job_name, partition=partition, log=context.log, instance=context.instance
        ):
            yield self

    @contextlib.contextmanager
    def parent_run(
        self,
        dagster_run_id: str,
        *,
        job: str,
        partition: str = "",
        log: Any = None,
        instance: dg.DagsterInstance | None = None,
    ) -> Iterator[ParentRun]:
        """Start (or resume) the MLflow run of Dagster run ``dagster_run_id`` through dagster-mlflow's
        ``mlflow_tracking`` and end it on exit: FAILED if a tracked block raised, the body raised or a step of
        the run failed (``instance``'s records), else FINISHED.

        ``mlflow_tracking`` is a function-style resource that is not used as is, for three reasons:
        its config is fixed when the Definitions load, while the tracking URI and artifact folder are read
        when the run starts (tests and ``bench_study`` point them elsewhere); it creates a missing experiment
        without our artifact location; and it never ends the run itself on success (only a job hook on the
        job's last op does, which UI materializations, asset subsets and partitioned asset jobs do not
        guarantee), nor on a failed step (Dagster catches the step's exception before the resource's
        teardown sees it: the MLflow run stayed RUNNING). So it is called here with the init context built
        from this resource's settings, and the parent run is ended below.
        """
        import mlflow

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            from dagster_mlflow import mlflow_tracking

        if self._parent is not None:
            raise RuntimeError(
                f"MLflow run {self._parent.run_id} of Dagster run {self._parent.dagster_run_id} is still open "
                f"in this resource; Dagster run {dagster_run_id} cannot open another. Use one "
                "TrackingResource per Dagster run."
            )
        active = mlflow.active_run()
        if active is not None:
            raise RuntimeError(
                f"An MLflow run ({active.info.run_id}) is already active in this process, so the Dagster run "
                f"{dagster_run_id} would log into it. End it first (mlflow.end_run())."
            )
        client = self._client()  # creates the store's schema under a lock
        experiment_id = self._experiment_id(client)  # with this project's artifact location
        tags = {
            "dagster.run_id": dagster_run_id,
            "dagster.job": job,
            "dagster.partition": partition,
            HOST_TAG: host_name(),
            PID_TAG: str(os.getpid()),
        }
        init = _MlflowInitContext(
            log=log or logging.getLogger(__name__),
            run_id=dagster_run_id,
            dagster_run=_JobName(job),
            resource_config={
                "experiment_name": self.experiment,
                "mlflow_tracking_uri": self.uri(),
                "extra_tags": tags,
            },
        )
        with warnings.catch_warnings():  # dagster-mlflow marks itself beta; chosen knowingly, said once here
            warnings.simplefilter("ignore", dg.BetaWarning)
            lifecycle = mlflow_tracking.resource_fn(init)
            next(lifecycle)  # starts or resumes the run tagged dagster_run_id=<Dagster run id>
        parent = ParentRun(mlflow.active_run().info.run_id, dagster_run_id, experiment_id)
        self._parent = parent
        raised = True
        try:
            yield parent
            raised = False
        finally:
            self._parent = None
            try:
                failed = raised or parent.failed or step_failures(instance, dagster_run_id) > 0
                while (current := mlflow.active_run()) is not None and current.info.run_id != parent.run_id:
                    mlflow.end_run(status="FAILED")  # a child left open by an interrupted block
                if current is not None:
                    mlflow.end_run(status="FAILED" if failed else "FINISHED")
            finally:
                lifecycle.close()

    @contextlib.contextmanager
    def track(
        self, context: dg.AssetExecutionContext, asset: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[TrackedRun]:
        """A nested MLflow run for this materialization under the Dagster run's run; logged and ended
        (FINISHED / FAILED) on exit. Outside Dagster's resource set-up (a direct call), the parent run is
        opened here for this one materialization."""
        tracked = TrackedRun(params=dict(params or {}))
        if not self.enabled:
            yield tracked
            return
        partition = context.partition_key if context.has_partition_key else ""
        if self._parent is None:
            with (
                self.parent_run(context.run_id, job=context.job_name or "", partition=partition),
                self._child(context, asset, partition, tracked),
            ):
                yield tracked
            return
        with self._child(context, asset, partition, tracked):
            yield tracked

    @contextlib.contextmanager
    def _child(
        self, context: dg.AssetExecutionContext, asset: str, partition: str, tracked: TrackedRun
    ) -> Iterator[None]:
        import mlflow

        parent = self._parent
        assert parent is not None
        client = self._client()
        run_name = f"{asset}[{partition}]" if partition else asset
        tracked.orphans_ended = end_orphaned_runs(client, parent.experiment_id, noticed_by=run_name)
        run = mlflow.start_run(
            experiment_id=parent.experiment_id,
            run_name=run_name,
            nested=True,
            parent_run_id=parent.run_id,
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
        tracked.url = f"{self.ui_url}/#/experiments/{parent.experiment_id}/runs/{tracked.run_id}"
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        finally:
            parent.failed = parent.failed or status == "FAILED"
            try:
                self._flush(client, tracked)
            finally:
                mlflow.end_run(status=status)

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


@dataclass(frozen=True)
class _JobName:
    job_name: str


@dataclass(frozen=True)
class _MlflowInitContext:
    """The parts of an ``InitResourceContext`` that dagster-mlflow's ``MlFlow`` reads."""

    log: Any
    run_id: str
    dagster_run: _JobName
    resource_config: dict[str, Any]
