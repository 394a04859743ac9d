"""Evaluator quality: the classifier per register and by person, politeness without emotion keywords."""

from __future__ import annotations

import pandas as pd
import pytest

from emotion_assets.science.evaluator_checks import CLASSIFIER, MARKER, POLITENESS, evaluator_quality_table
from emotion_assets.science.scoring import PolitenessScorer

LABELS = {e: f"emotion_{e}" for e in ("gratitude", "anger", "apology", "neutral")}
ROWS = [  # text, emotion, register
    ("I want the blue folder today.", "neutral", "direct"),
    ("We moved the desk yesterday.", "neutral", "polite"),
    ("The train leaves at nine.", "neutral", "direct"),
    ("The folder is on the shelf.", "neutral", "polite"),
    ("Thank you for the help.", "gratitude", "polite"),
    ("Thanks for the lift.", "gratitude", "direct"),
    ("I am furious about this.", "anger", "direct"),
    ("Sorry for the delay.", "apology", "polite"),
]


def _table(predict) -> pd.DataFrame:
    """Quality rows for a fake classifier that predicts ``predict(text, emotion)``."""
    evaluation = pd.DataFrame(ROWS, columns=["text", "emotion", "register"])
    guesses = [predict(t, e) for t, e, _ in ROWS]
    scores = pd.DataFrame([{c: float(label == g) for label, c in LABELS.items()} for g in guesses])
    scores = pd.concat([scores, PolitenessScorer().score(evaluation["text"].tolist())], axis=1)
    table, _ = evaluator_quality_table(evaluation, scores, LABELS, ["thank", "thanks", "furious", "sorry"])
    return table.set_index(["evaluator", "metric"])


def test_a_classifier_that_reads_person_is_caught_on_neutral_first_person_sentences():
    # Calls every first/second-person sentence gratitude, otherwise right.
    table = _table(lambda text, emotion: "gratitude" if text.split()[0] in ("I", "We") else emotion)
    assert table.loc[(CLASSIFIER, "accuracy_neutral_first_second_person"), "value"] == 0.0
    assert table.loc[(CLASSIFIER, "accuracy_neutral_first_second_person"), "n"] == 2
    assert table.loc[(CLASSIFIER, "accuracy_neutral_third_person"), "value"] == 1.0
    assert table.loc[(CLASSIFIER, "accuracy_register=direct"), "value"] == pytest.approx(2 / 4)
    assert table.loc[(CLASSIFIER, "accuracy_register=polite"), "value"] == pytest.approx(3 / 4)
    perfect = _table(lambda text, emotion: emotion)
    person_rows = [m for _, m in perfect.index if "person" in m or "register=" in m]
    assert len(person_rows) == 6 and (perfect.loc[CLASSIFIER, "value"] == 1.0).all()


def test_politeness_and_the_keyword_marker_are_reported_apart():
    table = _table(lambda text, emotion: emotion)
    assert (POLITENESS, "auroc_polite_vs_direct_register") in table.index
    assert table.loc[(MARKER, "share_gratitude"), "value"] == 1.0
    assert table.loc[(MARKER, "share_apology"), "value"] == 1.0
    assert table.loc[(MARKER, "share_neutral"), "value"] == 0.0
    assert table.loc[(MARKER, "auroc_polite_vs_direct_register"), "n"] == len(ROWS)
