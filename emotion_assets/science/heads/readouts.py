"""Readouts of a head's effect: the projection of the last token's residual onto a direction, the OV image
of a direction, attention onto marked tokens, and the role rule of thumb built from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from emotion_assets.science.attention_families import (
    attention_output_norm,
    input_norm,
    norm_direction,
    ov_weights,
)
from emotion_assets.science.heads.layout import check_heads, head_layout
from emotion_assets.science.residual import capture_residuals, decoder_blocks

HeadRole = Literal["mover", "writer", "reader", "other"]


def last_real_index(attention_mask: Tensor) -> Tensor:
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [pos]
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)  # [batch]


def unit_direction(direction: Tensor) -> Tensor:
    direction = direction.detach().flatten().float()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("The readout direction must be a finite, non-zero vector.")
    return direction / norm


def direction_readout(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    unit_direction: Tensor,
    readout_boundary: int,
    copies: int = 1,
) -> Float[Tensor, " rows"]:
    """Projection of the last real token's residual at ``readout_boundary`` onto ``unit_direction``.

    ``copies > 1``: hooks replicate the batch inside the forward; the result has ``copies * batch`` rows.
    """
    hidden = capture_residuals(model, input_ids, attention_mask, [readout_boundary])[:, 0]  # [rows, pos, d]
    if hidden.shape[0] != copies * input_ids.shape[0]:
        raise RuntimeError(
            f"Expected {copies * input_ids.shape[0]} rows at the readout, got {hidden.shape[0]}: the block "
            "inputs were not replicated as expected."
        )
    last = last_real_index(attention_mask).to(hidden.device).repeat(copies)  # [rows]
    resid = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # [batch, d_model]
    return resid @ unit_direction.to(resid.device)


@dataclass(frozen=True)
class OVReport:
    """What head ``(layer, head)``'s OV circuit does to one input direction."""

    layer: int
    head: int
    kv_head: int
    output: Float[Tensor, " d_model"]  # OV image of the unit input direction
    gain: float  # |output| for a unit input (the norm's gain folded in)
    cosines: dict[str, float]  # cosine of output with each given direction
    top_token_ids: list[int]  # tokens the output promotes most through the unembedding
    top_logits: list[float]


def _final_norm(model: nn.Module) -> nn.Module | None:
    for root in (model, getattr(model, "base_model", None)):
        for path in ("model.norm", "norm", "transformer.ln_f", "ln_f", "gpt_neox.final_layer_norm"):
            obj: Any = root
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.Module):
                return obj
    return None


def ov_circuit(
    model: nn.Module,
    layer: int,
    head: int,
    direction_in: Float[Tensor, " d_model"],
    emotion_directions: Mapping[str, Float[Tensor, " d_model"]] | None = None,
    unembed_top_k: int = 10,
) -> OVReport:
    """OV circuit of one head applied to a residual direction, for every attention family.

    ``output = W_O[:, h] @ W_V[kv(h)] @ N_in(x̂)``: ``x̂`` is the unit input direction and ``N_in`` the
    block's input norm without its per-token scale (``attention_families.norm_direction``: an RMSNorm's
    gain ``g ⊙ x̂``, folded in as TransformerLens ``fold_ln`` does; a LayerNorm's centring and weight);
    projection and norm biases are left out. Where the block normalises the attention output before the
    residual (Gemma-2/3), that norm's gain is applied to ``output`` too. ``gain = |output|``. Promoted
    tokens: the top-k of the unembedding of the final norm (its gain) applied to ``output``.
    """
    layout = head_layout(model)
    check_heads(layout, [(layer, head)])
    block = decoder_blocks(model)[layer]
    kv = layout.kv_head(head)
    w_v, w_o = ov_weights(block, layout, head)  # [d_head, d_model], [d_model, d_head]
    x = unit_direction(direction_in).to(device=w_v.device, dtype=w_v.dtype)  # [d_model]
    with torch.no_grad():
        x = norm_direction(input_norm(block), x)
        written = w_o @ (w_v @ x)  # [d_model]
        out_norm = attention_output_norm(block)
        if out_norm is not None and written.norm() > 0:
            written = norm_direction(out_norm, written / written.norm()) * written.norm()
        output = written.float().cpu()  # [d_model]
        cosines = {
            name: float(torch.nn.functional.cosine_similarity(output, d.detach().float().cpu(), dim=0))
            for name, d in (emotion_directions or {}).items()
        }
        top_ids: list[int] = []
        top_logits: list[float] = []
        unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if unembed is not None and unembed_top_k > 0:
            y = output.to(device=unembed.weight.device, dtype=unembed.weight.dtype)
            if y.norm() > 0:
                y = norm_direction(_final_norm(model), y / y.norm()) * y.norm()
            logits = (unembed.weight @ y).float()  # [vocab]
            values, ids = logits.topk(min(unembed_top_k, logits.numel()))
            top_ids, top_logits = ids.tolist(), values.tolist()
    return OVReport(layer, head, kv, output, float(output.norm()), cosines, top_ids, top_logits)


def qk_attention_to_positions(
    patterns: Float[Tensor, "batch n_heads q_pos k_pos"],
    emotion_mask: Bool[Tensor, "batch k_pos"],
    query_position: int = -1,
) -> Float[Tensor, "batch n_heads"]:
    """Attention mass from ``query_position`` (the final token under left padding) onto marked tokens."""
    weights = patterns[:, :, query_position, :].float()  # [batch, n_heads, k_pos]
    return (weights * emotion_mask.to(weights.device)[:, None, :].float()).sum(dim=-1)


def role_heuristic(
    ov_cosine: float,
    ablation_effect: float,
    attention_emotion: float,
    attention_neutral: float,
    *,
    effect_threshold: float,
    cos_threshold: float = 0.2,
    attention_delta: float = 0.05,
) -> HeadRole:
    """A documented rule of thumb for a head's role in carrying an emotion.

    - ``aligned``: the OV image of the emotion direction points along it, ``|ov_cosine| >= cos_threshold``;
    - ``attends``: the final token attends to emotion-word tokens more on emotion than on neutral prompts,
      ``attention_emotion - attention_neutral >= attention_delta``;
    - ``large``: ``|ablation_effect| >= effect_threshold``.

    ``mover`` = attends and aligned (moves emotion content to the final token); ``writer`` = aligned and
    large but not attending; ``reader`` = attends but not aligned; otherwise ``other``.
    """
    aligned = abs(ov_cosine) >= cos_threshold
    attends = attention_emotion - attention_neutral >= attention_delta
    large = abs(ablation_effect) >= effect_threshold
    if attends and aligned:
        return "mover"
    if aligned and large:
        return "writer"
    if attends:
        return "reader"
    return "other"
