"""Two runs on different partitions at the same time against a PostgreSQL-backed Dagster instance.

The test starts a throw-away PostgreSQL server (``initdb`` + ``pg_ctl`` from the Debian ``postgresql``
package, as the ``postgres`` user when running as root) on a free loopback port, points a DAGSTER_HOME at
it with ``docs/dagster.postgres.yaml``, and runs ``dataset_job`` for ``smoke`` and ``baseline`` in two
processes released together. Both runs must succeed and be recorded in the PostgreSQL run and event
storage. The server is always stopped and its files removed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import PROJECT, free_port, init_mlflow_store, isolated_env, stop_process_group

pytestmark = pytest.mark.e2e

PARTITIONS = ("smoke", "baseline")
DB_NAME = "dagster"
RUN_TIMEOUT = 420
TEST_TAG = "emotion/test"

WORKER = r"""
import json, sys, time
from pathlib import Path

partition, barrier = sys.argv[1], Path(sys.argv[2])
import dagster as dg
from emotion_assets.definitions import defs

(barrier / f"{partition}.ready").touch()
deadline = time.time() + 300
while len(list(barrier.glob("*.ready"))) < int(sys.argv[3]) and time.time() < deadline:
    time.sleep(0.05)
instance = dg.DagsterInstance.get()
result = defs.resolve_job_def("dataset_job").execute_in_process(
    partition_key=partition, instance=instance, raise_on_error=False, tags={"emotion/test": "postgres"}
)
print("RESULT " + json.dumps({"partition": partition, "run_id": result.run_id, "success": result.success}))
sys.exit(0 if result.success else 1)
"""


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    data_dir: Path

    def dsn(self, db: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={db}"

    def dagster_env(self, db: str) -> dict[str, str]:
        """The variables ``docs/dagster.postgres.yaml`` reads to reach database ``db`` (trust auth)."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_DB": db,
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
        }


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path is None:
        pytest.fail(
            f"PostgreSQL's {name} was not found (/usr/lib/postgresql/*/bin): run `bash scripts/ci_services.sh` "
            "(installs postgresql and chromium with apt-get) before the end-to-end tests."
        )
    return on_path


def _as_postgres(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as the ``postgres`` user when we are root (the server refuses to run as root)."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="emotion-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, user="postgres", group="postgres")
    data, log = root / "data", root / "server.log"
    port = free_port()
    started = False
    try:
        subprocess.run(
            _as_postgres(
                [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"]),
            check=True,
            capture_output=True,
            text=True,
            timeout=90,
        )
        started = True
        server = Postgres(host="127.0.0.1", port=port, user="postgres", data_dir=data)
        import psycopg2

        conn = psycopg2.connect(server.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DB_NAME}")
        conn.close()
        yield server
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"PostgreSQL failed to start: {exc.cmd}\n{exc.stdout}\n{exc.stderr}\n{server_log}")
    finally:
        if started:
            subprocess.run(
                _as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def test_two_partitions_run_concurrently_on_a_postgres_instance(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import dagster as dg
    import psycopg2

    pg_env = postgres.dagster_env(DB_NAME)
    env = isolated_env(tmp_path, **pg_env)
    home = Path(env["DAGSTER_HOME"])
    shutil.copy(PROJECT / "docs" / "dagster.postgres.yaml", home / "dagster.yaml")

    # Create the schema once, as a long-lived deployment would have it, before the runs race to it.
    for name, value in pg_env.items():
        monkeypatch.setenv(name, value)
    instance = dg.DagsterInstance.from_config(str(home))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage", type(instance.run_storage)
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    instance.dispose()

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    workers = []
    for partition in PARTITIONS:
        worker_env = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / f'mlflow-{partition}.db'}")
        init_mlflow_store(worker_env["MLFLOW_TRACKING_URI"])
        log = open(tmp_path / f"worker-{partition}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, partition, str(barrier), str(len(PARTITIONS))],
            cwd=PROJECT,
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.append((partition, proc, log))
    started = time.monotonic()
    outcomes = {}
    try:
        for partition, proc, _ in workers:
            remaining = max(1.0, RUN_TIMEOUT - (time.monotonic() - started))
            try:
                outcomes[partition] = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                outcomes[partition] = "timeout"
    finally:
        for _, proc, log in workers:
            stop_process_group(proc, grace=5)
            log.close()
    elapsed = time.monotonic() - started
    logs = {p: (tmp_path / f"worker-{p}.log").read_text(errors="replace") for p in PARTITIONS}
    for partition in PARTITIONS:
        assert outcomes[partition] == 0, f"{partition}: exit {outcomes[partition]}\n{logs[partition][-4000:]}"

    instance = dg.DagsterInstance.from_config(str(home))
    try:
        records = instance.get_run_records(filters=dg.RunsFilter(tags={TEST_TAG: "postgres"}))
        by_partition = {r.dagster_run.tags.get("dagster/partition"): r for r in records}
        assert set(by_partition) == set(PARTITIONS), by_partition.keys()
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        starts = [r.start_time for r in records]
        ends = [r.end_time for r in records]
        assert None not in starts and None not in ends
        overlap = min(ends) - max(starts)
        print(f"two runs in {elapsed:.1f} s; their executions overlapped for {overlap:.1f} s")
        assert overlap > 0, "the two runs did not execute at the same time"
        for partition in PARTITIONS:
            found = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("emotion_dataset"), asset_partitions=[partition]),
                limit=1,
            ).records
            assert found, f"no emotion_dataset materialization for {partition} in the event log"
    finally:
        instance.dispose()

    run_ids = {
        json.loads(line.removeprefix("RESULT "))["run_id"]
        for p in PARTITIONS
        for line in logs[p].splitlines()
        if line.startswith("RESULT ")
    }
    with psycopg2.connect(postgres.dsn(DB_NAME)) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (list(run_ids),))
        rows = dict(cur.fetchall())
    assert set(rows) == run_ids and set(rows.values()) == {"SUCCESS"}, rows
