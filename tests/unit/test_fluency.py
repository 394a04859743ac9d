"""Fluency metrics on known strings, and the continuation log-likelihood against a by-hand computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from emotion_assets.science.fluency import (
    continuation_logprob,
    degenerate_reason,
    distinct_n,
    fluency_summary,
    repetition_rate,
    structural_degeneracy,
    text_fluency,
    text_tokens,
)
from tests.tiny_models import FAMILIES, byte_tokenizer, tiny_llama

SENTENCE = "The weather was mild, so we walked to the market and bought some bread."


def test_tokens_keep_words_and_symbol_runs():
    assert text_tokens("I'd say: Hello, WORLD!!") == ["i'd", "say", ":", "hello", ",", "world", "!!"]
    assert text_tokens("# # #") == ["#", "#", "#"]
    assert text_tokens(None) == [] and text_tokens("  ") == []


def test_distinct_2_on_known_strings():
    assert distinct_n(text_tokens("a b a b")) == pytest.approx(2 / 3)
    assert distinct_n(text_tokens("a b c d")) == 1.0
    assert distinct_n(text_tokens("the the the the")) == pytest.approx(1 / 3)
    assert math.isnan(distinct_n(text_tokens("one"))) and math.isnan(distinct_n([]))
    assert distinct_n(text_tokens(SENTENCE)) == 1.0


def test_repetition_rate_on_known_strings():
    assert repetition_rate(text_tokens("the the the the")) == 1.0
    assert repetition_rate(text_tokens("a b c d")) == 0.0
    assert repetition_rate(text_tokens("a b a b")) == pytest.approx(2 / 3)
    assert repetition_rate(text_tokens("a b a b"), window=1) == 0.0  # period 2 is outside a window of 1
    assert repetition_rate(text_tokens("a b c a b c a b c")) == pytest.approx(6 / 8)
    assert math.isnan(repetition_rate(["x"]))
    assert repetition_rate(text_tokens(SENTENCE)) < 0.2
    with pytest.raises(ValueError, match="window"):
        repetition_rate(["a", "b"], window=0)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("...", "no_words"),
        ("!!!", "no_words"),
        ("# # #", "no_words"),
        ("You", "single_word"),
        ("Thanks!", "single_word"),
        ("the the the the the", "repetitive"),
        ("I'd I'm # # # # # #", "repetitive"),
        ("no no", None),  # too short to call repetitive
        (SENTENCE, None),
        ("Thank you.", None),
    ],
)
def test_degenerate_reason(text, reason):
    assert degenerate_reason(text) == reason
    structural = reason if reason in ("empty", "no_words", "single_word") else None
    assert structural_degeneracy(text) == structural


def test_text_fluency_table():
    texts = [SENTENCE, "", "the the the the", None]
    table = text_fluency(texts, generated_tokens=[20, 1, 4, 0])
    assert list(table.columns) == [
        "generated_tokens", "n_text_tokens", "distinct_2", "repetition_rate", "degenerate", "degenerate_reason"
    ]  # fmt: skip
    assert table["generated_tokens"].tolist() == [20, 1, 4, 0]
    assert table["n_text_tokens"].tolist() == [len(text_tokens(SENTENCE)), 0, 4, 0]
    assert table["degenerate"].tolist() == [False, True, True, True]
    assert table["degenerate_reason"].tolist() == [None, "empty", "repetitive", "empty"]
    assert table["distinct_2"].iloc[0] == 1.0 and math.isnan(table["distinct_2"].iloc[1])
    assert text_fluency([SENTENCE])["generated_tokens"].isna().all()
    with pytest.raises(ValueError, match="generated_tokens"):
        text_fluency([SENTENCE], generated_tokens=[1, 2])


def _by_hand(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """Sum of log p(continuation token | everything before), one unpadded row at a time."""
    p_ids = tokenizer(prompt)["input_ids"]
    c_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.inference_mode():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)  # [pos, vocab]
    total = sum(float(logprobs[len(p_ids) + j - 1, tok]) for j, tok in enumerate(c_ids))
    return total, len(c_ids)


def test_continuation_logprob_matches_per_row_unbatched_computation():
    model, tokenizer = tiny_llama(seed=3), byte_tokenizer(add_bos=True, padding_side="left")
    prompts = ["Hi", "A much longer prompt about the weather", "Tell me", "x", "Why?"]
    conts = [" there friend", " is mild today.", "", " a story about a long road", "!"]
    out = continuation_logprob(model, tokenizer, prompts, conts, batch_size=3)
    assert list(out.columns) == ["mean_logprob", "n_scored_tokens", "perplexity"]
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        total, n = _by_hand(model, tokenizer, p, c)
        assert out.loc[i, "n_scored_tokens"] == n
        if n == 0:
            assert math.isnan(out.loc[i, "mean_logprob"]) and math.isnan(out.loc[i, "perplexity"])
            continue
        assert out.loc[i, "mean_logprob"] == pytest.approx(total / n, abs=1e-4)
        assert out.loc[i, "perplexity"] == pytest.approx(math.exp(-out.loc[i, "mean_logprob"]), rel=1e-12)
    # The batch size (hence the padding each row gets) does not change a row's numbers.
    one = continuation_logprob(model, tokenizer, prompts, conts, batch_size=1)
    np.testing.assert_allclose(out["mean_logprob"], one["mean_logprob"], atol=1e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prompt_cache_shared_by_its_continuations_gives_each_row_its_own_numbers(name):
    """Every family: continuations scored on their prompt's shared KV cache (prompts of several lengths in
    one batch, continuations of several lengths) equal each full sequence run alone."""
    model, tokenizer = FAMILIES[name](), byte_tokenizer(add_bos=True, padding_side="left")
    prompts = ["Hi", "A longer prompt here", "Hi", "Hi", "A longer prompt here", "Why?"]
    conts = [" there friend", " is mild", " you", " a much longer continuation", "!", " not"]
    out = continuation_logprob(model, tokenizer, prompts, conts, batch_size=4)
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        total, n = _by_hand(model, tokenizer, p, c)
        assert out.loc[i, "n_scored_tokens"] == n
        assert out.loc[i, "mean_logprob"] == pytest.approx(total / n, abs=1e-4), (name, i)


def test_repeated_pairs_run_once_and_get_the_same_numbers():
    """A (prompt, continuation) pair repeated across conditions is run once; each repeat gets its row."""
    model, tokenizer = tiny_llama(seed=3), byte_tokenizer(add_bos=True, padding_side="left")
    prompts = ["Hi", "Tell me", "Hi", "Hi", "Tell me", "Hi"]
    conts = [" there", " more", " there", " you", " more", ""]
    rows_run = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: rows_run.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        out = continuation_logprob(model, tokenizer, prompts, conts, batch_size=8)
    finally:
        hook.remove()
    # One batch: its 2 distinct prompts run once, then its 3 distinct pairs on their prompts' KV cache
    # ((Hi, there), (Tell me, more), (Hi, you)); the empty continuation runs nothing.
    assert rows_run == [2, 3]
    for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
        total, n = _by_hand(model, tokenizer, p, c)
        assert out.loc[i, "n_scored_tokens"] == n
        if n:
            assert out.loc[i, "mean_logprob"] == pytest.approx(total / n, abs=1e-4)
    pd.testing.assert_series_equal(out.loc[0], out.loc[2], check_names=False)
    pd.testing.assert_series_equal(out.loc[1], out.loc[4], check_names=False)
    # The same prompt text with another continuation, or the same continuation after another prompt,
    # is another pair.
    assert out.loc[0, "mean_logprob"] != out.loc[3, "mean_logprob"]


def test_continuation_logprob_prefers_what_the_model_would_say():
    """Planted: the model's own greedy continuation is far likelier than the same bytes shuffled."""
    model, tokenizer = tiny_llama(seed=5), byte_tokenizer(add_bos=True, padding_side="left")
    prompt_ids = tokenizer("The cat")["input_ids"]
    with torch.inference_mode():
        ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
    greedy = tokenizer.decode(ids[0, len(prompt_ids) :], skip_special_tokens=True)
    shuffled = "".join(np.random.default_rng(0).permutation(list(greedy)))
    out = continuation_logprob(model, tokenizer, ["The cat", "The cat"], [greedy, shuffled], batch_size=2)
    assert out.loc[0, "mean_logprob"] > out.loc[1, "mean_logprob"]


