"""Capture per-head outputs ``z``, attention patterns and values, with hooks that stop the forward early.

Head output. The output of query head ``h`` at layer ``L`` is its slice of the **input** of the attention
output projection (``self_attn.o_proj`` for Llama, Qwen and Gemma, ``attn.c_proj`` for GPT-2,
``attention.dense`` for GPT-NeoX, ``attn.attention.out_proj`` for GPT-Neo): the
``[batch, pos, n_heads * head_dim]`` input viewed as ``[batch, pos, n_heads, head_dim]``, i.e.
TransformerLens ``blocks.{L}.attn.hook_z``. Patterns and values are recomputed from each attention
module's input (``science/attention_families.py``), so they work under SDPA as well as eager attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from emotion_assets.science.attention_families import (
    attention_module,
    head_patterns,
    head_values,
    output_projection,
    read_call,
)
from emotion_assets.science.heads.layout import HeadGeometry, HeadLayout, head_layout
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import _forward_kwargs, _StopForward, decoder_blocks


def z_hook(layout: HeadLayout, edit: Callable[[Tensor], Tensor]) -> Callable[..., tuple]:
    """A pre-hook on the output projection that rewrites its input viewed as per-head ``z``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # [batch, pos, n_heads * d_head]
        z = x.reshape(*x.shape[:-1], layout.n_heads, layout.head_dim)  # [batch, pos, n_heads, d_head]
        return (edit(z).reshape(x.shape), *args[1:])

    return hook


def layers_to_capture(layout: HeadGeometry, layers: Sequence[int]) -> list[int]:
    """``layers`` sorted without repeats; an error unless they are a non-empty subset of the model's layers."""
    wanted = sorted(set(int(layer) for layer in layers))
    if not wanted or not all(0 <= ly < layout.n_layers for ly in wanted):
        raise ValueError(
            f"layers must be a non-empty subset of 0..{layout.n_layers - 1}, got {list(layers)}."
        )
    return wanted


def run_stopped(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> None:
    """One forward with mask-derived position ids, stopped early by a hook raising ``_StopForward``."""
    with torch.inference_mode(), contextlib.suppress(_StopForward):
        model(**_forward_kwargs(model, input_ids, attention_mask))


def capture_head_outputs(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layers: Sequence[int],
) -> dict[int, Float[Tensor, "batch pos n_heads d_head"]]:
    """Per-head outputs ``z`` (``hook_z``) at ``layers``; the forward stops after the last one.

    Hooks registered earlier (an active ablation or patch) act before the capture, so it sees their edits.
    """
    layout = head_layout(model)
    blocks = decoder_blocks(model)
    wanted = layers_to_capture(layout, layers)
    captured: dict[int, Tensor] = {}

    def record(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]  # [batch, pos, n_heads * d_head]
            captured[layer] = x.reshape(*x.shape[:-1], layout.n_heads, layout.head_dim).clone()
            if layer == wanted[-1]:
                raise _StopForward

        return hook

    with HookSet() as hooks:
        for layer in wanted:
            hooks.pre(output_projection(blocks[layer]), record(layer), with_kwargs=False)
        run_stopped(model, input_ids, attention_mask)
    return {layer: captured[layer] for layer in wanted}


@dataclass(frozen=True)
class AttentionCapture:
    """Attention patterns per query head and value vectors per key/value head, by layer."""

    patterns: dict[int, Float[Tensor, "batch n_heads q_pos k_pos"]]
    values: dict[int, Float[Tensor, "batch pos n_kv_heads d_head"]]


def capture_attention(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layers: Sequence[int],
) -> AttentionCapture:
    """Patterns (``hook_pattern``) and values (``hook_v``) at ``layers``.

    Recomputed from each attention module's input, so they work under SDPA as well as eager attention.
    """
    layout = head_layout(model)
    blocks = decoder_blocks(model)
    wanted = layers_to_capture(layout, layers)
    patterns: dict[int, Tensor] = {}
    values: dict[int, Tensor] = {}

    def record(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = read_call(module, args, kwargs)
            patterns[layer] = head_patterns(module, layout, call)
            values[layer] = head_values(module, layout, call.hidden)
            if layer == wanted[-1]:
                raise _StopForward

        return hook

    with HookSet() as hooks:
        for layer in wanted:
            hooks.pre(attention_module(blocks[layer]), record(layer))
        run_stopped(model, input_ids, attention_mask)
    return AttentionCapture(
        patterns={ly: patterns[ly] for ly in wanted}, values={ly: values[ly] for ly in wanted}
    )


def mean_head_outputs(
    head_outputs: Mapping[int, Float[Tensor, "batch pos n_heads d_head"]],
    attention_mask: Int[Tensor, "batch pos"],
) -> dict[int, Float[Tensor, "n_heads d_head"]]:
    """Mean ``z`` over real (non-pad) tokens of all prompts: the reference for mean ablation."""
    keep = attention_mask.bool()  # [batch, pos]
    return {layer: z[keep].mean(dim=0) for layer, z in head_outputs.items()}


def shared_positions(
    mask_a: Int[Tensor, "batch pos"], mask_b: Int[Tensor, "batch pos"]
) -> Bool[Tensor, "batch pos"]:
    """Positions where both runs of a left-padded pair hold a real token."""
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"Paired batches differ in shape: {tuple(mask_a.shape)} vs {tuple(mask_b.shape)}.")
    return mask_a.bool() & mask_b.bool()
