"""The user's data is never changed silently: given splits are kept, disagreeing labels are refused,
over-long prompts are refused rather than cut, and steering layers a model lacks are refused."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pandas as pd
import pytest
import yaml

from emotion_assets.science.prompts import EMOTIONS, DatasetError, assign_splits, load_prompts
from emotion_assets.science.residual import PromptTooLongError, tokenize_prompts
from tests.artifacts import materialize
from tests.tiny_models import byte_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATASET = ROOT / "data" / "prompts" / "emotion_prompts.jsonl"


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(5)) for _ in range(n)]


def _frame(n: int = 10) -> pd.DataFrame:
    texts = iter(_texts(n * len(EMOTIONS)))
    rows = [{"id": f"{e}-{i:02d}", "text": next(texts), "emotion": e} for e in EMOTIONS for i in range(n)]
    return pd.DataFrame(rows).assign(split=None, role="fit", register="casual")


# ---------------------------------------------------------------- partial splits


def test_given_splits_are_kept_and_only_the_rest_is_assigned():
    frame = _frame()
    anger = frame.index[frame["emotion"] == "anger"]
    frame.loc[anger[:5], "split"] = "eval"  # the user holds out 5 of 10 anger prompts
    frame.loc[frame.index[frame["emotion"] == "gratitude"][:2], "split"] = "train"
    out = assign_splits(frame, eval_fraction=0.3, seed=13)
    given = frame["split"].notna()
    pd.testing.assert_series_equal(out.loc[given, "split"], frame.loc[given, "split"])
    assert out["split"].isin(["train", "eval"]).all()
    eval_counts = out[out["split"] == "eval"].groupby("emotion").size().to_dict()
    # anger: 5 given eval already exceed the 3 the group would get: every open row goes to train.
    # gratitude: 2 given train rows, 3 of the 8 open rows fill the eval split. Others: 3 of 10, as without.
    assert eval_counts == {"anger": 5, "gratitude": 3, "apology": 3, "neutral": 3}
    # With no split given the result is the plain stratified split, row for row.
    plain = assign_splits(_frame(), eval_fraction=0.3, seed=13)
    open_anger = out.loc[anger[5:], "split"]
    assert (open_anger == "train").all()
    assert out.loc[frame["emotion"] == "neutral", "split"].equals(
        plain.loc[frame["emotion"] == "neutral", "split"]
    )


def test_unknown_split_value_is_an_error_not_a_reassignment():
    frame = _frame().assign(split="train")
    frame.loc[3, "split"] = "test"
    with pytest.raises(ValueError, match=r"Unknown split value\(s\) \['test'\]"):
        assign_splits(frame, eval_fraction=0.3, seed=1)


def test_dataset_asset_reports_given_and_assigned_splits(tmp_path, monkeypatch):
    from emotion_assets.dataset import emotion_dataset
    from resources.storage import ArtifactStore, read_table
    from resources.tracking import TrackingResource

    rows = [json.loads(line) for line in DATASET.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows[::10]:  # a tenth of the rows lose their split
        del row["split"]
    source = tmp_path / "partial.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    doc = yaml.safe_load((ROOT / "data" / "profiles.yaml").read_text(encoding="utf-8"))
    smoke = doc["profiles"]["smoke"]
    smoke["dataset"]["path"] = str(source)
    smoke["samples_per_emotion"] = None
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(yaml.safe_dump({"version": 1, "profiles": {"smoke": smoke}}), encoding="utf-8")
    monkeypatch.setenv("EMOTION_PROFILES", str(profiles))
    instance = dg.DagsterInstance.ephemeral()
    store = ArtifactStore(root_dir=str(tmp_path / "results"))
    result = materialize(
        [emotion_dataset], store=store, partition_key="smoke",
        resources={"store": store, "tracking": TrackingResource(enabled=False)},
        instance=instance,
    )  # fmt: skip
    metadata = result.asset_materializations_for_node("emotion_dataset")[0].metadata
    n_open = len(rows[::10])
    assert metadata["splits_assigned"].value == n_open
    assert metadata["splits_given"].value == len(rows) - n_open
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    warnings = [message for message in logs if "give a split and keep it" in message]
    assert len(warnings) == 1 and f"the other {n_open} were assigned" in warnings[0]
    published = read_table(tmp_path / "results" / "smoke" / "emotion_dataset" / "prompts.parquet")
    given = {r["id"]: r["split"] for r in rows if "split" in r}
    kept = published[published["id"].isin(given)]
    assert len(kept) == len(given) and (kept["split"] == kept["id"].map(given)).all()


# ---------------------------------------------------------------- emotion vs label


def test_emotion_and_label_that_disagree_name_the_line(tmp_path):
    texts = _texts(24, seed=3)
    rows = [{"text": t, "emotion": EMOTIONS[i % 4]} for i, t in enumerate(texts)]
    rows[0]["label"] = " Gratitude "  # agrees once case and spaces are set aside
    rows[2] = {"text": texts[2], "emotion": "apology", "label": "anger"}
    rows[5] = {"text": texts[5], "emotion": "gratitude", "label": "neutral"}
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DatasetError) as err:
        load_prompts(path)
    message = str(err.value)
    assert "labels.jsonl line 3: fields 'emotion' ('apology') and 'label' ('anger') disagree" in message
    assert "labels.jsonl line 6: fields 'emotion' ('gratitude') and 'label' ('neutral') disagree" in message
    assert "line 1:" not in message and "Fix: keep one of the two fields" in message
    assert len(err.value.problems) == 2

    csv = tmp_path / "labels.csv"
    pd.DataFrame({"text": texts, "emotion": [EMOTIONS[i % 4] for i in range(24)],
                  "label": [EMOTIONS[(i + (i == 7)) % 4] for i in range(24)]}).to_csv(csv, index=False)  # fmt: skip
    with pytest.raises(
        DatasetError, match=r"labels\.csv line 9: fields 'emotion' \('neutral'\) and 'label' \('gratitude'\)"
    ):
        load_prompts(csv)


# ---------------------------------------------------------------- over-long prompts


def test_over_long_prompts_are_refused_by_id_and_count_never_cut():
    tokenizer = byte_tokenizer()
    texts = ["short one", "x" * 40, "also short", "y" * 60]
    ids = ["p-short", "p-40", "p-also", "p-60"]
    with pytest.raises(PromptTooLongError) as err:
        tokenize_prompts(tokenizer, texts, [], max_length=41, ids=ids, setting="max_prompt_tokens")
    message = str(err.value)
    # Byte tokenizer: one token per byte plus BOS; "x" * 40 has exactly 41 tokens and is allowed.
    assert "1 prompt(s) are longer than max_prompt_tokens = 41" in message
    assert "prompt 'p-60' has 61 tokens" in message and "p-40" not in message
    assert "raise max_prompt_tokens" in message
    enc = tokenize_prompts(tokenizer, texts, [], max_length=61, ids=ids)
    assert enc["attention_mask"].sum(dim=1).tolist() == [10, 41, 11, 61]  # nothing was cut


# ---------------------------------------------------------------- steering layers


def _handle(n_layers: int, causal: bool) -> SimpleNamespace:
    return SimpleNamespace(
        name="tiny", spec=SimpleNamespace(can_generate=causal), geometry=SimpleNamespace(n_layers=n_layers)
    )


def test_steering_layers_outside_the_model_are_refused_at_capture():
    from emotion_assets.activations import capture_boundaries
    from emotion_assets.profiles import ProfileError, get_profile

    smoke = get_profile("smoke")  # steering.layers [12], layers {stride: 6}
    assert capture_boundaries(smoke, _handle(30, causal=True)) == [0, 6, 12, 18, 24, 30]
    with pytest.raises(ProfileError) as err:
        capture_boundaries(smoke, _handle(12, causal=True))
    message = str(err.value)
    assert "Profile 'smoke' field steering.layers has [12], which tiny does not have" in message
    assert "12 blocks, so steerable layers (resid_pre of a block) are 0..11" in message
    assert capture_boundaries(smoke, _handle(6, causal=False)) == [0, 6]  # an encoder is never steered
