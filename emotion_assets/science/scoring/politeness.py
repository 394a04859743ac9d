"""Politeness from request strategies, blind to gratitude and apology keywords.

The cue lists and strategy weights are data: ``emotion_assets/science/data/politeness_cues.yaml``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from emotion_assets.science.data_files import DataFileError, data_file_path, entry, string_list
from emotion_assets.science.scoring.base import words

CUES_FILE = "politeness_cues.yaml"
MARKER_COLUMN = "gratitude_or_apology_marker"
# Strategies matched by a whole-word pattern anywhere in the (marker-free) text.
PATTERN_STRATEGIES = (
    "hedges",
    "deference",
    "indirect_request",
    "subjunctive",
    "formal_register",
    "intensified_courtesy",
    "negative_words",
    "swearing",
)
_SPACES_RE = re.compile(r"[ \t]+")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class PolitenessFeature:
    name: str
    weight: float
    description: str


@dataclass(frozen=True)
class PolitenessCues:
    """The compiled cue lists of one version of ``politeness_cues.yaml``."""

    version: str
    gratitude: re.Pattern[str]
    apology: re.Pattern[str]
    patterns: dict[str, re.Pattern[str]]
    imperative_verbs: frozenset[str]
    wh_words: frozenset[str]
    greeting_words: frozenset[str]
    greeting_pairs: frozenset[str]
    deference_starts: frozenset[str]
    second_person_starts: frozenset[str]
    features: tuple[PolitenessFeature, ...]


def _phrases(alternatives: Sequence[str]) -> re.Pattern[str]:
    """Whole-word regex for the alternatives, in order (each may itself be a regex)."""
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")


def _features() -> tuple[PolitenessFeature, ...]:
    rows = entry(CUES_FILE, "features")
    path = data_file_path(CUES_FILE)
    if not isinstance(rows, list) or not rows:
        raise DataFileError(f"Data file {path}: 'features' must be a non-empty list of strategies.")
    out = []
    for row in rows:
        if not isinstance(row, dict) or set(row) != {"name", "weight", "description"}:
            raise DataFileError(
                f"Data file {path}: each entry of 'features' needs exactly name, weight and description; "
                f"got {row!r}."
            )
        if not isinstance(row["weight"], int | float) or isinstance(row["weight"], bool):
            raise DataFileError(f"Data file {path}: strategy {row['name']!r} has a non-numeric weight.")
        out.append(PolitenessFeature(str(row["name"]), float(row["weight"]), str(row["description"])))
    return tuple(out)


@functools.cache
def politeness_cues() -> PolitenessCues:
    """The cue lists of ``politeness_cues.yaml``, compiled once per process."""
    features = _features()
    names = [f.name for f in features]
    missing = sorted(set(PATTERN_STRATEGIES) - set(names))
    if missing or len(set(names)) != len(names):
        raise DataFileError(
            f"Data file {data_file_path(CUES_FILE)}: 'features' must name each strategy once and include "
            f"{list(PATTERN_STRATEGIES)}; missing {missing}, names {names}."
        )

    def word_set(key: str) -> frozenset[str]:
        return frozenset(string_list(CUES_FILE, "words", key))

    return PolitenessCues(
        version=str(entry(CUES_FILE, "version")),
        gratitude=_phrases(string_list(CUES_FILE, "markers", "gratitude")),
        apology=_phrases(string_list(CUES_FILE, "markers", "apology")),
        patterns={s: _phrases(string_list(CUES_FILE, "patterns", s)) for s in PATTERN_STRATEGIES},
        imperative_verbs=word_set("imperative_verbs"),
        wh_words=word_set("wh_words"),
        greeting_words=word_set("greeting_words"),
        greeting_pairs=word_set("greeting_pairs"),
        deference_starts=word_set("deference_starts"),
        second_person_starts=word_set("second_person_starts"),
        features=features,
    )


def politeness_features() -> tuple[PolitenessFeature, ...]:
    """Every known strategy with its default weight, in column order."""
    return politeness_cues().features


def strip_emotion_markers(text: str) -> str:
    """Lowercased ``text`` with every gratitude / apology keyword removed (runs of spaces collapsed)."""
    cues = politeness_cues()
    norm = (text or "").lower().replace("\u2019", "'")
    norm = cues.apology.sub(" ", cues.gratitude.sub(" ", norm))
    return _SPACES_RE.sub(" ", norm).strip()


def has_emotion_marker(text: str) -> bool:
    """Whether ``text`` contains a gratitude or apology keyword (``markers`` in the cue file)."""
    cues = politeness_cues()
    norm = (text or "").lower().replace("\u2019", "'")
    return bool(cues.gratitude.search(norm) or cues.apology.search(norm))


class PolitenessScorer:
    """Politeness from request strategies, after Danescu-Niculescu-Mizil et al. (2013): a frozen heuristic.

    The study's emotions include gratitude and apology, so their keywords (thank(s), appreciate, grateful,
    sorry, apologize, excuse me, forgive me, regret, ...) are **not** politeness cues here: they are removed
    from the text before any cue is matched, and reported apart as ``gratitude_or_apology_marker`` (1 when
    the text has one, else 0). Politeness therefore cannot rise because a text names the target emotion.

    Each remaining strategy is a 0/1 indicator (present anywhere in the text); ``politeness_raw`` is the
    sum of the weights of the present strategies and ``politeness = 1 / (1 + exp(-politeness_raw))``, so a
    text with no strategy scores 0.5. Weights follow the signs of the paper's findings; magnitudes are set
    by hand and were not fit to this project's data:

    ========================  =======  ============================================================
    strategy                  weight   cue
    ========================  =======  ============================================================
    please                    +0.6     "please" inside a sentence
    please_start              +0.2     "please" as the first word of a sentence
    hedges                    +0.5     perhaps, maybe, I think, I guess, kind of, a bit
    deference                 +0.7     if you don't mind, with all due respect, initial "great/nice"
    indirect_request          +0.8     could you, would you (mind), would it be possible
    subjunctive               +0.5     I would, I'd, it would, if you could, I was wondering
    greeting                  +0.4     sentence starting with hi/hello/hey/dear/good morning
    formal_register           +0.6     would like to, on behalf of, please accept, kindly, your patience
    intensified_courtesy      +0.4     sincerely, truly, deeply, so much, very much, heartfelt
    direct_question           -0.3     question starting with what/why/who/where/when/how/which
    second_person_start       -0.5     sentence starting with you/your
    imperative_start          -0.8     non-question sentence starting with a bare command verb (give, tell)
    negative_words            -1.0     stupid, useless, ridiculous, shut up, ...
    swearing                  -1.5     damn, hell, crap, ...
    ========================  =======  ============================================================

    The cue lists and weights live in ``emotion_assets/science/data/politeness_cues.yaml``.
    ``politeness_raw`` therefore lies in [-4.1, 4.7]; ``features_frame(texts)`` returns the indicators.
    The cue lists are frozen at the file's ``version``; change them only with a new version and a new
    measurement. Measured on the baseline profile's eval-split fitting prompts (all four classes; the
    ``evaluator_quality`` asset recomputes it): AUROC of ``politeness`` for the ``polite`` against the
    ``direct`` register = 0.67 (73 vs 76 prompts; 0.61 with the keywords counted as cues, version 1); the
    marker column alone gives 0.50, as the registers carry the keywords equally. ``features`` may reweight
    these strategies (same names); it cannot add new ones.
    """

    name = "politeness_strategies"

    def __init__(self, features: Sequence[PolitenessFeature] | None = None) -> None:
        self.features = tuple(politeness_features() if features is None else features)
        known = {f.name for f in politeness_features()}
        extra = sorted({f.name for f in self.features} - known)
        if extra:
            raise ValueError(f"Unknown politeness strategies {extra}; known: {sorted(known)}.")
        self._weights = np.array([f.weight for f in self.features], dtype=float)  # [n_features]

    @property
    def metric_names(self) -> list[str]:
        return ["politeness", "politeness_raw", MARKER_COLUMN]

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        lo = float(self._weights[self._weights < 0].sum())
        hi = float(self._weights[self._weights > 0].sum())
        return {"politeness": (0.0, 1.0), "politeness_raw": (lo, hi), MARKER_COLUMN: (0.0, 1.0)}

    @property
    def neutral_scores(self) -> dict[str, float]:
        """No strategy and no marker present: raw 0, politeness 0.5, marker 0."""
        return {"politeness": 0.5, "politeness_raw": 0.0, MARKER_COLUMN: 0.0}

    @staticmethod
    def _indicators(text: str) -> dict[str, bool]:
        cues = politeness_cues()
        norm = strip_emotion_markers(text)
        sentences = [s for s in (x.strip() for x in _SENTENCE_SPLIT_RE.split(norm)) if s]
        please_start = False
        please_inside = False
        greeting = direct_question = second_start = imperative = deference_start = False
        for sent in sentences:
            tokens = words(sent)
            if not tokens:
                continue
            please_start |= tokens[0] == "please"
            please_inside |= "please" in tokens[1:]
            greeting |= tokens[0] in cues.greeting_words or " ".join(tokens[:2]) in cues.greeting_pairs
            direct_question |= sent.endswith("?") and tokens[0] in cues.wh_words
            second_start |= tokens[0] in cues.second_person_starts
            imperative |= tokens[0] in cues.imperative_verbs and not sent.endswith("?")
            deference_start |= tokens[0] in cues.deference_starts
        found = {s: bool(pattern.search(norm)) for s, pattern in cues.patterns.items()}
        return {
            "please": please_inside,
            "please_start": please_start,
            "hedges": found["hedges"],
            "deference": deference_start or found["deference"],
            "indirect_request": found["indirect_request"],
            "subjunctive": found["subjunctive"],
            "greeting": greeting,
            "formal_register": found["formal_register"],
            "intensified_courtesy": found["intensified_courtesy"],
            "direct_question": direct_question,
            "second_person_start": second_start,
            "imperative_start": imperative,
            "negative_words": found["negative_words"],
            "swearing": found["swearing"],
        }

    def features_frame(self, texts: list[str]) -> pd.DataFrame:
        """0/1 strategy indicators, one column per strategy."""
        names = [f.name for f in self.features]
        rows = [self._indicators(t) for t in texts]
        return pd.DataFrame([[float(r[n]) for n in names] for r in rows], columns=names, dtype=float)

    def score(self, texts: list[str]) -> pd.DataFrame:
        feats = self.features_frame(texts).to_numpy() if texts else np.zeros((0, len(self.features)))
        raw = feats @ self._weights  # [n_texts]
        marker = [float(has_emotion_marker(t)) for t in texts]
        return pd.DataFrame(
            {"politeness": 1.0 / (1.0 + np.exp(-raw)), "politeness_raw": raw, MARKER_COLUMN: marker},
            dtype=float,
        )
