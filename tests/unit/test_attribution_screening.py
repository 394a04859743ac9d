"""AtP* head screening: estimates track exact ablation, the QK fix handles saturation, shortlist ≡ exhaustive."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from emotion_assets.science import attribution_screening as S
from emotion_assets.science import heads as H
from emotion_assets.science.heads.readouts import unit_direction
from emotion_assets.science.heads.screening import length_groups
from emotion_assets.science.interventions import hooks_removed
from tests.tiny_models import SPECIAL, byte_tokenizer, tiny_llama

TEXTS = ["I am so grateful for this!", "Thanks a lot, truly.", "We really appreciate it", "Thank you"]
N_LAYERS, N_HEADS, N_KV, D_MODEL = 3, 4, 2, 64
HEADS = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS)]


@pytest.fixture(scope="module")
def batch():
    enc = byte_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def direction(seed: int) -> torch.Tensor:
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(seed))


def exhaustive(model, ids, mask, unit, boundary=N_LAYERS) -> torch.Tensor:
    return H.screen_heads_by_ablation(model, ids, mask, unit, boundary, HEADS, heads_per_pass=16)


def test_atp_equals_the_existing_linear_attribution_and_nothing_planted_gives_nothing_large(batch):
    ids, mask = batch
    for seed in (0, 1):
        model = tiny_llama(seed=seed, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)
        exact = exhaustive(model, ids, mask, direction(seed))
        estimate = S.attribution_estimates(model, ids, mask, direction(seed), N_LAYERS)
        reference = H.ablation_attribution(model, ids, mask, direction(seed), N_LAYERS)
        torch.testing.assert_close(estimate.atp, reference, rtol=0, atol=1e-6)
        star = estimate.atp_star.flatten()
        # Nothing planted: no estimate is large next to the largest exact effect, and they agree.
        assert star.abs().max() <= 1.5 * exact.abs().max()
        assert torch.corrcoef(torch.stack([star, exact]))[0, 1] > 0.9
        assert hooks_removed(model)


def test_the_qk_correction_vanishes_for_a_small_ablation(batch):
    # The correction is exact minus linearised softmax: second order in the size of the intervention.
    ids, mask = batch
    model = tiny_llama(seed=2, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)
    layout = H.head_layout(model)
    ids_g, mask_g = length_groups(ids, mask)[-1]
    record = S._forward_backward(model, layout, ids_g, mask_g, unit_direction(direction(2)), N_LAYERS)
    atp = {ly: (-z.float() * record.grad_z[ly].float()).sum(dim=(0, 1, 3)) for ly, z in record.z.items()}
    for eps in (1e-2, 1e-3):
        small = {ly: -eps * z for ly, z in record.z.items()}
        correction = S._qk_correction(model, layout, record, small, N_LAYERS)
        scale = max(float(a.abs().max()) for a in atp.values()) * eps
        assert correction.abs().max() < 20 * eps * scale  # O(eps^2), far below the first-order term


# --- a planted saturated pattern ---------------------------------------------------------------------

FEATURE, QUERY_DIM, READOUT_DIM = 5, 3, 10  # residual dims: key feature, u's write, readout


def saturated_model() -> tuple[LlamaForCausalLM, int]:
    """Two layers. Head (0, 0) writes a constant along residual dim QUERY_DIM; head (1, 2)'s query reads
    it and its key reads the '!' token's feature, so with (0, 0) present (1, 2) attends to '!' with a
    saturated pattern (score ≈ 35 vs ≈ 0) and copies the feature to the readout dim. Ablating (0, 0)
    flattens that pattern: a large effect whose gradient through the saturated softmax is ~0."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIAL) + 256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    bang = byte_tokenizer().convert_tokens_to_ids("!")
    hd = config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, [QUERY_DIM, FEATURE]] = 0.0
        embed[bang, FEATURE] = 0.05
        first, second = model.model.layers[0], model.model.layers[1]
        first.self_attn.o_proj.weight[[QUERY_DIM, FEATURE], :] = 0.0
        first.mlp.down_proj.weight[[QUERY_DIM, FEATURE], :] = 0.0
        first.self_attn.v_proj.bias[0] = 0.02  # value head 0 (query heads 0, 1): a constant
        first.self_attn.o_proj.weight[:, 0] = 0.0
        first.self_attn.o_proj.weight[QUERY_DIM, 0] = 1.0  # head 0 writes it along QUERY_DIM
        attn = second.self_attn  # head 2 reads key/value head 1; dim 7 barely rotates
        attn.q_proj.weight[2 * hd + 7] = 0.0
        attn.q_proj.weight[2 * hd + 7, QUERY_DIM] = 7.0
        attn.k_proj.weight[hd + 7] = 0.0
        attn.k_proj.weight[hd + 7, FEATURE] = 7.0
        attn.v_proj.weight[hd] = 0.0
        attn.v_proj.weight[hd, FEATURE] = 1.0
        attn.o_proj.weight[:, 2 * hd] = 0.0
        attn.o_proj.weight[READOUT_DIM, 2 * hd] = 1.0
    return model, bang


