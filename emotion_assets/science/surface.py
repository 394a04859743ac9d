"""Surface features of prompts and their balance between neutral and each emotion class (no Dagster).

A class difference in emotion should not come with a difference in form. Each fitting prompt gets a few
surface features; a table gives their shares (means for length) per class × register, and
:func:`surface_balance_problems` names every feature on which an emotion class and ``neutral`` differ by
more than the profile allows, with the fix.

Features (one row per prompt):

- ``final_punctuation``: the text ends in ``.``, ``!`` or ``?`` (unfinished openings do not);
- ``exclamation`` / ``question``: it ends in ``!`` / ``?``;
- ``n_words``: whitespace-separated words;
- ``first_second_person``: it contains I, me, my, mine, we, us, our, ours, you, your, yours (or a reflexive)
  as a whole word; contractions count through their pronoun (``I'm``, ``we're``, ``you'll``);
- ``starts_with_the``: its first word is "The";
- ``emotion_keyword``: it contains a word of ``data/emotion_words.yaml`` (reported, never checked: emotion
  classes carry their keywords by design, and the ``implicit`` register has none).

The register mix is checked too: the share of a class's prompts in each register.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from emotion_assets.science.prompts import DEFAULT_REGISTER, EMOTIONS, fitting_mask
from emotion_assets.science.residual import emotion_word_pattern

REFERENCE = "neutral"
ALL_REGISTERS = "all"
SHARE_FEATURES: tuple[str, ...] = (
    "final_punctuation",
    "exclamation",
    "question",
    "first_second_person",
    "starts_with_the",
    "emotion_keyword",
)
FEATURES: tuple[str, ...] = (*SHARE_FEATURES, "n_words")
# Shares checked against the threshold; ``emotion_keyword`` is reported only.
CHECKED_SHARES: tuple[str, ...] = SHARE_FEATURES[:-1]
LENGTH_FEATURE = "n_words"
REGISTER_PREFIX = "register="

_PRONOUNS = ("i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves")
_PRONOUNS += ("you", "your", "yours", "yourself", "yourselves")
# Apostrophes (straight or curly) are word boundaries for ``\b``, so "I'm" and "you'll" match via I / you.
_PERSON = re.compile(r"\b(?:" + "|".join(_PRONOUNS) + r")\b", re.IGNORECASE)
_DESCRIPTIONS = {
    "final_punctuation": "prompts ending in '.', '!' or '?'",
    "exclamation": "prompts ending in '!'",
    "question": "prompts ending in '?'",
    "first_second_person": "prompts in the first or second person (I/me/my/we/us/our/you/your)",
    "starts_with_the": "prompts starting with 'The'",
}


class SurfaceThresholds(Protocol):
    """The two limits of a profile's ``dataset.surface_balance`` (``SurfaceBalanceConfig``)."""

    max_share_difference: float
    max_length_ratio: float


def surface_features(texts: Sequence[str], emotion_words: Iterable[str]) -> pd.DataFrame:
    """One row per text with the columns :data:`FEATURES` (booleans, and ``n_words`` as int)."""
    pattern = emotion_word_pattern(emotion_words)
    stripped = [t.strip() for t in texts]
    return pd.DataFrame(
        {
            "final_punctuation": [t[-1:] in {".", "!", "?"} for t in stripped],
            "exclamation": [t.endswith("!") for t in stripped],
            "question": [t.endswith("?") for t in stripped],
            "first_second_person": [_PERSON.search(t) is not None for t in stripped],
            "starts_with_the": [t.split()[0].lower() == "the" if t.split() else False for t in stripped],
            "emotion_keyword": [pattern is not None and pattern.search(t) is not None for t in stripped],
            "n_words": [len(t.split()) for t in stripped],
        }
    )


def prompt_surface(frame: pd.DataFrame, emotion_words: Iterable[str]) -> pd.DataFrame:
    """Features of a prompt frame's **fitting** rows, next to their ``id``, ``emotion`` and ``register``."""
    fitting = frame[fitting_mask(frame)].reset_index(drop=True)
    register = (
        fitting["register"].fillna(DEFAULT_REGISTER).astype(str)
        if "register" in fitting.columns
        else pd.Series(DEFAULT_REGISTER, index=fitting.index)
    )
    keys = pd.DataFrame(
        {
            "id": fitting["id"] if "id" in fitting.columns else fitting.index.astype(str),
            "emotion": fitting["emotion"].astype(str),
            "register": register,
        }
    )
    return pd.concat([keys, surface_features(fitting["text"].tolist(), emotion_words)], axis=1)


def _emotion_order(emotions: Iterable[str]) -> list[str]:
    present = set(emotions)
    return [e for e in EMOTIONS if e in present] + sorted(present - set(EMOTIONS))


