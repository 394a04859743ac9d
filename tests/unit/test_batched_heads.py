"""Head interventions batched across conditions equal the per-condition path (tiny grouped-query Llama)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from emotion_assets.science import batched_heads as B
from emotion_assets.science import heads as H
from emotion_assets.science.interventions import hooks_removed
from emotion_assets.science.parallel import ModelWorkers
from tests.tiny_models import FAMILIES, byte_tokenizer, tiny_llama

EMOTION = ["I am so grateful for this!", "Thanks a lot, truly.", "We really appreciate it", "Thank you"]
NEUTRAL = ["I am so curious about this", "Notes on a lot, truly.", "We really evaluate it", "Read it"]
N_LAYERS, N_HEADS = 3, 4
MAX_NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3, n_layers=N_LAYERS, d_model=64, n_heads=N_HEADS, n_kv=2)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def sets(tokenizer):
    enc = tokenizer(EMOTION + NEUTRAL, padding=True, return_tensors="pt")
    n = len(EMOTION)
    return {
        "emotion": {k: enc[k][:n] for k in ("input_ids", "attention_mask")},
        "neutral": {k: enc[k][n:] for k in ("input_ids", "attention_mask")},
    }


@pytest.fixture(scope="module")
def positions(sets):
    return H.shared_positions(sets["emotion"]["attention_mask"], sets["neutral"]["attention_mask"])


@pytest.fixture(scope="module")
def mean_z(model, sets):
    ids, mask = sets["neutral"]["input_ids"], sets["neutral"]["attention_mask"]
    return H.mean_head_outputs(H.capture_head_outputs(model, ids, mask, range(N_LAYERS)), mask)


def experiment_conditions() -> list[B.Condition]:
    """The kinds of condition head_patching runs: baselines, ablations, patches in both directions."""
    top = ((0, 1), (1, 2), (2, 0))
    randoms = ((0, 3), (1, 0), (2, 2))
    conditions = [B.Condition("baseline_emotion", "emotion"), B.Condition("baseline_neutral", "neutral")]
    for mode in ("zero", "mean"):
        for i, head in enumerate(top):
            conditions.append(
                B.Condition(
                    f"ablate_{mode}_{i}", "emotion", B.HeadIntervention(ablate=(head,), ablation_mode=mode)
                )
            )
        conditions.append(
            B.Condition(f"ablate_{mode}_top", "emotion", B.HeadIntervention(ablate=top, ablation_mode=mode))
        )
    for destination, source in (("neutral", "emotion"), ("emotion", "neutral")):
        for mode in ("z", "v_only", "pattern_v"):
            item = B.HeadIntervention(patch=top, patch_mode=mode, source=source)
            conditions.append(B.Condition(f"patch_{mode}_to_{destination}", destination, item))
        item = B.HeadIntervention(patch=randoms, patch_mode="z", source=source)
        conditions.append(B.Condition(f"random_patch_to_{destination}", destination, item))
    conditions.append(B.Condition("random_ablate", "emotion", B.HeadIntervention(ablate=randoms)))
    return conditions


@pytest.mark.parametrize("batch_size", [5, 64])
def test_batched_generation_equals_one_generation_per_condition(
    model, tokenizer, sets, positions, mean_z, batch_size
):
    conditions = experiment_conditions()
    reference = B.generate_per_condition(
        model, tokenizer, sets, conditions, positions=positions, max_new_tokens=MAX_NEW, mean_z=mean_z
    )
    batched = B.generate_conditions(
        model, tokenizer, sets, conditions, positions=positions, max_new_tokens=MAX_NEW,
        batch_size=batch_size, mean_z=mean_z,
    )  # fmt: skip
    assert hooks_removed(model)
    assert batched == reference  # exact, token for token
    # The interventions are real: most conditions change some continuation of their destination.
    baseline = {"emotion": reference[0], "neutral": reference[1]}
    changed = [
        c.name for c, texts in zip(conditions, reference, strict=True) if texts != baseline[c.destination]
    ]
    assert len(changed) >= len(conditions) // 2, changed


def test_batched_readouts_equal_one_forward_per_condition(model, sets, positions, mean_z):
    conditions = [
        *experiment_conditions(),
        B.Condition("mlp_1", "emotion", B.HeadIntervention(ablate_mlps=(1,))),
        B.Condition(
            "heads_and_mlps", "emotion", B.HeadIntervention(ablate=((0, 1), (1, 2)), ablate_mlps=(0, 1))
        ),
    ]
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    kwargs = {"positions": positions, "direction": direction, "boundary": N_LAYERS, "mean_z": mean_z}
    reference = B.readout_per_condition(model, sets, conditions, **kwargs)
    batched = B.readout_conditions(model, sets, conditions, batch_size=7, **kwargs)
    assert hooks_removed(model)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    # Every intervention moves the readout of some prompt; the baselines are the plain readouts.
    clean = {"emotion": reference[0], "neutral": reference[1]}
    moved = (reference - torch.stack([clean[c.destination] for c in conditions])).abs().amax(dim=1)
    assert (moved[2:] > 1e-3).all(), moved


def test_patching_a_row_from_itself_changes_nothing(model, sets, positions):
    # Known answer: copying a set's own head outputs (any mode) leaves its readout as it was.
    items = [
        B.HeadIntervention(patch=((0, 1), (2, 3)), patch_mode=mode, source="emotion")
        for mode in H.PATCH_MODES
    ]
    conditions = [
        B.Condition("clean", "emotion"),
        *(B.Condition(f"self_{i.patch_mode}", "emotion", i) for i in items),
    ]
    direction = torch.ones(64)
    out = B.readout_conditions(model, sets, conditions, positions=positions, direction=direction, boundary=N_LAYERS,
                               batch_size=16)  # fmt: skip
    torch.testing.assert_close(out[1:], out[:1].expand(len(items), -1), rtol=1e-4, atol=1e-4)


def test_rows_are_independent_of_their_batch_neighbours(model, tokenizer, sets, positions):
    # A row ablating head (1, 2) next to clean rows: the clean rows equal the baseline, the ablated row
    # equals its own condition run alone.
    ablate = B.Condition("ablate", "emotion", B.HeadIntervention(ablate=((1, 2), (0, 0))))
    clean = B.Condition("clean", "emotion")
    together = B.generate_conditions(model, tokenizer, sets, [clean, ablate, clean], positions=positions,
                                     max_new_tokens=MAX_NEW, batch_size=64)  # fmt: skip
    alone = B.generate_per_condition(model, tokenizer, sets, [clean, ablate], positions=positions,
                                     max_new_tokens=MAX_NEW)  # fmt: skip
    assert together == [alone[0], alone[1], alone[0]]


def test_bad_inputs_name_the_fix(model, tokenizer, sets, positions):
    with pytest.raises(ValueError, match="source prompt set"):
        B.HeadIntervention(patch=((0, 1),))
    with pytest.raises(ValueError, match="not among the prompt sets"):
        B.generate_conditions(model, tokenizer, sets, [B.Condition("x", "other")], positions=positions,
                              max_new_tokens=2, batch_size=4)  # fmt: skip
    with pytest.raises(ValueError, match="mean_z"):
        B.generate_conditions(
            model, tokenizer, sets, [B.Condition("m", "emotion", B.HeadIntervention(ablate=((0, 1),), ablation_mode="mean"))],
            positions=positions, max_new_tokens=2, batch_size=4,
        )  # fmt: skip
    shorter = {"emotion": sets["emotion"], "neutral": {k: v[:, 1:] for k, v in sets["neutral"].items()}}
    with pytest.raises(ValueError, match="tokenize them together"):
        B.generate_conditions(model, tokenizer, shorter, [B.Condition("b", "emotion")], positions=positions,
                              max_new_tokens=2, batch_size=4)  # fmt: skip
    assert hooks_removed(model)


def test_head_patching_conditions_batched_equal_per_condition(model, tokenizer, sets, positions, mean_z):
    # The asset's own condition list (top heads, random controls) through both paths.
    from emotion_assets.science.head_conditions import build_generation_conditions

    conditions = [c.batched() for c in build_generation_conditions([(2, 1), (0, 2)], [(0, [(1, 1), (2, 3)])])]
    kwargs = {"positions": positions, "max_new_tokens": MAX_NEW, "mean_z": mean_z}
    reference = B.generate_per_condition(model, tokenizer, sets, conditions, **kwargs)
    assert B.generate_conditions(model, tokenizer, sets, conditions, batch_size=32, **kwargs) == reference


def worker_handle() -> SimpleNamespace:
    """What a worker process loads: the module's tiny model and tokenizer (seeded, so the same weights)."""
    return SimpleNamespace(
        model=tiny_llama(seed=3, n_layers=N_LAYERS, d_model=64, n_heads=N_HEADS, n_kv=2),
        tokenizer=byte_tokenizer(),
    )


