"""A function-preserving rotation of a decoder's residual basis: the positive control for alignment.

Recipe (Llama-family layout, pre-norm RMSNorm blocks):

1. fold every RMSNorm weight ``w`` into the linear maps that read the norm's output (``W ← W diag(w)``:
   q/k/v for ``input_layernorm``, gate/up for ``post_attention_layernorm``, the LM head for the final
   norm) and set ``w = 1``;
2. untie the LM head from the token embeddings where they are tied (they now differ);
3. rotate the residual basis by an orthogonal ``Q`` (row vectors, ``resid_rot = resid @ Q``): embeddings
   ``E ← E Q``; every linear reading the residual ``W ← W Q``; every linear writing it (o_proj, down_proj)
   ``W ← Qᵀ W`` and ``b ← b Q``.

An RMSNorm with unit weight commutes with ``Q`` (``‖x Q‖ = ‖x‖``), so the rotated model computes the same
logits while every residual boundary is ``h Q``: "the same representation up to a change of coordinates",
with the answer known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy.stats import ortho_group
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values with the Llama module layout and an RMSNorm of the form ``w ⊙ x / rms(x)``."""

ROTATION_METHOD = "scipy.stats.ortho_group (Haar: QR of a seeded Gaussian, signs fixed)"

_READ_AFTER_INPUT_NORM = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_READ_AFTER_POST_NORM = ("mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
# Per-head norms (Qwen3) act on head_dim, not on the residual stream: rotation leaves them alone.
_HEAD_SPACE = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


class UnsupportedArchitectureError(TypeError):
    """The model's architecture is not one the residual rotation knows how to fold and rotate."""


@dataclass(frozen=True)
class ResidualRotation:
    """The change of coordinates applied to a model: ``resid_rotated = resid @ q``."""

    q: Float[Tensor, "d_model d_model"]  # float64, CPU, orthogonal
    seed: int
    method: str
    lm_head_untied: bool

    def apply(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """Residual activations of the original model expressed in the rotated model's basis."""
        return (resid.to(torch.float64) @ self.q.to(resid.device)).to(resid.dtype)


def random_orthogonal(d: int, seed: int) -> Float[Tensor, "d d"]:
    """A Haar-random ``d × d`` orthogonal matrix from ``scipy.stats.ortho_group`` (float64, seeded)."""
    if d < 2:
        raise ValueError(f"random_orthogonal needs d >= 2, got d={d}.")
    q = ortho_group.rvs(d, random_state=np.random.default_rng(seed))  # [d, d]
    return torch.from_numpy(np.ascontiguousarray(q))


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _check_layout(model: nn.Module) -> tuple[nn.Embedding, nn.ModuleList, nn.Module, nn.Linear]:
    """The embedding, blocks, final norm and LM head of a supported causal LM; anything else raises."""
    arch = type(model).__name__
    model_type = _model_type(model)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"Cannot rotate the residual basis of {arch} (model_type {model_type!r}): supported families "
            f"are {supported} (the Llama layout with RMSNorm w ⊙ x / rms(x)). Use a model of one of these "
            "families as the `of:` of a rotated_twin."
        )
    base = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    parts = {name: getattr(base, name, None) for name in ("embed_tokens", "layers", "norm")}
    if not isinstance(lm_head, nn.Linear) or any(part is None for part in parts.values()):
        raise UnsupportedArchitectureError(
            f"Cannot rotate {arch}: expected a causal LM with model.embed_tokens, model.layers, model.norm "
            "and lm_head (load it with AutoModelForCausalLM, not AutoModel)."
        )
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "lm_head.bias"}
    for i in range(len(parts["layers"])):
        prefix = f"model.layers.{i}."
        known |= {prefix + n + ".weight" for n in _READ_AFTER_INPUT_NORM + _READ_AFTER_POST_NORM + _WRITERS}
        known |= {prefix + n + ".bias" for n in _READ_AFTER_INPUT_NORM + _READ_AFTER_POST_NORM + _WRITERS}
        known |= {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
        known |= {prefix + n for n in _HEAD_SPACE}
    unknown = [name for name, _ in model.named_parameters() if name not in known]
    if unknown:
        raise UnsupportedArchitectureError(
            f"Cannot rotate {arch}: parameters {unknown[:5]} are outside the Llama layout (supported "
            f"families: {supported}), so the rotation would not preserve the function."
        )
    return parts["embed_tokens"], parts["layers"], parts["norm"], lm_head


def _update(param: Tensor | None, fn: Callable[[Tensor], Tensor]) -> None:
    """Replace ``param`` in place by ``fn(param)``, computed in float64 on the CPU, cast back."""
    if param is None:
        return
    new = fn(param.detach().to("cpu", torch.float64))
    param.data.copy_(new.to(param.device, param.dtype))


def _fold_and_read(norm: nn.Module, readers: list[nn.Linear], q: Tensor) -> None:
    """Fold ``norm.weight`` into each reader (``W ← W diag(w) Q``) and set the norm weight to 1."""
    w = norm.weight.detach().to("cpu", torch.float64)  # [d_model]
    for linear in readers:
        _update(linear.weight, lambda m: (m * w) @ q)  # [out, d_model]; a reader's bias is not residual
    with torch.no_grad():
        norm.weight.fill_(1.0)


def _untie_lm_head(model: nn.Module, embed: nn.Embedding, lm_head: nn.Linear) -> bool:
    """Give the LM head its own copy of the embedding matrix when the two share storage."""
    if lm_head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    config = model.config
    for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers' record of tied parameters
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


def rotate_residual_basis_(model: nn.Module, seed: int) -> ResidualRotation:
    """Fold norms, untie the LM head and rotate the residual basis of ``model`` **in place**.

    ``model`` is a Llama-family causal LM (:data:`SUPPORTED_MODEL_TYPES`); pass a fresh copy, never a
    shared one. Arithmetic is float64 on the CPU, written back in each parameter's dtype and device.
    Returns the rotation ``Q`` (``scipy.stats.ortho_group``, seeded): every residual boundary of the
    rotated model equals the original's ``@ Q`` and the logits are unchanged.
    """
    embed, layers, final_norm, lm_head = _check_layout(model)
    q = random_orthogonal(embed.weight.shape[1], seed)  # [d_model, d_model]
    with torch.no_grad():
        untied = _untie_lm_head(model, embed, lm_head)
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            _fold_and_read(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], q)
            _fold_and_read(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], q)
            for writer in (attn.o_proj, mlp.down_proj):
                _update(writer.weight, lambda m: q.T @ m)  # [d_model, in]
                _update(writer.bias, lambda b: b @ q)  # [d_model]
        _fold_and_read(final_norm, [lm_head], q)
        _update(embed.weight, lambda e: e @ q)  # [vocab, d_model]
    return ResidualRotation(q=q, seed=seed, method=ROTATION_METHOD, lm_head_untied=untied)


__all__ = [
    "ROTATION_METHOD",
    "SUPPORTED_MODEL_TYPES",
    "ResidualRotation",
    "UnsupportedArchitectureError",
    "random_orthogonal",
    "rotate_residual_basis_",
]
