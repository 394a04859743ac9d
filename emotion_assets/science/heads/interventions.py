"""Ablate or patch attention heads while a context is open.

Ablation and ``z`` patching are forward pre-hooks on the output projection that rewrite one head's slice of
``z``; the rest of the forward is the model's own (SDPA or eager).

Grouped-query attention: ``z`` slices are per query head, so ablating or patching ``z`` of head ``h``
touches that head only. Values are shared by the query heads of a group, so patching the value head itself
would change every head of the group. To keep ``v_only`` a per-query-head intervention, the group's value
vectors are replaced only inside the recomputation of head ``h``: ``z_h = pattern_h(current run) @
v_patched`` is written into slice ``h`` and the other heads of the group keep their own ``z``. The pattern
is recomputed from the attention module's own input (stashed by a pre-hook on the attention module) with
its own query/key projections and q/k norms, the rotary embeddings the model passed in, its scaling,
soft-capping, sliding window and mask; tests check it against eager ``output_attentions`` and a by-hand
computation.

Patching modes (source and destination runs must have the same ``[batch, pos]``):

- ``z``: copy head ``h``'s output from the source run at the selected query positions;
- ``v_only``: the current run's pattern of head ``h`` over the source run's value vectors (replaced at the
  selected key positions);
- ``pattern_v``: the source pattern of head ``h`` over the source values, ``z_h = pattern_src @ v_src``,
  written at the selected query positions. Both factors come from the source, so this equals ``z``
  patching up to float rounding; it is computed from the captured pattern and values so the two paths
  check each other.

Neutral→emotion and emotion→neutral are only which run is the source and which the destination. Pairs are
matched by index and aligned by position: tokenize both sides together with left padding so they share a
width and their last tokens line up; pass ``positions`` (``shared_positions``) to patch only where both
prompts have real tokens. Every context manager removes its hooks on exit, also when the body raises. The
hooks assume one full forward per call (no KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from emotion_assets.science.attention_families import (
    AttentionCall,
    attention_module,
    head_patterns,
    head_values,
    output_projection,
    read_call,
)
from emotion_assets.science.heads.capture import AttentionCapture, z_hook
from emotion_assets.science.heads.layout import Head, check_heads, head_layout, heads_by_layer
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import decoder_blocks

AblationMode = Literal["zero", "mean"]
PatchMode = Literal["z", "v_only", "pattern_v"]
PATCH_MODES: tuple[PatchMode, ...] = ("z", "v_only", "pattern_v")


@contextmanager
def ablate_heads(
    model: nn.Module,
    heads: Sequence[Head],
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Iterator[None]:
    """Zero-ablate or mean-ablate the output ``z`` of ``heads`` (``(layer, head)`` pairs) at every position."""
    layout = head_layout(model)
    heads = check_heads(layout, heads)
    if mode not in ("zero", "mean"):
        raise ValueError(f"Ablation mode must be 'zero' or 'mean', got {mode!r}.")
    grouped = heads_by_layer(heads)
    if mode == "mean":
        missing = [ly for ly in grouped if mean_z is None or ly not in mean_z]
        if missing:
            raise ValueError(f"Mean ablation needs mean_z for layers {missing} (see mean_head_outputs).")
    blocks = decoder_blocks(model)

    def edit_for(layer: int, head_ids: list[int]) -> Callable[[Tensor], Tensor]:
        def edit(z: Tensor) -> Tensor:  # z: [batch, pos, n_heads, d_head]
            keep = torch.ones(layout.n_heads, 1, dtype=z.dtype, device=z.device)
            keep[head_ids] = 0
            out = z * keep  # [batch, pos, n_heads, d_head]
            if mode == "mean":
                assert mean_z is not None
                out = out + (1 - keep) * mean_z[layer].to(device=z.device, dtype=z.dtype)
            return out

        return edit

    with HookSet() as hooks:
        for layer, head_ids in grouped.items():
            hooks.pre(
                output_projection(blocks[layer]), z_hook(layout, edit_for(layer, head_ids)), with_kwargs=False
            )
        yield


def _check_source(name: str, tensor: Tensor, shape: tuple[int, ...], layer: int) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(
            f"{name} for layer {layer} has shape {tuple(tensor.shape)}, the patched run needs {shape}: source "
            "and destination must share [batch, pos] (tokenize the pair together with left padding)."
        )


def _select(positions: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``positions`` ([batch, pos]) is True, else ``old``; both ``[batch, pos, d_head]``."""
    if positions is None:
        return new
    if positions.shape != new.shape[:2]:
        raise ValueError(f"positions has shape {tuple(positions.shape)}, expected {tuple(new.shape[:2])}.")
    return torch.where(positions.to(new.device)[:, :, None], new, old)


