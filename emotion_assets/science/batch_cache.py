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
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor


class BatchCache(Protocol):
    """Where finished batches are kept (JSON values) until the whole result is published."""

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``, or None when there is none (or it could not be read)."""

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``; atomic, so a crash leaves no half value."""

    def discard(self, key: str, reason: str) -> None:
        """Drop the value under ``key`` because it does not fit the batch (``reason`` is recorded)."""


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