def test_batches_spread_over_worker_processes_generate_the_same(model, tokenizer, sets, positions, mean_z):
    conditions = experiment_conditions()
    kwargs = {"positions": positions, "max_new_tokens": MAX_NEW, "mean_z": mean_z, "batch_size": 9}
    reference = B.generate_per_condition(
        model, tokenizer, sets, conditions, positions=positions, max_new_tokens=MAX_NEW, mean_z=mean_z
    )
    with ModelWorkers(SimpleNamespace(model=model, tokenizer=tokenizer), worker_handle, 2) as workers:
        assert workers.count == 2
        spread = B.generate_conditions(model, tokenizer, sets, conditions, workers=workers, **kwargs)
        again = B.generate_conditions(model, tokenizer, sets, conditions[:5], workers=workers, **kwargs)
    assert spread == reference and again == reference[:5]
    assert hooks_removed(model)


def test_generation_stops_once_every_row_has_hit_eos(tokenizer, sets, positions):
    # Known answer: with a zero LM head every logit ties, argmax is token 0, and token 0 is made an EOS, so
    # every row finishes on its first token: one forward (the prompt) however many tokens were allowed.
    model = tiny_llama(seed=4, n_layers=N_LAYERS, d_model=64, n_heads=N_HEADS, n_kv=2)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.generation_config.eos_token_id = 0
    forwards: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        conditions = [
            B.Condition("clean", "emotion"),
            B.Condition("ablate", "neutral", B.HeadIntervention(ablate=((0, 1),))),
        ]
        texts = B.generate_conditions(
            model, tokenizer, sets, conditions, positions=positions, max_new_tokens=5, batch_size=64
        )
    finally:
        handle.remove()
    assert len(forwards) == 1
    assert texts == [[""] * len(EMOTION)] * 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_readouts_equal_per_condition_on_every_family(family, tokenizer, sets, positions):
    """The per-row hooks of every attention family (fused qkv, q/k norms, windows, partial rotary)."""
    model = FAMILIES[family](seed=5)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    heads = ((0, 1), (n_layers - 1, 2))
    conditions = [B.Condition("baseline_emotion", "emotion"), B.Condition("baseline_neutral", "neutral"),
                  B.Condition("ablate", "emotion", B.HeadIntervention(ablate=heads))]  # fmt: skip
    for mode in ("z", "v_only", "pattern_v"):
        item = B.HeadIntervention(patch=heads, patch_mode=mode, source="emotion")
        conditions.append(B.Condition(f"patch_{mode}", "neutral", item))
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(1))
    kwargs = {"positions": positions, "direction": direction, "boundary": n_layers}
    with torch.inference_mode():
        reference = B.readout_per_condition(model, sets, conditions, **kwargs)
        batched = B.readout_conditions(model, sets, conditions, batch_size=4, **kwargs)
    assert hooks_removed(model)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    moved = (reference[2:] - reference[[0, 1, 1, 1]]).abs().amax(dim=1)
    assert (moved > 1e-4).all(), moved  # every intervention changes some prompt's readout
