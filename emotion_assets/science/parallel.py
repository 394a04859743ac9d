"""Independent CPU-bound tasks in worker processes, for work that runs on one BLAS thread.

Many small decompositions (the alignment's bootstrap and null subspaces) gain nothing from a second BLAS
thread, so one process leaves the other cores idle. :func:`map_in_processes` runs such tasks in ``spawn``
worker processes (no state is inherited from the parent: safe beside torch's OpenMP threads and Dagster's
own threads), each limited to one BLAS thread, and returns the results in task order. Each task computes
exactly what it computes in the parent on one BLAS thread, so the results do not depend on the number of
workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _call(fn: Callable[..., T], kwargs: Mapping[str, Any]) -> T:
    return fn(**kwargs)


def process_count(workers: int | Literal["auto"], n_tasks: int) -> int:
    """``workers`` as a count: ``auto`` is this process's share of the CPU (torch's intra-op thread count,
    which a caller running several processes lowers), never more than the tasks."""
    if workers == "auto":
        import torch

        workers = torch.get_num_threads()
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}.")
    return max(1, min(workers, n_tasks, os.cpu_count() or 1))


def map_in_processes(
    fn: Callable[..., T], tasks: Sequence[Mapping[str, Any]], workers: int | Literal["auto"] = 1
) -> list[T]:
    """``[fn(**task) for task in tasks]``, in ``workers`` processes when more than one (``fn`` must be a
    module-level function; tasks and results are passed between processes, not stored)."""
    count = process_count(workers, len(tasks))
    if count == 1:
        return [fn(**task) for task in tasks]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(count, mp_context=context, initializer=_one_blas_thread) as pool:
        return list(pool.map(_call, [fn] * len(tasks), tasks))
