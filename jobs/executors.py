"""Executor chosen by ``$EMOTION_EXECUTOR``: in_process (default), multiprocess, k8s or celery.

in_process    every step of a run in one process: a model is loaded once per run and shared by all
              steps (the right choice on one machine and for every model-backed job).
multiprocess  one process per step, ``$EMOTION_MAX_CONCURRENT`` at a time (default: CPU count), for
              CPU-bound, model-free runs. A run that loads a model (any selected step needs the ``models``
              resource: a UI materialization, a run launched by automation) still runs in process, so
              the model is loaded once per run (:func:`run_executor`).
k8s           one Kubernetes Job per step (``dagster_k8s.k8s_job_executor``); needs ``pip install -e .[scale]``
              and a run launcher / image set up as in docs/operations.md.
celery        steps sent to Celery workers (``dagster_celery.celery_executor``); needs
              ``pip install -e .[scale]``, a broker (``$EMOTION_CELERY_BROKER``, default
              ``redis://localhost:6379/0``) and a result backend (``$EMOTION_CELERY_BACKEND``, default: the
              broker URL), and workers started as in docs/operations.md ("Team / cluster").

The project's jobs take their executor from :func:`job_executor`: in process, unless ``$EMOTION_EXECUTOR``
names a distributed executor (k8s, celery). There each step runs in a long-lived worker process (Celery)
or its own pod (k8s), and the model resource's per-process cache loads a model at most once per process.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import dagster as dg

EXECUTOR_ENV = "EMOTION_EXECUTOR"
EXECUTORS = ("in_process", "multiprocess", "k8s", "celery")
DISTRIBUTED = ("k8s", "celery")
CELERY_BROKER_ENV = "EMOTION_CELERY_BROKER"
CELERY_BACKEND_ENV = "EMOTION_CELERY_BACKEND"
DEFAULT_CELERY_BROKER = "redis://localhost:6379/0"
SCALE_INSTALL = "pip install -e .[scale]"


class ExecutorUnavailableError(RuntimeError):
    """The executor named by ``$EMOTION_EXECUTOR`` needs a package that is not installed."""


def _require(module: str, attribute: str, executor: str) -> dg.ExecutorDefinition:
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise ExecutorUnavailableError(
            f"{EXECUTOR_ENV}={executor} needs the {module.replace('_', '-')} package, which is not "
            f"installed ({exc}). Install the scale extras with `{SCALE_INSTALL}`, or unset {EXECUTOR_ENV} "
            "to run in process."
        ) from exc
    return getattr(imported, attribute)


def executor_from_env(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor named by ``name`` or ``$EMOTION_EXECUTOR`` (default ``in_process``).

    Raises ``ValueError`` for an unknown name and ``ExecutorUnavailableError`` when k8s or celery is asked
    for without its package.
    """
    choice = _choice(name)
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "multiprocess":
        limit = os.environ.get("EMOTION_MAX_CONCURRENT")
        if limit:
            return dg.multiprocess_executor.configured(
                {"max_concurrent": int(limit)}, name="multiprocess_executor"
            )
        return dg.multiprocess_executor
    if choice == "k8s":
        return _require("dagster_k8s", "k8s_job_executor", choice)
    if choice == "celery":
        executor = _require("dagster_celery", "celery_executor", choice)
        return executor.configured(celery_config(), name="celery_executor")
    raise ValueError(f"{EXECUTOR_ENV}={choice!r} is not one of {', '.join(EXECUTORS)}.")


def _choice(name: str | None) -> str:
    choice = (name or os.environ.get(EXECUTOR_ENV, "") or "in_process").strip().lower().replace("-", "_")
    return {"inprocess": "in_process", "kubernetes": "k8s"}.get(choice, choice)


def celery_config() -> dict[str, str]:
    """Broker and result backend of the Celery executor, from ``$EMOTION_CELERY_BROKER`` (default
    ``redis://localhost:6379/0``) and ``$EMOTION_CELERY_BACKEND`` (default: the broker URL; Redis serves
    as both). Workers must be started with the same URLs (deploy/celery/celery_config.yaml reads them)."""
    broker = os.environ.get(CELERY_BROKER_ENV, "").strip() or DEFAULT_CELERY_BROKER
    backend = os.environ.get(CELERY_BACKEND_ENV, "").strip() or broker
    return {"broker": broker, "backend": backend}


def job_executor(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor of the project's jobs: ``executor_from_env`` for a distributed executor (k8s, celery),
    else the in-process executor, so that on one machine every step of a run shares one model load
    (``multiprocess`` would load the model again in every step; it applies only to ad-hoc selections)."""
    if _choice(name) in DISTRIBUTED:
        return executor_from_env(name)
    if _choice(name) not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={_choice(name)!r} is not one of {', '.join(EXECUTORS)}.")
    return dg.in_process_executor


MODEL_RESOURCE_KEY = "models"


def loads_model(job_def: dg.JobDefinition) -> bool:
    """Whether a step of ``job_def`` (the run's job, subset to its selected assets) uses the model resource."""
    return any(MODEL_RESOURCE_KEY in op.required_resource_keys for op in job_def.graph.iterate_op_defs())


def _multiprocess_unless_model(init_context: dg.InitExecutorContext) -> Any:
    """In process for a run that loads a model, else one process per step (the multiprocess config)."""
    if loads_model(init_context.job.get_definition()):
        creation_fn = dg.in_process_executor.executor_creation_fn
    else:
        creation_fn = dg.multiprocess_executor.executor_creation_fn
    assert creation_fn is not None  # both are built by @dg.executor
    return creation_fn(init_context)


# Takes the multiprocess executor's config (``retries`` and ``step_dependency_config`` mean the same in
# process) and keeps its requirements (a reconstructable job, a persistent instance) for every run.
multiprocess_unless_model_executor = dg.ExecutorDefinition(
    name="multiprocess_unless_model",
    config_schema=dg.multiprocess_executor.config_schema,
    requirements=dg.multiprocess_executor.get_requirements,
    executor_creation_fn=_multiprocess_unless_model,
    description="One process per step, except a run with a step that loads a model: that run executes in "
    "process, so the model is loaded once per run.",
)


def run_executor(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor of runs outside the project's jobs (UI materializations, runs launched by automation):
    ``executor_from_env``, except that under ``multiprocess`` a run whose steps load a model executes in
    process (each step process would load its own copy of the model)."""
    if _choice(name) != "multiprocess":
        return executor_from_env(name)
    limit = os.environ.get("EMOTION_MAX_CONCURRENT")
    if limit:
        return multiprocess_unless_model_executor.configured({"max_concurrent": int(limit)})
    return multiprocess_unless_model_executor


__all__ = [
    "CELERY_BACKEND_ENV",
    "CELERY_BROKER_ENV",
    "EXECUTORS",
    "EXECUTOR_ENV",
    "ExecutorUnavailableError",
    "celery_config",
    "executor_from_env",
    "job_executor",
    "loads_model",
    "run_executor",
]
