"""The rotated twin (positive control): same function, residual basis rotated by a known Q."""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from emotion_assets.registry import RegistryError, RotatedTwinSource, load_registry
from emotion_assets.science.residual import capture_residuals
from emotion_assets.science.rotation import (
    UnsupportedArchitectureError,
    random_orthogonal,
    rotate_residual_basis_,
)
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama

LOGIT_TOL = 1e-3
GEOMETRY = dict(
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def _llama_tied_with_biases() -> PreTrainedModel:
    torch.manual_seed(1)
    cfg = LlamaConfig(**GEOMETRY, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


def _qwen2() -> PreTrainedModel:
    torch.manual_seed(2)
    return Qwen2ForCausalLM(Qwen2Config(**GEOMETRY, tie_word_embeddings=False)).eval()


def _qwen3() -> PreTrainedModel:
    torch.manual_seed(3)
    return Qwen3ForCausalLM(Qwen3Config(**GEOMETRY, head_dim=8, tie_word_embeddings=True)).eval()


BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama-untied": lambda: tiny_llama(seed=0),
    "llama-tied-biases": _llama_tied_with_biases,
    "qwen2-qkv-bias": _qwen2,
    "qwen3-qk-norm-tied": _qwen3,
}


def _plant(model: PreTrainedModel, seed: int = 7) -> PreTrainedModel:
    """Non-trivial norm weights and biases (random init leaves them at 1 and 0, which would hide a bug)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def _batch(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows of random tokens (ids 4..259, pad 0)."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


def _logits(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits  # [batch, pos, vocab]


def _boundaries(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n_layers = model.config.num_hidden_layers
    return capture_residuals(model, ids, mask, list(range(n_layers + 1)))  # [batch, L + 1, pos, d]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_rotated_twin_keeps_logits_and_rotates_every_boundary(name):
    original = _plant(BUILDERS[name]())
    rotated = copy.deepcopy(original)
    rotation = rotate_residual_basis_(rotated, seed=5)
    ids, mask = _batch(original)
    real = mask.bool()

    logit_diff = (_logits(rotated, ids, mask) - _logits(original, ids, mask)).abs()[real].max().item()
    assert logit_diff <= LOGIT_TOL, f"{name}: max abs logit difference {logit_diff:.2e}"

    h, h_rot = _boundaries(original, ids, mask), _boundaries(rotated, ids, mask)
    expected = rotation.apply(h)
    scale = h.abs().amax().item()
    err = (h_rot - expected).abs()[real[:, None, :].expand(-1, h.shape[1], -1)].max().item()
    assert err <= 1e-5 * scale, f"{name}: h_rot differs from h @ Q by {err:.2e} (scale {scale:.2e})"
    # The check can fail: the rotated residuals are far from the unrotated ones.
    assert (h_rot - h).abs()[real[:, None, :].expand(-1, h.shape[1], -1)].max().item() > 0.1 * scale
    # Norms are folded (unit weight) and Q is orthogonal.
    norms = [
        p for n, p in rotated.named_parameters() if n.endswith("layernorm.weight") or n == "model.norm.weight"
    ]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)
    eye = torch.eye(rotation.q.shape[0], dtype=torch.float64)
    assert torch.allclose(rotation.q.T @ rotation.q, eye, atol=1e-12)


def test_tied_lm_head_is_untied_and_stays_untied():
    original = _plant(_llama_tied_with_biases())
    rotated = copy.deepcopy(original)
    rotation = rotate_residual_basis_(rotated, seed=5)
    assert rotation.lm_head_untied
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    assert rotated.config.tie_word_embeddings is False
    rotated.tie_weights()  # transformers re-ties on some paths; the config must keep them apart
    ids, mask = _batch(original)
    diff = (_logits(rotated, ids, mask) - _logits(original, ids, mask)).abs()[mask.bool()].max().item()
    assert diff <= LOGIT_TOL
    # The original (a separate copy) is untouched and still tied.
    assert original.lm_head.weight.data_ptr() == original.model.embed_tokens.weight.data_ptr()


def test_rotation_is_seeded():
    a, b, c = (rotate_residual_basis_(tiny_llama(seed=0), seed=s) for s in (3, 3, 4))
    assert torch.equal(a.q, b.q)
    assert not torch.allclose(a.q, c.q)
    assert torch.equal(random_orthogonal(16, 9), random_orthogonal(16, 9))
    assert "scipy.stats.ortho_group" in a.method


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            lambda: tiny_gpt2(),
            r"GPT2LMHeadModel \(model_type 'gpt2'\).*supported families are llama, mistral",
        ),
        (lambda: tiny_bert(), r"BertModel \(model_type 'bert'\).*supported families"),
        (lambda: tiny_llama().model, r"LlamaModel.*AutoModelForCausalLM"),
    ],
)
def test_unsupported_architecture_is_named(model: Callable[[], nn.Module], match: str):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        rotate_residual_basis_(model(), seed=0)


def test_unknown_parameter_in_a_supported_family_is_refused():
    model = tiny_llama()
    model.model.layers[0].register_parameter("extra_norm", nn.Parameter(torch.ones(64)))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"model\.layers\.0\.extra_norm.*outside the Llama"
    ):
        rotate_residual_basis_(model, seed=0)


# --------------------------------------------------------------------------------------------------
# Registry, loader and study plan
# --------------------------------------------------------------------------------------------------


def _registry(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(body))
    return path


TINY = "tiny: {{kind: causal_lm, source: {{type: huggingface, id: tiny, path: '{path}'}}, " + (
    "width: 64, layers: 3, heads: 4, kv_heads: 2}}"
)


@pytest.mark.parametrize(
    ("twin", "match"),
    [
        ("{type: rotated_twin, of: ghost}", r"rotated_twin of unknown model 'ghost'; set `of:`"),
        ("{type: rotated_twin, of: rot}", r"rotated_twin of 'rot', which is itself a rotated_twin"),
        ("{type: random_twin, of: ghost}", r"random_twin of unknown model 'ghost'"),
        ("{type: rotated_twin, of: tiny, sead: 3}", r"models\.rot\.source\.rotated_twin\.sead"),
    ],
)
def test_registry_validates_rotated_twin(tmp_path, twin, match):
    path = _registry(
        tmp_path,
        f"""
        version: 1
        default_model: tiny
        models:
          {TINY.format(path="/nowhere")}
          rot: {{kind: causal_lm, source: {twin}, width: 64, layers: 3, heads: 4, kv_heads: 2}}
        """,
    )
    with pytest.raises(RegistryError, match=match):
        load_registry(path)


def test_rotated_twin_of_an_encoder_is_refused(tmp_path):
    path = _registry(
        tmp_path,
        """
        version: 1
        default_model: enc
        models:
          enc: {kind: encoder, source: {type: huggingface, id: x}, width: 8, layers: 1, heads: 2, kv_heads: 2}
          rot: {kind: encoder, source: {type: rotated_twin, of: enc}, width: 8, layers: 1, heads: 2, kv_heads: 2}
        """,
    )
    with pytest.raises(RegistryError, match=r"rotated_twin needs a causal_lm base"):
        load_registry(path)


def test_loader_builds_rotated_twin_and_leaves_cached_base_untouched(tmp_path, tiny_llama_dir):
    from resources.models import ModelResource, clear_model_cache

    path = _registry(
        tmp_path,
        f"""
        version: 1
        default_model: tiny
        models:
          {TINY.format(path=tiny_llama_dir)}
          rot: {{kind: causal_lm, source: {{type: rotated_twin, of: tiny, seed: 8}},
                 width: 64, layers: 3, heads: 4, kv_heads: 2}}
        """,
    )
    clear_model_cache()
    resource = ModelResource(registry_path=str(path), device="cpu", dtype="float32")
    base = resource.get("tiny")
    before = {n: p.clone() for n, p in base.model.state_dict().items()}
    twin = resource.get("rot")
    assert twin.model is not base.model
    assert all(torch.equal(before[n], p) for n, p in base.model.state_dict().items())
    assert twin.source["type"] == "rotated_twin" and twin.source["seed"] == 8
    assert "scipy.stats.ortho_group" in twin.source["rotation"]
    assert twin.geometry == base.geometry
    batch = base.tokenizer(["A short prompt.", "Hi"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    diff = (_logits(twin.model, ids, mask) - _logits(base.model, ids, mask)).abs()[mask.bool()]
    assert diff.max().item() <= LOGIT_TOL
    h_base = capture_residuals(base.model, ids, mask, [2])
    h_twin = capture_residuals(twin.model, ids, mask, [2])
    q = random_orthogonal(64, 8).float()
    assert torch.allclose(h_twin, h_base @ q, atol=1e-4)
    clear_model_cache()


def test_embedded_registry_has_the_controls_of_the_headline_pair():
    registry = load_registry()
    spec = registry.get("smollm2-135m-rotated")
    assert isinstance(spec.source, RotatedTwinSource) and spec.source.of == "smollm2-135m"
    assert {"smollm2-135m-random__minilm-l6", "smollm2-135m__smollm2-135m-rotated"} <= set(registry.pair_keys)
    assert set(registry.twins_of("smollm2-135m")) == {"smollm2-135m-random", "smollm2-135m-rotated"}


def test_study_plan_runs_the_twin_controls_after_every_partner():
    from emotion_assets.partitions import REGISTRY
    from jobs.jobs import study_plan

    model, profile = "smollm2-135m", "smoke"
    plan = study_plan(model, profile)
    family = {model, *REGISTRY.twins_of(model)}
    expected_pairs = [f"{a}__{b}|{profile}" for a, b in REGISTRY.pairs if family & {a, b}]
    alignments = [key for job, key in plan if job == "alignment_job"]
    assert alignments == expected_pairs
    assert "smollm2-135m-random__minilm-l6|smoke" in alignments
    assert "smollm2-135m__smollm2-135m-rotated|smoke" in alignments
    first_alignment = next(i for i, (job, _) in enumerate(plan) if job == "alignment_job")
    represented = {key.split("|")[0] for job, key in plan[:first_alignment] if job == "representation_job"}
    for key in alignments:
        assert set(key.split("|")[0].split("__")) <= represented, key
    assert len(plan) == len(set(plan)), "a step is planned twice"
    # A model without pairs or twins gets no alignment step.
    assert not [job for job, _ in study_plan("gpt2", profile) if job == "alignment_job"]
