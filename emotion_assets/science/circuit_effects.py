"""Circuit analysis of an emotion's top heads (``emotion_circuits``): OV/QK readouts, roles, and joint vs
summed single effects of ablating and patching them, per cross-fitted fold and pooled.

Readouts and prompts as in :mod:`emotion_assets.science.head_screen`: the projection of the last real
token's final-boundary residual onto the emotion vector, on each emotion's eval prompt pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from emotion_assets.science.batched_heads import Condition, HeadIntervention, readout_conditions
from emotion_assets.science.crossfit import FoldPlan, heads_by_fold, join_ids
from emotion_assets.science.head_conditions import POOLED_FOLD
from emotion_assets.science.head_pairs import PromptPair, head_label
from emotion_assets.science.heads import (
    Head,
    OVReport,
    capture_attention,
    head_layout,
    ov_circuit,
    qk_attention_to_positions,
    role_heuristic,
    shared_positions,
)
from emotion_assets.science.prompts import NEUTRAL


def boundary_at_most(boundaries: list[int], target: int) -> int:
    """The largest captured boundary ``<= target`` (what a head at block ``target`` can read), else the
    smallest captured one."""
    below = [b for b in boundaries if b <= target]
    return max(below) if below else min(boundaries)


def boundary_at_least(boundaries: list[int], target: int) -> int:
    """The smallest captured boundary ``>= target`` (where a head's output has arrived), else the largest."""
    above = [b for b in boundaries if b >= target]
    return min(above) if above else max(boundaries)


def circuit_effects(
    model: nn.Module,
    pair: PromptPair,
    top: list[Head],
    direction: Float[Tensor, " d_model"],
    boundary: int,
    screening_effects: dict[Head, float],
    batch_size: int = 64,
) -> tuple[pd.DataFrame, dict[Head, float]]:
    """Joint vs summed single effects on the readout of the emotion prompts; single-head patch effects.

    - ``ablate_heads``: the top heads zero-ablated jointly vs the sum of their screening effects;
    - ``ablate_heads_and_mlps``: plus the MLPs of those heads' layers zeroed vs the sum of the single-head
      and single-MLP effects;
    - ``patch_heads_z``: the top heads' ``z`` copied jointly from the paired neutral prompts
      (``emotion_to_neutral``) vs the sum of single-head patches.

    Every intervention's rows run together in batches of ``batch_size`` (``readout_conditions``).
    """
    layers = sorted({ly for ly, _ in top})
    sets = {"emotion": pair.emotion_batch, NEUTRAL: pair.neutral_batch}
    positions = shared_positions(pair.emotion_batch["attention_mask"], pair.neutral_batch["attention_mask"])

    def patch(heads: list[Head]) -> HeadIntervention:
        return HeadIntervention(patch=tuple(heads), patch_mode="z", source=NEUTRAL)

    named = {
        "clean": HeadIntervention(),
        **{f"patch {head}": patch([head]) for head in top},
        **{f"mlp {layer}": HeadIntervention(ablate_mlps=(layer,)) for layer in layers},
        "joint_ablate": HeadIntervention(ablate=tuple(top)),
        "joint_both": HeadIntervention(ablate=tuple(top), ablate_mlps=tuple(layers)),
        "joint_patch": patch(top),
    }
    readouts = readout_conditions(
        model,
        sets,
        [Condition(name, "emotion", item) for name, item in named.items()],
        positions=positions,
        direction=direction,
        boundary=boundary,
        batch_size=batch_size,
    )  # [n_conditions, n]
    clean = readouts[0]
    effect = {name: float((row - clean).mean()) for name, row in zip(named, readouts, strict=True)}
    single_patch = {head: effect[f"patch {head}"] for head in top}
    single_mlp = {layer: effect[f"mlp {layer}"] for layer in layers}
    joint_ablate, joint_both, joint_patch = (
        effect["joint_ablate"],
        effect["joint_both"],
        effect["joint_patch"],
    )
    sum_heads = float(sum(screening_effects[h] for h in top))
    rows = [
        ("ablate_heads", joint_ablate, sum_heads, len(top), []),
        (
            "ablate_heads_and_mlps",
            joint_both,
            sum_heads + sum(single_mlp.values()),
            len(top) + len(layers),
            layers,
        ),
        ("patch_heads_z", joint_patch, float(sum(single_patch.values())), len(top), []),
    ]
    table = pd.DataFrame([
        {
            "intervention": name, "heads": head_label(top), "mlp_layers": ",".join(map(str, mlps)),
            "n_components": n, "joint_effect": joint, "sum_single_effects": total,
            "difference": joint - total, "ratio": joint / total if abs(total) > 1e-12 else float("nan"),
            "clean_readout": float(clean.mean()), "n_prompts": pair.n,
        }
        for name, joint, total, n, mlps in rows
    ])  # fmt: skip
    return table, single_patch


@dataclass
class CircuitInputs:
    """What every fold of one emotion's circuit analysis reads: vectors, boundaries and the readout."""

    vectors: dict[str, Tensor]
    boundaries: list[int]
    strategy: str
    emotions: list[str]
    direction: Tensor
    n_layers: int
    batch_size: int = 64  # rows per forward of the circuit readouts


def fold_circuit(
    model: nn.Module,
    tokenizer: Any,
    plan: FoldPlan,
    pair: PromptPair,
    screening: pd.DataFrame,
    inputs: CircuitInputs,
) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """OV/QK readouts, roles and circuit effects of ``plan.heads`` on the measurement half's ``pair``.

    Single-head effects (the sum of singles, the role threshold) are the screening scores of the
    **measurement** half, so joint and summed effects are measured on the same held-out prompts;
    ``selection_effect`` is the score on the selecting half, for reference only.
    """
    emotion, top, vectors, boundaries = plan.emotion, plan.heads, inputs.vectors, inputs.boundaries
    rows = screening[(screening["emotion"] == emotion) & (screening["half"] == plan.measurement_half)]
    effects = {(int(r.layer), int(r.head)): float(r.ablation_effect) for r in rows.itertuples()}
    threshold = float(np.percentile(rows["ablation_effect"].abs(), 75))
    selected = screening[(screening["emotion"] == emotion) & (screening["half"] == plan.selection_half)]
    selected = selected.set_index(["layer", "head"])
    layers = sorted({ly for ly, _ in top})
    emo_att = capture_attention(
        model, pair.emotion_batch["input_ids"], pair.emotion_batch["attention_mask"], layers
    )
    neu_att = capture_attention(
        model, pair.neutral_batch["input_ids"], pair.neutral_batch["attention_mask"], layers
    )
    words = pair.emotion_batch["emotion_mask"].bool()  # [n, pos]
    same_positions = words & pair.neutral_batch["attention_mask"].bool()
    has_words = words.any(dim=1).cpu()  # [n]
    table, single_patch = circuit_effects(
        model, pair, top, inputs.direction, inputs.n_layers, effects, inputs.batch_size
    )
    labels = {**plan.labels(), "measured_on_prompt_ids": join_ids(plan.measurement_ids)}
    table = table.assign(emotion=emotion, **labels)
    screened = rows.set_index(["layer", "head"])
    head_rows = []
    own = vectors[f"{inputs.strategy}/{emotion}"]  # [n_boundaries, d_model]
    for rank, (layer, head) in enumerate(top, start=1):
        # The OV input is the emotion direction at the latest boundary before the head where it exists: a
        # zero vector (e.g. boundary 0 when every class ends in the same token) has no direction to read.
        live = [b for b in boundaries if b <= layer and float(own[boundaries.index(b)].norm()) > 0]
        b_in = live[-1] if live else boundary_at_most(boundaries, layer)
        b_out = boundary_at_least(boundaries, layer + 1)
        outs = {e: vectors[f"{inputs.strategy}/{e}"][boundaries.index(b_out)] for e in inputs.emotions}
        if live:
            ov = ov_circuit(
                model,
                layer,
                head,
                own[boundaries.index(b_in)],
                emotion_directions=outs,
                unembed_top_k=10,
            )
        else:
            ov = OVReport(layer, head, head_layout(model).kv_head(head), torch.zeros(0), math.nan,
                          dict.fromkeys(inputs.emotions, math.nan), [], [])  # fmt: skip
        to_words = qk_attention_to_positions(emo_att.patterns[layer], words)[:, head].cpu()
        to_same = qk_attention_to_positions(neu_att.patterns[layer], same_positions)[:, head].cpu()
        att_emotion = float(to_words[has_words].mean()) if has_words.any() else float("nan")
        att_neutral = float(to_same[has_words].mean()) if has_words.any() else float("nan")
        ablation = float(screened.loc[(layer, head), "ablation_effect"])
        role = role_heuristic(
            np.nan_to_num(ov.cosines[emotion]), ablation, np.nan_to_num(att_emotion), np.nan_to_num(att_neutral),
            effect_threshold=threshold,
        ) if live else "undetermined: no emotion direction at the head's input"  # fmt: skip
        head_rows.append({
            "emotion": emotion, **labels, "rank": rank, "layer": layer, "head": head, "kv_head": ov.kv_head,
            "selection_effect": float(selected.loc[(layer, head), "ablation_effect"]),
            "ablation_effect": ablation, "attribution": float(screened.loc[(layer, head), "attribution"]),
            "single_patch_effect": single_patch[(layer, head)], "effect_threshold": threshold,
            "boundary_in": b_in, "boundary_out": b_out, "ov_gain": ov.gain,
            "ov_cosine_own": ov.cosines[emotion],
            **{f"ov_cosine_{e}": ov.cosines[e] for e in inputs.emotions},
            "ov_top_tokens": " | ".join(repr(tokenizer.decode([t])) for t in ov.top_token_ids),
            "attention_emotion_words": att_emotion, "attention_neutral_same_positions": att_neutral,
            "attention_delta": att_emotion - att_neutral, "n_attention_prompts": int(has_words.sum()),
            "role": role,
        })  # fmt: skip
    return head_rows, table


def pooled_circuit_effects(effects: pd.DataFrame) -> pd.DataFrame:
    """Per emotion × intervention, the folds' effects pooled with weights ``n_prompts`` (every prompt once,
    each measured with heads chosen on the other half); ``fold`` = ``both``."""
    rows = []
    for (emotion, intervention), group in effects.groupby(["emotion", "intervention"], sort=False):
        weights = group["n_prompts"].to_numpy(dtype=float)
        joint = float(np.average(group["joint_effect"], weights=weights))
        total = float(np.average(group["sum_single_effects"], weights=weights))
        rows.append({
            "emotion": emotion, "intervention": intervention, "fold": POOLED_FOLD,
            "heads": heads_by_fold(group), "n_components": int(group["n_components"].max()),
            "joint_effect": joint, "sum_single_effects": total, "difference": joint - total,
            "ratio": joint / total if abs(total) > 1e-12 else float("nan"),
            "clean_readout": float(np.average(group["clean_readout"], weights=weights)),
            "n_prompts": int(weights.sum()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def effects_table(folds: pd.DataFrame, pooled: pd.DataFrame) -> pd.DataFrame:
    """The folds' circuit effects and their pooled rows in one table, ``emotion, fold, intervention`` first."""
    table = pd.concat([folds, pooled], ignore_index=True)
    leading = ["emotion", "fold", "intervention"]
    return table[leading + [c for c in table.columns if c not in leading]]


def circuit_summary(heads: pd.DataFrame, pooled: pd.DataFrame) -> pd.DataFrame:
    """One row per emotion: each fold's heads and roles, mean OV cosine and attention delta, and the pooled
    joint-to-summed ratio of every intervention."""
    return pd.DataFrame([
        {
            "emotion": emotion,
            "heads": " | ".join(f"{fold}: {head_label(list(zip(f['layer'], f['head'], strict=True)))}"
                                for fold, f in g.groupby("fold")),
            "roles": " | ".join(f"{fold}: {','.join(f['role'])}" for fold, f in g.groupby("fold")),
            "mean_ov_cosine_own": float(g["ov_cosine_own"].mean()),
            "mean_attention_delta": float(g["attention_delta"].mean()),
            **{f"ratio_{r.intervention}": r.ratio for r in pooled[pooled["emotion"] == emotion].itertuples()},
        }
        for emotion, g in heads.groupby("emotion", sort=False)
    ])  # fmt: skip
