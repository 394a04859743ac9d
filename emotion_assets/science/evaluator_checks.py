"""How well the evaluators recover what the prompts are labelled with, overall and where they could cheat.

The embedded emotion classifier could read register or grammatical person instead of emotion (gratitude
and apology prompts are often first person and polite); its accuracy is therefore also reported per
register and on neutral sentences with and without a first/second-person pronoun (``surface_features``):
a classifier that reads person calls first-person neutral sentences an emotion. Politeness is judged on
the polite against the direct register, without the gratitude/apology keywords that the
``gratitude_or_apology_marker`` column holds apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from emotion_assets.science.prompts import NEUTRAL
from emotion_assets.science.scoring import MARKER_COLUMN, binary_auroc, classification_quality
from emotion_assets.science.surface import surface_features

CLASSIFIER = "emotions (embedded classifier)"
POLITENESS = "politeness (strategies, without gratitude/apology keywords)"
MARKER = "gratitude_or_apology_marker (keyword heuristic)"


def predicted_labels(scores: pd.DataFrame, label_columns: Mapping[str, str]) -> np.ndarray:
    """The label whose score column is largest, per row."""
    labels = list(label_columns)
    matrix = scores[[label_columns[label] for label in labels]].to_numpy(dtype=float)
    return np.asarray(labels)[matrix.argmax(axis=1)]


def _accuracy(truth: pd.Series, predicted: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    n = int(mask.sum())
    return (float((truth.to_numpy()[mask] == predicted[mask]).mean()) if n else float("nan")), n


def classifier_subgroup_rows(
    evaluation: pd.DataFrame,
    scores: pd.DataFrame,
    label_columns: Mapping[str, str],
    emotion_words: Iterable[str],
) -> list[dict]:
    """Accuracy of the classifier per register, by person, and on neutral sentences by person.

    ``evaluation``: ``text``, ``emotion``, ``register`` rows aligned with ``scores``.
    """
    truth = evaluation["emotion"].astype(str).reset_index(drop=True)
    predicted = predicted_labels(scores.reset_index(drop=True), label_columns)
    person = surface_features(evaluation["text"].tolist(), emotion_words)["first_second_person"].to_numpy()
    neutral = (truth == NEUTRAL).to_numpy()
    groups = [
        *[(f"accuracy_register={r}", (evaluation["register"].astype(str) == r).to_numpy())
          for r in sorted(evaluation["register"].astype(str).unique())],
        ("accuracy_first_second_person", person),
        ("accuracy_third_person", ~person),
        ("accuracy_neutral_first_second_person", neutral & person),
        ("accuracy_neutral_third_person", neutral & ~person),
    ]  # fmt: skip
    rows = []
    for metric, mask in groups:
        value, n = _accuracy(truth, predicted, mask)
        rows.append({"evaluator": CLASSIFIER, "metric": metric, "value": value, "n": n})
    return rows


def evaluator_quality_table(
    evaluation: pd.DataFrame,
    scores: pd.DataFrame,
    label_columns: Mapping[str, str],
    emotion_words: Iterable[str],
) -> tuple[pd.DataFrame, dict]:
    """Every evaluator-quality number (``evaluator``, ``metric``, ``value``, ``n``) and the classifier's
    ``classification_quality`` (accuracy, macro-F1, AUROC, confusion matrix)."""
    evaluation = evaluation.reset_index(drop=True)
    scores = scores.reset_index(drop=True)
    quality = classification_quality(evaluation["emotion"].tolist(), scores, dict(label_columns))
    n_all = len(evaluation)
    emotion = evaluation["emotion"].astype(str)
    register = evaluation["register"].astype(str)
    rows = [
        {"evaluator": CLASSIFIER, "metric": "accuracy", "value": quality["accuracy"], "n": n_all},
        {"evaluator": CLASSIFIER, "metric": "macro_f1", "value": quality["macro_f1"], "n": n_all},
        *[{"evaluator": CLASSIFIER, "metric": f"auroc_{e}", "value": v, "n": n_all} for e, v in quality["auroc"].items()],
        *classifier_subgroup_rows(evaluation, scores, label_columns, emotion_words),
    ]  # fmt: skip
    if {"gratitude", "anger"} <= set(emotion) and "sentiment_compound" in scores:
        rows.append({
            "evaluator": "sentiment (vader)", "metric": "auroc_gratitude_vs_anger",
            "value": binary_auroc(scores.loc[emotion == "gratitude", "sentiment_compound"],
                                  scores.loc[emotion == "anger", "sentiment_compound"]),
            "n": int(emotion.isin(["gratitude", "anger"]).sum()),
        })  # fmt: skip
    if "nrc_anger" in scores and "anger" in set(emotion):
        rows.append({
            "evaluator": "emotions (nrc lexicon)", "metric": "auroc_anger_vs_rest",
            "value": binary_auroc(scores.loc[emotion == "anger", "nrc_anger"], scores.loc[emotion != "anger", "nrc_anger"]),
            "n": n_all,
        })  # fmt: skip
    polite, direct = (register == "polite").to_numpy(), (register == "direct").to_numpy()
    if polite.any() and direct.any() and "politeness" in scores:
        n = int(polite.sum() + direct.sum())
        rows += [
            {"evaluator": POLITENESS, "metric": "auroc_polite_vs_direct_register",
             "value": binary_auroc(scores.loc[polite, "politeness"], scores.loc[direct, "politeness"]), "n": n},
            {"evaluator": POLITENESS, "metric": "mean_polite_minus_direct",
             "value": float(scores.loc[polite, "politeness"].mean() - scores.loc[direct, "politeness"].mean()), "n": n},
            {"evaluator": MARKER, "metric": "auroc_polite_vs_direct_register",
             "value": binary_auroc(scores.loc[polite, MARKER_COLUMN], scores.loc[direct, MARKER_COLUMN]), "n": n},
        ]  # fmt: skip
    if MARKER_COLUMN in scores:
        rows += [
            {"evaluator": MARKER, "metric": f"share_{e}", "value": float(scores.loc[emotion == e, MARKER_COLUMN].mean()),
             "n": int((emotion == e).sum())}
            for e in label_columns if (emotion == e).any()
        ]  # fmt: skip
    table = pd.DataFrame(rows)
    table["value"] = table["value"].astype(float)
    return table, quality
