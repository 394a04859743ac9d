"""The whole smoke graph, end to end, on a tiny random checkpoint registered through ``source: {type: local}``.

``python -m jobs.study`` runs in a fresh process whose registry and profile file are test files
(``EMOTION_MODEL_REGISTRY`` / ``EMOTION_PROFILES``), so the partitions are built from them exactly as for a
user's own registry. The profile is ``smoke`` made tiny (few prompts, four generated tokens); the registry
holds the checkpoint, its random twin and the pair of the two, so every job of the study plan runs:
dataset, representations of both, interventions (steering, heads, statistics, circuits), alignment and
the report. Then every asset of the Definitions must have a materialization.

Families: a checkpoint of any family the head functions support belongs in ``STUDY_FAMILIES``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_checkpoints import save_tiny_checkpoint

PROJECT = Path(__file__).resolve().parents[2]
STUDY_FAMILIES = ["gpt_neox", "qwen3"]
MODEL, TWIN = "tiny", "tiny-random"


def _tiny_smoke_profile(path: Path) -> None:
    doc = yaml.safe_load((PROJECT / "data" / "profiles.yaml").read_text(encoding="utf-8"))
    smoke = doc["profiles"]["smoke"]
    smoke.update(
        samples_per_emotion=20, layers="all", k_max=2, n_bootstrap=50, batch_size=16,
        generation={"max_new_tokens": 4, "decoding": "greedy", "temperature": 1.0, "top_p": 1.0},
        heads={"top_n": 2, "max_prompts": 2},
    )  # fmt: skip
    smoke["steering"].update(layers=[1], alpha_grid=[-0.2, 0.0, 0.2], n_random_directions=1, max_prompts=4)
    smoke["alignment"].update(n_null=10, n_boot=10)
    path.write_text(yaml.safe_dump({"version": 1, "profiles": {"smoke": smoke}}), encoding="utf-8")


def _registry(path: Path, checkpoint: Path, geometry: dict[str, int]) -> None:
    models = {
        MODEL: {"kind": "causal_lm", "source": {"type": "local", "path": str(checkpoint)}, **geometry},
        TWIN: {"kind": "causal_lm", "source": {"type": "random_twin", "of": MODEL, "seed": 7}, **geometry},
    }
    doc = {"version": 1, "default_model": MODEL, "models": models, "pairs": [[MODEL, TWIN]]}
    path.write_text(json.dumps(doc), encoding="utf-8")


@pytest.mark.parametrize("family", STUDY_FAMILIES)
def test_smoke_graph_materializes_every_asset_on_a_local_checkpoint(tmp_path, family):
    import dagster as dg

    from emotion_assets.definitions import defs

    geometry = save_tiny_checkpoint(family, tmp_path / "checkpoint")
    _registry(tmp_path / "models.yaml", tmp_path / "checkpoint", geometry)
    _tiny_smoke_profile(tmp_path / "profiles.yaml")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    env = {
        **os.environ,
        "EMOTION_MODEL_REGISTRY": str(tmp_path / "models.yaml"),
        "EMOTION_PROFILES": str(tmp_path / "profiles.yaml"),
        "EMOTION_RESULTS_DIR": str(tmp_path / "results"),
        "EMOTION_MODEL_CACHE": str(tmp_path / "model-cache"),
        "DAGSTER_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "EMOTION_MLFLOW_ARTIFACTS": str(tmp_path / "mlartifacts"),
        "PYTHONPATH": str(PROJECT),
    }
    study = subprocess.run(
        [sys.executable, "-m", "jobs.study", "--model", MODEL, "--profile", "smoke"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert study.returncode == 0, study.stdout[-4000:] + study.stderr[-8000:]
    assert f"[ok] alignment_job {MODEL}__{TWIN}|smoke" in study.stdout
    print(study.stdout)  # per-job wall times, shown with -s

    with dg.DagsterInstance.from_config(str(home)) as instance:
        keys = sorted(defs.resolve_asset_graph().materializable_asset_keys, key=str)  # not the config sources
        missing = [k.to_user_string() for k in keys if instance.get_latest_materialization_event(k) is None]
    assert keys and not missing, f"not materialized: {missing}"
    assert (tmp_path / "results" / "smoke" / "findings_report" / "findings.html").exists()
