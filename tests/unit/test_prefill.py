"""Greedy decoding with separate prefill / decode intervention contexts on a tiny Llama."""

from __future__ import annotations

import contextlib

import pytest
import torch

from emotion_assets.science.heads import ablate_heads
from emotion_assets.science.interventions import hooks_removed
from emotion_assets.science.prefill import greedy_generate_with_prefill
from tests.tiny_models import byte_tokenizer, tiny_llama

PROMPTS = ["Thank you so much", "Hi", "The weather report says rain later today", "I am angry"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    return enc["input_ids"], enc["attention_mask"]


def reference(model, tokenizer, input_ids, attention_mask) -> list[str]:
    """``model.generate`` greedy continuations, cut at the first EOS, decoded without special tokens."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = []
    for row in out[:, input_ids.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def test_without_contexts_equals_generate_on_a_left_padded_batch(model, tokenizer, batch):
    ids, mask = batch
    ours = greedy_generate_with_prefill(model, tokenizer, ids, mask, MAX_NEW)
    assert ours == reference(model, tokenizer, ids, mask)
    assert any(len(text) > 0 for text in ours)
    assert hooks_removed(model)


def test_batched_equals_one_prompt_at_a_time(model, tokenizer, batch):
    ids, mask = batch
    together = greedy_generate_with_prefill(model, tokenizer, ids, mask, MAX_NEW)
    alone = []
    for text in PROMPTS:
        enc = tokenizer([text], return_tensors="pt")
        alone += greedy_generate_with_prefill(
            model, tokenizer, enc["input_ids"], enc["attention_mask"], MAX_NEW
        )
    assert together == alone


def test_contexts_are_entered_once_each_and_hooks_are_removed(model, tokenizer, batch):
    ids, mask = batch
    entered: list[str] = []

    def factory(name: str):
        @contextlib.contextmanager
        def context():
            entered.append(name)
            with ablate_heads(model, [(0, 1)]):
                yield

        return context

    greedy_generate_with_prefill(
        model,
        tokenizer,
        ids,
        mask,
        MAX_NEW,
        prefill_context=factory("prefill"),
        decode_context=factory("decode"),
    )
    assert entered == ["prefill", "decode"]
    assert hooks_removed(model)


def test_ablation_in_both_contexts_equals_generate_under_the_ablation(model, tokenizer, batch):
    ids, mask = batch
    heads = [(0, 0), (1, 2), (2, 3)]

    def context():
        return ablate_heads(model, heads)

    ours = greedy_generate_with_prefill(model, tokenizer, ids, mask, MAX_NEW, context, context)
    with ablate_heads(model, heads):
        expected = reference(model, tokenizer, ids, mask)
    assert ours == expected
    assert ours != greedy_generate_with_prefill(model, tokenizer, ids, mask, MAX_NEW)
    assert hooks_removed(model)


def test_prefill_only_intervention_leaves_decoding_steps_untouched(model, tokenizer, batch):
    ids, mask = batch
    calls = {"n": 0}

    def count(_module, _args):
        calls["n"] += 1

    o_proj = model.model.layers[0].self_attn.o_proj

    @contextlib.contextmanager
    def counting():
        handle = o_proj.register_forward_pre_hook(count)
        try:
            yield
        finally:
            handle.remove()

    greedy_generate_with_prefill(model, tokenizer, ids, mask, MAX_NEW, prefill_context=counting)
    assert calls["n"] == 1  # the prompt forward only
    assert hooks_removed(model)


def test_hooks_are_removed_when_the_forward_raises(model, tokenizer, batch):
    ids, mask = batch

    def boom(_module, _args):
        raise RuntimeError("boom")

    @contextlib.contextmanager
    def failing():
        handle = model.model.layers[1].register_forward_pre_hook(boom)
        try:
            yield
        finally:
            handle.remove()

    with pytest.raises(RuntimeError, match="boom"):
        greedy_generate_with_prefill(model, tokenizer, ids, mask, MAX_NEW, prefill_context=failing)
    assert hooks_removed(model)


def test_rejects_bad_arguments(model, tokenizer, batch):
    ids, mask = batch
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate_with_prefill(model, tokenizer, ids, mask, 0)
    with pytest.raises(ValueError, match="same"):
        greedy_generate_with_prefill(model, tokenizer, ids, mask[:, 1:], 2)
