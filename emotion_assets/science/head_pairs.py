"""Prompt pairs of the attention-head phases: each emotion's eval prompts paired with eval neutral prompts.

Screening, patching and circuits use each emotion's **eval** fitting prompts (the vectors were fit on the
train split) paired by index with eval neutral fitting prompts (never the unfinished steering openings,
whose form differs), at most ``profile.heads.max_prompts`` of each. The two lists are tokenized together
(left padding), so a pair shares its width and its last token, as head patching needs. The pairs of one
emotion are split into two seeded halves for cross-fitting (``science/crossfit.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from emotion_assets.science.crossfit import split_table
from emotion_assets.science.heads import Head
from emotion_assets.science.prompts import NEUTRAL, fitting_mask
from emotion_assets.science.residual import tokenize_prompts
from emotion_assets.science.statistics import stable_seed


def head_label(heads: Sequence[Head]) -> str:
    """``[(3, 2), (5, 0)]`` → ``"L3H2,L5H0"``."""
    return ",".join(f"L{layer}H{head}" for layer, head in heads)


def eval_prompts(frame: pd.DataFrame, emotion: str, max_prompts: int | None) -> pd.DataFrame:
    """Eval-split fitting prompts of ``emotion`` in id order, optionally capped."""
    rows = frame[
        ((frame["split"] == "eval") & (frame["emotion"] == emotion)).to_numpy() & fitting_mask(frame)
    ]
    rows = rows.sort_values("id")
    return rows.head(max_prompts) if max_prompts else rows


@dataclass
class PromptPair:
    """An emotion's eval prompts and eval neutral prompts paired by index, tokenized together."""

    emotion: pd.DataFrame
    neutral: pd.DataFrame
    emotion_batch: dict[str, Tensor]  # input_ids, attention_mask, emotion_mask: [n, pos]
    neutral_batch: dict[str, Tensor]
    max_tokens: int  # the profile's max_prompt_tokens; this and the next three are kept for sub-pairs
    words: list[str]  # the emotion words whose tokens ``emotion_mask`` marks
    tokenizer: Any
    device: torch.device | str

    @property
    def n(self) -> int:
        return len(self.emotion)


def _tokenized_pair(
    tokenizer: Any,
    device: torch.device | str,
    emo: pd.DataFrame,
    neu: pd.DataFrame,
    max_tokens: int,
    words: list[str],
) -> PromptPair:
    """Tokenize paired prompt rows together (left padding), so pair ``i`` shares its width and last token; a
    prompt over ``max_tokens`` (the profile's ``max_prompt_tokens``) is an error, never cut."""
    n = len(emo)
    emo, neu = emo.reset_index(drop=True), neu.reset_index(drop=True)
    enc = tokenize_prompts(
        tokenizer, emo["text"].tolist() + neu["text"].tolist(), words, max_tokens,
        ids=emo["id"].astype(str).tolist() + neu["id"].astype(str).tolist(), setting="max_prompt_tokens",
    )  # fmt: skip
    keys = ("input_ids", "attention_mask", "emotion_mask")
    first = {k: enc[k][:n].to(device) for k in keys}
    second = {k: enc[k][n:].to(device) for k in keys}
    return PromptPair(emo, neu, first, second, max_tokens, words, tokenizer, device)


def prompt_pair(
    tokenizer: Any,
    device: torch.device | str,
    frame: pd.DataFrame,
    emotion: str,
    max_prompts: int | None,
    max_tokens: int,
    words: Sequence[str],
) -> PromptPair:
    """Pair the first ``n`` eval prompts of ``emotion`` and of neutral (``n`` = the smaller count), tokenized
    with ``tokenizer`` onto ``device``; ``emotion_mask`` marks the tokens of ``words``.

    Both frames get a ``pair_index`` column (0..n-1) that :func:`sub_pair` keeps.
    """
    emo = eval_prompts(frame, emotion, max_prompts)
    neu = eval_prompts(frame, NEUTRAL, max_prompts)
    n = min(len(emo), len(neu))
    if n == 0:
        raise ValueError(f"No eval prompts to pair for {emotion!r} and {NEUTRAL!r}.")
    emo = emo.head(n).reset_index(drop=True).assign(pair_index=np.arange(n))
    neu = neu.head(n).reset_index(drop=True).assign(pair_index=np.arange(n))
    return _tokenized_pair(tokenizer, device, emo, neu, max_tokens, list(words))


def sub_pair(pair: PromptPair, pair_indices: Sequence[int]) -> PromptPair:
    """The pairs of ``pair`` whose ``pair_index`` is in ``pair_indices``, tokenized together anew."""
    keep = pair.emotion["pair_index"].isin(list(pair_indices)).to_numpy()
    if not keep.any():
        raise ValueError(f"None of the pair indices {list(pair_indices)} is in the prompt pair.")
    return _tokenized_pair(
        pair.tokenizer, pair.device, pair.emotion[keep], pair.neutral[keep], pair.max_tokens, pair.words
    )


def crossfit_split(pair: PromptPair, emotion: str, profile_seed: int) -> pd.DataFrame:
    """The seeded half (A/B) of every pair of ``emotion`` (see ``science.crossfit.split_table``)."""
    seed = stable_seed(profile_seed, "head_crossfit", emotion)
    return split_table(emotion, pair.emotion["id"].tolist(), pair.neutral["id"].tolist(), seed)


def check_split_matches(split: pd.DataFrame, pair: PromptPair) -> None:
    """Refuse a screening split whose prompt pairs are not this run's pairs (dataset or profile changed)."""
    want = list(zip(split["prompt_id"].astype(str), split["neutral_prompt_id"].astype(str), strict=True))
    have = list(zip(pair.emotion["id"].astype(str), pair.neutral["id"].astype(str), strict=True))
    if sorted(want) != sorted(have):
        raise ValueError(
            f"head_screening's split of {pair.emotion['emotion'].iloc[0]!r} pairs other prompts than this run "
            f"({len(want)} vs {len(have)} pairs); re-materialize head_screening with the same dataset and "
            "profile before head_patching / emotion_circuits."
        )


def trimmed(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` without the leading columns that are padding in every row."""
    mask = batch["attention_mask"]
    real_columns = mask.bool().any(dim=0).nonzero()
    start = int(real_columns[0]) if len(real_columns) else 0
    return batch["input_ids"][:, start:], mask[:, start:]


def emotions_of(vectors: dict[str, Tensor], strategy: str, targets: Sequence[str]) -> list[str]:
    """Emotions of ``targets`` (those with a target evaluator score) that have a vector for ``strategy``, in
    the order of ``targets``."""
    have = {key.split("/", 1)[1] for key in vectors if key.startswith(f"{strategy}/")}
    return [emotion for emotion in targets if emotion in have]


def final_direction(
    vectors: dict[str, Tensor], boundaries: list[int], strategy: str, emotion: str, n_layers: int
) -> Tensor:
    """The emotion vector at the final boundary (``n_layers``), where every head's effect is read out."""
    if n_layers not in boundaries:
        raise ValueError(
            f"emotion_vectors has no vector at the final boundary {n_layers} (captured: {boundaries}); "
            "re-materialize activations and emotion_vectors."
        )
    return vectors[f"{strategy}/{emotion}"][boundaries.index(n_layers)]
