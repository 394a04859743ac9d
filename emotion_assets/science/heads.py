"""Attention-head analysis: capture, ablation, patching, screening, attribution and OV/QK readouts.

Head output. The output of query head ``h`` at layer ``L`` is its slice of the **input** of the attention
output projection (``self_attn.o_proj`` for Llama, Qwen and Gemma, ``attn.c_proj`` for GPT-2,
``attention.dense`` for GPT-NeoX, ``attn.attention.out_proj`` for GPT-Neo): the
``[batch, pos, n_heads * head_dim]`` input viewed as ``[batch, pos, n_heads, head_dim]``, i.e.
TransformerLens ``blocks.{L}.attn.hook_z``. Ablation and ``z`` patching are forward pre-hooks on that
projection that rewrite one slice; the rest of the forward is the model's own (SDPA or eager).

Grouped-query attention. With ``n_heads`` query heads and ``n_kv_heads`` key/value heads, query head ``h``
reads key/value head ``h // (n_heads // n_kv_heads)``. ``z`` slices are per query head, so ablating or
patching ``z`` of head ``h`` touches that head only. Values are shared by the query heads of a group, so
patching the value head itself would change every head of the group. To keep ``v_only`` a per-query-head
intervention, the group's value vectors are replaced only inside the recomputation of head ``h``:
``z_h = pattern_h(current run) @ v_patched`` is written into slice ``h`` and the other heads of the group
keep their own ``z``. The pattern is recomputed from the attention module's own input (stashed by a
pre-hook on the attention module) with its own query/key projections and q/k norms, the rotary embeddings
the model passed in, its scaling, soft-capping, sliding window and mask; tests check it against eager
``output_attentions`` and a by-hand computation. Every attention family of the registry is supported
(Llama, Qwen3, Gemma-3, GPT-2, GPT-NeoX, GPT-Neo): ``science/attention_families.py`` says where each keeps
its heads.

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
prompts have real tokens.

Every context manager removes its hooks on exit, also when the body raises. The hooks assume one full
forward per call (no KV cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from emotion_assets.science.attention_families import (
    AttentionCall,
    HeadLayout,
    attention_module,
    attention_output_norm,
    head_layout,
    head_patterns,
    head_values,
    input_norm,
    norm_direction,
    output_projection,
    ov_weights,
    read_call,
)
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import (
    _block_output,
    _forward_kwargs,
    _hidden_from_call,
    _StopForward,
    capture_residuals,
    decoder_blocks,
)

AblationMode = Literal["zero", "mean"]
PatchMode = Literal["z", "v_only", "pattern_v"]
PATCH_MODES: tuple[PatchMode, ...] = ("z", "v_only", "pattern_v")
HeadRole = Literal["mover", "writer", "reader", "other"]
Head = tuple[int, int]  # (layer, query head)


def _attention(block: nn.Module) -> nn.Module:
    return attention_module(block)


def _out_proj(block: nn.Module) -> nn.Module:
    return output_projection(block)


def _check_heads(layout: HeadLayout, heads: Sequence[Head]) -> list[Head]:
    heads = [(int(layer), int(head)) for layer, head in heads]
    bad = [(ly, h) for ly, h in heads if not (0 <= ly < layout.n_layers and 0 <= h < layout.n_heads)]
    if bad:
        raise ValueError(f"Heads {bad} out of range ({layout.n_layers} layers × {layout.n_heads} heads).")
    return heads


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(layer, []).append(head)
    return grouped


def _z_hook(layout: HeadLayout, edit: Callable[[Tensor], Tensor]) -> Callable[..., tuple]:
    """A pre-hook on the output projection that rewrites its input viewed as per-head ``z``."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # [batch, pos, n_heads * d_head]
        z = x.reshape(*x.shape[:-1], layout.n_heads, layout.head_dim)  # [batch, pos, n_heads, d_head]
        return (edit(z).reshape(x.shape), *args[1:])

    return hook


