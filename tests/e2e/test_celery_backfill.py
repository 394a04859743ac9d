"""A cross-model backfill on two dagster-celery workers, with Redis as broker and PostgreSQL as storage.

The test starts a throw-away Redis server (Debian ``redis-server`` on a free loopback port, its config and
files in a temporary folder) as the Celery broker and result backend, a throw-away PostgreSQL server (the
fixture of test_postgres_concurrent.py) as Dagster's storage with ``deploy/celery/dagster.yaml``, two
workers started by ``deploy/celery/worker.sh``, and ``dagster dev`` with ``EMOTION_EXECUTOR=celery``.
Through GraphQL it backfills ``dataset_job`` for ``smoke``, then ``representation_job`` for three model
partitions launched at once (a bounded load test: 3 partitions on 2 workers). Meanwhile the same
partitions run with the in-process executor in a separate process and results tree.

Checked: every run SUCCESS and none left QUEUED / STARTING / STARTED; every step executed in one of the two
Celery workers (both took steps); every asset of every partition materialized; each worker process loaded
each model at most once (``EMOTION_MODEL_LOAD_LOG``) and no model was loaded outside the workers; every
MLflow run ended FINISHED; ``python -m jobs.compare`` finds the two results trees the same.

Skipped only when ``redis-server`` or PostgreSQL's ``initdb`` is not installed (``scripts/ci_services.sh``
installs both); every other problem fails.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import test_graphql_backfill as backfills
from tests.e2e.conftest import (
    PROJECT,
    free_port,
    init_mlflow_store,
    isolated_env,
    start_dagster_dev,
    stop_process_group,
)
from tests.e2e.test_postgres_concurrent import DB_NAME, Postgres, postgres  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

PROFILE = "smoke"
PARTITIONS = ["smollm2-135m|smoke", "minilm-l6|smoke", "smollm2-135m-random|smoke"]
WORKERS = ("emotion-w1", "emotion-w2")
REPRESENTATION_ASSETS = (
    "model_card",
    "activations",
    "emotion_vectors",
    "emotion_subspaces",
    "confound_audit",
)
WORKER_START_TIMEOUT = 180
BACKFILL_TIMEOUT = 1500
REFERENCE_TIMEOUT = 1500
UNFINISHED = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}

REFERENCE = r"""
import json, sys
import dagster as dg
from emotion_assets.definitions import defs

profile, partitions = sys.argv[1], sys.argv[2:]
with dg.DagsterInstance.ephemeral() as instance:
    plan = [("dataset_job", profile)] + [("representation_job", p) for p in partitions]
    for job, partition in plan:
        result = defs.resolve_job_def(job).execute_in_process(partition_key=partition, instance=instance)
        print("REFERENCE " + json.dumps({"job": job, "partition": partition, "success": result.success}))
"""


def _require_binary(name: str, found: str | None) -> str:
    if not found:
        pytest.skip(
            f"{name} is not installed: the Celery end-to-end test needs Debian's redis-server and postgresql "
            "(run `bash scripts/ci_services.sh`, which installs them with apt-get)."
        )
    return found


@pytest.fixture(autouse=True)
def services_installed() -> None:
    """Skip (saying why) before any server starts when redis-server or PostgreSQL is not installed."""
    _require_binary("redis-server", shutil.which("redis-server"))
    _require_binary("PostgreSQL (initdb)", (glob.glob("/usr/lib/postgresql/*/bin/initdb") or [None])[0])


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away Redis on a free loopback port: no persistence, files under a temporary folder."""
    root = tmp_path_factory.mktemp("redis")
    port = free_port()
    config = root / "redis.conf"
    config.write_text(
        f"bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize no\ndir {root}\n"
        f'save ""\nappendonly no\nlogfile {root / "redis.log"}\ndatabases 4\n'
    )
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", str(config)], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not _redis_ping(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (
                    (root / "redis.log").read_text(errors="replace")[-2000:]
                    if (root / "redis.log").exists()
                    else ""
                )
                pytest.fail(f"redis-server did not start on 127.0.0.1:{port} (exit {proc.poll()}):\n{log}")
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_process_group(proc, grace=10)


