"""NRC Emotion Lexicon affect rates (Mohammad & Turney 2013)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from emotion_assets.science.scoring.base import EvaluatorUnavailable, ProbabilityColumns, words
from emotion_assets.science.scoring.labels import nrc_affects
from resources.packages import installed_package_dir

NRC_PACKAGE = "nrclex"
NRC_INSTALL = "pip install nrclex==4.1.0"

# Inflection fallbacks: (suffix, replacements of the suffix), tried in this order.
_SUFFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ies", ("y",)),
    ("es", ("", "e")),
    ("s", ("",)),
    ("ied", ("y",)),
    ("ed", ("", "e")),
    ("ing", ("", "e")),
    ("ily", ("y",)),
    ("ly", ("",)),
)


def nrc_lexicon_path() -> Path:
    """The lexicon JSON shipped with the ``nrclex`` package."""
    package = installed_package_dir(NRC_PACKAGE)
    if package is None:
        raise EvaluatorUnavailable(f"The NRC emotion lexicon needs the 'nrclex' package: {NRC_INSTALL}")
    path = package / "data" / "nrc_en.json"
    if not path.is_file():
        raise EvaluatorUnavailable(f"NRC lexicon file not found at {path}; reinstall nrclex==4.1.0.")
    return path


class NrcLexiconEmotions(ProbabilityColumns):
    """NRC Emotion Lexicon (Mohammad & Turney 2013) affect rates.

    ``nrc_<affect>`` is the fraction of word tokens tagged with that affect, in [0, 1]. Tokens are lowercase
    alphabetic words; a word absent from the lexicon is looked up again after stripping a possessive and
    simple inflections (plural ``-s/-es/-ies``, ``-ed``, ``-ing``, ``-ly``, with restored final ``e`` and
    undoubled consonants). The lexicon JSON shipped with ``nrclex`` is read directly, without importing it
    (which would pull in TextBlob and NLTK corpora).
    """

    name = "nrc_lexicon"

    def __init__(self, lexicon: dict[str, list[str]] | None = None) -> None:
        if lexicon is None:
            lexicon = json.loads(nrc_lexicon_path().read_text(encoding="utf-8"))
        self.affect_names = nrc_affects()
        known = set(self.affect_names)
        self._lexicon = {
            w.lower(): frozenset(a for a in affects if a in known) for w, affects in lexicon.items()
        }
        self._cache: dict[str, frozenset[str]] = {}

    @property
    def metric_names(self) -> list[str]:
        return [f"nrc_{a}" for a in self.affect_names]

    @property
    def neutral_scores(self) -> dict[str, float]:
        """No affect word: every rate 0."""
        return dict.fromkeys(self.metric_names, 0.0)

    @staticmethod
    def _candidates(word: str) -> Iterable[str]:
        yield word
        if word.endswith("'s"):
            word = word[:-2]
            yield word
        for suffix, replacements in _SUFFIXES:
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                stem = word[: -len(suffix)]
                for rep in replacements:
                    yield stem + rep
                if suffix in ("ed", "ing") and len(stem) >= 4 and stem[-1] == stem[-2]:
                    yield stem[:-1]

    def affects(self, word: str) -> frozenset[str]:
        """Affects of one lowercase word, after the inflection fallbacks."""
        if word not in self._cache:
            found: frozenset[str] = frozenset()
            for cand in self._candidates(word):
                if cand in self._lexicon:
                    found = self._lexicon[cand]
                    break
            self._cache[word] = found
        return self._cache[word]

    def score(self, texts: list[str]) -> pd.DataFrame:
        out = np.zeros((len(texts), len(self.affect_names)), dtype=float)  # [n_texts, n_affects]
        index = {a: j for j, a in enumerate(self.affect_names)}
        for i, text in enumerate(texts):
            tokens = words(text or "")
            if not tokens:
                continue
            for w in tokens:
                for a in self.affects(w):
                    out[i, index[a]] += 1.0
            out[i] /= len(tokens)
        return pd.DataFrame(out, columns=self.metric_names)
