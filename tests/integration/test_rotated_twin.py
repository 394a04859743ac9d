"""The positive control on real weights: the rotated SmolLM2 twin computes the same function, and the
alignment pipeline recovers the known change of coordinates (overlap ≈ 1 after the map, ≈ chance before).

Independent of the ``smoke_study`` fixture: loads the two models through the resource and fits one
alignment sweep at one boundary (about a minute on two idle cores once the base model is converted).

A map fit on n paired rows has rank ≤ n − 1, so it can only be Q on the span of the centered anchor
activations: the exact known answer is the overlap of A's emotion subspace with its own projection onto
that span. The maps are fit, as in the asset (``alignment.anchor_poolings``), on two pooled views (``last``
and ``mean``) of every neutral train fitting prompt (235): 470 rows, a span that keeps ≥ 0.95 of each emotion
direction; one view alone keeps ≈ 0.92–0.94, and 60 prompts ≈ 0.6–0.76.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from emotion_assets.registry import DATA_DIR
from emotion_assets.science.alignment import alignment_sweep
from emotion_assets.science.directions import emotion_subspace, principal_angle_overlap
from emotion_assets.science.rotation import random_orthogonal
from resources.models import ModelHandle, ModelResource

pytestmark = pytest.mark.integration

BASE, TWIN = "smollm2-135m", "smollm2-135m-rotated"
BOUNDARY = 12
N_NEUTRAL_EVAL, N_PER_EMOTION = 20, 30
K_MAX = 3
VIEWS = ("last", "mean")  # the default alignment.anchor_poolings


@pytest.fixture(scope="module")
def handles() -> tuple[ModelHandle, ModelHandle]:
    resource = ModelResource(device="cpu", dtype="float32")
    return resource.get(BASE), resource.get(TWIN)


def _prompts() -> dict[str, list[str]]:
    """Every neutral train fitting prompt, the first neutral eval and per-emotion train fitting prompts, in
    file order (steering-only openings fit nothing, as in the alignment asset)."""
    rows = [json.loads(line) for line in (DATA_DIR / "prompts" / "emotion_prompts.jsonl").open()]
    out: dict[str, list[str]] = {}
    for row in rows:
        if row.get("role", "fit") != "fit":
            continue
        key = row["emotion"] if row["emotion"] != "neutral" else f"neutral_{row['split']}"
        if row["emotion"] == "neutral" or row["split"] == "train":
            out.setdefault(key, []).append(row["text"])
    sizes = {"neutral_train": None, "neutral_eval": N_NEUTRAL_EVAL}
    return {key: texts[: sizes.get(key, N_PER_EMOTION)] for key, texts in out.items()}


def _pooled(handle: ModelHandle, texts: list[str]) -> dict[str, np.ndarray]:
    acts = handle.extract(
        texts, boundaries=[BOUNDARY], strategies=list(VIEWS), emotion_words=[], batch_size=64
    )
    return {view: acts.pooled[view][:, 0].double().numpy() for view in VIEWS}  # [n, d_model] each


@pytest.fixture(scope="module")
def activations(handles) -> dict[str, dict[str, np.ndarray]]:
    """``last`` activations at ``BOUNDARY`` per prompt group, for the base (a) and the twin (b); the neutral
    train prompts' ``mean`` view too, under ``neutral_train_mean``."""
    prompts = _prompts()
    out: dict[str, dict[str, np.ndarray]] = {}
    for side, h in zip("ab", handles, strict=True):
        views = {key: _pooled(h, texts) for key, texts in prompts.items()}
        out[side] = {key: v["last"] for key, v in views.items()}
        out[side]["neutral_train_mean"] = views["neutral_train"]["mean"]
    return out


