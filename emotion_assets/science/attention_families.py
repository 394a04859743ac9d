"""Where each decoder family keeps its heads: output projections, queries, keys, values and patterns.

The head functions of ``science/heads/`` are written once against this module. Four attention layouts
cover the registry (``data/models.yaml``):

- ``llama``: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` in ``self_attn``, rotary embeddings passed
  in as ``position_embeddings`` (Llama, SmolLM2, Mistral, Qwen2/Qwen3, Gemma/Gemma-2/Gemma-3). Optional
  per-head ``q_norm``/``k_norm`` (Qwen3, Gemma-3) applied before the rotary embedding, grouped-query
  attention, the module's own ``scaling`` (Gemma-3: ``query_pre_attn_scalar ** -0.5``), sliding-window
  layers (``sliding_window`` set on the module) and logit soft-capping where the module applies it
  (Gemma-2). Gemma-3's config carries ``attn_logit_softcapping`` but its attention never applies it (q/k
  norms replaced it), so it is not applied here either; the Gemma-3 parity test sets it to check that.
- ``gpt2``: one fused ``c_attn`` (a ``Conv1D``, ``[d_model, 3 d_model]``) split into q, k, v; ``c_proj``
  out; no rotary; ``scaling`` from the module (``1/sqrt(d_head)``, optionally ``/(layer + 1)``).
- ``gpt_neox`` (Pythia): one fused ``query_key_value`` whose output is laid out per head as ``[q | k | v]``
  (``3 d_head`` values per head), ``dense`` out; rotary on the first ``rotary_ndims`` of each head only
  (``partial_rotary_factor``; the ``cos``/``sin`` passed in have that width); attention and MLP read the
  same residual (parallel blocks), which changes nothing here.
- ``gpt_neo``: ``attn.attention`` holds ``q_proj``/``k_proj``/``v_proj``/``out_proj``; scores are **not**
  scaled; ``local`` layers mask keys at distance ``>= window_size`` through the module's own ``bias``
  buffer, on top of the additive mask the model passes in.

Masks. A recomputed pattern uses the mask the model passed the attention module: ``None`` (causal, plus the
module's sliding window if it has one; transformers skips the mask only when the window cannot bite), a
boolean mask (True = attend) or an additive float mask, all ``[batch, 1, q_pos, k_pos]``, or the
``[batch, k_pos]`` padding mask flash attention gets (causal and window added here). Scores are
computed in float32; masked scores are set to the float32 minimum, so a fully masked (padding) query row
gets a uniform, finite pattern. Soft-capping acts before the mask, as in the models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

if TYPE_CHECKING:  # the geometry lives with the head functions; it is built from this module's accessors
    from emotion_assets.science.heads.layout import HeadLayout

AttentionFamily = Literal["llama", "gpt2", "gpt_neox", "gpt_neo"]

# Attention classes that pass ``attn_logit_softcapping`` to their attention function (Gemma-3 does not).
_SOFTCAPPING_CLASSES = ("Gemma2Attention",)


@dataclass(frozen=True)
class AttentionCall:
    """What a block passed its attention module: the (normed) residual, the mask and the rotary tables."""

    hidden: Float[Tensor, "batch pos d_model"]
    mask: Tensor | None  # [batch, 1, q_pos, k_pos], boolean (True = attend) or additive float
    rotary: tuple[Tensor, Tensor] | None  # (cos, sin), each [batch, pos, rotary_dim]


def block_family(block: nn.Module) -> AttentionFamily:
    """The attention layout of one decoder block (see the module docstring)."""
    attn = getattr(block, "self_attn", None)
    if attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "llama"
    attn = getattr(block, "attention", None)
    if attn is not None and hasattr(attn, "query_key_value") and hasattr(attn, "dense"):
        return "gpt_neox"
    attn = getattr(block, "attn", None)
    if attn is not None and hasattr(attn, "c_attn") and hasattr(attn, "c_proj"):
        return "gpt2"
    inner = getattr(attn, "attention", None)
    if inner is not None and all(hasattr(inner, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
        return "gpt_neo"
    raise NotImplementedError(
        f"{type(block).__name__} has none of the supported attention layouts: self_attn.{{q,k,v,o}}_proj "
        "(Llama, Qwen, Gemma, Mistral), attn.c_attn/c_proj (GPT-2), attention.query_key_value/dense "
        "(GPT-NeoX), attn.attention.{q,k,v,out}_proj (GPT-Neo). Add the block's layout to "
        "emotion_assets.science.attention_families."
    )


def attention_module(block: nn.Module) -> nn.Module:
    """The module whose call carries the residual, mask and rotary tables of the block's attention."""
    family = block_family(block)
    if family == "llama":
        return block.self_attn
    if family == "gpt_neox":
        return block.attention
    if family == "gpt2":
        return block.attn
    return block.attn.attention


