"""Scorers for generated text: sentiment, politeness and emotion, with no Dagster dependency.

Every scorer exposes ``name``, ``metric_names`` (its output columns), ``metric_ranges`` ({column: (lo, hi)}),
``neutral_scores`` ({column: the score of a text that expresses nothing, NaN where the scorer has none}) and
``score(texts) -> DataFrame`` with one row per text, one float column per metric and no NaN. One module per
scorer; word, cue and label lists are data files under ``emotion_assets/science/data/``.

- ``vader.VaderSentiment``: ``sentiment_compound`` in [-1, 1]; ``sentiment_pos``, ``sentiment_neg``,
  ``sentiment_neu`` in [0, 1] (VADER's proportions; all four are 0 for a text with no words).
- ``lexicon.NrcLexiconEmotions``: ``nrc_<affect>`` in [0, 1], the fraction of word tokens that the NRC
  emotion lexicon tags with that affect (0 for a text with no words).
- ``politeness.PolitenessScorer``: ``politeness`` in [0, 1] (logistic of ``politeness_raw``) and
  ``politeness_raw``, a weighted sum of politeness-strategy indicators (range in ``metric_ranges``), both
  blind to gratitude and apology keywords; ``gratitude_or_apology_marker`` in {0, 1}, whether the text has
  such a keyword.
- ``transformers.TransformerClassifier``: ``<prefix><label>`` in [0, 1] for every label of a local sequence
  classifier.
- ``classifier.EmbeddingEmotionClassifier``: ``emotion_<label>`` in [0, 1], class probabilities summing to 1.

``suite.EvaluatorSuite`` combines scorers; optional backends that could not load keep their declared
columns, filled with NaN, and the reason is reported in ``null_reasons``. Degenerate text is never scored
(``degenerate``: the rule and the neutral scores it gets instead). ``quality`` measures how well scores
separate known labels.
"""

from emotion_assets.science.scoring.base import EvaluatorUnavailable, TextScorer, normalize_label
from emotion_assets.science.scoring.classifier import EmbeddingEmotionClassifier, MiniLmEmbedder
from emotion_assets.science.scoring.lexicon import NrcLexiconEmotions
from emotion_assets.science.scoring.politeness import (
    MARKER_COLUMN,
    PolitenessFeature,
    PolitenessScorer,
    has_emotion_marker,
    strip_emotion_markers,
)
from emotion_assets.science.scoring.quality import binary_auroc, classification_quality
from emotion_assets.science.scoring.suite import EvaluatorSuite, UnavailableBackend, build_suite
from emotion_assets.science.scoring.transformers import TransformerClassifier
from emotion_assets.science.scoring.vader import VaderSentiment

__all__ = [
    "MARKER_COLUMN",
    "EmbeddingEmotionClassifier",
    "EvaluatorSuite",
    "EvaluatorUnavailable",
    "MiniLmEmbedder",
    "NrcLexiconEmotions",
    "PolitenessFeature",
    "PolitenessScorer",
    "TextScorer",
    "TransformerClassifier",
    "UnavailableBackend",
    "VaderSentiment",
    "binary_auroc",
    "build_suite",
    "classification_quality",
    "has_emotion_marker",
    "normalize_label",
    "strip_emotion_markers",
]
