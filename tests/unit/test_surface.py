"""Surface features of prompts and the balance check between neutral and each emotion class."""

from __future__ import annotations

import json
import random
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from emotion_assets.common import all_emotion_words
from emotion_assets.profiles import SurfaceBalanceConfig
from emotion_assets.science.prompts import EMOTIONS, ROLE_FIT, ROLE_STEERING, load_prompts
from emotion_assets.science.surface import (
    ALL_REGISTERS,
    CHECKED_SHARES,
    prompt_surface,
    surface_balance_problems,
    surface_features,
    surface_table,
)
from tests.artifacts import materialize

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "data" / "prompts" / "emotion_prompts.jsonl"
REGISTERS = ("polite", "casual", "direct", "implicit")
EMOTION_CLASSES = ("gratitude", "anger", "apology")
THRESHOLDS = SurfaceBalanceConfig()
_CONSONANTS = "bcdfghjklmnpqrstvwxz"  # pseudo-words without vowels can never be a pronoun or "The"


def _sentence(rng: random.Random, start: str, end: str, n_words: int) -> str:
    words = ["".join(rng.choices(_CONSONANTS, k=rng.randint(4, 7))) for _ in range(n_words)]
    return " ".join([start, *words] if start else words) + end


def _rows(
    emotion: str,
    n: int = 40,
    *,
    seed: int,
    ends: tuple[str, ...] = (".", ".", ".", "!", "?", ".", ".", "."),
    starts: tuple[str, ...] = ("I", "We", "You", "I", "My", "Our", "I", "", "The", "I"),
    n_words: int = 7,
    registers: tuple[str, ...] = REGISTERS,
    role: str = ROLE_FIT,
) -> list[dict]:
    """``n`` prompts of one class whose features cycle through ``ends`` / ``starts`` / ``registers``."""
    rng = random.Random(seed)
    return [
        {
            "id": f"{emotion}-{role}-{i:03d}",
            "text": _sentence(rng, starts[i % len(starts)], ends[i % len(ends)], n_words),
            "emotion": emotion,
            "register": registers[i % len(registers)],
            "role": role,
        }
        for i in range(n)
    ]


def _balanced(**neutral: object) -> list[dict]:
    """Every class built alike; ``neutral`` overrides the recipe of the neutral class only."""
    rows = [r for k, e in enumerate(EMOTION_CLASSES) for r in _rows(e, seed=k)]
    return rows + _rows("neutral", seed=99, **neutral)


def _problems(rows: list[dict]) -> list[dict]:
    return surface_balance_problems(prompt_surface(pd.DataFrame(rows), all_emotion_words()), THRESHOLDS)


def _named(problems: list[dict]) -> set[tuple[str, str]]:
    return {(p["feature"], p["emotion"]) for p in problems}


# --------------------------------------------------------------------------------------------------------
# Features


def test_surface_features_known_answers() -> None:
    texts = [
        "I'm at the station now.",
        "Thanks a ton for the ride!",
        "Could you send me the agenda?",
        "The museum is closed on Mondays.",
        "Walking home through the park, they",
        "Ian made tea for everyone.",  # "Ian" is not "I"; "made" is not "mad"
        "We\u2019ll take the early train.",  # curly apostrophe
        "Honestly, that sounds mad to her.",
    ]
    f = surface_features(texts, all_emotion_words())
    assert f["final_punctuation"].tolist() == [True, True, True, True, False, True, True, True]
    assert f["exclamation"].tolist() == [False, True, False, False, False, False, False, False]
    assert f["question"].tolist() == [False, False, True, False, False, False, False, False]
    assert f["first_second_person"].tolist() == [True, False, True, False, False, False, True, False]
    assert f["starts_with_the"].tolist() == [False, False, False, True, False, False, False, False]
    assert f["emotion_keyword"].tolist() == [False, True, False, False, False, False, False, True]
    assert f["n_words"].tolist() == [5, 6, 6, 6, 6, 5, 5, 6]


def test_prompt_surface_keeps_fitting_rows_only() -> None:
    rows = _balanced() + _rows("neutral", 10, seed=5, ends=("",), role=ROLE_STEERING)
    features = prompt_surface(pd.DataFrame(rows), all_emotion_words())
    assert len(features) == 160
    assert features["final_punctuation"].all()