def output_projection(block: nn.Module) -> nn.Module:
    """The attention output projection; its input, viewed ``[..., n_heads, d_head]``, is ``hook_z``."""
    attn = attention_module(block)
    for name in ("o_proj", "c_proj", "dense", "out_proj"):
        module = getattr(attn, name, None)
        if isinstance(module, nn.Module):
            return module
    raise NotImplementedError(f"{type(attn).__name__} has no o_proj/c_proj/dense/out_proj projection.")


def read_call(module: nn.Module, args: tuple, kwargs: dict) -> AttentionCall:
    """The inputs of one attention-module call, positional or keyword, bound to its ``forward``."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError as error:
        raise TypeError(f"Cannot bind the call of {type(module).__name__}: {error}") from error
    hidden = bound.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise TypeError(f"{type(module).__name__} was called without a hidden_states tensor.")
    rotary = bound.get("position_embeddings")
    mask = bound.get("attention_mask")
    return AttentionCall(hidden, mask if isinstance(mask, Tensor) else None, rotary)


def _split_fused(attn: nn.Module, layout: HeadLayout, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values ``[batch, pos, heads, d_head]`` before norms and rotary."""
    batch, pos, _ = hidden.shape
    hd = layout.head_dim
    if layout.family == "gpt2":
        d = layout.n_heads * hd
        q, k, v = (t.view(batch, pos, layout.n_heads, hd) for t in attn.c_attn(hidden).split(d, dim=-1))
        return q, k, v
    if layout.family == "gpt_neox":
        qkv = attn.query_key_value(hidden).view(batch, pos, layout.n_heads, 3 * hd)
        q, k, v = qkv.chunk(3, dim=-1)
        return q, k, v
    q = attn.q_proj(hidden).view(batch, pos, layout.n_heads, hd)
    k = attn.k_proj(hidden).view(batch, pos, layout.n_kv_heads, hd)
    v = attn.v_proj(hidden).view(batch, pos, layout.n_kv_heads, hd)
    return q, k, v


