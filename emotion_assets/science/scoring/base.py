"""What every text scorer provides, and the small text helpers the scorers share."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")


class EvaluatorUnavailable(ValueError):
    """An evaluator backend cannot be loaded on this machine (e.g. the model is not in the local cache)."""


class TextScorer(Protocol):
    """What every scorer provides."""

    name: str

    @property
    def metric_names(self) -> list[str]: ...

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]: ...

    @property
    def neutral_scores(self) -> dict[str, float]: ...

    def score(self, texts: list[str]) -> pd.DataFrame: ...


class ProbabilityColumns:
    """For scorers whose every column is a rate or probability in [0, 1]."""

    metric_names: list[str]

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        return dict.fromkeys(self.metric_names, (0.0, 1.0))


def normalize_label(label: str) -> str:
    """Lowercase a class label and replace whitespace and dashes with underscores."""
    return re.sub(r"[\s\-]+", "_", str(label).strip().lower())


def words(text: str) -> list[str]:
    """Lowercase alphabetic word tokens (with inner apostrophes; a typographic apostrophe counts as one)."""
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


def neutral_class_scores(columns: Sequence[str], neutral_column: str) -> dict[str, float]:
    """All probability on ``neutral_column``; NaN everywhere when the classifier has no neutral class."""
    if neutral_column not in columns:
        return dict.fromkeys(columns, float("nan"))
    return {c: float(c == neutral_column) for c in columns}


def tokenized_batches(
    tokenizer: Any,
    texts: Sequence[str],
    order: Int[np.ndarray, " n_texts"],
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> Iterator[tuple[Int[np.ndarray, " batch"], Any]]:
    """``(rows, encoding)`` per batch of ``texts`` taken in ``order``: padded, truncated tensors on ``device``."""
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        yield idx, enc
