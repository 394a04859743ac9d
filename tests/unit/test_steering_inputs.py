"""What the steering and k-selection assets hand to science: layer vectors, neutral-centred activations,
steering prompts and the k chosen at the best-aligned layer."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from emotion_assets.science.statistics import select_k_at_best_layer
from emotion_assets.science.steering import layer_vectors, neutral_centered_activations, steering_prompts


def test_layer_vectors_pick_each_emotions_vector_at_each_layer_and_refuse_a_missing_layer():
    vectors = {
        "last/anger": torch.arange(3.0)[:, None].expand(3, 4),  # row b holds b at boundary [0, 2, 4][b]
        "last/gratitude": -torch.arange(3.0)[:, None].expand(3, 4),
        "mean/anger": torch.full((3, 4), 9.0),
    }
    chosen = layer_vectors(vectors, [0, 2, 4], "last", [2, 4], "tiny")
    assert sorted(chosen) == ["anger", "gratitude"]
    assert torch.equal(chosen["anger"][4], torch.full((4,), 2.0))
    assert torch.equal(chosen["gratitude"][2], torch.full((4,), -1.0))
    with pytest.raises(ValueError, match=r"Steering layers \[3\] have no emotion vectors for tiny"):
        layer_vectors(vectors, [0, 2, 4], "last", [2, 3], "tiny")


def test_neutral_centering_uses_train_neutral_fitting_rows_only():
    index = pd.DataFrame({
        "emotion": ["neutral", "neutral", "neutral", "neutral", "anger"],
        "split": ["train", "train", "eval", "train", "train"],
        "role": ["fit", "fit", "fit", "steering_prompt", "fit"],
    })  # fmt: skip
    pooled = torch.zeros(5, 2, 3)  # [n, boundaries (1, 3), d_model]
    pooled[0, 1], pooled[1, 1] = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    pooled[2:, 1] = 100.0  # eval, steering-prompt and non-neutral rows: never used
    centered = neutral_centered_activations(pooled, index, [1, 3], [3])
    assert list(centered) == [3]
    assert torch.allclose(centered[3], torch.tensor([[-1.0, 0.0, 1.0], [1.0, 0.0, -1.0]]))


def test_steering_prompts_are_the_eval_steering_openings_capped():
    frame = pd.DataFrame({
        "id": ["s2", "s1", "f1", "s3"], "text": ["b", "a", "fit", "c"], "emotion": ["neutral"] * 4,
        "split": ["eval", "eval", "eval", "train"], "role": ["steering_prompt", "steering_prompt", "fit",
                                                             "steering_prompt"],
    })  # fmt: skip
    prompts, role = steering_prompts(frame, max_prompts=1)
    assert role == "steering_prompt" and prompts["id"].tolist() == ["s1"]
    every, _ = steering_prompts(frame, max_prompts=None)
    assert every["id"].tolist() == ["s1", "s2"]


def _sweep(layer_a: int, lo: float) -> list[dict]:
    return [
        {"method": "pca", "emotion": "anger", "layer_a": layer_a, "layer_b": 1, "k": k, "overlap": lo + 0.1,
         "boot_lo": lo, "boot_hi": lo + 0.2, "null_p95": 0.3, "chance": 0.1}
        for k in (1, 2)
    ]  # fmt: skip


def test_k_is_chosen_at_the_layer_with_the_largest_margin_over_the_null():
    sweep = pd.DataFrame(_sweep(1, 0.2) + _sweep(2, 0.5))  # layer 2 clears the null band, layer 1 does not
    layer, table, chosen = select_k_at_best_layer(sweep, sweep)
    assert layer == 2
    assert chosen.drop(columns="decision").to_dict("records") == [
        {"method": "pca", "emotion": "anger", "layer_a": 2, "k": 1}
    ]
    assert table["passes"].all() and table["chosen"].tolist() == [True, False]
    below = pd.DataFrame(_sweep(1, 0.2))
    _, _, none = select_k_at_best_layer(below, below)
    assert none["k"].isna().all()  # nothing clears the null: no k, never a fallback
