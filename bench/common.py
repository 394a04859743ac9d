"""What the model benchmarks share: the options that pick and load the model, and loading it."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from emotion_assets.science.parallel import ModelWorkers
from resources.models import ModelHandle, ModelResource

T = TypeVar("T")


def add_model_options(parser: argparse.ArgumentParser, *, repeats: int, device: bool = True) -> None:
    """``--model``, ``--repeats`` (timings are the median of this many runs), ``--threads`` and, when the
    bench can run off the CPU, ``--device``."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    if device:
        parser.add_argument("--device", default="cpu")


def load_model(args: argparse.Namespace) -> ModelHandle:
    """Apply ``--threads``, then load ``--model`` on ``--device`` (CPU when the bench has no such option)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return ModelResource(device=getattr(args, "device", "cpu")).get(args.model)


def time_interleaved(
    methods: dict[str, Callable[[], T]], repeats: int, device: torch.device
) -> tuple[dict[str, float], dict[str, T]]:
    """Run every method once per repeat, interleaved; each method's median seconds and its last result."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, T] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def _ready(_handle: ModelHandle) -> bool:
    return True


def started_model_workers(handle: ModelHandle, count: int) -> ModelWorkers | None:
    """``count`` worker processes each holding ``handle``'s model (what ``cpu_workers`` runs), started and
    loaded before any timing, the start-up time printed; None below 2 workers or off the CPU. Stop them with
    ``.__exit__`` (or use them as a context manager)."""
    if count < 2 or handle.device.type != "cpu":
        return None
    workers = ModelResource(device="cpu").workers(handle, count)
    start = time.perf_counter()
    workers.map(_ready, [{} for _ in range(2 * workers.count)])  # every worker loads the model once
    print(
        f"{workers.count} worker processes started and loaded the model in {time.perf_counter() - start:.1f} s"
    )
    return workers