def head_values(
    attn: nn.Module, layout: HeadLayout, hidden: Float[Tensor, "batch pos d_model"]
) -> Float[Tensor, "batch pos n_kv_heads d_head"]:
    """Value vectors per key/value head (``hook_v``), projection bias included."""
    batch, pos, _ = hidden.shape
    if layout.family in ("llama", "gpt_neo"):
        return attn.v_proj(hidden).view(batch, pos, layout.n_kv_heads, layout.head_dim)
    return _split_fused(attn, layout, hidden)[2]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: Tensor, rotary: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dims of each head (all of them unless partial)."""
    cos, sin = (t.unsqueeze(1) for t in rotary)  # [batch, 1, pos, rotary_dim]
    width = cos.shape[-1]
    rot, rest = x[..., :width], x[..., width:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


def _scaling(attn: nn.Module, layout: HeadLayout) -> float:
    if layout.family == "gpt_neo":
        return 1.0  # GPT-Neo does not scale its attention scores
    return float(attn.scaling)


def _window(attn: nn.Module, layout: HeadLayout) -> int | None:
    if layout.family == "gpt_neo":
        return int(attn.config.window_size) if attn.attention_type == "local" else None
    window = getattr(attn, "sliding_window", None)
    return int(window) if window else None


def _softcap(attn: nn.Module) -> float | None:
    if type(attn).__name__ not in _SOFTCAPPING_CLASSES:
        return None
    cap = getattr(attn, "attn_logit_softcapping", None)
    return float(cap) if cap else None


def _allowed(q_len: int, k_len: int, window: int | None, device: torch.device) -> Tensor:
    """Causal (and sliding-window) allowance ``[q_pos, k_pos]``, queries aligned to the last keys."""
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_idx = torch.arange(k_len, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed &= k_idx > q_idx - window
    return allowed


def head_patterns(
    attn: nn.Module,
    layout: HeadLayout,
    call: AttentionCall,
    heads: list[int] | None = None,
) -> Float[Tensor, "batch n_sel q_pos k_pos"]:
    """Attention patterns (``hook_pattern``) of ``heads`` (all by default), recomputed from ``call``."""
    heads = list(range(layout.n_heads)) if heads is None else list(heads)
    q, k, _ = _split_fused(attn, layout, call.hidden)  # [batch, pos, heads, d_head]
    q = q[:, :, heads]
    k = k[:, :, [layout.kv_head(h) for h in heads]]
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [batch, n_sel, pos, d_head]
    if layout.family in ("llama", "gpt_neox"):
        if call.rotary is None:
            raise ValueError(f"{type(attn).__name__} needs the rotary tables (cos, sin) of its call.")
        q, k = _apply_rotary(q, call.rotary), _apply_rotary(k, call.rotary)
    scores = (q.float() @ k.float().transpose(-1, -2)) * _scaling(attn, layout)  # [batch, n_sel, q, k]
    cap = _softcap(attn)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    lowest = torch.finfo(scores.dtype).min
    q_len, k_len = scores.shape[-2:]
    window = _window(attn, layout)
    mask = call.mask
    if mask is not None and mask.ndim == 2:  # flash attention: the [batch, k_pos] padding mask, 1 = real
        mask = mask.bool()[:, None, None, :]  # causal and window come from _allowed below
        scores = scores.masked_fill(~_allowed(q_len, k_len, window, scores.device), lowest)
    elif mask is None or layout.family == "gpt_neo":  # GPT-Neo applies its own causal/local mask first
        scores = scores.masked_fill(~_allowed(q_len, k_len, window, scores.device), lowest)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :k_len], lowest)
    elif mask is not None:
        scores = (scores + mask[..., :k_len].float()).clamp(min=lowest)
    return torch.softmax(scores, dim=-1).to(call.hidden.dtype)


def ov_weights(
    block: nn.Module, layout: HeadLayout, head: int
) -> tuple[Float[Tensor, "d_head d_model"], Float[Tensor, "d_model d_head"]]:
    """``W_V`` of the key/value head that query head ``head`` reads and ``W_O``'s columns of ``head``."""
    attn = attention_module(block)
    hd = layout.head_dim
    kv = layout.kv_head(head)
    if layout.family == "gpt2":
        d = layout.n_heads * hd
        w_v = attn.c_attn.weight[:, 2 * d + kv * hd : 2 * d + (kv + 1) * hd].T  # Conv1D: [in, out]
        w_o = attn.c_proj.weight[head * hd : (head + 1) * hd, :].T
        return w_v, w_o
    if layout.family == "gpt_neox":
        start = kv * 3 * hd + 2 * hd  # per head: [q | k | v]
        w_v = attn.query_key_value.weight[start : start + hd]
        return w_v, attn.dense.weight[:, head * hd : (head + 1) * hd]
    out = attn.o_proj if layout.family == "llama" else attn.out_proj
    return attn.v_proj.weight[kv * hd : (kv + 1) * hd], out.weight[:, head * hd : (head + 1) * hd]


def input_norm(block: nn.Module) -> nn.Module | None:
    """The norm the block applies to the residual before its attention."""
    for name in ("input_layernorm", "ln_1"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def attention_output_norm(block: nn.Module) -> nn.Module | None:
    """A norm applied to the attention output before it joins the residual (Gemma-2/3), else ``None``."""
    if hasattr(block, "pre_feedforward_layernorm"):  # Gemma: post_attention_layernorm normalises attn out
        return block.post_attention_layernorm
    return None


def norm_direction(norm: nn.Module | None, direction: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """What ``norm`` does to a unit ``direction`` apart from the per-token scale: ``(N(s x) - N(0)) / s``.

    ``s = sqrt(d_model)`` gives the input unit RMS, so an RMSNorm returns ``gain ⊙ x`` (Gemma's ``1 + w``
    included) and a LayerNorm the centred direction, renormalised, times its weight; its bias (``N(0)``)
    is left out like projection biases. ``None`` returns ``direction``.
    """
    if norm is None:
        return direction
    scale = direction.numel() ** 0.5
    probe = torch.stack([direction * scale, torch.zeros_like(direction)])  # [2, d_model]
    out = norm(probe)
    return (out[0] - out[1]) / scale
