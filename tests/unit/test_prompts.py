"""Prompt dataset: the shipped file, import formats, validation errors, splits and subsampling."""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import string
from pathlib import Path

import pandas as pd
import pytest
import yaml

from emotion_assets.profiles import get_profile
from emotion_assets.science.prompts import (
    COLUMNS,
    EMOTIONS,
    ROLE_FIT,
    ROLE_STEERING,
    DatasetError,
    assign_splits,
    dataset_summary,
    find_near_duplicates,
    fitting_mask,
    limit_per_emotion,
    load_prompts,
    normalize_text,
    steering_starts,
)

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "data" / "prompts" / "emotion_prompts.jsonl"
BUILD_SCRIPT = ROOT / "data" / "prompts" / "build_prompts.py"
WORDS = ROOT / "data" / "emotion_words.yaml"


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Distinct texts of random pseudo-words, far from each other in trigram space."""
    rng = random.Random(seed)
    return [
        " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(6))
        for _ in range(n)
    ]


def _rows(n_per_emotion: int = 6, seed: int = 0) -> list[dict[str, str]]:
    texts = iter(_random_texts(n_per_emotion * len(EMOTIONS), seed))
    return [{"text": next(texts), "emotion": e} for e in EMOTIONS for _ in range(n_per_emotion)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = ("text", "emotion")) -> Path:
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def _error(path: Path, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_prompts(path, **kwargs)
    return info.value


def _assert_reports(err: DatasetError, name: str, line: int) -> None:
    message = str(err)
    assert name in message
    assert f"line {line}" in message or f", {line}" in message
    assert "Fix:" in message


# --------------------------------------------------------------------------------------------------------
# The shipped dataset


@pytest.fixture(scope="module")
def shipped() -> pd.DataFrame:
    return load_prompts(DATASET)


def test_shipped_dataset_loads_with_unique_prompts_and_both_splits(shipped: pd.DataFrame) -> None:
    assert list(shipped.columns) == list(COLUMNS)
    assert shipped["id"].is_unique
    assert set(shipped["lang"]) == {"en"}
    fitting = shipped[fitting_mask(shipped)]
    for emotion in EMOTIONS:
        part = fitting[fitting["emotion"] == emotion]
        # Neutral has more fitting prompts (84 per register): cross-model maps are fit on them alone.
        per_register = 84 if emotion == "neutral" else 56
        assert part["text"].map(normalize_text).nunique() == len(part) == 4 * per_register
        assert set(part["split"]) == {"train", "eval"}
        assert 0.25 <= (part["split"] == "eval").mean() <= 0.35
        assert part["register"].value_counts().to_dict() == {
            r: per_register for r in ("polite", "casual", "direct", "implicit")
        }
    steering = shipped[shipped["role"] == ROLE_STEERING]
    assert set(steering["emotion"]) == {"neutral"} and len(steering) == 120
    assert 0.25 <= (steering["split"] == "eval").mean() <= 0.35
    assert not steering["text"].str.rstrip().str[-1].isin(list(".!?")).any()  # unfinished openings
    assert fitting["text"].str.rstrip().str[-1].isin(list(".!?")).all()  # complete sentences


def test_shipped_dataset_has_no_near_duplicates_and_sane_lengths(shipped: pd.DataFrame) -> None:
    assert find_near_duplicates(shipped["text"].tolist(), 0.9) == []
    words = shipped["text"].str.split().str.len()
    assert words.between(3, 25).all()


def test_shipped_dataset_rebuilds_identically_and_obeys_lexicon_rules() -> None:
    spec = importlib.util.spec_from_file_location("build_prompts", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render(module.build_records()) == DATASET.read_text(encoding="utf-8")
    assert module.check_sentences(module.PROMPTS, module.load_emotion_words()) == []
    assert module.balance_problems(module.build_records()) == []
    assert not any(module.is_opening(t) for texts in module.PROMPTS["neutral"].values() for t in texts)
    assert all(module.is_opening(t) for texts in module.NEUTRAL_OPENINGS.values() for t in texts)
    # The build refuses an opening among fitting prompts and a neutral keyword.
    bad = {"neutral": {"direct": ("The meeting this afternoon will", "We were so grateful for the lift.")}}
    problems = module.check_sentences(bad, module.load_emotion_words(), openings={})
    assert any("complete sentence" in p for p in problems)
    assert any("grateful" in p for p in problems)


def test_normalize_text() -> None:
    assert normalize_text("  Don't   STOP—now!  Café ") == "dont stop now café"
    assert normalize_text("It\u2019s fine.") == normalize_text("its FINE")


def test_emotion_words_file() -> None:
    doc = yaml.safe_load(WORDS.read_text(encoding="utf-8"))
    assert doc["version"] == 1
    assert set(doc["words"]) == set(EMOTIONS)
    assert doc["words"]["neutral"] == []
    for emotion in ("gratitude", "anger", "apology"):
        words = doc["words"][emotion]
        assert words and all(w == w.lower().strip() for w in words)
    assert {"thank", "sorry", "angry"} <= {w for ws in doc["words"].values() for w in ws}


# --------------------------------------------------------------------------------------------------------
# Formats


def test_label_column_is_accepted_as_emotion(tmp_path: Path) -> None:
    rows = [{"text": r["text"], "label": r["emotion"]} for r in _rows()]
    frame = load_prompts(_write_csv(tmp_path / "labels.csv", rows, ("text", "label")))
    assert frame["emotion"].value_counts().to_dict() == {e: 6 for e in EMOTIONS}
    assert frame["register"].eq("unspecified").all()
    assert frame["split"].isna().all()
    assert frame["source_line"].tolist() == list(range(2, 2 + len(rows)))


def test_jsonl_with_optional_fields(tmp_path: Path) -> None:
    rows = [
        {**r, "id": f"p{i}", "lang": "de", "register": "Casual", "split": "eval"}
        for i, r in enumerate(_rows())
    ]
    frame = load_prompts(_write_jsonl(tmp_path / "p.jsonl", rows))
    assert frame["id"].tolist()[:2] == ["p0", "p1"]
    assert (
        set(frame["lang"]) == {"de"}
        and set(frame["register"]) == {"casual"}
        and set(frame["split"]) == {"eval"}
    )


def test_per_emotion_json_directory(tmp_path: Path) -> None:
    texts = iter(_random_texts(24))
    for emotion in EMOTIONS:
        doc: dict = {
            "prompts": [next(texts) for _ in range(5)] + [{"text": next(texts), "register": "direct"}]
        }
        name = f"{emotion}.json"
        if emotion == "anger":
            doc["emotion"], name = "anger", "file_with_other_name.json"
        (tmp_path / name).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    frame = load_prompts(tmp_path)
    assert frame["emotion"].value_counts().to_dict() == {e: 6 for e in EMOTIONS}
    assert frame["source_line"].tolist()[:6] == [3, 4, 5, 6, 7, 8]  # items of an indented "prompts" array
    assert (frame["register"] == "direct").sum() == 4


# --------------------------------------------------------------------------------------------------------
# Validation errors


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "no_emotion.csv"
    path.write_text("text,lang\nhello there friend,en\n", encoding="utf-8")
    err = _error(path)
    _assert_reports(err, "no_emotion.csv", 1)
    assert "emotion" in str(err)


def test_csv_unknown_label_and_empty_text(tmp_path: Path) -> None:
    rows = _rows()
    rows[2] = {**rows[2], "emotion": "joy"}
    rows[4] = {**rows[4], "text": "   "}
    err = _error(_write_csv(tmp_path / "bad.csv", rows))
    message = str(err)
    _assert_reports(err, "bad.csv", 4)  # header is line 1, rows[2] is line 4
    assert "unknown emotion 'joy'" in message and "gratitude, anger, apology, neutral" in message
    assert "bad.csv line 6: empty text" in message


def test_jsonl_malformed_json_on_line_3(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "broken.jsonl", _rows())
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = '{"text": "unterminated, "emotion": "anger"'
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = _error(path)
    _assert_reports(err, "broken.jsonl", 3)
    assert "malformed JSON" in str(err)


def test_jsonl_invalid_utf8(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "latin1.jsonl", _rows())
    data = path.read_bytes().split(b"\n")
    data[1] = '{"text": "caf\u00e9 au lait tomorrow", "emotion": "anger"}'.encode("latin-1")
    path.write_bytes(b"\n".join(data))
    err = _error(path)
    _assert_reports(err, "latin1.jsonl", 2)
    assert "invalid UTF-8" in str(err) and "0xe9" in str(err)


def test_jsonl_duplicate_lines_report_both_line_numbers(tmp_path: Path) -> None:
    rows = _rows()
    rows.append({"text": rows[0]["text"].upper() + "!", "emotion": rows[0]["emotion"]})
    err = _error(_write_jsonl(tmp_path / "dupes.jsonl", rows))
    assert f"dupes.jsonl lines 1, {len(rows)}: duplicate text" in str(err)
    assert "Fix:" in str(err)


def test_json_wrong_structure(tmp_path: Path) -> None:
    path = tmp_path / "anger.json"
    path.write_text(json.dumps(["just", "a", "list"]), encoding="utf-8")
    err = _error(path, allowed_emotions=("anger",))
    _assert_reports(err, "anger.json", 1)
    assert '"prompts"' in str(err)

    path.write_text(json.dumps({"prompts": ["ok text here", 42]}, indent=1), encoding="utf-8")
    err = _error(path, allowed_emotions=("anger",))
    _assert_reports(err, "anger.json", 4)
    assert "prompts[1]" in str(err)


def test_all_problems_are_collected_and_capped(tmp_path: Path) -> None:
    rows = _rows(n_per_emotion=10)
    for i in range(0, 30):
        rows[i] = {**rows[i], "emotion": "surprise"}
    err = _error(_write_jsonl(tmp_path / "many.jsonl", rows))
    assert len(err.problems) >= 30
    assert "... and" in str(err) and "more" in str(err)
    assert str(err).count("unknown emotion") == 20


def test_near_duplicates_are_detected(tmp_path: Path) -> None:
    rows = _rows()
    rows[1] = {**rows[1], "text": "the delivery of the new kitchen table arrived late on tuesday afternoon"}
    rows[8] = {**rows[8], "text": "the delivery of the new kitchen table arrived late on tuesday afternoons"}
    err = _error(_write_jsonl(tmp_path / "near.jsonl", rows))
    assert "near.jsonl lines 2, 9: near-duplicate" in str(err)
    assert load_prompts(tmp_path / "near.jsonl", near_duplicate_threshold=None).shape[0] == len(rows)


def test_imbalance_and_missing_class_are_detected(tmp_path: Path) -> None:
    rows = _rows(n_per_emotion=4) + [{"text": t, "emotion": "anger"} for t in _random_texts(12, seed=1)]
    err = _error(_write_jsonl(tmp_path / "skewed.jsonl", rows))
    assert "imbalanced" in str(err) and "anger has 16" in str(err) and "skewed.jsonl" in str(err)
    assert load_prompts(tmp_path / "skewed.jsonl", max_imbalance_ratio=5.0).shape[0] == len(rows)

    rows = [r for r in _rows() if r["emotion"] != "apology"]
    err = _error(_write_jsonl(tmp_path / "partial.jsonl", rows))
    assert "no fitting prompts (role 'fit') for emotion(s) apology" in str(err)


def test_find_near_duplicates_matches_brute_force() -> None:
    rng = random.Random(3)
    base = _random_texts(40, seed=5)
    texts = base + [t[:-1] + rng.choice("xyz") for t in base[:15]] + [t + " ok" for t in base[15:25]]
    for k, t in enumerate(base[25:40]):  # replace 1-3 of the 6 words: moderate similarities
        words = t.split()
        words[: 1 + k % 3] = _random_texts(1, seed=100 + k)[0].split()[: 1 + k % 3]
        texts.append(" ".join(words))

    def jaccard(a: str, b: str) -> float:
        sa = {a[i : i + 3] for i in range(len(a) - 2)}
        sb = {b[i : i + 3] for i in range(len(b) - 2)}
        return len(sa & sb) / len(sa | sb)

    norm = [normalize_text(t) for t in texts]
    counts = []
    for threshold in (0.4, 0.7, 0.95):
        expected = {
            (i, j)
            for i, j in itertools.combinations(range(len(texts)), 2)
            if jaccard(norm[i], norm[j]) >= threshold
        }
        assert {(i, j) for i, j, _ in find_near_duplicates(texts, threshold)} == expected
        counts.append(len(expected))
    assert counts[0] > counts[1] > counts[2] > 0


def test_find_near_duplicates_finds_the_one_pair_among_5000_texts() -> None:
    texts = _random_texts(5000, seed=7)
    texts[4999] = texts[17] + "s"
    pairs = find_near_duplicates(texts, 0.9)
    assert [(i, j) for i, j, _ in pairs] == [(17, 4999)]


# --------------------------------------------------------------------------------------------------------
# Splits, subsampling, summary


def _frame(n_per_emotion: int = 40) -> pd.DataFrame:
    registers = ("polite", "casual", "direct", "implicit")
    rows = [
        {**r, "register": registers[i % 4], "id": f"r{i:03d}"} for i, r in enumerate(_rows(n_per_emotion))
    ]
    return pd.DataFrame(rows)


def test_assign_splits_is_deterministic_and_stratified() -> None:
    df = _frame()
    a, b = assign_splits(df, 0.3, seed=13), assign_splits(df, 0.3, seed=13)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(assign_splits(df, 0.3, seed=14)["split"])
    for _, part in a.groupby("emotion"):
        assert (part["split"] == "eval").sum() == 12
        assert part.groupby("register")["split"].apply(lambda s: (s == "eval").sum()).tolist() == [3, 3, 3, 3]
    shuffled = assign_splits(df.sample(frac=1.0, random_state=0), 0.3, seed=13)
    assert shuffled.set_index("id")["split"].sort_index().equals(a.set_index("id")["split"].sort_index())


def test_assign_splits_keeps_existing_splits_and_fills_partial() -> None:
    df = _frame(10).assign(split="train")
    assert assign_splits(df, 0.3, seed=1)["split"].eq("train").all()
    df.loc[0, "split"] = None
    assigned = assign_splits(df, 0.3, seed=1)
    assert set(assigned["split"]) == {"train", "eval"}
    with pytest.raises(ValueError):
        assign_splits(df, 1.0, seed=1)


def test_limit_per_emotion_is_deterministic_and_keeps_proportions() -> None:
    df = assign_splits(_frame(), 0.3, seed=13)
    small = limit_per_emotion(df, 10, seed=13)
    pd.testing.assert_frame_equal(small, limit_per_emotion(df, 10, seed=13))
    assert small["emotion"].value_counts().to_dict() == {e: 10 for e in EMOTIONS}
    for _, part in small.groupby("emotion"):
        assert (part["split"] == "eval").sum() == 3
    assert not small["id"].equals(limit_per_emotion(df, 10, seed=99)["id"])
    tiny = limit_per_emotion(df, 2, seed=0)
    assert all(set(part["split"]) == {"train", "eval"} for _, part in tiny.groupby("emotion"))
    assert len(limit_per_emotion(df, None, seed=0)) == len(df)
    assert len(limit_per_emotion(df, 1000, seed=0)) == len(df)
    with pytest.raises(ValueError, match="at least 2"):
        limit_per_emotion(df, 1, seed=0)


def test_dataset_summary(shipped: pd.DataFrame) -> None:
    summary = dataset_summary(shipped)
    json.dumps(summary)  # JSON-ready
    assert summary["n_prompts"] == len(shipped)
    for emotion in EMOTIONS:
        counts = summary["counts"][emotion]
        assert counts["train"] + counts["eval"] == counts["total"] >= 200
        assert sum(summary["registers"][emotion].values()) == counts["total"]
    assert summary["length_words"]["min"] >= 3 and summary["length_words"]["max"] <= 25
    assert summary["uniqueness"]["n_unique"] == len(shipped)
    assert summary["uniqueness"]["n_near_duplicate_pairs"] == 0
    assert summary["roles"]["neutral"] == {ROLE_FIT: 336, ROLE_STEERING: 120}
    assert summary["roles"]["anger"] == {ROLE_FIT: 224}


# --------------------------------------------------------------------------------------------------------
# Roles: fitting prompts and steering prompts


def _with_openings(rows: list[dict], n: int, seed: int = 9) -> list[dict]:
    """``rows`` plus ``n`` neutral steering prompts (unfinished openings)."""
    return rows + [
        {"text": f"{t} and then", "emotion": "neutral", "role": ROLE_STEERING}
        for t in _random_texts(n, seed=seed)
    ]


def test_role_is_read_from_jsonl_csv_and_json_and_defaults_to_fit(tmp_path: Path) -> None:
    rows = _with_openings(_rows(), 3)
    frame = load_prompts(_write_jsonl(tmp_path / "roles.jsonl", rows))
    assert frame["role"].value_counts().to_dict() == {ROLE_FIT: 24, ROLE_STEERING: 3}
    csv_frame = load_prompts(_write_csv(tmp_path / "roles.csv", rows, ("text", "emotion", "role")))
    assert csv_frame["role"].tolist() == frame["role"].tolist()  # empty CSV cells are "fit"

    folder = tmp_path / "per_emotion"
    folder.mkdir()
    texts = iter(_random_texts(30, seed=4))
    for emotion in EMOTIONS:
        doc: dict = {"prompts": [next(texts) for _ in range(4)]}
        if emotion == "neutral":
            doc["prompts"].append({"text": next(texts) + " and", "role": "Steering_Prompt"})
        (folder / f"{emotion}.json").write_text(json.dumps(doc), encoding="utf-8")
    per_emotion = load_prompts(folder)
    assert per_emotion.loc[per_emotion["role"] == ROLE_STEERING, "emotion"].tolist() == ["neutral"]
    assert (per_emotion["role"] == ROLE_FIT).sum() == 16


def test_unknown_role_and_emotion_steering_prompt_name_the_line(tmp_path: Path) -> None:
    rows = _rows()
    rows[1] = {**rows[1], "role": "generation"}
    rows[2] = {**rows[2], "role": ROLE_STEERING}  # a gratitude prompt
    err = _error(_write_jsonl(tmp_path / "roles.jsonl", rows))
    message = str(err)
    assert "roles.jsonl line 2: unknown role 'generation'" in message
    assert "use one of: fit, steering_prompt" in message
    assert f"roles.jsonl line 3: role '{ROLE_STEERING}' on a 'gratitude' prompt" in message
    assert "label it 'neutral'" in message


def test_class_balance_counts_fitting_prompts_only(tmp_path: Path) -> None:
    # 6 fitting prompts per class plus 30 neutral openings: balanced (openings fit nothing).
    frame = load_prompts(_write_jsonl(tmp_path / "ok.jsonl", _with_openings(_rows(), 30)))
    assert len(frame) == 54
    # Neutral with 1 fitting prompt and 30 openings: imbalanced although it has the most rows.
    rows = [r for r in _rows() if r["emotion"] != "neutral"] + _rows(2, seed=5)[-1:]
    err = _error(_write_jsonl(tmp_path / "skewed.jsonl", _with_openings(rows, 30)))
    assert "gratitude has 6 fitting prompts, neutral has 1 (ratio 6.00" in str(err)
    # Neutral with openings only: no fitting neutral prompts at all.
    rows = [r for r in _rows() if r["emotion"] != "neutral"]
    err = _error(_write_jsonl(tmp_path / "openings.jsonl", _with_openings(rows, 6)))
    assert "no fitting prompts (role 'fit') for emotion(s) neutral" in str(err)


def _role_frame(n_fit: int = 40, n_steer: int = 20) -> pd.DataFrame:
    frame = _frame(n_fit).assign(role=ROLE_FIT)
    texts = _random_texts(n_steer, seed=21)
    openings = pd.DataFrame(
        {
            "text": [t + " and" for t in texts],
            "emotion": "neutral",
            "register": [("polite", "casual", "direct", "implicit")[i % 4] for i in range(n_steer)],
            "id": [f"o{i:03d}" for i in range(n_steer)],
            "role": ROLE_STEERING,
        }
    )
    return pd.concat([frame, openings], ignore_index=True)


def test_assign_splits_gives_each_role_its_own_eval_share() -> None:
    df = _role_frame()
    split = assign_splits(df, 0.3, seed=13)
    for (emotion, role), part in split.groupby(["emotion", "role"]):
        expected = 6 if role == ROLE_STEERING else 12
        assert (part["split"] == "eval").sum() == expected, (emotion, role)
    # Fitting prompts keep the splits they had before roles existed.
    plain = assign_splits(_frame(), 0.3, seed=13)
    assert split.iloc[: len(plain)]["split"].tolist() == plain["split"].tolist()


def test_limit_per_emotion_caps_each_role_and_keeps_eval_steering_prompts() -> None:
    df = assign_splits(_role_frame(40, 30), 0.3, seed=13)
    small = limit_per_emotion(df, 10, seed=13)
    pd.testing.assert_frame_equal(small, limit_per_emotion(df, 10, seed=13))
    fitting = small[fitting_mask(small)]
    assert fitting["emotion"].value_counts().to_dict() == {e: 10 for e in EMOTIONS}
    steering = small[small["role"] == ROLE_STEERING]
    assert len(steering) == 10 and (steering["split"] == "eval").sum() == 3


def test_smoke_profile_keeps_eval_steering_prompts(shipped: pd.DataFrame) -> None:
    profile = get_profile("smoke", ROOT / "data" / "profiles.yaml")
    frame = limit_per_emotion(
        assign_splits(shipped, profile.dataset.eval_fraction, profile.seed),
        profile.samples_per_emotion,
        profile.seed,
    )
    counts = frame[fitting_mask(frame)]["emotion"].value_counts()
    assert counts.to_dict() == {e: profile.samples_per_emotion for e in EMOTIONS}
    starts, role = steering_starts(frame)
    assert role == ROLE_STEERING and len(starts) >= 5
    assert set(starts["split"]) == {"eval"} and set(starts["emotion"]) == {"neutral"}


def test_steering_starts_fall_back_to_eval_neutral_fitting_prompts() -> None:
    with_roles = assign_splits(_role_frame(), 0.3, seed=13)
    starts, role = steering_starts(with_roles)
    assert role == ROLE_STEERING and set(starts["role"]) == {ROLE_STEERING} and len(starts) == 6
    plain = assign_splits(_frame(), 0.3, seed=13)  # no role column: every row is a fitting row
    starts, role = steering_starts(plain)
    assert role == ROLE_FIT and set(starts["emotion"]) == {"neutral"} and set(starts["split"]) == {"eval"}
    assert starts["id"].is_monotonic_increasing
    with pytest.raises(ValueError, match="no eval-split prompts to steer"):
        steering_starts(plain[plain["emotion"] != "neutral"])