@contextmanager
def patch_heads(
    model: nn.Module,
    heads: Sequence[Head],
    source_z: Mapping[int, Float[Tensor, "batch pos n_heads d_head"]] | None = None,
    *,
    mode: PatchMode = "z",
    source_attention: AttentionCapture | None = None,
    positions: Bool[Tensor, "batch pos"] | None = None,
) -> Iterator[None]:
    """Patch ``heads`` from a source run while the context is open (modes: see the module docstring).

    ``z`` needs ``source_z`` (``capture_head_outputs``); ``v_only`` and ``pattern_v`` need
    ``source_attention`` (``capture_attention``). ``positions`` selects query positions (``z``,
    ``pattern_v``) or key positions whose values are replaced (``v_only``); default all.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"Patch mode must be one of {PATCH_MODES}, got {mode!r}.")
    layout = head_layout(model)
    heads = check_heads(layout, heads)
    grouped = heads_by_layer(heads)
    blocks = decoder_blocks(model)
    if mode == "z":
        missing = [ly for ly in grouped if source_z is None or ly not in source_z]
        if missing:
            raise ValueError(f"z patching needs source_z for layers {missing}.")
    else:
        need = "patterns" if mode == "pattern_v" else "values"
        if source_attention is None:
            raise ValueError(f"Patch mode {mode!r} needs source_attention (capture_attention).")
        missing = [
            ly
            for ly in grouped
            if ly not in source_attention.values or ly not in getattr(source_attention, need)
        ]
        if missing:
            raise ValueError(f"source_attention lacks {need}/values for layers {missing}.")
    stash: dict[int, AttentionCall] = {}

    def stash_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            stash[layer] = read_call(module, args, kwargs)

        return hook

    def edit_for(layer: int, head_ids: list[int]) -> Callable[[Tensor], Tensor]:
        attn = attention_module(blocks[layer])

        def edit(z: Tensor) -> Tensor:  # z: [batch, pos, n_heads, d_head]
            shape = tuple(z.shape)
            out = z.clone()
            if mode == "z":
                assert source_z is not None
                src = source_z[layer].to(device=z.device, dtype=z.dtype)
                _check_source("source_z", src, shape, layer)
                for h in head_ids:
                    out[:, :, h] = _select(positions, src[:, :, h], z[:, :, h])
                return out
            assert source_attention is not None
            v_src = source_attention.values[layer].to(device=z.device, dtype=z.dtype)
            _check_source("source values", v_src, (*shape[:2], layout.n_kv_heads, shape[3]), layer)
            if mode == "pattern_v":
                pattern = source_attention.patterns[layer].to(device=z.device, dtype=z.dtype)
                _check_source(
                    "source pattern", pattern, (shape[0], layout.n_heads, shape[1], shape[1]), layer
                )
                for h in head_ids:
                    z_h = pattern[:, h] @ v_src[:, :, layout.kv_head(h)]  # [batch, q_pos, d_head]
                    out[:, :, h] = _select(positions, z_h, z[:, :, h])
                return out
            call = stash.pop(layer)
            pattern = head_patterns(attn, layout, call, head_ids)  # [batch, n_sel, q, k]
            v_cur = head_values(attn, layout, call.hidden)  # [batch, pos, n_kv_heads, d_head]
            for i, h in enumerate(head_ids):
                kv = layout.kv_head(h)
                v_patched = _select(positions, v_src[:, :, kv], v_cur[:, :, kv])  # [batch, k_pos, d_head]
                out[:, :, h] = pattern[:, i] @ v_patched
            return out

        return edit

    with HookSet() as hooks:
        for layer, head_ids in grouped.items():
            if mode == "v_only":
                hooks.pre(attention_module(blocks[layer]), stash_hook(layer))
            hooks.pre(
                output_projection(blocks[layer]), z_hook(layout, edit_for(layer, head_ids)), with_kwargs=False
            )
        try:
            yield
        finally:
            stash.clear()
