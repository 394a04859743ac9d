"""MLP ablation and the emotion readout on a tiny grouped-query Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from emotion_assets.science import heads as H
from emotion_assets.science.circuits import ablate_mlps, readout_projection
from emotion_assets.science.interventions import hooks_removed
from emotion_assets.science.residual import _forward_kwargs
from tests.tiny_models import byte_tokenizer, tiny_llama

PROMPTS = ["I am so grateful for this!", "Thanks", "We really appreciate it", "Thank you, truly."]
N_LAYERS = 3


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def batch():
    enc = byte_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def direction():
    return torch.randn(64, generator=torch.Generator().manual_seed(3))


def logits(model, ids, mask):
    with torch.inference_mode():
        return model(**_forward_kwargs(model, ids, mask)).logits


def test_ablate_mlps_zeroes_the_mlp_output_and_removes_its_hooks(model, batch):
    ids, mask = batch
    seen = {}
    with ablate_mlps(model, [1]):
        handle = model.model.layers[1].mlp.register_forward_hook(lambda _m, _a, out: seen.update(out=out))
        try:
            ablated = logits(model, ids, mask)
        finally:
            handle.remove()
    assert torch.count_nonzero(seen["out"]) == 0
    assert hooks_removed(model)
    assert not torch.allclose(ablated, logits(model, ids, mask))


def test_ablate_mlps_equals_zeroed_down_projections(model, batch):
    ids, mask = batch
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (0, 2):
            twin.model.layers[layer].mlp.down_proj.weight.zero_()
    with ablate_mlps(model, [2, 0, 0]):
        ours = logits(model, ids, mask)
    torch.testing.assert_close(ours, logits(twin, ids, mask))
    assert hooks_removed(model)


def test_ablate_mlps_removes_hooks_when_the_body_raises(model):
    with pytest.raises(RuntimeError, match="inside"), ablate_mlps(model, [0]):
        raise RuntimeError("inside")
    assert hooks_removed(model)
    with pytest.raises(ValueError, match="out of range"), ablate_mlps(model, [N_LAYERS]):
        pass


@pytest.mark.parametrize("boundary", [0, 1, 2])
def test_readout_projection_matches_hidden_states(model, batch, direction, boundary):
    ids, mask = batch
    with torch.inference_mode():
        hidden = model(**_forward_kwargs(model, ids, mask), output_hidden_states=True).hidden_states[boundary]
    last = hidden[:, -1]  # left padding: the last column is every row's last real token
    expected = last.float() @ (direction / direction.norm())
    torch.testing.assert_close(readout_projection(model, ids, mask, direction, boundary), expected)


def test_readout_projection_is_scale_free_and_rejects_a_zero_direction(model, batch, direction):
    ids, mask = batch
    torch.testing.assert_close(
        readout_projection(model, ids, mask, 5 * direction, N_LAYERS),
        readout_projection(model, ids, mask, direction, N_LAYERS),
    )
    with pytest.raises(ValueError, match="non-zero"):
        readout_projection(model, ids, mask, torch.zeros(64), N_LAYERS)


def test_readout_change_under_ablation_equals_the_screening_score(model, batch, direction):
    ids, mask = batch
    heads = [(0, 1), (1, 3), (2, 0)]
    scores = H.screen_heads_by_ablation(model, ids, mask, direction, N_LAYERS, heads, heads_per_pass=2)
    clean = readout_projection(model, ids, mask, direction, N_LAYERS)
    for head, score in zip(heads, scores, strict=True):
        with H.ablate_heads(model, [head]):
            effect = (readout_projection(model, ids, mask, direction, N_LAYERS) - clean).mean()
        assert float(effect) == pytest.approx(float(score), abs=1e-4)
    assert hooks_removed(model)
