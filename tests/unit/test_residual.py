"""Residual capture parity, batching invariance, pooling over real tokens only, emotion-word positions."""

from __future__ import annotations

import pytest
import torch

from emotion_assets.science.residual import (
    boundary_names,
    capture_residuals,
    decoder_blocks,
    extract_pooled_activations,
    pool_hidden,
    position_ids_from_mask,
    tokenize_prompts,
)
from tests.tiny_models import byte_tokenizer, tiny_bert, tiny_gpt2, tiny_llama

TEXTS = ["Thanks so much for your help!", "I am angry.", "ok", "Sorry, I was late again today."]
WORDS = ["thank", "angry", "sorry"]


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    if hasattr(model, "model"):
        return model.model.norm
    if hasattr(model, "transformer"):
        return model.transformer.ln_f
    return torch.nn.Identity()  # BERT: LayerNorm lives inside each layer


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2, tiny_bert])
def test_capture_matches_hf_hidden_states(make_model):
    model, tok = make_model(), byte_tokenizer()
    enc = tokenize_prompts(tok, TEXTS, WORDS, max_length=64)
    n_layers = len(decoder_blocks(model))
    captured = capture_residuals(model, enc["input_ids"], enc["attention_mask"], range(n_layers + 1))
    with torch.inference_mode():
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_from_mask(enc["attention_mask"]),
            output_hidden_states=True,
        )
    hs = out.hidden_states  # n_layers + 1 entries of [batch, pos, d_model]
    assert captured.shape == (len(TEXTS), n_layers + 1, *hs[0].shape[1:])
    real = enc["attention_mask"].bool()
    for layer in range(n_layers):
        assert (captured[:, layer][real] - hs[layer][real]).abs().max() <= 1e-5
    # The final boundary is the last block's output before the final norm.
    final = _final_norm(model)(captured[:, n_layers])
    assert (final[real] - hs[-1][real]).abs().max() <= 1e-5


def test_capture_subset_order_and_names():
    model, tok = tiny_llama(), byte_tokenizer()
    enc = tokenize_prompts(tok, TEXTS, WORDS, max_length=64)
    full = capture_residuals(model, enc["input_ids"], enc["attention_mask"], [0, 1, 2, 3])
    part = capture_residuals(model, enc["input_ids"], enc["attention_mask"], [2, 0])
    assert torch.equal(part[:, 0], full[:, 2]) and torch.equal(part[:, 1], full[:, 0])
    assert boundary_names(3) == [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.2.hook_resid_pre",
        "blocks.2.hook_resid_post",
    ]
    with pytest.raises(ValueError, match="out of range"):
        capture_residuals(model, enc["input_ids"], enc["attention_mask"], [4])


def test_decoder_blocks_error_names_class():
    with pytest.raises(TypeError, match="Linear"):
        decoder_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2, tiny_bert])
def test_batched_equals_unbatched(make_model):
    model, tok = make_model(), byte_tokenizer()
    strategies = ["last", "mean", "emotion_tokens"]
    kwargs = {"boundaries": [0, 1, 2], "strategies": strategies, "emotion_words": WORDS, "device": "cpu"}
    batched = extract_pooled_activations(model, tok, TEXTS, batch_size=4, **kwargs)
    for i, text in enumerate(TEXTS):
        alone = extract_pooled_activations(model, tok, [text], batch_size=1, **kwargs)
        for s in strategies:
            torch.testing.assert_close(batched.pooled[s][i], alone.pooled[s][0], atol=1e-5, rtol=0)
    assert batched.emotion_fallback.tolist() == [False, False, True, False]
    assert batched.n_tokens.tolist() == [len(t) for t in TEXTS]  # one token per byte, BOS excluded
    assert batched.pooled["last"].dtype == torch.float32
    assert batched.boundary_names == boundary_names(len(decoder_blocks(model)))[:3]


def test_sorted_batches_restore_input_order():
    model, tok = tiny_llama(), byte_tokenizer()
    kwargs = {"boundaries": [3], "strategies": ["mean"], "emotion_words": WORDS, "device": "cpu"}
    small = extract_pooled_activations(model, tok, TEXTS, batch_size=1, **kwargs)
    big = extract_pooled_activations(model, tok, TEXTS, batch_size=3, **kwargs)
    torch.testing.assert_close(small.pooled["mean"], big.pooled["mean"], atol=1e-5, rtol=0)


def test_non_finite_activations_are_reported():
    model, tok = tiny_llama(), byte_tokenizer()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="prompt index"):
        extract_pooled_activations(
            model,
            tok,
            TEXTS,
            boundaries=[2],
            strategies=["last"],
            emotion_words=WORDS,
            batch_size=2,
            device="cpu",
        )


def _synthetic():
    """Two left-padded rows: row 0 = [pad, pad, BOS, a, b], row 1 = [BOS, a, b, c, SEP]."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 5, 4)  # [batch, n_boundaries, pos, d_model]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    special = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 1]]).bool()
    emotion = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]]).bool()
    return hidden, mask, special, emotion


@pytest.mark.parametrize("strategy", ["last", "mean", "emotion_tokens"])
@pytest.mark.parametrize("junk", [float("nan"), 1e30, float("inf")])
def test_pooling_never_reads_pads_or_specials(strategy, junk):
    hidden, mask, special, emotion = _synthetic()
    clean, _ = pool_hidden(hidden, mask, strategy, special, emotion)
    dirty = hidden.clone()
    dirty[special[:, None, :, None].expand_as(dirty)] = junk
    pooled, _ = pool_hidden(dirty, mask, strategy, special, emotion)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, clean)


def test_pooling_values_and_fallback():
    hidden, mask, special, emotion = _synthetic()
    last, fb = pool_hidden(hidden, mask, "last", special, emotion)
    torch.testing.assert_close(last[0], hidden[0, :, 4])
    torch.testing.assert_close(last[1], hidden[1, :, 3])  # [SEP] is skipped
    assert not fb.any()
    mean, _ = pool_hidden(hidden, mask, "mean", special, emotion)
    torch.testing.assert_close(mean[1], hidden[1, :, 1:4].mean(dim=1))
    emo, fb = pool_hidden(hidden, mask, "emotion_tokens", special, emotion)
    torch.testing.assert_close(emo[0], hidden[0, :, 3])
    torch.testing.assert_close(emo[1], last[1])
    assert fb.tolist() == [False, True]


def test_emotion_word_positions():
    tok = byte_tokenizer()
    enc = tokenize_prompts(
        tok, ["Thanks so much", "I am thankful", "unthankful, no thanksgiving?"], ["thank"], 64
    )
    ids = enc["input_ids"]
    for row in range(3):
        marked = tok.decode(ids[row][enc["emotion_mask"][row]])
        assert marked == ["Thanks", "thankful", "thanksgiving"][row]
    assert not (enc["emotion_mask"] & enc["special_mask"]).any()
    assert (enc["attention_mask"][:, -1] == 1).all()  # left padded
    assert enc["n_tokens"].tolist() == [14, 13, 28]


def test_whole_word_entries_do_not_match_longer_words():
    from emotion_assets.science.residual import emotion_word_pattern

    pattern = emotion_word_pattern(["mad$", "thank"])
    assert pattern.search("I am so mad at you")
    assert not pattern.search("She made dinner")
    assert pattern.search("Thanks a lot")
