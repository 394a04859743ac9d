"""Runs launched by automation load each model once per run, whatever ``$EMOTION_EXECUTOR`` says.

Automation launches runs of the implicit asset job, whose executor is the Definitions' executor
(``jobs.executors.run_executor``). Under ``EMOTION_EXECUTOR=multiprocess`` each step would run in its own
process and load its own copy of the model; a run with a step that uses the ``models`` resource therefore
executes in process. The end-to-end test registers a tiny local checkpoint, lets the automation conditions
request its representation partition, launches exactly that selection as a multiprocess-configured run and
counts the model loads through ``$EMOTION_MODEL_LOAD_LOG``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from tests.tiny_checkpoints import save_tiny_checkpoint
from tests.unit.test_local_checkpoint_study import _tiny_smoke_profile

PROJECT = Path(__file__).resolve().parents[2]
MODEL, PROFILE = "tiny", "smoke"
PARTITION = f"{MODEL}|{PROFILE}"

# Runs in a fresh process whose registry and profile file are the test's (partitions are built from them
# when the code location loads): builds the dataset, evaluates the automation conditions over two ticks
# (the missing model partitions are owed once the nightly cron tick has passed), then launches the
# representation assets model_automation would request for the tiny model exactly as a run worker does,
# through the implicit asset job and the Definitions' executor (`dagster asset materialize`).
AUTOMATION_RUN = """
import datetime as dt, json, subprocess, sys
import dagster as dg
from emotion_assets.automation import MODEL_GROUPS
from emotion_assets.definitions import defs

partition = sys.argv[1]
instance = dg.DagsterInstance.get()
dataset = dg.AssetKey("emotion_dataset")
repository = defs.get_repository_def()
built = repository.get_implicit_job_def_for_assets([dataset]).execute_in_process(
    partition_key="smoke", asset_selection=[dataset], instance=instance
)
assert built.success
now = dt.datetime.now(dt.timezone.utc)
first = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=now)
tick = dg.evaluate_automation_conditions(
    defs=defs, instance=instance, cursor=first.cursor, evaluation_time=now + dt.timedelta(days=1)
)
model_assets = dg.AssetSelection.groups(*MODEL_GROUPS).resolve(defs.resolve_asset_graph())
same_run = repository.asset_graph.get(dg.AssetKey("model_card")).partitions_def
requested = sorted(
    key.to_user_string() for key in model_assets
    if partition in tick.get_requested_partitions(key)
    and repository.asset_graph.get(key).partitions_def == same_run
)
run = subprocess.run(
    [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "emotion_assets.definitions",
     "--select", ",".join(requested), "--partition", partition],
    capture_output=True, text=True,
)
built_keys = sorted(
    key for key in requested
    if instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1
    ).records
)
print(json.dumps({"requested": requested, "built": built_keys, "returncode": run.returncode,
                  "log": (run.stdout + run.stderr)[-6000:]}))
"""


def _registry(path: Path, checkpoint: Path, geometry: dict[str, int]) -> None:
    models = {MODEL: {"kind": "causal_lm", "source": {"type": "local", "path": str(checkpoint)}, **geometry}}
    path.write_text(json.dumps({"version": 1, "default_model": MODEL, "models": models}), encoding="utf-8")


def test_a_run_of_model_assets_executes_in_process_under_the_multiprocess_setting():
    from emotion_assets.definitions import defs
    from jobs.executors import loads_model, run_executor

    repository = defs.get_repository_def()

    def job_for(*keys: str) -> dg.JobDefinition:
        selection = {dg.AssetKey(k) for k in keys}
        return repository.get_implicit_job_def_for_assets(selection).get_subset(asset_selection=selection)

    assert loads_model(job_for("model_card", "activations", "emotion_vectors"))
    assert not loads_model(job_for("emotion_vectors", "emotion_subspaces"))  # read activations, no model
    assert not loads_model(job_for("emotion_dataset", "evaluator_quality"))
    assert run_executor("multiprocess").name == "multiprocess_unless_model"
    assert run_executor("in_process").name == dg.in_process_executor.name


def test_a_run_launched_by_automation_loads_its_model_once_under_the_multiprocess_executor(tmp_path):
    geometry = save_tiny_checkpoint("gpt_neox", tmp_path / "checkpoint")
    _registry(tmp_path / "models.yaml", tmp_path / "checkpoint", geometry)
    _tiny_smoke_profile(tmp_path / "profiles.yaml")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    loads = tmp_path / "model-loads"
    env = {
        **os.environ,
        "EMOTION_EXECUTOR": "multiprocess",
        "EMOTION_MAX_CONCURRENT": "2",
        "EMOTION_MODEL_LOAD_LOG": str(loads),
        "EMOTION_AUTOMATION_PROFILES": PROFILE,
        "EMOTION_MODEL_REGISTRY": str(tmp_path / "models.yaml"),
        "EMOTION_PROFILES": str(tmp_path / "profiles.yaml"),
        "EMOTION_RESULTS_DIR": str(tmp_path / "results"),
        "EMOTION_MODEL_CACHE": str(tmp_path / "model-cache"),
        "DAGSTER_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "EMOTION_MLFLOW_ARTIFACTS": str(tmp_path / "mlartifacts"),
        "PYTHONPATH": str(PROJECT),
    }
    env.pop("EMOTION_AUTOMATION_CRON", None)
    done = subprocess.run(
        [sys.executable, "-c", AUTOMATION_RUN, PARTITION],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # Automation asks for the whole representation chain of the new model at once (one run) ...
    assert {"model_card", "activations", "emotion_vectors", "emotion_subspaces"} <= set(summary["requested"])
    assert summary["returncode"] == 0, summary["log"]
    assert summary["built"] == summary["requested"], summary["log"]
    # ... and that run loaded the model once, although two of its steps use it.
    records = [
        json.loads(line) for path in sorted(loads.glob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    assert [r["model"] for r in records] == [MODEL], records
