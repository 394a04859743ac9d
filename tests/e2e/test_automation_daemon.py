"""Declarative Automation on a real daemon: a run launched by an automation sensor, polled to SUCCESS.

A temporary DAGSTER_HOME with the project's dagster.yaml (run queue, pools, run monitoring). The automation
sensors start stopped, as on a user's fresh instance; the test turns ``study_automation`` on with the
command docs/operations.md gives, then starts ``dagster-daemon run``. With ``EMOTION_AUTOMATION_PROFILES=smoke``
and a cron of every minute, the daemon's first evaluation records the state, the next one (a cron tick
later) finds ``emotion_dataset[smoke]`` missing and owed, and launches it. Only the study sensor runs, so
no model is loaded: the model assets wait for ``model_automation``, which stays off. The daemon's process
group is stopped at the end, whatever happened.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    PROJECT,
    init_mlflow_store,
    isolated_env,
    stop_process_group,
    write_instance_yaml,
)

pytestmark = pytest.mark.e2e

SENSOR = "study_automation"
PROFILE = "smoke"
RUN_TIMEOUT = 300  # from the daemon's start: code location load, two sensor ticks 60 s apart, the run
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def cli(name: str) -> str:
    """The console script of the running interpreter's environment (``dagster``, ``dagster-daemon``)."""
    return str(Path(sys.executable).parent / name)


def automation_runs(instance) -> list:
    import dagster as dg

    return list(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/from_automation_condition": "true"})))


def test_daemon_launches_the_missing_dataset_through_the_automation_sensor(tmp_path: Path):
    import dagster as dg

    automation = {"EMOTION_AUTOMATION_PROFILES": PROFILE, "EMOTION_AUTOMATION_CRON": "* * * * *"}
    env = isolated_env(tmp_path, PYTHONPATH=str(PROJECT), **automation)
    home = Path(env["DAGSTER_HOME"])
    write_instance_yaml(home)
    init_mlflow_store(env["MLFLOW_TRACKING_URI"])
    started = time.monotonic()
    switched = subprocess.run(
        [cli("dagster"), "sensor", "start", SENSOR, "-w", "workspace.yaml"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert switched.returncode == 0, switched.stdout[-2000:] + switched.stderr[-4000:]

    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log, dg.DagsterInstance.from_config(str(home)) as instance:
        daemon = subprocess.Popen(
            [cli("dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            run = wait_for_automation_run(instance, daemon, log_path)
        finally:
            stop_process_group(daemon)
        print(f"automation run {run.run_id} SUCCESS after {time.monotonic() - started:.0f} s")

        assert run.status == dg.DagsterRunStatus.SUCCESS, tail(log_path)
        assert run.tags.get("dagster/partition") == PROFILE
        assert dg.AssetKey("emotion_dataset") in (run.asset_selection or set())
        assert not any(key.to_user_string() == "model_card" for key in run.asset_selection or set())
        record = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("emotion_dataset"), asset_partitions=[PROFILE]),
            limit=1,
        ).records
        assert record and record[0].run_id == run.run_id
    assert (tmp_path / "results" / PROFILE / "emotion_dataset" / "prompts.parquet").exists()


def wait_for_automation_run(instance, daemon: subprocess.Popen, log_path: Path):
    """The first run launched by automation, once it has finished; fails on a daemon exit or the timeout."""
    deadline = time.monotonic() + RUN_TIMEOUT
    seen: list = []
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            pytest.fail(f"dagster-daemon exited with {daemon.returncode}:\n{tail(log_path)}")
        seen = automation_runs(instance)
        finished = [r for r in seen if r.status.value in DONE]
        if finished:
            return finished[-1]  # runs come newest first: the first one launched
        time.sleep(2)
    every = [(r.run_id[:8], r.status.value, dict(r.tags)) for r in instance.get_runs()]
    pytest.fail(f"no finished automation run after {RUN_TIMEOUT} s (all runs: {every}):\n{tail(log_path)}")


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