def test_the_qk_fix_recovers_an_effect_hidden_by_a_saturated_pattern():
    model, _ = saturated_model()
    enc = byte_tokenizer()(
        ["ab!cdefgh", "x!yzwv", "hello!there", "so! much fun"], padding=True, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    unit = torch.zeros(64)
    unit[READOUT_DIM] = 1.0
    heads = [(layer, head) for layer in range(2) for head in range(4)]
    exact = H.screen_heads_by_ablation(model, ids, mask, unit, 2, heads).view(2, 4)
    estimate = S.attribution_estimates(model, ids, mask, unit, 2)
    planted = exact[0, 0]
    assert planted < -1.0 and planted.abs() > 5 * exact.flatten()[[1, 2, 3, 4, 5, 7]].abs().max()
    # plain AtP misses it (even the sign); AtP* recovers most of it
    assert abs(estimate.atp[0, 0] - planted) > 0.9 * planted.abs()
    assert abs(estimate.atp_star[0, 0] - planted) < 0.25 * planted.abs()
    assert abs(estimate.atp_star[0, 0] - planted) < 0.25 * abs(estimate.atp[0, 0] - planted)
    # the head that reads the pattern is unsaturated in its own output: both estimates agree with exact
    torch.testing.assert_close(estimate.atp_star[1, 2], exact[1, 2], rtol=1e-3, atol=1e-3)
    table = S.screen_heads_atp_star(model, ids, mask, unit, 2, heads, shortlist_size=3)
    ranked = table[table["confirmed"]].sort_values("ablation_effect", key=abs, ascending=False)
    assert {(0, 0), (1, 2)} == set(zip(ranked["layer"].head(2), ranked["head"].head(2), strict=True))


# --- shortlist and confirmation ----------------------------------------------------------------------


def test_a_planted_head_is_first_and_the_shortlist_reproduces_the_exhaustive_top(batch):
    ids, mask = batch
    model = tiny_llama(seed=3, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)
    unit = direction(3)
    hd = D_MODEL // N_HEADS
    with torch.no_grad():  # head (1, 3) writes strongly along the readout direction
        o_proj = model.model.layers[1].self_attn.o_proj.weight
        o_proj[:, 3 * hd : 4 * hd] += 0.5 * torch.outer(unit / unit.norm(), torch.ones(hd))
    exact = exhaustive(model, ids, mask, unit)
    order = exact.abs().argsort(descending=True)
    assert HEADS[int(order[0])] == (1, 3)

    table = S.screen_heads_atp_star(model, ids, mask, unit, N_LAYERS, HEADS, shortlist_size=6)
    assert list(zip(table["layer"], table["head"], strict=True)) == HEADS
    confirmed = table[table["confirmed"]]
    assert len(confirmed) == 6 and table.loc[~table["confirmed"], "ablation_effect"].isna().all()
    ranked = confirmed.sort_values("ablation_effect", key=abs, ascending=False)
    assert (int(ranked["layer"].iloc[0]), int(ranked["head"].iloc[0])) == (1, 3)
    # confirmed values are the exhaustive ones; where the shortlist holds the exhaustive top-3, so does the ranking
    index = [HEADS.index((int(r.layer), int(r.head))) for r in confirmed.itertuples()]
    torch.testing.assert_close(
        torch.tensor(confirmed["ablation_effect"].to_numpy()).float(), exact[index], rtol=0, atol=1e-5
    )
    top3 = [HEADS[int(i)] for i in order[:3]]
    assert set(top3) <= set(zip(confirmed["layer"], confirmed["head"], strict=True))
    assert list(zip(ranked["layer"].head(3), ranked["head"].head(3), strict=True)) == top3

    # a shortlist of every head is the exhaustive screen
    everything = S.screen_heads_atp_star(model, ids, mask, unit, N_LAYERS, HEADS, shortlist_size=len(HEADS))
    torch.testing.assert_close(
        torch.tensor(everything["ablation_effect"].to_numpy()).float(), exact, rtol=0, atol=1e-5
    )
    assert hooks_removed(model)


def test_mean_ablation_estimates_and_errors(batch):
    ids, mask = batch
    model = tiny_llama(seed=4, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)
    mean_z = H.mean_head_outputs(H.capture_head_outputs(model, ids, mask, range(N_LAYERS)), mask)
    exact = H.screen_heads_by_ablation(model, ids, mask, direction(4), N_LAYERS, HEADS, 16, "mean", mean_z)
    estimate = S.attribution_estimates(model, ids, mask, direction(4), N_LAYERS, "mean", mean_z)
    assert torch.corrcoef(torch.stack([estimate.atp_star.flatten(), exact]))[0, 1] > 0.9
    with pytest.raises(ValueError, match="mean_z"):
        S.attribution_estimates(model, ids, mask, direction(4), N_LAYERS, "mean", None)
    with pytest.raises(ValueError, match=r"heads\.screening\.shortlist"):
        S.shortlist(estimate.atp_star, HEADS, 0)
    assert S.attribution_estimates(model, ids, mask, direction(4), 0).atp_star.abs().sum() == 0


# --- wiring: profile knob, ranking and the completeness check ------------------------------------------


def test_profile_knob_and_the_screening_table_of_an_atp_star_screen():
    import numpy as np
    import pandas as pd
    from pydantic import ValidationError

    from emotion_assets.head_screening import screening_check
    from emotion_assets.profiles import HeadsConfig
    from emotion_assets.science.crossfit import RANK, rank_within_halves, top_of_half

    assert HeadsConfig().screening.method == "exhaustive"
    assert HeadsConfig(top_n=6, screening={"method": "atp_star", "shortlist": 6}).screening.shortlist == 6
    for method in ("atp", "atp_star"):
        with pytest.raises(ValidationError, match="shortlist"):
            HeadsConfig(top_n=6, screening={"method": method, "shortlist": 4})

    heads = [(ly, h) for ly in range(2) for h in range(3)]
    effect = {(0, 1): -0.5, (1, 2): 0.2}  # the confirmed shortlist; the rest have no exact effect
    table = pd.DataFrame(
        [
            {"emotion": "anger", "half": half, "layer": ly, "head": h, "attribution": 0.1,
             "ablation_effect": effect.get((ly, h), np.nan), "confirmed": (ly, h) in effect}
            for half in ("A", "B") for ly, h in heads
        ]
    )  # fmt: skip
    ranked = rank_within_halves(table)
    assert top_of_half(ranked, "anger", "A", 2) == [(0, 1), (1, 2)]
    assert sorted(ranked.loc[ranked["half"] == "B", RANK]) == list(range(1, 7))
    split = pd.DataFrame({"emotion": ["anger"] * 2, "half": ["A", "B"], "prompt_id": ["a-1", "a-2"],
                          "neutral_prompt_id": ["n-1", "n-2"], "pair_index": [0, 1]})  # fmt: skip
    assert screening_check(ranked, split, 2, 3).passed
    broken = ranked.copy()
    broken.loc[(broken["layer"] == 0) & (broken["head"] == 1), "ablation_effect"] = np.nan
    assert not screening_check(broken, split, 2, 3).passed


def test_the_qk_fix_refuses_other_attention_families_and_plain_atp_runs_there(batch):
    from tests.tiny_models import tiny_qwen3

    ids, mask = batch
    model = tiny_qwen3(seed=1, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)
    with pytest.raises(NotImplementedError, match="method: exhaustive"):
        S.attribution_estimates(model, ids, mask, direction(1), N_LAYERS)
    plain = S.attribution_estimates(model, ids, mask, direction(1), N_LAYERS, qk_fix=False)
    assert hooks_removed(model) and torch.isfinite(plain.atp).all() and plain.atp.abs().max() > 0
