"""Head interventions batched across conditions: every row of a batch carries its own ablation or patch.

A head experiment runs many conditions (baselines, single and joint ablations, patches in both
directions, random-head controls) on the same paired prompt sets. Run one by one, each condition is its
own small ``generate`` (or forward) under ``ablate_heads`` / ``patch_heads``. Here the rows of all
conditions share batches: a row is ``(condition, prompt)``, and hooks on the attention output projection
(and, where asked, the MLP) apply each row's own intervention, read from per-row masks by layer:

- ablation (``zero`` / ``mean``) of a row's heads on **every** forward, prompt and generated tokens;
- zeroed MLP output of a row's layers on every forward (circuit readouts);
- patching of a row's heads from the **paired source row** (the prompt with the same index in the source
  prompt set), on the prompt forward only, at the row's ``positions``: ``z`` copies the source head
  output, ``pattern_v`` writes ``pattern_src @ v_src``, ``v_only`` recomputes the row's own pattern of
  the head over the source values (see ``science.heads``).

Within a row the edits apply in that order (ablation, then ``z``, ``pattern_v``, ``v_only``); a condition
of the experiments here uses one kind only. The arithmetic per row is the one ``ablate_heads`` and
``patch_heads`` perform, so a batched run equals the per-condition run (``run_per_condition``), which is
kept as the reference: greedy continuations are token-for-token equal and readouts equal up to float
rounding (tests). Patch sources are captured once per prompt set, not once per condition.

Prompt sets are named (``{"emotion": ..., "neutral": ...}``), share one ``[n, pos]`` shape and are paired
by row index (tokenize them together with left padding); ``positions`` (``[n, pos]``, usually
``shared_positions``) says where patches act for pair ``i``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from emotion_assets.science.attention_families import (
    AttentionCall,
    attention_module,
    head_patterns,
    head_values,
    output_projection,
    read_call,
)
from emotion_assets.science.circuits import _mlp, ablate_mlps, readout_projection
from emotion_assets.science.heads.capture import (
    AttentionCapture,
    capture_attention,
    capture_head_outputs,
    z_hook,
)
from emotion_assets.science.heads.interventions import AblationMode, PatchMode, ablate_heads, patch_heads
from emotion_assets.science.heads.layout import Head, HeadLayout, check_heads, head_layout
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.prefill import greedy_generate_with_prefill
from emotion_assets.science.residual import decoder_blocks

PromptSets = Mapping[str, Mapping[str, Tensor]]


@dataclass(frozen=True)
class HeadIntervention:
    """What one condition does to the model: ablate heads / MLPs on every forward, patch heads on the prompt.

    ``source`` names the prompt set patches copy from (row ``i`` reads source row ``i``); it is required
    when ``patch`` is non-empty.
    """

    ablate: tuple[Head, ...] = ()
    ablation_mode: AblationMode = "zero"
    ablate_mlps: tuple[int, ...] = ()
    patch: tuple[Head, ...] = ()
    patch_mode: PatchMode = "z"
    source: str | None = None

    def __post_init__(self) -> None:
        if self.ablation_mode not in ("zero", "mean"):
            raise ValueError(f"ablation_mode must be 'zero' or 'mean', got {self.ablation_mode!r}.")
        if self.patch_mode not in ("z", "v_only", "pattern_v"):
            raise ValueError(f"patch_mode must be 'z', 'v_only' or 'pattern_v', got {self.patch_mode!r}.")
        if self.patch and self.source is None:
            raise ValueError(f"A patch of heads {list(self.patch)} needs the name of its source prompt set.")


@dataclass(frozen=True)
class Condition:
    """A named intervention applied to the prompt set ``destination``."""

    name: str
    destination: str
    intervention: HeadIntervention = HeadIntervention()


@dataclass(frozen=True)
class PatchSources:
    """Head outputs and attention of every prompt set, stacked in ``order`` (set ``k`` at rows ``k*n..``).

    ``pattern_v`` holds ``pattern_src @ v_src`` per query head, as ``patch_heads`` computes it.
    """

    order: tuple[str, ...]
    n: int
    z: dict[int, Float[Tensor, "sources pos n_heads d_head"]]
    values: dict[int, Float[Tensor, "sources pos n_kv_heads d_head"]]
    pattern_v: dict[int, Float[Tensor, "sources pos n_heads d_head"]]

    def rows(self, name: str) -> range:
        """Rows of prompt set ``name`` in the stacked tensors."""
        if name not in self.order:
            raise KeyError(f"No patch source prompt set {name!r}; captured: {list(self.order)}.")
        k = self.order.index(name)
        return range(k * self.n, (k + 1) * self.n)


def _check_sets(sets: PromptSets) -> tuple[int, int]:
    if not sets:
        raise ValueError("At least one prompt set is needed.")
    shapes = {name: tuple(s["input_ids"].shape) for name, s in sets.items()}
    bad = {name: shape for name, shape in shapes.items() if len(shape) != 2}
    if bad or len(set(shapes.values())) != 1:
        raise ValueError(
            f"Prompt sets must share one [n, pos] shape (tokenize them together with left padding), got {shapes}."
        )
    n, pos = next(iter(shapes.values()))
    return n, pos


def capture_patch_sources(
    model: nn.Module, sets: PromptSets, conditions: Sequence[Condition]
) -> PatchSources | None:
    """One capture of every source the ``conditions`` patch from (``None`` when none patches)."""
    n, _ = _check_sets(sets)
    patching = [c.intervention for c in conditions if c.intervention.patch]
    if not patching:
        return None
    order = tuple(sets)
    missing = sorted({i.source for i in patching if i.source not in sets})  # type: ignore[misc]
    if missing:
        raise ValueError(f"Patch sources {missing} are not among the prompt sets {list(order)}.")
    z_layers = sorted({ly for i in patching if i.patch_mode == "z" for ly, _ in i.patch})
    att_layers = sorted({ly for i in patching if i.patch_mode != "z" for ly, _ in i.patch})
    ids = torch.cat([sets[name]["input_ids"] for name in order])  # [sources, pos]
    mask = torch.cat([sets[name]["attention_mask"] for name in order])  # [sources, pos]
    z = capture_head_outputs(model, ids, mask, z_layers) if z_layers else {}
    values: dict[int, Tensor] = {}
    pattern_v: dict[int, Tensor] = {}
    if att_layers:
        layout = head_layout(model)
        attention: AttentionCapture = capture_attention(model, ids, mask, att_layers)
        values = attention.values
        for layer in att_layers:
            pattern, v = attention.patterns[layer], attention.values[layer]
            per_head = [pattern[:, h] @ v[:, :, layout.kv_head(h)] for h in range(layout.n_heads)]
            pattern_v[layer] = torch.stack(per_head, dim=2)  # [sources, q_pos, n_heads, d_head]
    return PatchSources(order, n, z, values, pattern_v)


@dataclass(frozen=True)
class _RowMasks:
    """Per-row masks of one batch, by layer (only layers some row touches)."""

    keep: dict[int, Float[Tensor, "rows n_heads"]]  # 0 where the row ablates the head
    mean: dict[int, Bool[Tensor, " rows"]]  # rows of the layer that mean-ablate
    mlp: dict[int, Bool[Tensor, " rows"]]
    patch: dict[str, dict[int, Bool[Tensor, "rows n_heads"]]]  # by patch mode
    source_row: Int[Tensor, " rows"]  # row of PatchSources each row copies from (0 when none)
    positions: Bool[Tensor, "rows pos"]


def _compile(
    layout: HeadLayout,
    interventions: Sequence[HeadIntervention],
    source_rows: Sequence[int],
    positions: Bool[Tensor, "rows pos"],
) -> _RowMasks:
    rows = len(interventions)
    keep: dict[int, Tensor] = {}
    mean: dict[int, Tensor] = {}
    mlp: dict[int, Tensor] = {}
    patch: dict[str, dict[int, Tensor]] = {"z": {}, "v_only": {}, "pattern_v": {}}
    for r, item in enumerate(interventions):
        for layer, head in check_heads(layout, item.ablate):
            keep.setdefault(layer, torch.ones(rows, layout.n_heads))[r, head] = 0.0
            if item.ablation_mode == "mean":
                mean.setdefault(layer, torch.zeros(rows, dtype=torch.bool))[r] = True
        for layer in item.ablate_mlps:
            if not 0 <= layer < layout.n_layers:
                raise ValueError(f"MLP layer {layer} out of range 0..{layout.n_layers - 1}.")
            mlp.setdefault(int(layer), torch.zeros(rows, dtype=torch.bool))[r] = True
        by_layer = patch[item.patch_mode]
        for layer, head in check_heads(layout, item.patch):
            by_layer.setdefault(layer, torch.zeros(rows, layout.n_heads, dtype=torch.bool))[r, head] = True
    source_row = torch.tensor(list(source_rows), dtype=torch.long)
    return _RowMasks(keep, mean, mlp, patch, source_row, positions.bool())


@contextmanager
def row_interventions(
    model: nn.Module,
    interventions: Sequence[HeadIntervention],
    *,
    positions: Bool[Tensor, "rows pos"],
    sources: PatchSources | None = None,
    source_rows: Sequence[int] | None = None,
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
    patches: bool = True,
) -> Iterator[None]:
    """Apply ``interventions[r]`` to batch row ``r`` while the context is open; hooks removed on exit.

    ``source_rows[r]`` is the row of ``sources`` that row ``r`` patches from (ignored for rows without a
    patch); ``positions[r]`` where its patches act. ``patches=False`` applies ablations only (the decoding
    steps of a generation, whose positions have no source).
    """
    layout = head_layout(model)
    rows = len(interventions)
    if positions.shape[0] != rows:
        raise ValueError(f"positions has {positions.shape[0]} rows for {rows} interventions.")
    source_rows = list(source_rows) if source_rows is not None else [0] * rows
    if len(source_rows) != rows:
        raise ValueError(f"source_rows has {len(source_rows)} entries for {rows} interventions.")
    masks = _compile(layout, interventions, source_rows, positions)
    if any(masks.patch[m] for m in masks.patch) and patches:
        if sources is None:
            raise ValueError("Rows patch heads but no PatchSources were given (capture_patch_sources).")
        need = {"z": sources.z, "v_only": sources.values, "pattern_v": sources.pattern_v}
        missing = {
            m: sorted(set(masks.patch[m]) - set(need[m])) for m in need if set(masks.patch[m]) - set(need[m])
        }
        if missing:
            raise ValueError(f"PatchSources lack layers {missing}; capture them from the same conditions.")
    if masks.mean and (mean_z is None or any(ly not in mean_z for ly in masks.mean)):
        raise ValueError(
            f"Mean ablation needs mean_z for layers {sorted(masks.mean)} (see mean_head_outputs)."
        )
    blocks = decoder_blocks(model)
    layers = set(masks.keep) | (
        {ly for by_layer in masks.patch.values() for ly in by_layer} if patches else set()
    )
    stash: dict[int, AttentionCall] = {}

    def stash_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            stash[layer] = read_call(module, args, kwargs)

        return hook

    def edit_for(layer: int) -> Callable[[Tensor], Tensor]:
        attn = attention_module(blocks[layer])

        def edit(z: Tensor) -> Tensor:  # z: [rows, pos, n_heads, d_head]
            if z.shape[0] != rows:
                raise RuntimeError(f"Batched head hooks expect {rows} rows, the forward has {z.shape[0]}.")
            out = z
            if layer in masks.keep:
                keep = masks.keep[layer].to(device=z.device, dtype=z.dtype)[:, None, :, None]  # [rows,1,H,1]
                out = out * keep
                if layer in masks.mean:
                    assert mean_z is not None
                    fill = (1 - keep) * mean_z[layer].to(device=z.device, dtype=z.dtype)  # [rows, 1, H, D]
                    out = torch.where(masks.mean[layer].to(z.device)[:, None, None, None], out + fill, out)
            if not patches:
                return out
            src_rows = masks.source_row.to(z.device)
            where = masks.positions.to(z.device)[:, :, None, None]  # [rows, pos, 1, 1]
            for mode, table in (
                ("z", sources.z if sources else {}),
                ("pattern_v", sources.pattern_v if sources else {}),
            ):
                if layer in masks.patch[mode]:
                    chosen = masks.patch[mode][layer].to(z.device)[:, None, :, None]  # [rows, 1, H, 1]
                    src = table[layer].to(device=z.device, dtype=z.dtype)[src_rows]  # [rows, pos, H, D]
                    out = torch.where(chosen & where, src, out)
            if layer in masks.patch["v_only"]:
                assert sources is not None
                out = _v_only(attn, layout, out, stash.pop(layer), masks, masks.patch["v_only"][layer],
                              sources.values[layer])  # fmt: skip
            return out

        return edit

    def mlp_hook(layer: int) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # [rows, pos, d_model]
            drop = masks.mlp[layer].to(hidden.device)[:, None, None]
            zeroed = torch.where(drop, torch.zeros_like(hidden), hidden)
            return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed

        return hook

    with HookSet() as hooks:
        for layer in sorted(layers):
            if patches and layer in masks.patch["v_only"]:
                hooks.pre(attention_module(blocks[layer]), stash_hook(layer))
            hooks.pre(output_projection(blocks[layer]), z_hook(layout, edit_for(layer)), with_kwargs=False)
        for layer in sorted(masks.mlp):
            hooks.post(_mlp(blocks[layer]), mlp_hook(layer))
        try:
            yield
        finally:
            stash.clear()


def _rows_of(tensor: Tensor | None, rows: Tensor, n_rows: int) -> Tensor | None:
    """``tensor[rows]`` when its first dimension is the batch, else ``tensor`` (broadcast over rows)."""
    if tensor is None or tensor.shape[0] != n_rows:
        return tensor
    return tensor[rows.to(tensor.device)]


def _v_only(
    attn: nn.Module,
    layout: HeadLayout,
    out: Float[Tensor, "rows pos n_heads d_head"],
    call: AttentionCall,
    masks: _RowMasks,
    chosen: Bool[Tensor, "rows n_heads"],
    values: Float[Tensor, "sources pos n_kv d_head"],
) -> Float[Tensor, "rows pos n_heads d_head"]:
    """Rows' own patterns of their ``v_only`` heads over the source values at their positions."""
    n_rows = call.hidden.shape[0]
    rows = chosen.any(dim=1).nonzero().flatten()  # [r]
    heads = sorted(set(chosen[rows].nonzero()[:, 1].tolist()))
    sub = call.hidden[rows.to(call.hidden.device)]  # [r, pos, d_model]
    rotary = None if call.rotary is None else tuple(_rows_of(t, rows, n_rows) for t in call.rotary)
    sub_call = AttentionCall(sub, _rows_of(call.mask, rows, n_rows), rotary)
    pattern = head_patterns(attn, layout, sub_call, heads)  # [r, n_sel, q, k]
    v_cur = head_values(attn, layout, sub)  # [r, pos, n_kv, d_head]
    v_src = values.to(device=sub.device, dtype=sub.dtype)[masks.source_row[rows].to(sub.device)]
    where = masks.positions[rows].to(sub.device)[:, :, None]  # [r, k_pos, 1]
    out = out.clone()
    for i, h in enumerate(heads):
        kv = layout.kv_head(h)
        z_h = pattern[:, i] @ torch.where(where, v_src[:, :, kv], v_cur[:, :, kv])  # [r, q_pos, d_head]
        take = chosen[rows, h].to(sub.device)[:, None, None]  # [r, 1, 1]
        dest = rows.to(out.device)
        out[dest, :, h] = torch.where(take, z_h, out[dest, :, h])
    return out


