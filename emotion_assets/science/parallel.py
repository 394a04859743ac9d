"""Independent CPU-bound tasks in worker processes, for work that runs on one BLAS thread.

Many small decompositions (the alignment's bootstrap and null subspaces) gain nothing from a second BLAS
thread, so one process leaves the other cores idle. :func:`map_in_processes` runs such tasks in ``spawn``
worker processes (no state is inherited from the parent: safe beside torch's OpenMP threads and Dagster's
own threads), each limited to one BLAS thread, and returns the results in task order. Each task computes
exactly what it computes in the parent on one BLAS thread, so the results do not depend on the number of
workers. :class:`ModelWorkers` does the same for tasks that need a model, each worker holding its own copy.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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


# The model a worker process of :class:`ModelWorkers` loaded, for the tasks it runs.
_WORKER_MODEL: dict[str, Any] = {}


def _init_model_worker(load: Callable[[], Any]) -> None:
    import torch

    _one_blas_thread()
    torch.set_num_threads(1)
    _WORKER_MODEL["model"] = load()


def _call_with_model(fn: Callable[..., T], kwargs: Mapping[str, Any]) -> T:
    return fn(_WORKER_MODEL["model"], **kwargs)


class ModelWorkers:
    """Processes that each hold a copy of a model, kept for as many :meth:`map` calls as a caller needs.

    With one worker (the default, and always off the CPU) nothing is started: the caller's ``model`` runs
    every task here. With more, ``spawn`` workers each call ``load()`` once (a picklable zero-argument
    callable returning an equivalent of ``model``) on first use, and run tasks on one torch and one BLAS
    thread: small-batch decoding on a CPU gains more from a second process than from a second thread (a
    model per process is the price in memory). Use as a context manager; leaving it stops the workers.
    """

    def __init__(
        self, model: Any, load: Callable[[], Any] | None, workers: int | Literal["auto"] = 1
    ) -> None:
        self.model = model
        self.load = load
        self.count = 1 if load is None else process_count(workers, os.cpu_count() or 1)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> ModelWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def map(
        self,
        fn: Callable[..., T],
        tasks: Sequence[Mapping[str, Any]],
        on_result: Callable[[int, T], None] | None = None,
    ) -> list[T]:
        """``[fn(model, **task) for task in tasks]`` (``fn`` a module-level function); ``on_result(index,
        result)`` is called here as each task finishes (e.g. to store it), in completion order; the list is
        in task order. A single task runs here."""
        results: list[Any] = [None] * len(tasks)
        if self.count == 1 or len(tasks) < 2:
            for index, task in enumerate(tasks):
                results[index] = fn(self.model, **task)
                if on_result is not None:
                    on_result(index, results[index])
            return results
        if self._pool is None:
            context = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(
                self.count, mp_context=context, initializer=_init_model_worker, initargs=(self.load,)
            )
        futures = {self._pool.submit(_call_with_model, fn, task): index for index, task in enumerate(tasks)}
        for future in as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            if on_result is not None:
                on_result(index, results[index])
        return results