def surface_table(features: pd.DataFrame) -> pd.DataFrame:
    """Shares of the boolean features and the mean ``n_words`` per emotion × register, plus an ``all`` row.

    ``features`` is the output of :func:`prompt_surface` (fitting rows only). Columns: ``emotion``,
    ``register``, ``n``, then :data:`FEATURES`.
    """
    rows: list[dict[str, Any]] = []
    registers = sorted(features["register"].unique())
    for emotion in _emotion_order(features["emotion"].unique()):
        part = features[features["emotion"] == emotion]
        for register in [*registers, ALL_REGISTERS]:
            cell = part if register == ALL_REGISTERS else part[part["register"] == register]
            if cell.empty:
                continue
            row: dict[str, Any] = {"emotion": emotion, "register": register, "n": len(cell)}
            for name in SHARE_FEATURES:
                row[name] = float(cell[name].mean())
            row[LENGTH_FEATURE] = float(cell[LENGTH_FEATURE].mean())
            rows.append(row)
    return pd.DataFrame(rows, columns=["emotion", "register", "n", *FEATURES])


def _fix(feature: str, emotion: str, neutral: float, value: float) -> str:
    if feature == LENGTH_FEATURE:
        goal = f"the mean length of neutral prompts moves from {neutral:.1f} toward {value:.1f} words"
    elif feature.startswith(REGISTER_PREFIX):
        register = feature.removeprefix(REGISTER_PREFIX)
        return (
            f"add or remove neutral or {emotion} prompts in register {register!r} so that both classes have "
            f"the same register mix ({neutral:.2f} vs {value:.2f} now)"
        )
    else:
        goal = f"the share of {_DESCRIPTIONS[feature]} moves from {neutral:.2f} toward {value:.2f}"
    return (
        f"add or edit neutral prompts (or {emotion} prompts) so that {goal}; "
        "or mark unfinished openings as role: steering_prompt"
    )


def surface_balance_problems(
    features: pd.DataFrame, thresholds: SurfaceThresholds, reference: str = REFERENCE
) -> list[dict[str, Any]]:
    """Every surface imbalance between ``reference`` (neutral) and an emotion class, over all registers.

    Checked: each share of :data:`CHECKED_SHARES` and each register's share of the class (absolute difference
    ≤ ``thresholds.max_share_difference``) and the mean length in words (longer / shorter ≤
    ``thresholds.max_length_ratio``). ``features`` comes from :func:`prompt_surface` (fitting rows only).
    Returns one record per violation: ``feature``, ``emotion``, ``neutral_value``, ``emotion_value``,
    ``difference`` (the length ratio for ``n_words``), ``threshold`` and ``fix``; empty when balanced.
    """
    base = features[features["emotion"] == reference]
    if base.empty:
        return [
            {
                "feature": "n",
                "emotion": reference,
                "neutral_value": 0.0,
                "emotion_value": float("nan"),
                "difference": float("nan"),
                "threshold": float("nan"),
                "fix": f"add fitting prompts (role: fit) labelled {reference!r}; the balance is measured "
                "against them",
            }
        ]
    registers = sorted(features["register"].unique())

    def values(part: pd.DataFrame) -> dict[str, float]:
        out = {name: float(part[name].mean()) for name in CHECKED_SHARES}
        out.update({f"{REGISTER_PREFIX}{r}": float((part["register"] == r).mean()) for r in registers})
        out[LENGTH_FEATURE] = float(part[LENGTH_FEATURE].mean())
        return out

    neutral = values(base)
    problems: list[dict[str, Any]] = []
    for emotion in _emotion_order(features["emotion"].unique()):
        if emotion == reference:
            continue
        observed = values(features[features["emotion"] == emotion])
        for name, value in observed.items():
            if name == LENGTH_FEATURE:
                low, high = sorted((neutral[name], value))
                difference = high / low if low > 0 else float("inf")
                limit = thresholds.max_length_ratio
            else:
                difference = abs(value - neutral[name])
                limit = thresholds.max_share_difference
            if difference > limit + 1e-12:
                problems.append(
                    {
                        "feature": name,
                        "emotion": emotion,
                        "neutral_value": round(neutral[name], 4),
                        "emotion_value": round(value, 4),
                        "difference": round(float(difference), 4),
                        "threshold": float(limit),
                        "fix": _fix(name, emotion, neutral[name], value),
                    }
                )
    return problems


def share_matrix(
    table: pd.DataFrame, register: str = ALL_REGISTERS
) -> tuple[np.ndarray, list[str], list[str]]:
    """``(values [classes, share features], class labels, feature labels)`` of one register of the table."""
    rows = table[table["register"] == register]
    return rows[list(SHARE_FEATURES)].to_numpy(dtype=float), rows["emotion"].tolist(), list(SHARE_FEATURES)
