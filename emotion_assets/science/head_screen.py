"""The cross-fitted screen of every attention head for one emotion (``head_screening``).

Readout: the change in the projection of the last real token's residual at the model's final (pre-norm)
boundary onto the emotion's vector there (first pooling strategy of the profile); reading out at the final
boundary lets every ``(layer, head)`` reach it. Every score is computed on each half of the emotion's prompt
pairs separately; each half's top heads are measured on the other half (``science/crossfit.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import Tensor, nn

from emotion_assets.profiles import ScreeningConfig
from emotion_assets.science.attribution_screening import screen_heads_atp_star
from emotion_assets.science.crossfit import (
    HALVES,
    honest_top_heads,
    join_ids,
    other_half,
    rank_within_halves,
    top_of_half,
    top_set_overlap,
)
from emotion_assets.science.head_pairs import PromptPair, sub_pair, trimmed
from emotion_assets.science.heads import (
    Head,
    ablation_effects_per_prompt,
    attribution_scores,
    head_layout,
    screen_heads_by_ablation,
)
from emotion_assets.science.parallel import ModelWorkers

# Heads ablated in one forward of the screen (all 270 of SmolLM2-135M): bench/bench_heads.py measured
# 27, 90 and 270 per pass, and fewer, larger passes were fastest. The cap bounds memory for larger models.
SCREEN_HEADS_PER_PASS = 288


def correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman (Pearson of average ranks) correlation; NaN when either side is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def pearson(x: np.ndarray, y: np.ndarray) -> float:
        if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
            return float("nan")
        return float(np.corrcoef(x, y)[0, 1])

    return pearson(a, b), pearson(pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy())


def screen_pairs(
    model: nn.Module,
    pair: PromptPair,
    direction: Float[Tensor, " d_model"],
    n_layers: int,
    every_head: list[Head],
    screening: ScreeningConfig | None = None,
) -> pd.DataFrame:
    """Zero-ablation effect and attribution of every head on one set of pairs (one row per head).

    ``screening.method`` ``atp`` or ``atp_star``: ``ablation_effect`` is exact for the ``confirmed``
    shortlist only (NaN elsewhere) and the column named after the method holds every head's estimate
    (``science/attribution_screening.py``).
    """
    screening = screening or ScreeningConfig()
    ids, mask = trimmed(pair.emotion_batch)
    extra: dict[str, Any] = {"confirmed": True}
    if screening.method in ("atp", "atp_star"):
        shortlisted = screen_heads_atp_star(
            model, ids, mask, direction, n_layers, every_head, screening.shortlist,
            heads_per_pass=SCREEN_HEADS_PER_PASS, mode="zero", qk_fix=screening.method == "atp_star",
        )  # fmt: skip
        ablation = shortlisted["ablation_effect"].to_numpy()
        extra = {
            "confirmed": shortlisted["confirmed"].to_numpy(),
            screening.method: shortlisted[screening.method].to_numpy(),
        }
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


def _screen_pairs_of_handle(handle: Any, **kwargs: Any) -> pd.DataFrame:
    """:func:`screen_pairs` on a worker's model (``handle.model``)."""
    return screen_pairs(handle.model, **kwargs)


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
    workers: ModelWorkers | None = None,
) -> EmotionScreen:
    """Screen every head of ``model`` for ``pair``'s emotion on each half of ``split``; measure each half's
    top-N heads per prompt on the other half (held out, bootstrap seed ``seed``) and correlate the ablation
    and attribution scores within each half. ``workers`` (``science.parallel.ModelWorkers`` holding this
    model as ``.model``) screens the two halves in its processes."""
    emotion = str(pair.emotion["emotion"].iloc[0])
    n_layers = head_layout(model).n_layers
    halves = {
        half: sub_pair(pair, split.loc[split["half"] == half, "pair_index"].tolist()) for half in HALVES
    }
    if workers is None:
        workers = ModelWorkers(SimpleNamespace(model=model), load=None)
    tasks = [
        {"pair": half_pair, "direction": direction, "n_layers": n_layers, "every_head": every_head,
         "screening": screening}
        for half_pair in halves.values()
    ]  # fmt: skip
    tables = [
        table.assign(emotion=emotion, half=half)
        for half, table in zip(halves, workers.map(_screen_pairs_of_handle, tasks), strict=True)
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