def _wait_for_workers(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    waiting = set(procs)
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):
            text = logs[name].read_text(errors="replace")
            if procs[name].poll() is not None:
                pytest.fail(f"Celery worker {name} exited with {procs[name].returncode}:\n{text[-3000:]}")
            if f"{name}@" in text and " ready." in text:
                waiting.discard(name)
        time.sleep(1)
    if waiting:
        tails = "\n".join(f"--- {n}\n{logs[n].read_text(errors='replace')[-2000:]}" for n in waiting)
        pytest.fail(f"Celery workers not ready after {WORKER_START_TIMEOUT} s:\n{tails}")


def _descendants(proc: subprocess.Popen) -> set[int]:
    import psutil

    parent = psutil.Process(proc.pid)
    return {proc.pid} | {child.pid for child in parent.children(recursive=True)}


@contextlib.contextmanager
def in_process_reference(root: Path, drop_env: tuple[str, ...]) -> Iterator[subprocess.Popen]:
    """The same partitions with the in-process executor, in a subprocess with its own results tree."""
    env = isolated_env(root)
    for name in ("EMOTION_EXECUTOR", "EMOTION_MODEL_LOAD_LOG", *drop_env):
        env.pop(name, None)
    init_mlflow_store(env["MLFLOW_TRACKING_URI"])
    with open(root / "reference.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", REFERENCE, PROFILE, *PARTITIONS],
            cwd=PROJECT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop_process_group(proc, grace=5)


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as exit_stack:
        yield exit_stack