def _run(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> None:
    """One forward with mask-derived position ids, stopped early by a hook raising ``_StopForward``."""
    with torch.inference_mode(), contextlib.suppress(_StopForward):
        model(**_forward_kwargs(model, input_ids, attention_mask))


# --- capture -----------------------------------------------------------------------------------------


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
    wanted = sorted(set(int(layer) for layer in layers))
    if not wanted or not all(0 <= ly < layout.n_layers for ly in wanted):
        raise ValueError(
            f"layers must be a non-empty subset of 0..{layout.n_layers - 1}, got {list(layers)}."
        )
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
            hooks.pre(_out_proj(blocks[layer]), record(layer), with_kwargs=False)
        _run(model, input_ids, attention_mask)
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
    wanted = sorted(set(int(layer) for layer in layers))
    if not wanted or not all(0 <= ly < layout.n_layers for ly in wanted):
        raise ValueError(
            f"layers must be a non-empty subset of 0..{layout.n_layers - 1}, got {list(layers)}."
        )
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
            hooks.pre(_attention(blocks[layer]), record(layer))
        _run(model, input_ids, attention_mask)
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


# --- ablation and patching -----------------------------------------------------------------------------


@contextmanager
def ablate_heads(
    model: nn.Module,
    heads: Sequence[Head],
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Iterator[None]:
    """Zero-ablate or mean-ablate the output ``z`` of ``heads`` (``(layer, head)`` pairs) at every position."""
    layout = head_layout(model)
    heads = _check_heads(layout, heads)
    if mode not in ("zero", "mean"):
        raise ValueError(f"Ablation mode must be 'zero' or 'mean', got {mode!r}.")
    grouped = _by_layer(heads)
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
            hooks.pre(_out_proj(blocks[layer]), _z_hook(layout, edit_for(layer, head_ids)), with_kwargs=False)
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
    heads = _check_heads(layout, heads)
    grouped = _by_layer(heads)
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
        attn = _attention(blocks[layer])

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
                hooks.pre(_attention(blocks[layer]), stash_hook(layer))
            hooks.pre(_out_proj(blocks[layer]), _z_hook(layout, edit_for(layer, head_ids)), with_kwargs=False)
        try:
            yield
        finally:
            stash.clear()


# --- screening by ablation -----------------------------------------------------------------------------


def _last_real_index(attention_mask: Tensor) -> Tensor:
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [pos]
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)  # [batch]


def _unit(direction: Tensor) -> Tensor:
    direction = direction.detach().flatten().float()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("The readout direction must be a finite, non-zero vector.")
    return direction / norm


def _readout(
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
    last = _last_real_index(attention_mask).to(hidden.device).repeat(copies)  # [rows]
    resid = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()  # [batch, d_model]
    return resid @ unit_direction.to(resid.device)


def _check_readout(layout: HeadLayout, readout_boundary: int) -> None:
    if not 0 <= readout_boundary <= layout.n_layers:
        raise ValueError(f"readout_boundary {readout_boundary} out of range 0..{layout.n_layers}.")


def _grow_hook(batch: int, copies_in: int, copies_out: int) -> Callable[..., tuple[tuple, dict]]:
    """A block pre-hook that appends ``copies_out - copies_in`` copies of the clean rows to the batch.

    The residual stream enters with ``copies_in * batch`` rows whose first ``batch`` rows are the clean
    run; the new copies are taken from those. Every other batch-sized block input (masks, rotary
    embeddings, positions) is computed once per forward by the model, so it is repeated ``copies_out``
    times.
    """

    def expand(obj: Any) -> Any:
        if isinstance(obj, Tensor) and obj.ndim >= 2 and obj.shape[0] == batch:
            return obj.repeat(copies_out, *([1] * (obj.ndim - 1)))
        if isinstance(obj, tuple | list):
            return type(obj)(expand(o) for o in obj)
        return obj

    def grow(hidden: Tensor) -> Tensor:  # [copies_in * batch, pos, d] -> [copies_out * batch, pos, d]
        if hidden.shape[0] != copies_in * batch:
            raise RuntimeError(
                f"Expected {copies_in * batch} rows entering the block, got {hidden.shape[0]}."
            )
        if copies_out == copies_in:
            return hidden
        extra = hidden[:batch].repeat(copies_out - copies_in, *([1] * (hidden.ndim - 1)))
        return torch.cat([hidden, extra], dim=0)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args and isinstance(args[0], Tensor):
            args = (grow(args[0]), *(expand(a) for a in args[1:]))
            return args, {key: expand(value) for key, value in kwargs.items()}
        new_kwargs = {key: expand(value) for key, value in kwargs.items() if key != "hidden_states"}
        new_kwargs["hidden_states"] = grow(_hidden_from_call(args, kwargs))
        return tuple(expand(a) for a in args), new_kwargs

    return hook


def _length_groups(
    input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> list[tuple[Int[Tensor, "group length"], Int[Tensor, "group length"]]]:
    """The prompts with their padding removed, grouped by real length: ``(ids, all-ones mask)`` per group."""
    real = attention_mask.bool()
    lengths = real.sum(dim=1)  # [batch]
    if bool((lengths == 0).any()):
        raise ValueError("Every prompt needs at least one real token (a row of the attention mask is all 0).")
    groups = []
    for length in sorted(set(lengths.tolist())):
        rows = (lengths == length).nonzero().flatten().tolist()
        ids = torch.stack([input_ids[r][real[r]] for r in rows])  # [group, length]
        groups.append((ids, torch.ones_like(ids)))
    return groups


def _ablation_pass(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    unit: Float[Tensor, " d_model"],
    readout_boundary: int,
    chunk: Sequence[Head],
    mode: AblationMode,
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None,
) -> Float[Tensor, "n_chunk batch"]:
    """Readout change for each head of ``chunk`` (sorted by layer) on each prompt, in one forward.

    Copy 0 of the batch is the clean run; copy ``1 + j`` ablates ``chunk[j]`` and joins at its layer.
    """
    layout = head_layout(model)
    blocks = decoder_blocks(model)
    batch = input_ids.shape[0]
    joined_by: dict[int, int] = {}  # layer -> copies present after that layer's pre-hook
    for j, (layer, _) in enumerate(chunk):
        joined_by[layer] = j + 2
    copies = len(chunk) + 1
    with HookSet() as hooks:
        present = 1
        for layer in range(chunk[0][0], readout_boundary):
            after = joined_by.get(layer, present)
            hooks.pre(blocks[layer], _grow_hook(batch, present, after))
            present = after
        for layer, rows in joined_by.items():
            ablated = torch.zeros(rows * batch, layout.n_heads, dtype=torch.bool)  # [rows, n_heads]
            for j, (head_layer, head) in enumerate(chunk):
                if head_layer == layer:
                    ablated[(j + 1) * batch : (j + 2) * batch, head] = True

            def edit(z: Tensor, ablated: Tensor = ablated, layer: int = layer) -> Tensor:
                drop = ablated.to(z.device)[:, None, :, None]  # [rows, 1, n_heads, 1]
                if mode == "mean":
                    assert mean_z is not None
                    fill = mean_z[layer].to(device=z.device, dtype=z.dtype)  # [n_heads, d_head]
                    return torch.where(drop, fill, z)
                return z.masked_fill(drop, 0.0)

            hooks.pre(_out_proj(blocks[layer]), _z_hook(layout, edit), with_kwargs=False)
        readout = _readout(model, input_ids, attention_mask, unit, readout_boundary, copies)
    readout = readout.view(copies, batch)  # [copies, batch]
    return readout[1:] - readout[:1]


def screen_heads_by_ablation(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    heads: Sequence[Head],
    heads_per_pass: int = 90,
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Float[Tensor, " n_screened"]:
    """Ablation effect of each head on the readout, many heads per forward pass.

    Score of a head = mean over prompts of the change, when the head is ablated at every position, in the
    projection of the last real token's residual at ``readout_boundary`` onto the unit ``direction``.
    Heads at layers ``>= readout_boundary`` cannot reach the readout and score exactly 0 without a pass.

    The batch dimension is spent on heads, not on padding: the prompts are regrouped by real length with
    their padding removed (positions still start at 0, as in the padded run). Heads are sorted by layer
    and taken ``heads_per_pass`` at a time. A pass runs a group's clean prompts up to the first layer of
    its heads; from there the batch grows: a pre-hook on each block appends one copy of the clean rows for
    every head of that block's layer (and repeats the masks, rotary embeddings and positions to match),
    and an output-projection pre-hook ablates head ``j`` in copy ``j`` only. Each copy therefore runs
    exactly the blocks between its head and the readout, as that head's own forward would, but inside
    large matrix products; the clean copy that travels along is the reference. The forward stops at the
    readout boundary. Scores equal ``screen_heads_loop`` up to float rounding.
    """
    layout = head_layout(model)
    heads = _check_heads(layout, heads)
    _check_readout(layout, readout_boundary)
    if heads_per_pass < 1:
        raise ValueError(f"heads_per_pass must be >= 1, got {heads_per_pass}.")
    if mode == "mean" and (
        mean_z is None or any(ly not in mean_z for ly, _ in heads if ly < readout_boundary)
    ):
        raise ValueError("Mean ablation needs mean_z for every screened layer (see mean_head_outputs).")
    unit = _unit(direction)
    totals = torch.zeros(len(heads), dtype=torch.float64)
    active = sorted((i for i, (ly, _) in enumerate(heads) if ly < readout_boundary), key=lambda i: heads[i])
    for ids, mask in _length_groups(input_ids, attention_mask):
        for start in range(0, len(active), heads_per_pass):
            chunk = active[start : start + heads_per_pass]
            change = _ablation_pass(
                model, ids, mask, unit, readout_boundary, [heads[i] for i in chunk], mode, mean_z
            )  # [len(chunk), group]
            totals[chunk] += change.sum(dim=1).double().cpu()
    return (totals / input_ids.shape[0]).float()


def ablation_effects_per_prompt(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    heads: Sequence[Head],
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Float[Tensor, "batch n_screened"]:
    """Per-prompt change of the readout when each head alone is ablated, one full forward per head.

    Column ``j`` is ``heads[j]``; heads at layers ``>= readout_boundary`` cannot reach the readout and stay 0.
    """
    layout = head_layout(model)
    heads = _check_heads(layout, heads)
    _check_readout(layout, readout_boundary)
    unit = _unit(direction)
    clean = _readout(model, input_ids, attention_mask, unit, readout_boundary)  # [batch]
    effects = torch.zeros(input_ids.shape[0], len(heads))
    for i, head in enumerate(heads):
        if head[0] >= readout_boundary:
            continue
        with ablate_heads(model, [head], mode=mode, mean_z=mean_z):
            ablated = _readout(model, input_ids, attention_mask, unit, readout_boundary)
        effects[:, i] = (ablated - clean).cpu()
    return effects


def screen_heads_loop(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    direction: Float[Tensor, " d_model"],
    readout_boundary: int,
    heads: Sequence[Head],
    mode: AblationMode = "zero",
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Float[Tensor, " n_screened"]:
    """The same scores as ``screen_heads_by_ablation``, one full forward per head (the baseline)."""
    effects = ablation_effects_per_prompt(
        model, input_ids, attention_mask, direction, readout_boundary, heads, mode, mean_z
    )  # [batch, n_screened]
    return effects.mean(dim=0)


# --- attribution patching ------------------------------------------------------------------------------


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
    _check_readout(layout, readout_boundary)
    unit = _unit(direction)
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
            hooks.pre(_out_proj(blocks[layer]), add_delta(layer), with_kwargs=False)
        if readout_boundary < layout.n_layers:
            hooks.pre(blocks[readout_boundary], read_pre)
        else:
            hooks.post(blocks[-1], read_post)
        with contextlib.suppress(_StopForward):
            model(**_forward_kwargs(model, input_ids, attention_mask))
        resid = captured["resid"]  # [batch, pos, d_model]
        last = _last_real_index(attention_mask).to(resid.device)  # [batch]
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


# --- OV / QK readouts and roles ------------------------------------------------------------------------


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
    _check_heads(layout, [(layer, head)])
    block = decoder_blocks(model)[layer]
    kv = layout.kv_head(head)
    w_v, w_o = ov_weights(block, layout, head)  # [d_head, d_model], [d_model, d_head]
    x = _unit(direction_in).to(device=w_v.device, dtype=w_v.dtype)  # [d_model]
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
