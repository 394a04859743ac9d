"""Experiment design of the attention-head phases: prompt pairs, cross-fitted screening, generation conditions.

Readout. Every forward-only score here is the change in the projection of the last real token's residual
at the model's final (pre-norm) boundary onto the emotion's vector at that boundary (first pooling
strategy of the profile). Reading out at the final boundary lets every ``(layer, head)`` reach it.

Prompts. Screening, patching and circuits use each emotion's **eval** fitting prompts (the vectors were fit
on the train split) paired by index with eval neutral fitting prompts (never the unfinished steering
openings, whose form differs), at most ``profile.heads.max_prompts`` of each. The two lists are tokenized
together (left padding), so a pair shares its width and its last token, as head patching needs; mean
ablation uses the mean head output over **train** neutral fitting prompts.

No Dagster here: the assets ``head_screening``, ``head_patching`` and ``emotion_circuits`` read their inputs,
call these functions and write the tables they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn

from emotion_assets.profiles import ScreeningConfig
from emotion_assets.science.attribution_screening import screen_heads_atp_star
from emotion_assets.science.batched_heads import Condition, HeadIntervention, generate_conditions
from emotion_assets.science.crossfit import (
    HALVES,
    FoldPlan,
    heads_by_fold,
    honest_top_heads,
    join_ids,
    other_half,
    rank_within_halves,
    split_table,
    top_of_half,
    top_set_overlap,
)
from emotion_assets.science.heads import (
    Head,
    HeadLayout,
    ablation_effects_per_prompt,
    attribution_scores,
    capture_head_outputs,
    head_layout,
    mean_head_outputs,
    screen_heads_by_ablation,
    shared_positions,
)
from emotion_assets.science.prompts import NEUTRAL, fitting_mask
from emotion_assets.science.residual import tokenize_prompts
from emotion_assets.science.statistics import stable_seed

N_RANDOM_SEEDS = 2
POOLED_FOLD = "both"
# Heads ablated in one forward of the screen (all 270 of SmolLM2-135M): bench/bench_heads.py measured
# 27, 90 and 270 per pass, and fewer, larger passes were fastest. The cap bounds memory for larger models.
SCREEN_HEADS_PER_PASS = 288


# --- prompt pairs and shared helpers -------------------------------------------------------------------


def head_label(heads: Sequence[Head]) -> str:
    """``[(3, 2), (5, 0)]`` → ``"L3H2,L5H0"``."""
    return ",".join(f"L{layer}H{head}" for layer, head in heads)


def eval_prompts(frame: pd.DataFrame, emotion: str, max_prompts: int | None) -> pd.DataFrame:
    """Eval-split fitting prompts of ``emotion`` in id order, optionally capped."""
    rows = frame[
        ((frame["split"] == "eval") & (frame["emotion"] == emotion)).to_numpy() & fitting_mask(frame)
    ]
    rows = rows.sort_values("id")
    return rows.head(max_prompts) if max_prompts else rows


@dataclass
class PromptPair:
    """An emotion's eval prompts and eval neutral prompts paired by index, tokenized together."""

    emotion: pd.DataFrame
    neutral: pd.DataFrame
    emotion_batch: dict[str, Tensor]  # input_ids, attention_mask, emotion_mask: [n, pos]
    neutral_batch: dict[str, Tensor]
    max_tokens: int  # the profile's max_prompt_tokens; this and the next three are kept for sub-pairs
    words: list[str]  # the emotion words whose tokens ``emotion_mask`` marks
    tokenizer: Any
    device: torch.device | str

    @property
    def n(self) -> int:
        return len(self.emotion)


def _tokenized_pair(
    tokenizer: Any,
    device: torch.device | str,
    emo: pd.DataFrame,
    neu: pd.DataFrame,
    max_tokens: int,
    words: list[str],
) -> PromptPair:
    """Tokenize paired prompt rows together (left padding), so pair ``i`` shares its width and last token; a
    prompt over ``max_tokens`` (the profile's ``max_prompt_tokens``) is an error, never cut."""
    n = len(emo)
    emo, neu = emo.reset_index(drop=True), neu.reset_index(drop=True)
    enc = tokenize_prompts(
        tokenizer, emo["text"].tolist() + neu["text"].tolist(), words, max_tokens,
        ids=emo["id"].astype(str).tolist() + neu["id"].astype(str).tolist(), setting="max_prompt_tokens",
    )  # fmt: skip
    keys = ("input_ids", "attention_mask", "emotion_mask")
    first = {k: enc[k][:n].to(device) for k in keys}
    second = {k: enc[k][n:].to(device) for k in keys}
    return PromptPair(emo, neu, first, second, max_tokens, words, tokenizer, device)


