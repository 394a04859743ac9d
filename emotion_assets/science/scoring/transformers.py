"""Hugging Face sequence classifiers loaded from a local folder or the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

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


def unavailable_message(model_id: str, err: BaseException | None = None) -> str:
    """Why classifier ``model_id`` cannot load here, and how to make it available."""
    why = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err else ""
    return (
        f"Classifier {model_id!r} is not available locally{why}. Download it on a connected machine with "
        f"`huggingface-cli download {model_id}` into the Hugging Face cache (HF_HOME), or set the evaluator "
        "id to a local directory that holds the saved model and tokenizer."
    )


class TransformerClassifier(ProbabilityColumns):
    """A Hugging Face sequence classifier loaded from a local directory or the local HF cache.

    Multi-label models (``config.problem_type == "multi_label_classification"``) get an independent sigmoid
    per label; all others a softmax over labels. Columns are ``<prefix><label>`` with labels from
    ``config.id2label`` lowercased and with spaces replaced by underscores; values lie in [0, 1].
    Texts are scored in batches sorted by token length and returned in input order.
    """

    def __init__(
        self,
        model_id_or_path: str,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        max_length: int = 256,
        prefix: str = "",
        local_files_only: bool = True,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_id = str(model_id_or_path)
        self.name = self.model_id
        self.prefix = prefix
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        looks_like_path = self.model_id.startswith((".", "/", "~")) or Path(self.model_id).exists()
        if looks_like_path and not Path(self.model_id).expanduser().is_dir():
            raise EvaluatorUnavailable(
                unavailable_message(self.model_id, FileNotFoundError("no such directory"))
            )
        source = str(Path(self.model_id).expanduser()) if looks_like_path else self.model_id
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source, local_files_only=local_files_only, dtype=torch.float32
            )
        except (OSError, ValueError) as err:
            raise EvaluatorUnavailable(unavailable_message(self.model_id, err)) from err
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise EvaluatorUnavailable(
                    f"Classifier {self.model_id!r} has no pad or eos token to pad with."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        cfg = self.model.config
        self.multi_label = cfg.problem_type == "multi_label_classification"
        self.labels = [normalize_label(cfg.id2label[i]) for i in range(cfg.num_labels)]
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(
                f"Classifier {self.model_id!r} has duplicate labels after normalizing: {self.labels}"
            )

    @property
    def metric_names(self) -> list[str]:
        return [f"{self.prefix}{label}" for label in self.labels]

    @property
    def neutral_scores(self) -> dict[str, float]:
        """1 on the ``neutral`` label and 0 elsewhere (softmax or sigmoid alike); NaN without that label."""
        return neutral_class_scores(self.metric_names, f"{self.prefix}neutral")

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> Float[np.ndarray, "n_texts n_labels"]:
        """Raw logits in input order.

        A text that tokenizes to nothing (an empty continuation with a tokenizer that adds no special
        tokens) is scored as the single unknown (or pad) token.
        """
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        filler = self.tokenizer.unk_token or self.tokenizer.pad_token
        texts = [t if len(i) else filler for t, i in zip(texts, ids, strict=True)]
        lengths = [len(i) or 1 for i in ids]
        order = np.argsort(lengths, kind="stable")
        batches = tokenized_batches(
            self.tokenizer, texts, order, self.batch_size, self.max_length, self.device
        )
        for idx, enc in batches:
            out[idx] = self.model(**enc).logits.float().cpu().numpy()
        return out

    def score(self, texts: list[str]) -> pd.DataFrame:
        logits = torch.from_numpy(self.logits(texts))
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return pd.DataFrame(probs.numpy(), columns=self.metric_names, dtype=float)