def test_rotated_twin_has_the_same_logits_and_leaves_the_base_untouched(handles):
    base, twin = handles
    assert twin.model is not base.model and twin.geometry == base.geometry
    assert twin.source["type"] == "rotated_twin" and twin.source["lm_head_untied"] is True
    # The cached base keeps its tied head and unfolded norms.
    assert base.model.lm_head.weight.data_ptr() == base.model.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(base.model.model.norm.weight, torch.ones_like(base.model.model.norm.weight))
    prompts = ["I am so grateful for your help.", "Why", "How dare you ignore my messages again?"]
    batch = base.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = [
            h.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for h in handles
        ]
    real = batch["attention_mask"].bool()
    diff = (logits[1] - logits[0]).abs()[real].max().item()
    assert diff <= 1e-3, f"max abs logit difference {diff:.2e}"
    assert torch.equal(logits[0].argmax(-1)[real], logits[1].argmax(-1)[real])


def _span_limited_answer(anchors: np.ndarray, neutral: np.ndarray, emotion: np.ndarray, k: int) -> float:
    """Overlap of A's k-dim emotion subspace with its projection on the span of the centered anchor rows."""
    mean = neutral.mean(axis=0)
    _, _, vt = np.linalg.svd(anchors - anchors.mean(axis=0), full_matrices=False)  # vt: [m, d]
    basis = emotion_subspace(emotion, mean, k)[0].double().numpy()  # [k, d]
    return principal_angle_overlap(basis @ vt.T @ vt, basis)


def test_alignment_recovers_the_known_rotation(handles, activations):
    base, twin = handles
    a, b = activations["a"], activations["b"]
    emotions = sorted(e for e in a if not e.startswith("neutral"))
    # The activations themselves are rotated copies: resid_twin = resid_base @ Q.
    q = random_orthogonal(base.geometry.d_model, twin.spec.source.seed).numpy()
    rel = np.abs(a["neutral_train"] @ q - b["neutral_train"]).max() / np.abs(b["neutral_train"]).max()
    assert rel < 1e-4, f"twin activations differ from base @ Q by {rel:.1e} of their scale"

    n_train = len(a["neutral_train"])
    anchors_a = np.concatenate([a["neutral_train"], a["neutral_train_mean"]])  # [2n, d]
    anchors_b = np.concatenate([b["neutral_train"], b["neutral_train_mean"]])
    sweep = alignment_sweep(
        anchors_a,
        anchors_b,
        a["neutral_eval"],
        b["neutral_eval"],
        {e: a[e] for e in emotions},
        {e: b[e] for e in emotions},
        a["neutral_train"].mean(axis=0),
        b["neutral_train"].mean(axis=0),
        k_max=K_MAX,
        methods=("ridge",),
        n_null=20,
        n_boot=10,
        train_groups=np.tile(np.arange(n_train), 2),
    )
    rows = sweep.overlaps.sort_values(["emotion", "k"]).reset_index(drop=True)
    rows["span_answer"] = [
        _span_limited_answer(anchors_a, a["neutral_train"], a[e], k)
        for e, k in zip(rows.emotion, rows.k, strict=True)
    ]
    table = rows[
        ["emotion", "k", "overlap", "span_answer", "overlap_before", "chance", "null_p95", "r2_heldout"]
    ]
    message = f"n_neutral_train={n_train} × {len(VIEWS)} views\n{table.to_string()}"
    assert len(rows) == len(emotions) * K_MAX
    # The map is Q on everything the neutral data spans: the overlap is the exact span-limited answer …
    assert np.allclose(rows.overlap, rows.span_answer, atol=0.01), message
    # … which, with two views of every neutral train fitting prompt (470 rows in 576 dimensions), is ≥ 0.95.
    assert (rows.overlap >= 0.95).all(), message
    # The sweep reports that ceiling itself, and the recovered share of it is complete.
    assert np.allclose(rows.span_ceiling, rows.span_answer, atol=5e-3), message
    assert (rows.overlap / rows.span_ceiling >= 0.98).all(), message
    # Before the map the two bases are unrelated: ≈ chance (k / 576 ≤ 0.005), far below the overlap.
    assert (rows.overlap_before <= 0.05).all() and (rows.overlap > rows.null_p95).all(), message
    pd.testing.assert_series_equal(rows.chance, rows.k / base.geometry.d_model, check_names=False)