def test_representation_backfill_on_two_celery_workers_matches_in_process(
    postgres: Postgres,  # noqa: F811 - the imported fixture
    redis_url: str,
    stack: contextlib.ExitStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    import dagster as dg
    from mlflow.tracking import MlflowClient

    started = time.monotonic()
    pg_env = postgres.dagster_env(DB_NAME)
    loads = tmp_path / "model-loads"
    cluster = {
        **pg_env,
        "EMOTION_EXECUTOR": "celery",
        "EMOTION_CELERY_BROKER": f"{redis_url}/0",
        "EMOTION_CELERY_BACKEND": f"{redis_url}/1",
        "EMOTION_MODEL_LOAD_LOG": str(loads),
    }
    instance_yaml = PROJECT / "deploy" / "celery" / "dagster.yaml"
    root = tmp_path / "celery"
    env = isolated_env(root, **cluster)
    home = Path(env["DAGSTER_HOME"])
    shutil.copy(instance_yaml, home / "dagster.yaml")
    for name, value in pg_env.items():
        monkeypatch.setenv(name, value)
    dg.DagsterInstance.from_config(str(home)).dispose()  # the schema exists before anything races to it
    init_mlflow_store(env["MLFLOW_TRACKING_URI"])

    # The in-process reference runs meanwhile, in its own results tree and instance.
    reference_root = tmp_path / "reference"
    reference = stack.enter_context(in_process_reference(reference_root, tuple(pg_env)))
    workers: dict[str, subprocess.Popen] = {}
    worker_logs = {name: tmp_path / f"{name}.log" for name in WORKERS}
    handles = []
    server = None
    try:
        for name in WORKERS:
            handle = open(worker_logs[name], "w")  # noqa: SIM115 - closed below
            handles.append(handle)
            workers[name] = subprocess.Popen(
                ["bash", str(PROJECT / "deploy" / "celery" / "worker.sh"), name],
                cwd=PROJECT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = start_dagster_dev(root, extra_env=cluster, instance_yaml=instance_yaml)
        _wait_for_workers(workers, worker_logs)
        print(f"redis, postgres, 2 workers and dagster dev up after {time.monotonic() - started:.0f} s")

        monkeypatch.setattr(backfills, "BACKFILL_TIMEOUT", BACKFILL_TIMEOUT)
        dataset = backfills.launch_job_backfill(server, "dataset_job", [PROFILE])
        backfills.wait_for_backfill(server, dataset, 1)
        launched = time.monotonic()
        representation = backfills.launch_job_backfill(server, "representation_job", PARTITIONS)
        representation_runs = backfills.wait_for_backfill(server, representation, len(PARTITIONS))
        print(f"representation backfill of {len(PARTITIONS)} partitions: {time.monotonic() - launched:.0f} s")
        assert sorted(backfills._partition(r) for r in representation_runs) == sorted(PARTITIONS)

        worker_pids = {name: _descendants(proc) for name, proc in workers.items()}
        all_runs = backfills.runs(server)
        assert not [r for r in all_runs if r["status"] in UNFINISHED], all_runs
        assert {r["status"] for r in all_runs} == {"SUCCESS"}, all_runs
    finally:
        if server is not None:
            stop_process_group(server.proc)
        for proc in workers.values():
            stop_process_group(proc, grace=10)
        for handle in handles:
            handle.close()

    # Every step ran in a Celery worker, and both workers took steps.
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        hosts: collections.Counter[str] = collections.Counter()
        for run in all_runs:
            records = instance.all_logs(run["runId"])
            succeeded = {r.step_key for r in records if r.dagster_event and r.dagster_event.is_step_success}
            in_worker = {}
            for record in records:
                event = record.dagster_event
                # dagster-celery's "Executing steps ... in celery worker" event, written by the worker.
                worker = (
                    event.engine_event_data.metadata.get("Celery worker")
                    if event and event.is_engine_event
                    else None
                )
                if worker is not None:
                    in_worker[record.step_key] = worker.value
            assert succeeded and succeeded <= set(in_worker), (run["jobName"], succeeded - set(in_worker))
            hosts.update(name.split("@")[0] for name in in_worker.values())
        print(f"steps per worker: {dict(hosts)}")
        assert set(hosts) == set(WORKERS), hosts
        for partition in PARTITIONS:
            for asset in REPRESENTATION_ASSETS:
                found = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
                ).records
                assert found, f"no {asset} materialization for {partition}"
    finally:
        instance.dispose()

    # Each worker process loaded each model at most once; no model was loaded outside the workers.
    records = [
        json.loads(line) for path in sorted(loads.glob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    per_process = collections.Counter((r["pid"], r["model"]) for r in records)
    owner = {pid: name for name, pids in worker_pids.items() for pid in pids}
    print("model loads (worker, pid, model: count):")
    for (pid, model), count in sorted(per_process.items()):
        print(f"  {owner.get(pid, 'outside the workers')} pid={pid} {model}: {count}")
    assert {r["pid"] for r in records} <= set(owner), (records, worker_pids)
    assert max(per_process.values()) == 1, per_process
    assert {r["model"] for r in records} == {p.split("|")[0] for p in PARTITIONS}

    # Every MLflow run ended.
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    mlflow_runs = client.search_runs(experiments, max_results=5000)
    statuses = collections.Counter(r.info.status for r in mlflow_runs)
    print(f"MLflow runs: {dict(statuses)}")
    assert set(statuses) == {"FINISHED"}, statuses
    tracked = {(r.data.tags.get("dagster.asset"), r.data.tags.get("dagster.partition")) for r in mlflow_runs}
    assert {(a, p) for a in ("activations", "emotion_vectors") for p in PARTITIONS} <= tracked, tracked

    # The same partitions in process give the same results.
    try:
        reference_exit = reference.wait(timeout=max(1.0, REFERENCE_TIMEOUT - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        reference_exit = "timeout"
    reference_text = (reference_root / "reference.log").read_text(errors="replace")
    assert reference_exit == 0, f"in-process reference: exit {reference_exit}\n{reference_text[-4000:]}"
    compare = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.compare",
            str(root / "results"),
            str(reference_root / "results"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"compare (celery vs in-process), exit {compare.returncode}:\n{compare.stdout[-3000:]}")
    assert compare.returncode == 0, compare.stdout[-6000:] + compare.stderr[-2000:]
    print(f"celery end-to-end test: {time.monotonic() - started:.0f} s")