def prompt_pair(
    tokenizer: Any,
    device: torch.device | str,
    frame: pd.DataFrame,
    emotion: str,
    max_prompts: int | None,
    max_tokens: int,
    words: Sequence[str],
) -> PromptPair:
    """Pair the first ``n`` eval prompts of ``emotion`` and of neutral (``n`` = the smaller count), tokenized
    with ``tokenizer`` onto ``device``; ``emotion_mask`` marks the tokens of ``words``.

    Both frames get a ``pair_index`` column (0..n-1) that :func:`sub_pair` keeps.
    """
    emo = eval_prompts(frame, emotion, max_prompts)
    neu = eval_prompts(frame, NEUTRAL, max_prompts)
    n = min(len(emo), len(neu))
    if n == 0:
        raise ValueError(f"No eval prompts to pair for {emotion!r} and {NEUTRAL!r}.")
    emo = emo.head(n).reset_index(drop=True).assign(pair_index=np.arange(n))
    neu = neu.head(n).reset_index(drop=True).assign(pair_index=np.arange(n))
    return _tokenized_pair(tokenizer, device, emo, neu, max_tokens, list(words))


def sub_pair(pair: PromptPair, pair_indices: Sequence[int]) -> PromptPair:
    """The pairs of ``pair`` whose ``pair_index`` is in ``pair_indices``, tokenized together anew."""
    keep = pair.emotion["pair_index"].isin(list(pair_indices)).to_numpy()
    if not keep.any():
        raise ValueError(f"None of the pair indices {list(pair_indices)} is in the prompt pair.")
    return _tokenized_pair(
        pair.tokenizer, pair.device, pair.emotion[keep], pair.neutral[keep], pair.max_tokens, pair.words
    )


def crossfit_split(pair: PromptPair, emotion: str, profile_seed: int) -> pd.DataFrame:
    """The seeded half (A/B) of every pair of ``emotion`` (see ``science.crossfit.split_table``)."""
    seed = stable_seed(profile_seed, "head_crossfit", emotion)
    return split_table(emotion, pair.emotion["id"].tolist(), pair.neutral["id"].tolist(), seed)


