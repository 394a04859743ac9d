"""The evaluator suite: the scorers a profile asks for, combined into one score table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from emotion_assets.science.scoring.base import EvaluatorUnavailable, TextScorer, normalize_label
from emotion_assets.science.scoring.classifier import EmbeddingEmotionClassifier, MiniLmEmbedder
from emotion_assets.science.scoring.degenerate import DEGENERATE_TEXT, degenerate_mask, no_neutral_reason
from emotion_assets.science.scoring.labels import known_transformer_labels
from emotion_assets.science.scoring.lexicon import NrcLexiconEmotions
from emotion_assets.science.scoring.politeness import PolitenessScorer
from emotion_assets.science.scoring.transformers import TransformerClassifier
from emotion_assets.science.scoring.vader import VaderSentiment
from resources.device import resolve_device

SENTIMENT_BACKENDS = ("vader",)
POLITENESS_BACKENDS = ("strategies",)
EMOTION_BACKENDS = ("embedded", "lexicon")
SPEC_KEYS = ("sentiment", "politeness", "emotions", "transformers")


@dataclass(frozen=True)
class UnavailableBackend:
    """An optional backend that could not be loaded, with the columns it would have produced."""

    name: str
    reason: str
    metric_names: list[str] = field(default_factory=list)
    column_prefix: str = ""
    metric_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


class EvaluatorSuite:
    """A set of loaded scorers plus optional backends that could not load.

    ``score`` concatenates every scorer's columns; an unavailable backend contributes its declared columns
    as NaN and ``null_reasons`` maps each such column to the reason. A backend whose labels are unknown
    (neither declared in the spec nor known) has no columns; it is listed in ``unavailable`` (keyed by model
    id) and under ``"<prefix>*"`` in ``null_reasons``. Degenerate texts (empty, symbols only, one word) are
    not passed to the scorers: they get each scorer's ``neutral_scores`` (see
    :mod:`~emotion_assets.science.scoring.degenerate`) and ``degenerate = True``.
    """

    def __init__(self, scorers: Sequence[TextScorer], unavailable: Sequence[UnavailableBackend] = ()) -> None:
        self.scorers = list(scorers)
        self._unavailable = list(unavailable)
        cols = self.metric_names
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise ValueError(
                f"Evaluator columns collide: {dupes}. Give transformer backends distinct prefixes."
            )

    @property
    def unavailable(self) -> dict[str, str]:
        """{backend name: reason it could not be loaded}."""
        return {u.name: u.reason for u in self._unavailable}

    @property
    def null_reasons(self) -> dict[str, str]:
        """{column: reason} for every column that is NaN because its backend is unavailable, or NaN on
        degenerate texts because its scorer has no neutral value."""
        reasons: dict[str, str] = {}
        for s in self.scorers:
            for col, value in s.neutral_scores.items():
                if np.isnan(value):
                    reasons[col] = no_neutral_reason(s.name)
        for u in self._unavailable:
            if u.metric_names:
                reasons.update(dict.fromkeys(u.metric_names, u.reason))
            else:
                reasons[f"{u.column_prefix}*"] = u.reason
        return reasons

    def degenerate_policy(self) -> dict[str, float | None]:
        """{column: the score a degenerate text gets (None: null)} for every loaded scorer's column."""
        return {
            col: (None if np.isnan(value) else value)
            for s in self.scorers
            for col, value in s.neutral_scores.items()
        }

    @property
    def metric_names(self) -> list[str]:
        return [c for s in self.scorers for c in s.metric_names] + [
            c for u in self._unavailable for c in u.metric_names
        ]

    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        ranges: dict[str, tuple[float, float]] = {}
        for s in self.scorers:
            ranges.update(s.metric_ranges)
        for u in self._unavailable:
            ranges.update(u.metric_ranges)
        return ranges

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for run metadata."""
        return {
            "scorers": [s.name for s in self.scorers],
            "metrics": self.metric_names,
            "metric_ranges": {k: list(v) for k, v in self.metric_ranges().items()},
            "unavailable": self.unavailable,
            "null_reasons": self.null_reasons,
            "degenerate_text": DEGENERATE_TEXT,
            "degenerate_scores": self.degenerate_policy(),
        }

    def score(
        self, texts: Sequence[str], prompts: Sequence[str] | None = None, continuation_only: bool = True
    ) -> pd.DataFrame:
        """Score continuations (default), or prompt + continuation when ``continuation_only`` is False.

        Returns one row per text: every column of :attr:`metric_names` (float) and ``degenerate`` (bool),
        judged on the text that is scored. Degenerate rows hold the scorers' ``neutral_scores``. Each
        distinct text reaches the scorers once, in first-seen order; its repeats get its row.
        """
        texts = ["" if t is None else str(t) for t in texts]
        if not continuation_only:
            if prompts is None:
                raise ValueError("continuation_only=False needs the prompts.")
            if len(prompts) != len(texts):
                raise ValueError(f"Got {len(prompts)} prompts for {len(texts)} texts.")
            texts = [join_prompt(p, c) for p, c in zip(prompts, texts, strict=True)]
        degenerate = degenerate_mask(texts)  # [n]
        # Each distinct fluent text is scored once and its scores copied to its repeats: a sweep repeats
        # many continuations (conditions that change nothing, heads whose ablation changes nothing).
        # pandas.factorize numbers values in first-seen order: `distinct` [n_distinct], `repeat_of` [n_fluent].
        repeat_of, distinct = pd.factorize(
            pd.Series([t for t, bad in zip(texts, degenerate, strict=True) if not bad], dtype=object)
        )
        fluent = list(distinct)
        frames = []
        for scorer in self.scorers:
            frame = pd.DataFrame(np.nan, index=range(len(texts)), columns=scorer.metric_names, dtype=float)
            if fluent:
                scored = scorer.score(fluent)
                if len(scored) != len(fluent) or list(scored.columns) != scorer.metric_names:
                    raise RuntimeError(
                        f"Scorer {scorer.name!r} returned a frame of the wrong shape or columns."
                    )
                if scored.isna().to_numpy().any():
                    raise RuntimeError(f"Scorer {scorer.name!r} returned NaN values.")
                frame.loc[~degenerate, :] = scored.to_numpy(dtype=float)[repeat_of]
            neutral = scorer.neutral_scores
            frame.loc[degenerate, :] = np.array([neutral[c] for c in scorer.metric_names], dtype=float)
            frames.append(frame)
        for u in self._unavailable:
            frames.append(pd.DataFrame(np.nan, index=range(len(texts)), columns=u.metric_names, dtype=float))
        out = pd.concat(frames, axis=1) if frames else pd.DataFrame(index=range(len(texts)))
        out["degenerate"] = degenerate
        return out


def join_prompt(prompt: str, continuation: str) -> str:
    """Prompt and continuation as one text, with a space between them unless one is already there."""
    prompt = prompt or ""
    if not prompt or not continuation or prompt[-1].isspace() or continuation[0].isspace():
        return prompt + continuation
    return f"{prompt} {continuation}"


def _backend(spec: dict[str, Any], key: str, valid: Sequence[str]) -> str | None:
    entry = spec.get(key)
    if entry is None:
        return None
    backend = entry.get("backend") if isinstance(entry, dict) else entry
    if backend in (None, "none"):
        return None
    if backend not in valid:
        raise ValueError(
            f"Unknown {key} backend {backend!r}. Valid backends: {', '.join(valid)} (or 'none')."
        )
    return str(backend)


def build_suite(
    spec: dict[str, Any],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    train_texts: Sequence[str] = (),
    train_labels: Sequence[str] = (),
    seed: int = 0,
) -> EvaluatorSuite:
    """Load the scorers a profile's evaluator config asks for.

    ``spec`` keys: ``sentiment`` (backend ``vader``), ``politeness`` (``strategies``), ``emotions``
    (``embedded``: NRC lexicon + MiniLM embedding classifier fit on ``train_texts``/``train_labels``;
    ``lexicon``: NRC only) and ``transformers``: a list of ``{"id", "optional", "prefix", "labels",
    "max_length"}``. A non-optional transformer that cannot load raises ``EvaluatorUnavailable``; an optional
    one is recorded as unavailable with NaN columns (labels from ``labels`` or the known-model table in
    ``emotion_assets/science/data/emotion_labels.yaml``).
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"Unknown evaluator config keys {unknown}. Valid keys: {', '.join(SPEC_KEYS)}.")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    scorers: list[TextScorer] = []
    unavailable: list[UnavailableBackend] = []

    if _backend(spec, "sentiment", SENTIMENT_BACKENDS) == "vader":
        scorers.append(VaderSentiment())
    if _backend(spec, "politeness", POLITENESS_BACKENDS) == "strategies":
        scorers.append(PolitenessScorer())
    emotions = _backend(spec, "emotions", EMOTION_BACKENDS)
    if emotions in ("embedded", "lexicon"):
        scorers.append(NrcLexiconEmotions())
    if emotions == "embedded":
        classifier = EmbeddingEmotionClassifier(MiniLmEmbedder(device=dev, batch_size=batch_size))
        scorers.append(classifier.fit(list(train_texts), list(train_labels), seed=seed))

    for entry in spec.get("transformers") or []:
        if isinstance(entry, str):
            entry = {"id": entry}
        if "id" not in entry:
            raise ValueError(f"Transformer evaluator entry {entry!r} needs an 'id' (HF id or local path).")
        model_id = str(entry["id"])
        prefix = str(entry.get("prefix", ""))
        try:
            scorers.append(
                TransformerClassifier(
                    model_id,
                    device=dev,
                    batch_size=batch_size,
                    max_length=int(entry.get("max_length", 256)),
                    prefix=prefix,
                )
            )
        except EvaluatorUnavailable as err:
            if not entry.get("optional", False):
                raise
            labels = entry.get("labels") or known_transformer_labels().get(model_id, ())
            cols = [f"{prefix}{normalize_label(lab)}" for lab in labels]
            unavailable.append(
                UnavailableBackend(
                    name=model_id,
                    column_prefix=prefix,
                    reason=str(err),
                    metric_names=cols,
                    metric_ranges=dict.fromkeys(cols, (0.0, 1.0)),
                )
            )
    return EvaluatorSuite(scorers, unavailable)
