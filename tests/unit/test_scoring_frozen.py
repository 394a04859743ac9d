"""The text scorers give the frozen reference's scores, and their data files fail loudly.

``data/text_scores_frozen.json`` holds the scores of the scorers on known strings, computed before the
scorers were split into one module each and their word lists moved to YAML data files; any change to a cue
list, a weight or the scoring code shows up here as a difference. Floats must agree to 1e-12 relative:
a weighted sum can round its last bit differently on another CPU (vector width), while any change of a cue
or weight moves a score by far more.
"""

from __future__ import annotations

import json
import math
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd
import pytest

from emotion_assets.science import data_files
from emotion_assets.science.data_files import DataFileError, data_file_path, load_data_file
from emotion_assets.science.scoring import (
    NrcLexiconEmotions,
    PolitenessScorer,
    VaderSentiment,
    build_suite,
    has_emotion_marker,
    labels,
    politeness,
    strip_emotion_markers,
)

FROZEN = json.loads((Path(__file__).parent / "data" / "text_scores_frozen.json").read_text(encoding="utf-8"))
TEXTS: list[str] = FROZEN["texts"]
ROOT = Path(__file__).resolve().parents[2]
FLOAT_TOLERANCE = 1e-12  # relative; the last bit of a sum may differ between CPUs


def _same(frame: pd.DataFrame, frozen: dict[str, list]) -> None:
    assert list(frame.columns) == list(frozen)
    for col, values in frozen.items():
        got = frame[col].tolist()
        assert len(got) == len(values), col
        for i, (a, b) in enumerate(zip(got, values, strict=True)):
            same = (a == b) or (
                isinstance(a, float)
                and isinstance(b, float)
                and (math.isclose(a, b, rel_tol=FLOAT_TOLERANCE) or (math.isnan(a) and math.isnan(b)))
            )
            assert same, f"{col}[{i}] ({TEXTS[i]!r}): {a!r} != frozen {b!r}"


def test_each_scorer_matches_the_frozen_scores() -> None:
    _same(VaderSentiment().score(TEXTS), FROZEN["vader"])
    _same(NrcLexiconEmotions().score(TEXTS), FROZEN["nrc_lexicon"])
    scorer = PolitenessScorer()
    _same(scorer.score(TEXTS), FROZEN["politeness"])
    _same(scorer.features_frame(TEXTS), FROZEN["politeness_features"])
    assert [strip_emotion_markers(t) for t in TEXTS] == FROZEN["stripped"]
    assert [has_emotion_marker(t) for t in TEXTS] == FROZEN["marker"]


def test_the_suite_matches_the_frozen_scores_and_description() -> None:
    suite = build_suite(FROZEN["spec"], device="cpu")
    _same(suite.score(TEXTS), FROZEN["suite_continuation"])
    joined = suite.score(TEXTS, prompts=FROZEN["prompts"], continuation_only=False)
    _same(joined, FROZEN["suite_joined"])
    assert json.loads(json.dumps(suite.describe())) == FROZEN["describe"]


def test_the_frozen_texts_exercise_every_politeness_strategy() -> None:
    """The reference would miss a changed cue list if no frozen text fired that strategy."""
    fired = {name for name, values in FROZEN["politeness_features"].items() if any(values)}
    assert fired == {f.name for f in politeness.politeness_features()}


def test_every_data_file_ships_as_package_data() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["emotion_assets.science"]
    folder = data_file_path("politeness_cues.yaml").parent
    files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.iterdir() if p.is_file())
    assert files, folder
    assert [f for f in files if not any(fnmatch(f, g) for g in globs)] == []


@pytest.fixture
def data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Data files read from ``tmp_path`` instead of the package, with every cache emptied around the test."""
    caches = [load_data_file, politeness.politeness_cues, labels.nrc_affects, labels.go_emotions_labels]
    for cached in caches:
        cached.cache_clear()
    monkeypatch.setattr(data_files, "data_file_path", lambda name: tmp_path / name)
    yield tmp_path
    monkeypatch.undo()
    for cached in caches:
        cached.cache_clear()


def test_a_missing_data_file_names_the_file(data_folder: Path) -> None:
    with pytest.raises(DataFileError, match=r"politeness_cues\.yaml does not exist"):
        PolitenessScorer()


def test_a_malformed_data_file_names_the_file(data_folder: Path) -> None:
    (data_folder / "emotion_labels.yaml").write_text("nrc_affects: [anger, joy\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"emotion_labels\.yaml is not valid YAML"):
        NrcLexiconEmotions(lexicon={})


def test_a_data_file_without_an_entry_names_the_entry(data_folder: Path) -> None:
    (data_folder / "emotion_labels.yaml").write_text("go_emotions: [joy]\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"emotion_labels\.yaml has no entry 'nrc_affects'"):
        NrcLexiconEmotions(lexicon={})


def test_a_list_entry_of_another_type_is_refused(data_folder: Path) -> None:
    (data_folder / "emotion_labels.yaml").write_text("nrc_affects: [anger, yes]\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=r"'nrc_affects' must be a non-empty list of non-empty strings"):
        NrcLexiconEmotions(lexicon={})