def trimmed(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` without the leading columns that are padding in every row."""
    mask = batch["attention_mask"]
    real_columns = mask.bool().any(dim=0).nonzero()
    start = int(real_columns[0]) if len(real_columns) else 0
    return batch["input_ids"][:, start:], mask[:, start:]


def emotions_of(vectors: dict[str, Tensor], strategy: str, targets: Sequence[str]) -> list[str]:
    """Emotions of ``targets`` (those with a target evaluator score) that have a vector for ``strategy``, in
    the order of ``targets``."""
    have = {key.split("/", 1)[1] for key in vectors if key.startswith(f"{strategy}/")}
    return [emotion for emotion in targets if emotion in have]


def final_direction(
    vectors: dict[str, Tensor], boundaries: list[int], strategy: str, emotion: str, n_layers: int
) -> Tensor:
    """The emotion vector at the final boundary (``n_layers``), where every head's effect is read out."""
    if n_layers not in boundaries:
        raise ValueError(
            f"emotion_vectors has no vector at the final boundary {n_layers} (captured: {boundaries}); "
            "re-materialize activations and emotion_vectors."
        )
    return vectors[f"{strategy}/{emotion}"][boundaries.index(n_layers)]


def random_heads(n_layers: int, n_heads: int, exclude: Sequence[Head], n: int, seed: int) -> list[Head]:
    """``n`` distinct heads drawn uniformly from every head not in ``exclude``, sorted by (layer, head)."""
    pool = [(ly, h) for ly in range(n_layers) for h in range(n_heads) if (ly, h) not in set(exclude)]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
    return sorted(pool[int(i)] for i in chosen)


def correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman (Pearson of average ranks) correlation; NaN when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def pearson(x: np.ndarray, y: np.ndarray) -> float:
        if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    return pearson(a, b), pearson(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())


# --- screening -----------------------------------------------------------------------------------------


def screen_pairs(
    model: nn.Module,
    pair: PromptPair,
    direction: Float[Tensor, " d_model"],
    n_layers: int,
    every_head: list[Head],
    screening: ScreeningConfig | None = None,
) -> pd.DataFrame:
    """Zero-ablation effect and attribution of every head on one set of pairs (one row per head).

    ``screening.method == "atp_star"``: ``ablation_effect`` is exact for the ``confirmed`` shortlist only
    (NaN elsewhere) and ``atp_star`` holds every head's estimate (``science/attribution_screening.py``).
    """
    screening = screening or ScreeningConfig()
    ids, mask = trimmed(pair.emotion_batch)
    extra: dict[str, Any] = {"confirmed": True}
    if screening.method == "atp_star":
        atp = screen_heads_atp_star(
            model, ids, mask, direction, n_layers, every_head, screening.shortlist,
            heads_per_pass=SCREEN_HEADS_PER_PASS, mode="zero",
        )  # fmt: skip
        ablation = atp["ablation_effect"].to_numpy()
        extra = {"confirmed": atp["confirmed"].to_numpy(), "atp_star": atp["atp_star"].to_numpy()}
    else:
        ablation = screen_heads_by_ablation(
            model, ids, mask, direction, n_layers, every_head,
            heads_per_pass=SCREEN_HEADS_PER_PASS, mode="zero",
        ).double().numpy()  # fmt: skip
    attribution = attribution_scores(
        model, pair.emotion_batch, pair.neutral_batch, direction, n_layers
    )  # [n_layers, n_heads]
    layout = head_layout(model)
    return pd.DataFrame(
        {
            "layer": [ly for ly, _ in every_head],
            "head": [h for _, h in every_head],
            "kv_head": [layout.kv_head(h) for _, h in every_head],
            "ablation_effect": ablation,
            "attribution": [float(attribution[ly, h]) for ly, h in every_head],
            "n_prompts": pair.n,
            "prompt_ids": join_ids(pair.emotion["id"].tolist()),
            "screening_method": screening.method,
            **extra,
        }
    )


@dataclass
class EmotionScreen:
    """One emotion's screen: per-half scores of every head, the split, honest maxima and correlations."""

    scores: pd.DataFrame  # one row per half × head, unranked (rank over every emotion with screening_table)
    split: pd.DataFrame
    top: pd.DataFrame
    correlations: list[dict[str, Any]]


def screen_emotion(
    model: nn.Module,
    pair: PromptPair,
    split: pd.DataFrame,
    direction: Float[Tensor, " d_model"],
    every_head: list[Head],
    screening: ScreeningConfig,
    *,
    top_n: int,
    n_boot: int,
    seed: int,
) -> EmotionScreen:
    """Screen every head of ``model`` for ``pair``'s emotion on each half of ``split``; measure each half's
    top-N heads per prompt on the other half (held out, bootstrap seed ``seed``) and correlate the ablation
    and attribution scores within each half."""
    emotion = str(pair.emotion["emotion"].iloc[0])
    n_layers = head_layout(model).n_layers
    halves = {
        half: sub_pair(pair, split.loc[split["half"] == half, "pair_index"].tolist()) for half in HALVES
    }
    tables = [
        screen_pairs(model, half_pair, direction, n_layers, every_head, screening).assign(
            emotion=emotion, half=half
        )
        for half, half_pair in halves.items()
    ]
    screened = rank_within_halves(pd.concat(tables, ignore_index=True))
    held_out = {}
    for half in HALVES:
        ids, mask = trimmed(halves[other_half(half)].emotion_batch)
        held_out[half] = ablation_effects_per_prompt(
            model, ids, mask, direction, n_layers, top_of_half(screened, emotion, half, top_n)
        )  # [n other-half prompts, top_n]
    top = honest_top_heads(screened, emotion, top_n, held_out, n_boot=n_boot, seed=seed)
    correlations = []
    for half in HALVES:
        rows = screened[(screened["half"] == half) & screened["ablation_effect"].notna()]
        pearson, spearman = correlation(rows["ablation_effect"], rows["attribution"])
        _, spearman_abs = correlation(rows["abs_ablation"], rows["attribution"].abs())
        correlations.append({
            "emotion": emotion, "half": half, "n_heads": len(rows), "n_prompts": int(rows["n_prompts"].iloc[0]),
            "pearson": pearson, "spearman": spearman, "spearman_abs": spearman_abs,
            "top_set_overlap": top_set_overlap(screened, emotion, top_n),
        })  # fmt: skip
    return EmotionScreen(pd.concat(tables, ignore_index=True), split, top, correlations)


def screening_table(scores: list[pd.DataFrame], n_layers: int, strategy: str) -> pd.DataFrame:
    """Every emotion's per-half scores in one table, ranked within each emotion × half, with the readout."""
    screening = rank_within_halves(pd.concat(scores, ignore_index=True))
    leading = ["emotion", "half", "layer", "head"]
    screening = screening[leading + [c for c in screening.columns if c not in leading]]
    screening["readout_boundary"] = n_layers
    screening["strategy"] = strategy
    return screening


# --- generation conditions (head_patching) -------------------------------------------------------------


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


def check_split_matches(split: pd.DataFrame, pair: PromptPair) -> None:
    """Refuse a screening split whose prompt pairs are not this run's pairs (dataset or profile changed)."""
    want = list(zip(split["prompt_id"].astype(str), split["neutral_prompt_id"].astype(str), strict=True))
    have = list(zip(pair.emotion["id"].astype(str), pair.neutral["id"].astype(str), strict=True))
    if sorted(want) != sorted(have):
        raise ValueError(
            f"head_screening's split of {pair.emotion['emotion'].iloc[0]!r} pairs other prompts than this run "
            f"({len(want)} vs {len(have)} pairs); re-materialize head_screening with the same dataset and "
            "profile before head_patching / emotion_circuits."
        )


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
) -> list[dict[str, Any]]:
    """Every generation condition of one fold: ``plan.heads`` (chosen on the other half) on ``pair``, all
    conditions' rows together in batches of ``batch_size`` (``science.batched_heads``)."""
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
        max_new_tokens=max_new, batch_size=batch_size, mean_z=mean_z,
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