def test_continuation_logprob_rejects_bad_input():
    model, tokenizer = tiny_llama(), byte_tokenizer(add_bos=False)
    with pytest.raises(ValueError, match="no tokens"):
        continuation_logprob(model, tokenizer, [""], [" hello"], batch_size=1)
    with pytest.raises(ValueError, match="prompts"):
        continuation_logprob(model, tokenizer, ["a", "b"], [" hello"], batch_size=1)


def test_fluency_summary_per_condition_with_perplexity_ratio():
    frame = pd.DataFrame(
        {
            "kind": ["baseline"] * 3 + ["steer"] * 3,
            "alpha": [0.0] * 3 + [0.5] * 3,
            "continuation": [SENTENCE, SENTENCE, "Thank you.", "...", "the the the the", SENTENCE],
            "mean_logprob": [-2.0, -2.0, -2.0, np.nan, -4.0, -3.0],
        }
    )
    frame = pd.concat(
        [frame, text_fluency(frame["continuation"], generated_tokens=[9, 9, 3, 5, 4, 9])], axis=1
    )
    summary = fluency_summary(frame, ["kind", "alpha"], baseline={"kind": "baseline"})
    base, steer = summary.iloc[0], summary.iloc[1]
    assert (base["n_rows"], steer["n_rows"]) == (3, 3)
    assert base["share_degenerate"] == 0.0 and steer["share_degenerate"] == pytest.approx(2 / 3)
    assert steer["generated_tokens"] == pytest.approx(6.0)
    # NaN log-likelihood is excluded and counted, not averaged in as 0.
    assert steer["mean_logprob"] == pytest.approx(-3.5) and steer["n_valid_mean_logprob"] == 2
    assert steer["distinct_2"] == pytest.approx((1 / 3 + 1.0) / 2) and steer["n_valid_distinct_2"] == 2
    assert base["perplexity"] == pytest.approx(math.exp(2.0))
    assert base["perplexity_ratio"] == 1.0
    assert steer["perplexity_ratio"] == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError, match="must match one"):
        fluency_summary(frame, ["kind", "alpha"], baseline={"kind": "nothing"})
    with pytest.raises(ValueError, match="degenerate"):
        fluency_summary(frame.drop(columns="degenerate"), ["kind"])
