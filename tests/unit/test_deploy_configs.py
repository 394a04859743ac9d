"""The shipped cluster config files (deploy/) load with Dagster's own validation, and the executor switch.

Each ``dagster.yaml`` goes through Dagster's instance-config loader (schema of the whole file) and its
run launcher / coordinator config through that class's own schema; each executor config through the
executor's config schema. A copy with one misspelled key must be refused, so these checks can fail.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.config import dagster_instance_config

from jobs.executors import celery_config, executor_from_env, job_executor

PROJECT = Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy"
INSTANCE_FILES = [DEPLOY / "celery" / "dagster.yaml", DEPLOY / "k8s" / "dagster.yaml"]
PG_ENV = {
    "DAGSTER_PG_HOST": "db.internal",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_DB": "dagster",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
}


def load_instance_config(path: Path, home: Path) -> dict[str, Any]:
    """``path`` as ``home/dagster.yaml`` through Dagster's instance-config loader; the validated dict."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, home / "dagster.yaml")
    config, _ = dagster_instance_config(str(home))
    return dict(config)


def class_config_errors(section: dict[str, Any]) -> list[str]:
    """Errors of a ``module`` / ``class`` / ``config`` section against that class's own config schema."""
    cls = getattr(importlib.import_module(section["module"]), section["class"])
    result = validate_config(cls.config_type(), section.get("config") or {})
    return [error.message for error in result.errors or []]


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_instance_yaml_passes_dagsters_instance_schema(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    config = load_instance_config(path, tmp_path / "home")
    assert "postgres" in config["storage"], "a cluster instance must keep its runs in PostgreSQL"
    for section in ("run_launcher", "run_coordinator"):
        assert class_config_errors(config[section]) == [], f"{path}: {section}"


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_misspelled_instance_key_is_refused(path: Path, tmp_path: Path):
    broken = tmp_path / "dagster.yaml"
    broken.write_text(path.read_text().replace("run_monitoring:", "run_monitor:", 1))
    with pytest.raises(DagsterInvalidConfigError, match="run_monitor"):
        load_instance_config(broken, tmp_path / "home")


def test_a_misspelled_launcher_key_is_refused():
    section = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())["run_launcher"]
    section["config"]["job_namspace"] = section["config"].pop("job_namespace")
    assert any("job_namspace" in error for error in class_config_errors(section))


def test_celery_worker_config_validates_and_matches_the_executor(monkeypatch: pytest.MonkeyPatch):
    from dagster_celery.cli import get_validated_config
    from dagster_celery.executor import celery_executor

    monkeypatch.setenv("EMOTION_CELERY_BROKER", "redis://broker.internal:6379/0")
    monkeypatch.setenv("EMOTION_CELERY_BACKEND", "redis://broker.internal:6379/1")
    worker = get_validated_config(str(DEPLOY / "celery" / "celery_config.yaml"))
    assert (worker["broker"], worker["backend"]) == (
        "redis://broker.internal:6379/0",
        "redis://broker.internal:6379/1",
    )
    assert worker["config_source"]["worker_prefetch_multiplier"] == 1
    # The runs' executor reads the same variables, so workers and runs meet at the same broker.
    assert celery_config() == {"broker": worker["broker"], "backend": worker["backend"]}
    assert validate_config(celery_executor.config_schema.config_type, celery_config()).success

    monkeypatch.delenv("EMOTION_CELERY_BACKEND")
    assert celery_config()["backend"] == "redis://broker.internal:6379/0"  # deploy/celery/worker.sh agrees


def test_k8s_run_config_validates_and_gives_a_gpu_to_exactly_the_model_steps():
    from dagster_k8s import k8s_job_executor

    from emotion_assets.definitions import defs

    config = yaml.safe_load((DEPLOY / "k8s" / "run_config.yaml").read_text())["execution"]["config"]
    schema = k8s_job_executor.config_schema.config_type
    assert validate_config(schema, config).success, validate_config(schema, config).errors
    gpu_steps = {
        step
        for step, step_config in config["per_step_k8s_config"].items()
        if step_config["container_config"]["resources"]["limits"].get("nvidia.com/gpu") == 1
    }
    graph = defs.resolve_asset_graph()
    model_pool = {
        key.to_user_string() for key in graph.get_all_asset_keys() if "model" in graph.get(key).pools
    }
    assert gpu_steps == model_pool
    assert "nvidia.com/gpu" not in config["step_k8s_config"]["container_config"]["resources"]["limits"]

    broken = dict(config, max_concurent=8)
    assert not validate_config(schema, broken).success


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "in_process"),
        ("in_process", "in_process"),
        ("multiprocess", "in_process"),
        ("celery", "celery_executor"),
    ],
)
def test_jobs_run_in_process_unless_a_distributed_executor_is_named(
    name: str, expected: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("EMOTION_EXECUTOR", raising=False)
    monkeypatch.setenv("EMOTION_CELERY_BROKER", "redis://127.0.0.1:6390/0")
    assert job_executor(name or None).name == expected
    if name == "celery":
        assert executor_from_env(name).name == "celery_executor"


def test_an_unknown_executor_name_is_refused():
    with pytest.raises(ValueError, match="EMOTION_EXECUTOR='celry'"):
        job_executor("celry")
    assert isinstance(job_executor("k8s"), dg.ExecutorDefinition)
