"""Steering sweeps: condition building, random controls and batched per-row generation."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from emotion_assets.common import progress_logger
from emotion_assets.science.interventions import add_to_residual, hooks_removed
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.steering import (
    SteeringCondition,
    build_conditions,
    distinct_conditions,
    generate_sweep,
    random_directions,
    scaled_vector,
)
from tests.tiny_models import byte_tokenizer, tiny_llama

PROMPTS = ["Thank you so much, truly.", "Hi", "I am sorry about that", "The weather"]
LAYERS = [1, 2]
ALPHAS = [-1.0, 0.0, 1.0]
KINDS = ("emotion", "random_isotropic", "random_covariance")
NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _vectors(d: int) -> dict[str, dict[int, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return {e: {layer: torch.randn(d, generator=gen) for layer in LAYERS} for e in ("joy", "anger")}


def _neutral(d: int, m: int = 10) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    acts = {layer: torch.randn(m, d, generator=gen) for layer in LAYERS}
    return {layer: x - x.mean(0) for layer, x in acts.items()}


@pytest.fixture(scope="module")
def conditions(model):
    d = model.config.hidden_size
    return build_conditions(
        _vectors(d), {1: 3.0, 2: 4.0}, LAYERS, ALPHAS, n_random=2, seed=7, neutral_centered=_neutral(d)
    )


@pytest.fixture(scope="module")
def sweep(model, tokenizer, conditions):
    return generate_sweep(model, tokenizer, PROMPTS, conditions, max_new_tokens=NEW, batch_size=16)


def _single(model, tokenizer, prompt: str, cond: SteeringCondition) -> str:
    enc = tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode(), add_to_residual(model, cond.layer or 0, cond.vector):
        out = model.generate(**enc, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    if 2 in new:
        new = new[: new.index(2) + 1]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_scaled_vector_norm_and_direction():
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(scaled_vector(v, -0.5, 10.0), torch.tensor([-3.0, -4.0]))
    assert torch.equal(scaled_vector(v, 0.0, 10.0), torch.zeros(2))


def test_conditions_cover_grid(conditions):
    names = [c.name for c in conditions]
    assert len(names) == len(set(names))
    assert [c.kind for c in conditions].count("baseline") == 1
    emotion = [c for c in conditions if c.kind == "emotion"]
    assert len(emotion) == 2 * len(LAYERS) * len(ALPHAS)
    assert {c.alpha for c in emotion} == {-1.0, 0.0, 1.0}
    for kind in ("random_isotropic", "random_covariance"):
        rand = [c for c in conditions if c.kind == kind]
        assert len(rand) == len(LAYERS) * 2 * 2  # layers × α≠0 × seed index
        assert all(c.alpha != 0 and c.seed is not None for c in rand)
    # Every vector at (layer, α) has norm |α| · resid_norm, so the controls are norm-matched.
    for c in conditions:
        if c.layer is not None:
            expected = abs(c.alpha) * {1: 3.0, 2: 4.0}[c.layer]
            assert c.vector_norm == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_added_and_negative_required(model):
    d = model.config.hidden_size
    conds = build_conditions(_vectors(d), {1: 1.0, 2: 1.0}, [1], [-0.5, 0.5], n_random=0, seed=0)
    assert 0.0 in {c.alpha for c in conds if c.kind == "emotion"}
    with pytest.raises(ValueError, match="negative"):
        build_conditions(_vectors(d), {1: 1.0, 2: 1.0}, [1], [0.5], n_random=0, seed=0)


@pytest.mark.parametrize("kind", ["isotropic", "covariance"])
def test_random_directions_norm_matched_and_seeded(kind):
    ref = torch.randn(32, generator=torch.Generator().manual_seed(3)) * 5
    acts = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    factor = acts - acts.mean(0) if kind == "covariance" else None
    a = random_directions(ref, 5, seed=11, kind=kind, covariance_factor=factor)
    b = random_directions(ref, 5, seed=11, kind=kind, covariance_factor=factor)
    c = random_directions(ref, 5, seed=12, kind=kind, covariance_factor=factor)
    assert a.shape == (5, 32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a.norm(dim=1), ref.norm().expand(5), atol=1e-5, rtol=1e-6)


def test_covariance_directions_in_activation_span():
    gen = torch.Generator().manual_seed(5)
    acts = torch.randn(6, 40, generator=gen, dtype=torch.float64)  # rank 5 after centering, in R^40
    centered = acts - acts.mean(0)
    z = random_directions(
        torch.ones(40, dtype=torch.float64), 4, seed=1, kind="covariance", covariance_factor=centered
    )
    coef = torch.linalg.lstsq(centered.T, z.T).solution  # [m, n]
    torch.testing.assert_close(centered.T @ coef, z.T, atol=1e-9, rtol=1e-9)
    iso = random_directions(torch.ones(40, dtype=torch.float64), 1, seed=1)
    residual = centered.T @ torch.linalg.lstsq(centered.T, iso.T).solution - iso.T
    assert residual.norm() > 0.5  # an isotropic draw is not in that 5-dim span


def test_alpha_zero_reproduces_baseline(model, tokenizer, conditions, sweep):
    base = sweep[sweep.kind == "baseline"].set_index("prompt_index").continuation
    zero = sweep[(sweep.kind == "emotion") & (sweep.alpha == 0.0)]
    assert len(zero) == 2 * len(LAYERS) * len(PROMPTS)
    for _, row in zero.iterrows():
        assert row.continuation == base[row.prompt_index]
    # The sweep copies the baseline into α = 0 rows; generating one through its hook gives the same text.
    zero_condition = next(c for c in conditions if c.kind == "emotion" and c.alpha == 0.0 and c.layer == 2)
    for pi, prompt in enumerate(PROMPTS):
        assert _single(model, tokenizer, prompt, zero_condition) == base[pi]
    steered = sweep[(sweep.kind == "emotion") & (sweep.alpha != 0.0)]
    changed = [row.continuation != base[row.prompt_index] for _, row in steered.iterrows()]
    assert sum(changed) > len(changed) / 2


def test_sweep_equals_single_prompt_generation(model, tokenizer, conditions, sweep):
    picked = [conditions[0]] + [next(c for c in conditions if c.kind == k and c.alpha != 0) for k in KINDS]
    by_key = sweep.set_index(["condition", "prompt_index"]).continuation
    for cond in picked:
        for pi, prompt in enumerate(PROMPTS):
            assert by_key[(cond.name, pi)] == _single(model, tokenizer, prompt, cond), (cond.name, prompt)


def test_sweep_layout_and_hooks_removed(model, conditions, sweep):
    assert hooks_removed(model)
    assert len(sweep) == len(conditions) * len(PROMPTS)
    assert list(sweep.condition[:: len(PROMPTS)]) == [c.name for c in conditions]
    assert list(sweep.prompt_index[: len(PROMPTS)]) == list(range(len(PROMPTS)))
    assert (sweep.n_new_tokens.between(1, NEW)).all()
    expected = {"prompt_index", "prompt", "condition", "kind", "emotion", "layer", "alpha", "seed"}
    assert expected | {"continuation", "n_new_tokens"} <= set(sweep.columns)


def test_batch_size_does_not_change_greedy_results(model, tokenizer, conditions, sweep):
    subset = conditions[::4]
    calls: list[tuple[int, int]] = []
    small = generate_sweep(
        model, tokenizer, PROMPTS, subset, max_new_tokens=NEW, batch_size=3,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    expected = sweep[sweep.condition.isin([c.name for c in subset])]
    assert list(small.continuation) == list(expected.continuation)
    total = len(set(distinct_conditions(subset))) * len(PROMPTS)  # rows generated; copies are not
    assert total < len(subset) * len(PROMPTS)  # the subset holds the baseline and an α = 0 condition
    done = [d for d, _ in calls]  # one call per generate, batches of at most 3 rows
    assert calls[-1] == (total, total) and all(0 < b - a <= 3 for a, b in zip([0, *done], done, strict=False))


def tiny_handle() -> SimpleNamespace:
    """What a worker process loads: the same tiny model and tokenizer as the fixtures (seeded)."""
    return SimpleNamespace(model=tiny_llama(), tokenizer=byte_tokenizer())


def test_worker_processes_generate_the_same_continuations(model, tokenizer, conditions, sweep):
    calls: list[tuple[int, int]] = []
    with ModelWorkers(SimpleNamespace(model=model, tokenizer=tokenizer), tiny_handle, 2) as workers:
        spread = generate_sweep(
            model, tokenizer, PROMPTS, conditions, max_new_tokens=NEW, batch_size=8, workers=workers,
            progress=lambda done, total: calls.append((done, total)),
        )  # fmt: skip
        assert workers.count == 2
    alone = generate_sweep(model, tokenizer, PROMPTS, conditions, max_new_tokens=NEW, batch_size=8)
    assert list(spread.continuation) == list(alone.continuation) == list(sweep.continuation)
    assert list(spread.n_new_tokens) == list(alone.n_new_tokens)
    total = len(set(distinct_conditions(conditions))) * len(PROMPTS)
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert hooks_removed(model)


def test_only_conditions_that_cannot_differ_are_generated_once(conditions):
    source = distinct_conditions(conditions)
    zero = [i for i, c in enumerate(conditions) if not c.vector.any()]
    assert conditions[zero[0]].kind == "baseline" and len(zero) == 1 + 2 * len(LAYERS)
    assert all(source[i] == zero[0] for i in zero)
    assert all(source[i] == i for i in range(len(conditions)) if i not in zero)  # every steered one runs
    first = next(c for c in conditions if c.vector.any())
    twin = dataclasses.replace(first, name="twin", vector=first.vector.clone())
    other_layer = dataclasses.replace(first, name="moved", layer=3 - first.layer)
    assert distinct_conditions([first, twin, other_layer]) == [0, 0, 2]


def test_progress_logger_logs_each_tenth_once():
    lines: list[str] = []
    context = SimpleNamespace(log=SimpleNamespace(info=lines.append))
    progress = progress_logger(context, "rows")
    for done in range(0, 101):
        progress(done, 100)
    assert len(lines) == 11 and lines[0] == "0 of 100 rows (0 %)" and lines[-1] == "100 of 100 rows (100 %)"


def test_sampling_is_seeded(model, tokenizer, conditions):
    kwargs = dict(max_new_tokens=NEW, batch_size=8, decoding="sample", temperature=1.0, top_p=0.9)
    state = torch.random.get_rng_state()
    a = generate_sweep(model, tokenizer, PROMPTS, conditions[:4], seed=3, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    b = generate_sweep(model, tokenizer, PROMPTS, conditions[:4], seed=3, **kwargs)
    assert list(a.continuation) == list(b.continuation)
    assert hooks_removed(model)
