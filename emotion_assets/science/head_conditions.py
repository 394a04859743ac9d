"""Generation conditions of ``head_patching``: an emotion's top heads ablated or patched, random-head
controls, the continuations of one cross-fitted fold and the shifts against the baseline.

Mean ablation uses the mean head output over **train** neutral fitting prompts; patches copy head outputs
between the paired emotion and neutral prompts of ``science/head_pairs.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from emotion_assets.science.batched_heads import Condition, HeadIntervention, generate_conditions
from emotion_assets.science.crossfit import FoldPlan, heads_by_fold
from emotion_assets.science.head_pairs import PromptPair, head_label
from emotion_assets.science.heads import (
    Head,
    HeadLayout,
    capture_head_outputs,
    head_layout,
    mean_head_outputs,
    shared_positions,
)
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.prompts import NEUTRAL, fitting_mask
from emotion_assets.science.residual import tokenize_prompts
from emotion_assets.science.statistics import stable_seed

N_RANDOM_SEEDS = 2


POOLED_FOLD = "both"


def random_heads(n_layers: int, n_heads: int, exclude: Sequence[Head], n: int, seed: int) -> list[Head]:
    """``n`` distinct heads drawn uniformly from every head not in ``exclude``, sorted by (layer, head)."""
    pool = [(ly, h) for ly in range(n_layers) for h in range(n_heads) if (ly, h) not in set(exclude)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[int(i)] for i in chosen)


@dataclass
class GenerationCondition:
    """One generation condition of one emotion: which prompts it continues and what it does to the heads."""

    name: str
    kind: str  # baseline | ablation | patch | random_ablation | random_patch
    destination: str  # "emotion" or "neutral": the prompts continued
    mode: str | None = None
    direction: str | None = None
    scope: str | None = None  # "single" or "joint" head set; None for baselines
    heads: list[Head] = field(default_factory=list)
    seed: int | None = None
    intervention: HeadIntervention = field(default_factory=HeadIntervention)

    @property
    def source(self) -> str | None:
        if self.kind not in ("patch", "random_patch"):
            return None
        return NEUTRAL if self.destination == "emotion" else "emotion"

    def batched(self) -> Condition:
        """The condition as ``science.batched_heads`` runs it."""
        return Condition(self.name, self.destination, self.intervention)


# A patch direction names the change asked of the destination prompts (direction -> destination):
# neutral_to_emotion continues neutral prompts carrying head outputs of the paired emotion prompts,
# emotion_to_neutral continues emotion prompts carrying head outputs of the paired neutral prompts.
DIRECTIONS = {"neutral_to_emotion": "neutral", "emotion_to_neutral": "emotion"}


def build_generation_conditions(
    top: list[Head], randoms: list[tuple[int, list[Head]]]
) -> list[GenerationCondition]:
    """Baselines, single and joint ablations, joint patching in both directions and random-head controls.

    Conditions are named by rank, not by head (``ablate_zero_rank1``, ``ablate_zero_top3``): cross-fitted
    folds measure different heads under one name, and each prompt is measured under every name once.
    Ablations run on the emotion prompts in prefill and decoding; patches copy source tensors captured on
    the paired prompts (same padded width) and act during the prefill only.
    """
    label = f"top{len(top)}"
    conditions = [
        GenerationCondition("baseline_emotion", "baseline", "emotion"),
        GenerationCondition("baseline_neutral", "baseline", NEUTRAL),
    ]
    for mode in ("zero", "mean"):
        singles = [("single", [h], f"rank{rank}") for rank, h in enumerate(top, start=1)]
        for scope, heads, name in [*singles, ("joint", top, label)]:
            conditions.append(
                GenerationCondition(
                    f"ablate_{mode}_{name}", "ablation", "emotion", mode=mode, scope=scope, heads=heads,
                    intervention=HeadIntervention(ablate=tuple(heads), ablation_mode=mode),
                )
            )  # fmt: skip
    for direction, destination in DIRECTIONS.items():
        source = NEUTRAL if destination == "emotion" else "emotion"
        for mode in ("z", "v_only", "pattern_v"):
            conditions.append(
                GenerationCondition(
                    f"patch_{mode}_{direction}_{label}", "patch", destination, mode=mode, direction=direction,
                    scope="joint", heads=top,
                    intervention=HeadIntervention(patch=tuple(top), patch_mode=mode, source=source),
                )
            )  # fmt: skip
        for seed, heads in randoms:
            conditions.append(
                GenerationCondition(
                    f"random{seed}_patch_z_{direction}", "random_patch", destination, mode="z",
                    direction=direction, scope="joint", heads=heads, seed=seed,
                    intervention=HeadIntervention(patch=tuple(heads), patch_mode="z", source=source),
                )
            )  # fmt: skip
    for seed, heads in randoms:
        conditions.append(
            GenerationCondition(
                f"random{seed}_ablate_zero", "random_ablation", "emotion", mode="zero", scope="joint",
                heads=heads, seed=seed, intervention=HeadIntervention(ablate=tuple(heads)),
            )
        )  # fmt: skip
    return conditions


def neutral_mean_head_outputs(
    model: nn.Module, tokenizer: Any, device: torch.device | str, frame: pd.DataFrame, max_tokens: int
) -> dict[int, Tensor]:
    """Every layer's mean head output ``z`` over the **train** neutral fitting prompts of ``frame`` (the
    reference of mean ablation)."""
    neutral_train = frame[
        ((frame["split"] == "train") & (frame["emotion"] == NEUTRAL)).to_numpy() & fitting_mask(frame)
    ].sort_values("id")
    enc = tokenize_prompts(
        tokenizer, neutral_train["text"].tolist(), [], max_tokens,
        ids=neutral_train["id"].astype(str).tolist(), setting="max_prompt_tokens",
    )  # fmt: skip
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    return mean_head_outputs(capture_head_outputs(model, ids, mask, range(head_layout(model).n_layers)), mask)


def fold_generations(
    model: nn.Module,
    tokenizer: Any,
    plan: FoldPlan,
    pair: PromptPair,
    layout: HeadLayout,
    mean_z: dict[int, Tensor],
    max_new: int,
    profile_seed: int,
    batch_size: int = 64,
    workers: ModelWorkers | None = None,
) -> list[dict[str, Any]]:
    """Every generation condition of one fold: ``plan.heads`` (chosen on the other half) on ``pair``, all
    conditions' rows together in batches of ``batch_size`` (``science.batched_heads``), spread over
    ``workers`` when given."""
    top = plan.heads
    randoms = [
        (seed, random_heads(layout.n_layers, layout.n_heads, top, len(top),
                            stable_seed(profile_seed, "head_patching", plan.emotion, plan.name, seed)))
        for seed in range(N_RANDOM_SEEDS)
    ]  # fmt: skip
    frames = {"emotion": pair.emotion, NEUTRAL: pair.neutral}
    sets = {"emotion": pair.emotion_batch, NEUTRAL: pair.neutral_batch}
    positions = shared_positions(pair.emotion_batch["attention_mask"], pair.neutral_batch["attention_mask"])
    conditions = build_generation_conditions(top, randoms)
    generated = generate_conditions(
        model, tokenizer, sets, [c.batched() for c in conditions], positions=positions,
        max_new_tokens=max_new, batch_size=batch_size, mean_z=mean_z, workers=workers,
    )  # fmt: skip
    rows = []
    for cond, texts in zip(conditions, generated, strict=True):
        prompts = frames[cond.destination]
        source = frames[cond.source] if cond.source else None
        for i, text in enumerate(texts):
            rows.append({
                "emotion": plan.emotion, "condition": cond.name, "kind": cond.kind, "mode": cond.mode,
                "direction": cond.direction, "scope": cond.scope, "heads": head_label(cond.heads),
                "seed": cond.seed, "destination": cond.destination, "source": cond.source,
                "pair_index": int(prompts["pair_index"].iloc[i]),
                "prompt_id": prompts["id"].iloc[i], "prompt": prompts["text"].iloc[i],
                "source_prompt_id": source["id"].iloc[i] if source is not None else None,
                **plan.labels(), "continuation": text,
            })  # fmt: skip
    return rows


def shift_table(scored: pd.DataFrame, metrics_by_emotion: dict[str, list[str]]) -> pd.DataFrame:
    """Per emotion × condition × fold: mean score and mean paired shift against the baseline on the same
    prompts; fold ``both`` pools the two cross-fitted folds (every prompt once, with heads chosen on the
    other half; ``heads`` then names each fold's heads)."""
    rows = []
    keys = ["emotion", "condition", "kind", "mode", "direction", "scope", "seed", "destination"]
    for values, group in scored.groupby(keys, dropna=False, sort=False):
        for fold, part in [*group.groupby("fold", sort=True), (POOLED_FOLD, group)]:
            row = dict(zip(keys, values, strict=True))
            row["fold"] = fold
            row["heads"] = heads_by_fold(part) if fold == POOLED_FOLD else part["heads"].iloc[0]
            base = scored[
                (scored["emotion"] == row["emotion"])
                & (scored["kind"] == "baseline")
                & (scored["destination"] == row["destination"])
            ].set_index("pair_index")
            paired = part.set_index("pair_index")
            base = base.loc[paired.index]
            row["n_prompts"] = len(paired)
            row["n_changed"] = int((paired["continuation"] != base["continuation"]).sum())
            for metric in metrics_by_emotion[row["emotion"]]:
                name = "target" if metric.startswith("emotion_") else "sentiment"
                row[f"{name}_metric"] = metric
                row[f"{name}_mean"] = float(paired[metric].mean())
                row[f"{name}_shift"] = float((paired[metric] - base[metric]).mean())
            rows.append(row)
    return pd.DataFrame(rows)


def top_vs_random(shifts: pd.DataFrame) -> pd.DataFrame:
    """Joint top-N interventions next to the mean of the random-head controls of the same kind, both folds
    pooled (every prompt measured with heads chosen on the other half)."""
    rows = []
    pooled = shifts[(shifts["scope"] == "joint") & (shifts["fold"] == POOLED_FOLD)]
    for emotion, group in pooled.groupby("emotion", sort=False):
        for what, kind, mode, direction in (
            ("zero ablation", "ablation", "zero", None),
            ("z patch neutral_to_emotion", "patch", "z", "neutral_to_emotion"),
            ("z patch emotion_to_neutral", "patch", "z", "emotion_to_neutral"),
        ):
            same = (group["mode"] == mode) & (
                group["direction"].isna() if direction is None else group["direction"] == direction
            )
            top = group[same & (group["kind"] == kind)]
            rand = group[same & (group["kind"] == f"random_{kind}")]
            if top.empty:
                continue
            rows.append({
                "emotion": emotion, "intervention": what, "heads": top["heads"].iloc[0],
                "top_target_shift": float(top["target_shift"].iloc[0]),
                "random_target_shift": float(rand["target_shift"].mean()) if len(rand) else float("nan"),
                "top_sentiment_shift": float(top["sentiment_shift"].iloc[0]),
                "random_sentiment_shift": (
                    float(rand["sentiment_shift"].mean()) if len(rand) else float("nan")
                ),
                "top_changed": int(top["n_changed"].iloc[0]),
                "random_changed": float(rand["n_changed"].mean()) if len(rand) else float("nan"),
            })  # fmt: skip
    return pd.DataFrame(rows)