def test_surface_table_has_shares_per_class_and_register_and_an_all_row() -> None:
    table = surface_table(prompt_surface(pd.DataFrame(_balanced()), all_emotion_words()))
    assert table["emotion"].drop_duplicates().tolist() == list(EMOTIONS)
    assert set(table["register"]) == {*REGISTERS, ALL_REGISTERS}
    overall = table[table["register"] == ALL_REGISTERS].set_index("emotion")
    assert overall["n"].tolist() == [40, 40, 40, 40]
    assert overall.loc["anger", "exclamation"] == pytest.approx(5 / 40)  # "!" is 1 of the 8 endings
    assert overall.loc["anger", "starts_with_the"] == pytest.approx(4 / 40)
    assert overall.loc["anger", "first_second_person"] == pytest.approx(32 / 40)
    assert overall["n_words"].to_numpy() == pytest.approx([7.9] * 4)  # start word (9 of 10) + 7 words
    per_register = table[table["register"] != ALL_REGISTERS]
    assert per_register.groupby("emotion")["n"].sum().eq(40).all()


# --------------------------------------------------------------------------------------------------------
# Balance: nothing planted, nothing found; each planted imbalance is named with its classes and fix


def test_balanced_classes_have_no_problems() -> None:
    assert _problems(_balanced()) == []


def test_every_emotion_prompt_exclaims_and_no_neutral_does() -> None:
    rows = [r for k, e in enumerate(EMOTION_CLASSES) for r in _rows(e, seed=k, ends=("!",))]
    rows += _rows("neutral", seed=99, ends=(".",))
    problems = _problems(rows)
    assert _named(problems) == {("exclamation", e) for e in EMOTION_CLASSES}
    (first, *_) = problems
    assert (first["neutral_value"], first["emotion_value"], first["difference"]) == (0.0, 1.0, 1.0)
    assert first["threshold"] == THRESHOLDS.max_share_difference
    assert "add or edit neutral prompts" in first["fix"] and "'!'" in first["fix"]


def test_unfinished_neutral_openings_are_named_and_steering_role_fixes_them() -> None:
    problems = _problems(_balanced(ends=("",)))
    assert {("final_punctuation", e) for e in EMOTION_CLASSES} <= _named(problems)
    assert all("role: steering_prompt" in p["fix"] for p in problems if p["feature"] == "final_punctuation")
    # The same openings as steering prompts, next to balanced fitting neutral prompts: nothing to report.
    fixed = _balanced() + _rows("neutral", seed=7, ends=("",), role=ROLE_STEERING)
    assert _problems(fixed) == []


def test_third_person_neutral_prompts_are_named() -> None:
    problems = _problems(_balanced(starts=("She", "They", "It", "")))
    assert {("first_second_person", e) for e in EMOTION_CLASSES} <= _named(problems)
    record = next(p for p in problems if p["feature"] == "first_second_person")
    assert record["neutral_value"] == 0.0 and record["emotion_value"] == pytest.approx(0.8)


def test_neutral_prompts_starting_with_the_are_named() -> None:
    assert _named(_problems(_balanced(starts=("The", "The", "I", "We")))) >= {
        ("starts_with_the", e) for e in EMOTION_CLASSES
    }


def test_length_ratio_is_checked_in_both_directions() -> None:
    longer = _problems(_balanced(n_words=15))  # 15.9 vs 7.9 words on average
    assert _named(longer) == {("n_words", e) for e in EMOTION_CLASSES}
    assert longer[0]["difference"] == pytest.approx(15.9 / 7.9, abs=1e-4)
    assert _named(_problems(_balanced(n_words=3))) == {("n_words", e) for e in EMOTION_CLASSES}
    assert _problems(_balanced(n_words=8)) == []  # 8.9 vs 7.9 words: ratio 1.13 ≤ 1.3


def test_register_mix_is_checked() -> None:
    names = _named(_problems(_balanced(registers=("polite",))))
    assert ("register=polite", "anger") in names and ("register=casual", "anger") in names


def test_emotion_keywords_are_reported_but_not_checked() -> None:
    rows = _balanced()
    for r in rows:
        if r["emotion"] == "gratitude":
            r["text"] = "Thanks " + r["text"]
    features = prompt_surface(pd.DataFrame(rows), all_emotion_words())
    table = surface_table(features).set_index(["emotion", "register"])
    assert table.loc[("gratitude", ALL_REGISTERS), "emotion_keyword"] == 1.0
    assert table.loc[("neutral", ALL_REGISTERS), "emotion_keyword"] == 0.0
    assert all(p["feature"] != "emotion_keyword" for p in surface_balance_problems(features, THRESHOLDS))


