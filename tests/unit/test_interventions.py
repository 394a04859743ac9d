"""Steering hooks under Hugging Face generate: KV cache, left padding, per-row vectors, hook cleanup."""

from __future__ import annotations

import pytest
import torch

from emotion_assets.science.interventions import add_to_residual, hooks_removed
from emotion_assets.science.residual import position_ids_from_mask
from tests.tiny_models import byte_tokenizer, tiny_llama

PROMPTS = ["Thank you so much, truly.", "Hi", "I am sorry"]
BLOCK = 1
NEW = 5


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_llama(), byte_tokenizer()
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"][:, 0] == 0).any()  # left padded
    d = model.config.hidden_size
    vectors = 8.0 * torch.randn(len(PROMPTS), d, generator=torch.Generator().manual_seed(0))  # [batch, d]
    return model, tok, enc, vectors


def _generate(model, enc, **kwargs):
    out = model.generate(
        **enc,
        max_new_tokens=NEW,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences, torch.stack(out.scores, dim=1)  # [batch, prompt + new], [batch, new, vocab]


def _manual_logits(model, input_ids, attention_mask, vectors, steer_positions):
    """Logits of a plain forward with vectors added at resid_pre of BLOCK at the given positions."""

    def hook(_module, args, kwargs):
        hidden = args[0].clone()  # [batch, pos, d_model]
        hidden[:, steer_positions] += vectors[:, None, :]
        return (hidden, *args[1:]), kwargs

    handle = model.model.layers[BLOCK].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
            ).logits  # [batch, pos, vocab]
    finally:
        handle.remove()


def test_zero_vector_equals_unsteered(setup):
    model, _, enc, vectors = setup
    base_seq, base_scores = _generate(model, enc)
    with add_to_residual(model, BLOCK, torch.zeros_like(vectors)):
        seq, scores = _generate(model, enc)
    assert torch.equal(seq, base_seq)
    assert torch.equal(scores, base_scores)


@pytest.mark.parametrize("prompt_positions", ["all", "last"])
def test_first_generated_token_is_steered(setup, prompt_positions):
    model, _, enc, vectors = setup
    _, base_scores = _generate(model, enc)
    with add_to_residual(model, BLOCK, vectors, prompt_positions=prompt_positions):
        _, scores = _generate(model, enc)
    # Every row's first-step distribution moves, the left-padded rows included.
    assert ((scores[:, 0] - base_scores[:, 0]).abs().amax(dim=-1) > 1e-2).all()
    # And it is exactly the distribution of a plain forward with the vector added at the same positions.
    width = enc["input_ids"].shape[1]
    positions = list(range(width)) if prompt_positions == "all" else [width - 1]
    manual = _manual_logits(model, enc["input_ids"], enc["attention_mask"], vectors, positions)
    torch.testing.assert_close(scores[:, 0], manual[:, -1], atol=1e-4, rtol=1e-4)


def test_generated_tokens_steered_under_kv_cache(setup):
    model, _, enc, vectors = setup
    base_seq, base_scores = _generate(model, enc)
    with add_to_residual(model, BLOCK, vectors, prompt_positions="none"):
        seq, scores = _generate(model, enc)
    torch.testing.assert_close(scores[:, 0], base_scores[:, 0])  # prompt untouched
    assert torch.equal(seq[:, : enc["input_ids"].shape[1] + 1], base_seq[:, : enc["input_ids"].shape[1] + 1])
    assert ((scores[:, 1] - base_scores[:, 1]).abs().amax(dim=-1) > 1e-2).all()
    # Decode step 1 (cached) equals a full forward that steers only the first generated token.
    width = enc["input_ids"].shape[1]
    ids = seq[:, : width + 1]
    mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
    manual = _manual_logits(model, ids, mask, vectors, [width])
    torch.testing.assert_close(scores[:, 1], manual[:, -1], atol=1e-4, rtol=1e-4)


def test_per_row_vectors(setup):
    model, _, enc, vectors = setup
    base_seq, base_scores = _generate(model, enc)
    rows = vectors.clone()
    rows[0] = 0.0
    with add_to_residual(model, BLOCK, rows):
        seq, scores = _generate(model, enc)
    assert torch.equal(seq[0], base_seq[0])
    torch.testing.assert_close(scores[0], base_scores[0], atol=1e-5, rtol=0)
    assert (scores[1:, 0] - base_scores[1:, 0]).abs().amax() > 1e-2


def test_batched_equals_one_at_a_time(setup):
    model, tok, enc, vectors = setup
    with add_to_residual(model, BLOCK, vectors, prompt_positions="last"):
        seq, scores = _generate(model, enc)
    width = enc["input_ids"].shape[1]
    for i, prompt in enumerate(PROMPTS):
        alone = tok([prompt], return_tensors="pt")
        with add_to_residual(model, BLOCK, vectors[i], prompt_positions="last"):
            seq_i, scores_i = _generate(model, alone)
        assert torch.equal(seq[i, width:], seq_i[0, alone["input_ids"].shape[1] :])
        torch.testing.assert_close(scores[i], scores_i[0], atol=1e-4, rtol=1e-4)


def test_without_cache_needs_prompt_length(setup):
    model, _, enc, vectors = setup
    with add_to_residual(model, BLOCK, vectors, prompt_positions="last"):
        cached_seq, cached_scores = _generate(model, enc)
    width = enc["input_ids"].shape[1]
    with add_to_residual(model, BLOCK, vectors, prompt_positions="last", prompt_length=width):
        seq, scores = _generate(model, enc, use_cache=False)
    assert torch.equal(seq, cached_seq)
    torch.testing.assert_close(scores, cached_scores, atol=1e-4, rtol=1e-4)


def test_hooks_removed_after_exit_and_exception(setup):
    model, _, enc, vectors = setup
    assert hooks_removed(model)
    with add_to_residual(model, BLOCK, vectors):
        assert not hooks_removed(model)
    assert hooks_removed(model)
    with pytest.raises(RuntimeError, match="boom"), add_to_residual(model, BLOCK, vectors):
        raise RuntimeError("boom")
    assert hooks_removed(model)
    with pytest.raises(ValueError, match="steering vectors"), add_to_residual(model, BLOCK, vectors[:2]):
        _generate(model, enc)
    assert hooks_removed(model)
    # Two conditions in a row are independent.
    with add_to_residual(model, BLOCK, vectors):
        _, first = _generate(model, enc)
    with add_to_residual(model, BLOCK, vectors):
        _, second = _generate(model, enc)
    assert torch.equal(first, second)
