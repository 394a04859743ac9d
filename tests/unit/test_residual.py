"""Residual capture parity, batching invariance, pooling over real non-sink tokens only, emotion-word positions."""

from __future__ import annotations

import contextlib

import pytest
import torch

from emotion_assets.science.residual import (
    DEFAULT_EXCLUDE_FIRST,
    DEFAULT_NORM_RATIO,
    boundary_names,
    capture_residuals,
    decoder_blocks,
    extract_pooled_activations,
    find_sinks,
    pool_hidden,
    position_ids_from_mask,
    residual_norm_table,
    sink_exclusion_table,
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
        torch.testing.assert_close(batched.token_norm[i], alone.token_norm[0], atol=1e-5, rtol=1e-6)
        assert torch.equal(batched.sink_excluded[i], alone.sink_excluded[0])
    assert batched.emotion_fallback.tolist() == [False, False, True, False]
    assert not batched.sink_excluded.any()  # BOS is special: no content token is a sink in a random model
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
    assert fb.tolist() == [[False] * 3, [True] * 3]  # per row and boundary


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


# Attention sinks: the first position without BOS and massive-norm tokens are never pooled by mean /
# emotion_tokens.

PLANT_TEXTS = [
    "Thanks so much for your help!",
    "I am angry about the delay.",
    "Sorry, I was late again today.",
]
SCALE = 1000.0
PLANT_BLOCK = 1  # scaling block 1's output makes the token massive at boundaries 2 and 3, not at 0 and 1


def _exact_norms(model: torch.nn.Module) -> torch.nn.Module:
    """RMSNorm(c·x) == RMSNorm(x) up to eps: shrink eps so a planted scale reaches no other position."""
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12
    return model


@contextlib.contextmanager
def planted_sink(model: torch.nn.Module, block: int, token_id: int, scale: float = SCALE):
    """Multiply the residual leaving ``block`` by ``scale`` at every position holding ``token_id``."""
    state: dict[str, torch.Tensor] = {}

    def remember(_module, args, kwargs):
        state["ids"] = kwargs["input_ids"] if "input_ids" in kwargs else args[0]

    def plant(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.where((state["ids"] == token_id)[..., None], hidden * scale, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [
        model.register_forward_pre_hook(remember, with_kwargs=True),
        decoder_blocks(model)[block].register_forward_hook(plant),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _extract(model, tok, texts, batch_size=3, **kwargs):
    return extract_pooled_activations(
        model,
        tok,
        texts,
        boundaries=[0, 1, 2, 3],
        strategies=["last", "mean", "emotion_tokens"],
        emotion_words=WORDS,
        batch_size=batch_size,
        device="cpu",
        **kwargs,
    )


def test_sink_defaults_match_the_profile_defaults():
    from emotion_assets.profiles import SinkConfig

    assert SinkConfig().exclude_first == DEFAULT_EXCLUDE_FIRST
    assert SinkConfig().norm_ratio == DEFAULT_NORM_RATIO


def test_norm_rule_is_per_boundary():
    hidden, mask, special, emotion = _synthetic()  # row 1 content = positions 1, 2, 3
    clean = find_sinks(hidden, mask, special)
    assert not clean.by_norm.any() and not clean.first.any()  # BOS rows: the first position is special
    planted = hidden.clone()
    planted[1, 1, 2] *= SCALE  # row 1, boundary 1, position 2 only
    sinks = find_sinks(planted, mask, special)
    assert sinks.by_norm.nonzero().tolist() == [[1, 1, 2]]
    assert sinks.n_excluded.tolist() == [[0, 0, 0], [0, 1, 0]]
    assert sinks.max_ratio()[1, 1] > SCALE / 10
    mean, fallback = pool_hidden(planted, mask, "mean", special, emotion)
    torch.testing.assert_close(mean[1, 1], hidden[1, 1, [1, 3]].mean(dim=0))
    torch.testing.assert_close(
        mean[:, [0, 2]], pool_hidden(hidden, mask, "mean", special, emotion)[0][:, [0, 2]]
    )
    assert not fallback.any()
    off, _ = pool_hidden(planted, mask, "mean", special, emotion, norm_ratio=None)
    torch.testing.assert_close(off[1, 1], planted[1, 1, 1:4].mean(dim=0))  # the rule switched off reads it


def test_planted_massive_token_changes_no_mean_or_emotion_vector():
    model, tok = _exact_norms(tiny_llama()), byte_tokenizer()
    marker = tok.convert_tokens_to_ids("k")  # only in "Thanks" (an emotion word) of the first text
    assert [t.count("k") for t in PLANT_TEXTS] == [1, 0, 0]
    with planted_sink(model, PLANT_BLOCK, marker):
        planted = _extract(model, tok, PLANT_TEXTS)
    clean = _extract(model, tok, PLANT_TEXTS)

    # Reference: the unplanted forward with the marker position masked out by hand (rules off).
    enc = tokenize_prompts(tok, PLANT_TEXTS, WORDS, max_length=64)
    hidden = capture_residuals(model, enc["input_ids"], enc["attention_mask"], [0, 1, 2, 3])
    by_hand = enc["special_mask"] | (enc["input_ids"] == marker)
    for strategy in ("mean", "emotion_tokens", "last"):
        plain, _ = pool_hidden(
            hidden, enc["attention_mask"], strategy, enc["special_mask"], enc["emotion_mask"]
        )
        masked, _ = pool_hidden(
            hidden, enc["attention_mask"], strategy, by_hand, enc["emotion_mask"], norm_ratio=None
        )
        expected = torch.cat([plain[:, :2], masked[:, 2:]], dim=1)  # massive at boundaries 2 and 3 only
        if strategy == "last":
            expected = plain  # the last token is never the marker
        torch.testing.assert_close(planted.pooled[strategy], expected, atol=1e-5, rtol=1e-5)
    # The plant is found exactly where it is massive, and nothing is found where nothing was planted.
    assert planted.sink_excluded.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert planted.max_norm_ratio[0, 2:].min() > 100
    assert not clean.sink_excluded.any() and not clean.first_excluded.any()
    assert clean.max_norm_ratio.max() < DEFAULT_NORM_RATIO
    # Without the rule the planted token dominates the pooled mean.
    with planted_sink(model, PLANT_BLOCK, marker):
        unguarded = _extract(model, tok, PLANT_TEXTS, norm_ratio=None)
    ratio = unguarded.pooled["mean"][0, 2].norm() / planted.pooled["mean"][0, 2].norm()
    assert ratio > 10


def test_first_position_excluded_once_per_row_under_left_padding():
    model, tok = tiny_llama(), byte_tokenizer(add_bos=False)  # no BOS: the first token is the sink
    batched = _extract(model, tok, TEXTS, batch_size=4)
    assert batched.first_excluded.all()
    assert (batched.sink_excluded == 1).all()  # the first position, once per row and boundary
    assert batched.norm_excluded.sum() == 0
    for i, text in enumerate(TEXTS):
        alone = _extract(model, tok, [text], batch_size=1)
        for strategy, pooled in batched.pooled.items():
            torch.testing.assert_close(pooled[i], alone.pooled[strategy][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.token_norm[i], alone.token_norm[0], atol=1e-5, rtol=1e-6)
        enc = tokenize_prompts(tok, [text], WORDS, max_length=64)  # unpadded: position 0 is the first token
        hidden = capture_residuals(model, enc["input_ids"], enc["attention_mask"], [0, 1, 2, 3])[0]
        torch.testing.assert_close(batched.pooled["mean"][i], hidden[:, 1:].mean(dim=1), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            batched.token_norm[i], hidden[:, 1:].norm(dim=-1).mean(dim=1), atol=1e-5, rtol=0
        )


def test_one_token_prompt_falls_back_to_last_and_is_recorded():
    model, tok = tiny_llama(), byte_tokenizer(add_bos=False)
    result = _extract(model, tok, ["a", "Thanks a lot"], batch_size=2)
    torch.testing.assert_close(result.pooled["mean"][0], result.pooled["last"][0])
    assert result.mean_fallback.tolist() == [[True] * 4, [False] * 4]
    assert result.last_is_sink.tolist() == [[True] * 4, [False] * 4]  # `last` still reads it, recorded
    torch.testing.assert_close(result.token_norm[0], result.pooled["last"][0].norm(dim=-1))
    assert result.emotion_fallback.tolist() == [True, False]
    table = sink_exclusion_table(result)
    assert table["mean_fallbacks"].tolist() == [1] * 4
    assert table["last_token_is_sink"].tolist() == [1] * 4
    assert table["excluded_first"].tolist() == [2] * 4


def test_sink_and_residual_norm_tables():
    model, tok = _exact_norms(tiny_llama()), byte_tokenizer()
    with planted_sink(model, PLANT_BLOCK, tok.convert_tokens_to_ids("k")):
        result = _extract(model, tok, PLANT_TEXTS)
    table = sink_exclusion_table(result)
    assert table["boundary"].tolist() == [0, 1, 2, 3]
    assert table["excluded_norm"].tolist() == [0, 0, 1, 1]
    assert table["prompts_affected"].tolist() == [0, 0, 1, 1]
    assert table["excluded_first"].tolist() == [0] * 4
    assert (table["max_norm_ratio"].iloc[2:] > 100).all() and (table["max_norm_ratio"].iloc[:2] < 10).all()

    reference = [False, True, True]  # the planted prompt is not a reference prompt
    norms = residual_norm_table(result, reference, "last")
    expected = result.token_norm[1:].double().mean(dim=0)
    assert norms["mean_residual_norm"].tolist() == pytest.approx(expected.tolist())
    assert norms["n_reference_prompts"].tolist() == [2] * 4
    pooled_norm = result.pooled["last"].double().norm(dim=-1).mean(dim=0)
    assert norms["pooled_vector_norm"].tolist() == pytest.approx(pooled_norm.tolist())
    with pytest.raises(ValueError, match="No reference prompts"):
        residual_norm_table(result, [False] * 3, "last")


def test_vector_report_takes_the_non_sink_token_norm():
    from emotion_assets.science.directions import vector_report

    acts = torch.ones(4, 2, 3)  # ‖act‖ = √3 everywhere
    token_norm = torch.tensor([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0], [5.0, 6.0]])
    train = [True, True, False, True]
    vectors = {"joy": torch.full((2, 3), 2.0)}  # ‖v‖ = 2√3
    plain = vector_report(vectors, acts, train)
    assert plain["mean_resid_norm"].tolist() == pytest.approx([3**0.5] * 2)
    report = vector_report(vectors, acts, train, token_norm=token_norm)
    assert report["mean_resid_norm"].tolist() == pytest.approx([3.0, 4.0])  # train rows only
    assert report["relative_norm"].tolist() == pytest.approx([2 * 3**0.5 / 3, 2 * 3**0.5 / 4])
    with pytest.raises(ValueError, match="token_norm has shape"):
        vector_report(vectors, acts, train, token_norm=token_norm[:, :1])
