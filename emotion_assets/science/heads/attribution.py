"""Attribution patching: linear estimates of patching and ablation effects for every head at once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emotion_assets.science.attention_families import output_projection
from emotion_assets.science.heads.capture import capture_head_outputs, shared_positions
from emotion_assets.science.heads.layout import check_readout, head_layout
from emotion_assets.science.heads.readouts import last_real_index, unit_direction
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import (
    _block_output,
    _forward_kwargs,
    _hidden_from_call,
    _StopForward,
    decoder_blocks,
)


def head_output_gradients(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    reduction: Literal["mean", "sum"] = "mean",
    extra_hooks: Callable[[HookSet, int], None] | None = None,
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """``z`` of every layer before the readout and the gradient of the readout metric with respect to it.

    Metric: mean (or sum, ``reduction``) over prompts of the projection of the last real token's residual
    at ``readout_boundary`` onto the unit ``direction``. One forward and one backward; gradients are total
    derivatives (through every later layer). Parameter gradients are neither computed nor stored.
    ``extra_hooks(hooks, layer)`` may register more hooks per layer on the same forward (e.g. to record
    the layer's inputs). Returns ``(z, grad)``, each ``{layer: [batch, pos, n_heads, d_head]}``.
    """
    layout = head_layout(model)
    check_readout(layout, readout_boundary)
    unit = unit_direction(direction)
    blocks = decoder_blocks(model)
    layers = list(range(readout_boundary))
    zs: dict[int, Tensor] = {}
    deltas: dict[int, Tensor] = {}
    captured: dict[str, Tensor] = {}

    def add_delta(layer: int) -> Callable[..., tuple]:
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]  # [batch, pos, n_heads * d_head]
            delta = torch.zeros_like(x, requires_grad=True)
            zs[layer] = x.detach().reshape(*x.shape[:-1], layout.n_heads, layout.head_dim)
            deltas[layer] = delta
            return (x + delta, *args[1:])

        return hook

    def read_pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["resid"] = _hidden_from_call(args, kwargs)
        raise _StopForward

    def read_post(_module: nn.Module, _args: tuple, output: Any) -> None:
        captured["resid"] = _block_output(output)
        raise _StopForward

    if not layers:
        return {}, {}
    with HookSet() as hooks, torch.inference_mode(False), torch.enable_grad():
        for layer in layers:
            if extra_hooks is not None:
                extra_hooks(hooks, layer)
            hooks.pre(output_projection(blocks[layer]), add_delta(layer), with_kwargs=False)
        if readout_boundary < layout.n_layers:
            hooks.pre(blocks[readout_boundary], read_pre)
        else:
            hooks.post(blocks[-1], read_post)
        with contextlib.suppress(_StopForward):
            model(**_forward_kwargs(model, input_ids, attention_mask))
        resid = captured["resid"]  # [batch, pos, d_model]
        last = last_real_index(attention_mask).to(resid.device)  # [batch]
        rows = torch.arange(resid.shape[0], device=resid.device)
        projection = resid[rows, last].float() @ unit.to(resid.device)  # [batch]
        metric = projection.mean() if reduction == "mean" else projection.sum()
        grads = torch.autograd.grad(metric, [deltas[ly] for ly in layers])
    shape = (layout.n_heads, layout.head_dim)
    return zs, {ly: g.reshape(*g.shape[:-1], *shape) for ly, g in zip(layers, grads, strict=True)}


def attribution_scores(
    model: nn.Module,
    emotion_batch: Mapping[str, Tensor],
    neutral_batch: Mapping[str, Tensor],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    positions: Literal["all", "last"] = "all",
) -> Float[Tensor, "n_layers n_heads"]:
    """Attribution patching of emotion→neutral ``z`` patching, for every head in one backward pass.

    Estimate for head ``(L, h)``: ``sum (z_emotion - z_neutral) · dM/dz``, the gradient taken on the
    neutral run, ``M`` the readout metric of ``head_output_gradients``. Summed over ``d_head`` and over
    positions where both prompts of a pair have real tokens (``all``, the linear estimate of patching
    every position) or the last position only (``last``); averaged over pairs (``M`` is already a mean,
    so the sum over the batch is taken). Batches hold ``input_ids`` and ``attention_mask`` of the same
    shape, pairs by row, left-padded so positions align. Layers ``>= readout_boundary`` score 0.
    """
    layout = head_layout(model)
    emo_ids, emo_mask = emotion_batch["input_ids"], emotion_batch["attention_mask"]
    neu_ids, neu_mask = neutral_batch["input_ids"], neutral_batch["attention_mask"]
    shared = shared_positions(emo_mask, neu_mask)  # [batch, pos]
    if positions == "last":
        shared = torch.zeros_like(shared)
        shared[:, -1] = True
    elif positions != "all":
        raise ValueError(f"positions must be 'all' or 'last', got {positions!r}.")
    scores = torch.zeros(layout.n_layers, layout.n_heads)
    if readout_boundary == 0:
        return scores
    z_emotion = capture_head_outputs(model, emo_ids, emo_mask, range(readout_boundary))
    z_neutral, grads = head_output_gradients(model, neu_ids, neu_mask, direction, readout_boundary)
    for layer, grad in grads.items():
        diff = (z_emotion[layer] - z_neutral[layer]).float()  # [batch, pos, n_heads, d_head]
        weight = shared.to(grad.device)[:, :, None, None].float()
        scores[layer] = (diff * grad.float() * weight).sum(dim=(0, 1, 3)).cpu()
    return scores


def ablation_attribution(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
) -> Float[Tensor, "n_layers n_heads"]:
    """Linear estimate of zero-ablation effects, ``sum (0 - z) · dM/dz`` over all positions and ``d_head``.

    The first-order counterpart of ``screen_heads_by_ablation`` (zero mode) for every head at once.
    """
    layout = head_layout(model)
    scores = torch.zeros(layout.n_layers, layout.n_heads)
    zs, grads = head_output_gradients(model, input_ids, attention_mask, direction, readout_boundary)
    for layer, grad in grads.items():
        scores[layer] = (-zs[layer].float() * grad.float()).sum(dim=(0, 1, 3)).cpu()
    return scores
