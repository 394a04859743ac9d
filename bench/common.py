"""What the model benchmarks share: the options that pick and load the model, and loading it."""

from __future__ import annotations

import argparse

import torch

from resources.models import ModelHandle, ModelResource


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