def test_missing_neutral_class_is_a_problem() -> None:
    rows = [r for r in _balanced() if r["emotion"] != "neutral"]
    (problem,) = _problems(rows)
    assert problem["emotion"] == "neutral" and "add fitting prompts" in problem["fix"]


# --------------------------------------------------------------------------------------------------------
# The shipped dataset


@pytest.fixture(scope="module")
def shipped_features() -> pd.DataFrame:
    return prompt_surface(load_prompts(DATASET), all_emotion_words())


def test_shipped_dataset_is_balanced_overall_and_per_register(shipped_features: pd.DataFrame) -> None:
    assert len(shipped_features) == 3 * 224 + 336  # fitting rows only
    assert surface_balance_problems(shipped_features, THRESHOLDS) == []
    for register in REGISTERS:
        part = shipped_features[shipped_features["register"] == register]
        assert surface_balance_problems(part, THRESHOLDS) == [], register
    table = surface_table(shipped_features).set_index(["emotion", "register"])
    assert table.loc[("neutral", ALL_REGISTERS), "final_punctuation"] == 1.0
    assert table.loc[("neutral", ALL_REGISTERS), "emotion_keyword"] == 0.0
    assert table.xs("implicit", level="register")["emotion_keyword"].eq(0.0).all()
    assert set(CHECKED_SHARES) < set(table.columns)


# --------------------------------------------------------------------------------------------------------
# The blocking asset check, run through Dagster on a temporary results folder and profile file


def _materialize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: Path) -> dg.ExecuteInProcessResult:
    from emotion_assets.dataset import emotion_dataset, emotion_dataset_surface_balance
    from resources.storage import ArtifactStore
    from resources.tracking import TrackingResource

    doc = yaml.safe_load((ROOT / "data" / "profiles.yaml").read_text(encoding="utf-8"))
    smoke = doc["profiles"]["smoke"]
    smoke["dataset"]["path"] = str(dataset)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(yaml.safe_dump({"version": 1, "profiles": {"smoke": smoke}}), encoding="utf-8")
    monkeypatch.setenv("EMOTION_PROFILES", str(profiles))
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(tmp_path / "results"))
    store = ArtifactStore()
    return materialize(
        [emotion_dataset, emotion_dataset_surface_balance],
        store=store,
        partition_key="smoke",
        resources={"store": store, "tracking": TrackingResource(enabled=False)},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_surface_check_blocks_an_unbalanced_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emotion_assets.dataset import surface_balance_check
    from emotion_assets.profiles import get_profile
    from emotion_assets.science.prompts import load_prompts

    rows = [r for k, e in enumerate(EMOTION_CLASSES) for r in _rows(e, seed=k, ends=("!",))]
    rows += _rows("neutral", seed=99, ends=(".",), starts=("She", "They", ""))
    unbalanced = _write_jsonl(tmp_path / "unbalanced.jsonl", rows)
    # The check's logic names the features, the classes and the fix.
    evaluation = surface_balance_check(load_prompts(unbalanced), get_profile("smoke"))
    metadata = evaluation.metadata
    assert not evaluation.passed
    assert {"exclamation", "first_second_person"} <= set(metadata["features"].value)
    assert set(metadata["classes"].value) == set(EMOTION_CLASSES)
    assert "role: steering_prompt" in metadata["problems"].value
    assert "exclamation" in evaluation.description and "Fix:" in evaluation.description
    # The asset runs it before publishing: it fails with that message and publishes nothing.
    result = _materialize(tmp_path, monkeypatch, unbalanced)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.message
    assert "emotion_dataset_surface_balance" in message and "exclamation" in message and "Fix:" in message
    assert not (tmp_path / "results" / "smoke" / "emotion_dataset" / "prompts.parquet").exists()


def test_surface_check_passes_the_shipped_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _materialize(tmp_path, monkeypatch, DATASET)
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["n_problems"].value == 0
    (materialization,) = result.asset_materializations_for_node("emotion_dataset")
    metadata = materialization.metadata
    assert "first_second_person" in metadata["surface_table"].value
    assert metadata["n_steering_prompts"].value == 20  # smoke: 20 fitting and 20 steering prompts per class
    prompts = pd.read_parquet(tmp_path / "results" / "smoke" / "emotion_dataset" / "prompts.parquet")
    assert ((prompts["role"] == ROLE_STEERING) & (prompts["split"] == "eval")).sum() == 6
