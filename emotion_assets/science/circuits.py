"""Circuit-level readouts: the emotion readout of a batch and zero-ablation of whole MLP sublayers.

The readout is the one head screening uses: the projection of the last real token's residual at a block
boundary (``resid_pre`` of block ``boundary``, or the final pre-norm residual for ``boundary == n_layers``)
onto the unit emotion direction. A joint intervention's effect is the mean change of this readout, so it
can be set against the sum of single-component effects measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import capture_residuals, decoder_blocks


def _mlp(block: nn.Module) -> nn.Module:
    module = getattr(block, "mlp", None)
    if not isinstance(module, nn.Module):
        raise NotImplementedError(f"{type(block).__name__} has no `mlp` submodule to ablate.")
    return module


def _zeros_like_output(output: Any) -> Any:
    if isinstance(output, Tensor):
        return torch.zeros_like(output)
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    raise TypeError(f"Cannot zero an MLP output of type {type(output).__name__}.")


@contextmanager
def ablate_mlps(model: nn.Module, layers: Sequence[int]) -> Iterator[None]:
    """Zero the output of the MLP sublayer of every block in ``layers`` (at every position) while open.

    The block's residual addition then adds nothing for its MLP; hooks are removed on exit.
    """
    blocks = decoder_blocks(model)
    wanted = sorted({int(layer) for layer in layers})
    bad = [ly for ly in wanted if not 0 <= ly < len(blocks)]
    if bad:
        raise ValueError(f"MLP layers {bad} out of range 0..{len(blocks) - 1}.")

    def zero(_module: nn.Module, _args: tuple, output: Any) -> Any:
        return _zeros_like_output(output)

    with HookSet() as hooks:
        for layer in wanted:
            hooks.post(_mlp(blocks[layer]), zero)
        yield


def readout_projection(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    boundary: int,
) -> Float[Tensor, " batch"]:
    """Projection of each prompt's last real token's residual at ``boundary`` onto the unit ``direction``.

    Active hooks (ablations, patches) act on the forward. Float32, on CPU.
    """
    unit = direction.detach().flatten().float()
    norm = unit.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("The readout direction must be a finite, non-zero vector.")
    unit = unit / norm
    hidden = capture_residuals(model, input_ids, attention_mask, [boundary])[:, 0]  # [batch, pos, d_model]
    if hidden.shape[-1] != unit.numel():
        raise ValueError(f"direction has {unit.numel()} dims, the residual has {hidden.shape[-1]}.")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [pos]
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)  # [batch]
    if (last < 0).any():
        raise ValueError("Every row needs at least one real token.")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    resid = hidden[rows, last.to(hidden.device)].float()  # [batch, d_model]
    return (resid @ unit.to(resid.device)).cpu()