# --- running conditions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    condition: int
    prompt: int


def _plan_rows(
    sets: PromptSets, conditions: Sequence[Condition], sources: PatchSources | None
) -> tuple[list[_Row], list[int]]:
    n, _ = _check_sets(sets)
    unknown = sorted({c.destination for c in conditions if c.destination not in sets})
    if unknown:
        raise ValueError(f"Destinations {unknown} are not among the prompt sets {list(sets)}.")
    rows = [_Row(ci, i) for ci in range(len(conditions)) for i in range(n)]
    source_rows = []
    for row in rows:
        item = conditions[row.condition].intervention
        source_rows.append(sources.rows(item.source)[row.prompt] if item.patch and sources else 0)
    return rows, source_rows


def _batch_inputs(
    sets: PromptSets, conditions: Sequence[Condition], rows: Sequence[_Row]
) -> tuple[Tensor, Tensor]:
    ids = torch.stack([sets[conditions[r.condition].destination]["input_ids"][r.prompt] for r in rows])
    mask = torch.stack([sets[conditions[r.condition].destination]["attention_mask"][r.prompt] for r in rows])
    return ids, mask  # [rows, pos] each


def _generate_rows(
    handle: Any,
    *,
    ids: Int[Tensor, "rows pos"],
    mask: Int[Tensor, "rows pos"],
    items: Sequence[HeadIntervention],
    where: Bool[Tensor, "rows pos"],
    sources: PatchSources | None,
    source_rows: Sequence[int],
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of one batch of rows, each with its own intervention, on ``handle``'s model."""
    context = partial(row_interventions, handle.model, items, positions=where, sources=sources,
                      source_rows=source_rows, mean_z=mean_z)  # fmt: skip
    return greedy_generate_with_prefill(
        handle.model, handle.tokenizer, ids, mask, max_new_tokens,
        prefill_context=partial(context, patches=True), decode_context=partial(context, patches=False),
    )  # fmt: skip


def generate_conditions(
    model: nn.Module,
    tokenizer: Any,
    sets: PromptSets,
    conditions: Sequence[Condition],
    *,
    positions: Bool[Tensor, "n pos"],
    max_new_tokens: int,
    batch_size: int,
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
    workers: ModelWorkers | None = None,
) -> list[list[str]]:
    """Greedy continuations of every prompt of each condition's destination, ``batch_size`` rows a call.

    Returns one list of texts per condition, in prompt order. Patches act on the prompt forward, ablations
    on every forward (``greedy_generate_with_prefill``); each call stops once every row has hit EOS.
    ``workers`` (``science.parallel.ModelWorkers`` holding this model as ``.model`` and ``.tokenizer``)
    spreads the same batches over its processes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sources = capture_patch_sources(model, sets, conditions)
    rows, source_rows = _plan_rows(sets, conditions, sources)
    texts: list[list[str]] = [[""] * len(next(iter(sets.values()))["input_ids"]) for _ in conditions]
    chunks, tasks = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = _batch_inputs(sets, conditions, chunk)
        chunks.append(chunk)
        tasks.append({
            "ids": ids, "mask": mask, "items": [conditions[r.condition].intervention for r in chunk],
            "where": positions[[r.prompt for r in chunk]], "sources": sources,
            "source_rows": source_rows[start : start + batch_size], "mean_z": mean_z,
            "max_new_tokens": max_new_tokens,
        })  # fmt: skip
    if workers is None:
        workers = ModelWorkers(SimpleNamespace(model=model, tokenizer=tokenizer), load=None)
    for chunk, out in zip(chunks, workers.map(_generate_rows, tasks), strict=True):
        for row, text in zip(chunk, out, strict=True):
            texts[row.condition][row.prompt] = text
    return texts


def readout_conditions(
    model: nn.Module,
    sets: PromptSets,
    conditions: Sequence[Condition],
    *,
    positions: Bool[Tensor, "n pos"],
    direction: Float[Tensor, " d_model"],
    boundary: int,
    batch_size: int,
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Float[Tensor, "n_conditions n"]:
    """The emotion readout (``readout_projection``) of every prompt under every condition, batched."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sources = capture_patch_sources(model, sets, conditions)
    rows, source_rows = _plan_rows(sets, conditions, sources)
    n, _ = _check_sets(sets)
    result = torch.zeros(len(conditions), n)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = _batch_inputs(sets, conditions, chunk)
        with row_interventions(
            model, [conditions[r.condition].intervention for r in chunk],
            positions=positions[[r.prompt for r in chunk]], sources=sources,
            source_rows=source_rows[start : start + batch_size], mean_z=mean_z,
        ):  # fmt: skip
            values = readout_projection(model, ids, mask, direction, boundary)  # [rows]
        for row, value in zip(chunk, values.tolist(), strict=True):
            result[row.condition, row.prompt] = value
    return result


# --- the per-condition reference ------------------------------------------------------------------------


def _condition_contexts(
    model: nn.Module,
    sets: PromptSets,
    item: HeadIntervention,
    positions: Tensor,
    mean_z: Mapping[int, Tensor] | None,
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(prompt-forward, every-forward) context factories of one condition, from ``ablate_heads`` /
    ``patch_heads`` / ``ablate_mlps`` with sources captured on the whole source prompt set."""
    source: Any = None
    if item.patch:
        assert item.source is not None
        batch = sets[item.source]
        layers = sorted({ly for ly, _ in item.patch})
        capture = capture_head_outputs if item.patch_mode == "z" else capture_attention
        source = capture(model, batch["input_ids"], batch["attention_mask"], layers)

    @contextmanager
    def always() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if item.ablate:
                mz = mean_z if item.ablation_mode == "mean" else None
                stack.enter_context(
                    ablate_heads(model, list(item.ablate), mode=item.ablation_mode, mean_z=mz)
                )
            if item.ablate_mlps:
                stack.enter_context(ablate_mlps(model, list(item.ablate_mlps)))
            yield

    @contextmanager
    def prompt() -> Iterator[None]:
        with always():
            if not item.patch:
                yield
            elif item.patch_mode == "z":
                with patch_heads(model, list(item.patch), source, mode="z", positions=positions):
                    yield
            else:
                with patch_heads(model, list(item.patch), mode=item.patch_mode, source_attention=source,
                                 positions=positions):  # fmt: skip
                    yield

    return prompt, always


def generate_per_condition(
    model: nn.Module,
    tokenizer: Any,
    sets: PromptSets,
    conditions: Sequence[Condition],
    *,
    positions: Bool[Tensor, "n pos"],
    max_new_tokens: int,
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> list[list[str]]:
    """The reference for ``generate_conditions``: one generation per condition on its whole prompt set."""
    _check_sets(sets)
    texts = []
    for cond in conditions:
        prompt, always = _condition_contexts(model, sets, cond.intervention, positions, mean_z)
        batch = sets[cond.destination]
        texts.append(greedy_generate_with_prefill(
            model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens,
            prefill_context=prompt, decode_context=always,
        ))  # fmt: skip
    return texts


def readout_per_condition(
    model: nn.Module,
    sets: PromptSets,
    conditions: Sequence[Condition],
    *,
    positions: Bool[Tensor, "n pos"],
    direction: Float[Tensor, " d_model"],
    boundary: int,
    mean_z: Mapping[int, Float[Tensor, "n_heads d_head"]] | None = None,
) -> Float[Tensor, "n_conditions n"]:
    """The reference for ``readout_conditions``: one forward per condition on its whole prompt set."""
    _check_sets(sets)
    rows = []
    for cond in conditions:
        prompt, _ = _condition_contexts(model, sets, cond.intervention, positions, mean_z)
        batch = sets[cond.destination]
        with prompt():
            rows.append(
                readout_projection(model, batch["input_ids"], batch["attention_mask"], direction, boundary)
            )
    return torch.stack(rows)
