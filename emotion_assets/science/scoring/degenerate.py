"""The degenerate-text rule: text that is never scored, and what it gets instead.

A text that is empty after stripping, punctuation/symbols only, or a single word
(:func:`~emotion_assets.science.fluency.structural_degeneracy`) is not passed to any scorer; it gets each
scorer's ``neutral_scores``. Neutral (not null) is the policy wherever a neutral value exists, so broken
text counts as expressing no emotion rather than dropping out of a paired comparison: VADER compound 0,
pos 0, neg 0, neu 1; NRC rates 0; politeness 0.5 (raw 0, marker 0); classifiers all probability on their
``neutral`` class. A classifier without a ``neutral`` class gets NaN on degenerate texts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool

from emotion_assets.science.fluency import structural_degeneracy

DEGENERATE_TEXT = "empty after stripping, punctuation/symbols only, or a single word"


def degenerate_mask(texts: Sequence[str]) -> Bool[np.ndarray, " n_texts"]:
    """Which texts are degenerate (never scored)."""
    return np.array([structural_degeneracy(t) is not None for t in texts], dtype=bool)


def no_neutral_reason(scorer_name: str) -> str:
    """Why a column is null on degenerate texts: its scorer has no neutral value."""
    return (
        f"null where degenerate is True (empty, punctuation/symbols only or one word): "
        f"{scorer_name} has no neutral class to put the probability on"
    )
