"""Batch results that outlive an interrupted run: a content key per batch and the cache the sweeps use.

A long generation sweep (hours for a 270M model on a CPU, 10k+ continuations) runs in batches whose
composition is fixed by its inputs. Each batch gets a key that hashes everything its output depends on:
the model's fingerprint, the generation settings and the exact tensors fed to the model (token ids,
attention mask, per-row vectors). A cache hit therefore means this very batch was computed before, and
reusing it gives bit-identical results; any change to an input changes the key, and the batch is
computed anew. Storage is the caller's (``resources.resume.ResumeFolder`` for assets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor


class BatchCache(Protocol):
    """Where finished batches are kept (JSON values) until the whole result is published."""

    def get(self, key: str, valid: Callable[[Any], bool], expected: str) -> Any | None:
        """The value stored under ``key`` when ``valid(value)``; else None. A value that cannot be read or is
        not valid (it should hold ``expected``) is dropped and recorded, so the batch is computed again."""

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``; atomic, so a crash leaves no half value."""


def require_fingerprint(cache: BatchCache | None, fingerprint: str) -> None:
    """Refuse a cache without the model's fingerprint: its keys would match batches of another model."""
    if cache is not None and not fingerprint:
        raise ValueError(
            "A batch cache needs the model's fingerprint, so batches of another model never match."
        )


def batch_key(kind: str, fingerprint: str, settings: Mapping[str, Any], *tensors: Tensor) -> str:
    """Hex sha256 of a batch's inputs: ``kind`` (which computation), the model ``fingerprint``, the
    JSON ``settings`` and each tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    header = {"kind": kind, "fingerprint": fingerprint, "settings": dict(settings)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode("utf-8"))
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().flatten()
        digest.update(f"|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
