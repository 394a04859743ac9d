"""VADER sentiment (Hutto & Gilbert 2014)."""

from __future__ import annotations

from typing import ClassVar

import pandas as pd


class VaderSentiment:
    """VADER (Hutto & Gilbert 2014) sentiment: compound in [-1, 1] and pos/neg/neu proportions in [0, 1]."""

    name = "vader"
    _keys: ClassVar[dict[str, str]] = {
        "compound": "sentiment_compound",
        "pos": "sentiment_pos",
        "neg": "sentiment_neg",
        "neu": "sentiment_neu",
    }

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    @property
    def metric_names(self) -> list[str]:
        return list(self._keys.values())

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        return {c: ((-1.0, 1.0) if c == "sentiment_compound" else (0.0, 1.0)) for c in self.metric_names}

    @property
    def neutral_scores(self) -> dict[str, float]:
        """A wholly neutral text: compound 0, all of it neutral (VADER's score of "The table is in the room.")."""
        return {c: float(c == "sentiment_neu") for c in self.metric_names}

    def score(self, texts: list[str]) -> pd.DataFrame:
        rows = [self._analyzer.polarity_scores(t or "") for t in texts]
        data = {col: [float(r[key]) for r in rows] for key, col in self._keys.items()}
        return pd.DataFrame(data, columns=self.metric_names, dtype=float)
