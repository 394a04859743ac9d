"""Executor chosen by ``$EMOTION_EXECUTOR``: in_process (default), multiprocess, k8s or celery.

in_process    every step of a run in one process: a model is loaded once per run and shared by all
              steps (the right choice on one machine and for every model-backed job).
multiprocess  one process per step, ``$EMOTION_MAX_CONCURRENT`` at a time (default: CPU count); each
              step that needs a model loads its own copy, so use it for CPU-bound, model-free jobs.
k8s           one Kubernetes Job per step (``dagster_k8s.k8s_job_executor``); needs ``pip install -e .[scale]``
              and a run launcher / image set up as in docs/operations.md.
celery        steps sent to Celery workers (``dagster_celery.celery_executor``); needs
              ``pip install -e .[scale]`` and a broker (``$EMOTION_CELERY_BROKER``).
"""

from __future__ import annotations

import importlib
import os

import dagster as dg

EXECUTOR_ENV = "EMOTION_EXECUTOR"
EXECUTORS = ("in_process", "multiprocess", "k8s", "celery")
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
    choice = (name or os.environ.get(EXECUTOR_ENV, "") or "in_process").strip().lower().replace("-", "_")
    if choice in ("in_process", "inprocess"):
        return dg.in_process_executor
    if choice == "multiprocess":
        limit = os.environ.get("EMOTION_MAX_CONCURRENT")
        if limit:
            return dg.multiprocess_executor.configured(
                {"max_concurrent": int(limit)}, name="multiprocess_executor"
            )
        return dg.multiprocess_executor
    if choice in ("k8s", "kubernetes"):
        return _require("dagster_k8s", "k8s_job_executor", choice)
    if choice == "celery":
        executor = _require("dagster_celery", "celery_executor", choice)
        broker = os.environ.get("EMOTION_CELERY_BROKER")
        return executor.configured({"broker": broker}, name="celery_executor") if broker else executor
    raise ValueError(f"{EXECUTOR_ENV}={choice!r} is not one of {', '.join(EXECUTORS)}.")


__all__ = ["EXECUTORS", "EXECUTOR_ENV", "ExecutorUnavailableError", "executor_from_env"]
