"""Screen every head by its ablation effect on a readout, many heads per forward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emotion_assets.science.attention_families import output_projection
from emotion_assets.science.heads.capture import z_hook
from emotion_assets.science.heads.interventions import AblationMode, ablate_heads
from emotion_assets.science.heads.layout import Head, check_heads, check_readout, head_layout
from emotion_assets.science.heads.readouts import direction_readout, unit_direction
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.residual import _hidden_from_call, decoder_blocks


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


def length_groups(
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

            hooks.pre(output_projection(blocks[layer]), z_hook(layout, edit), with_kwargs=False)
        readout = direction_readout(model, input_ids, attention_mask, unit, readout_boundary, copies)
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
    heads = check_heads(layout, heads)
    check_readout(layout, readout_boundary)
    if heads_per_pass < 1:
        raise ValueError(f"heads_per_pass must be >= 1, got {heads_per_pass}.")
    if mode == "mean" and (
        mean_z is None or any(ly not in mean_z for ly, _ in heads if ly < readout_boundary)
    ):
        raise ValueError("Mean ablation needs mean_z for every screened layer (see mean_head_outputs).")
    unit = unit_direction(direction)
    totals = torch.zeros(len(heads), dtype=torch.float64)
    active = sorted((i for i, (ly, _) in enumerate(heads) if ly < readout_boundary), key=lambda i: heads[i])
    for ids, mask in length_groups(input_ids, attention_mask):
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
    heads = check_heads(layout, heads)
    check_readout(layout, readout_boundary)
    unit = unit_direction(direction)
    clean = direction_readout(model, input_ids, attention_mask, unit, readout_boundary)  # [batch]
    effects = torch.zeros(input_ids.shape[0], len(heads))
    for i, head in enumerate(heads):
        if head[0] >= readout_boundary:
            continue
        with ablate_heads(model, [head], mode=mode, mean_z=mean_z):
            ablated = direction_readout(model, input_ids, attention_mask, unit, readout_boundary)
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
