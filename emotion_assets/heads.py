"""Phases 6 and 8: attention heads that carry an emotion (screening, generation-level patching, circuits).

Readout. Every forward-only score here is the change in the projection of the last real token's residual
at the model's final (pre-norm) boundary onto the emotion's vector at that boundary (first pooling
strategy of the profile). Reading out at the final boundary lets every ``(layer, head)`` reach it.

Prompts. Screening, patching and circuits use each emotion's **eval** fitting prompts (the vectors were fit
on the train split) paired by index with eval neutral fitting prompts (never the unfinished steering
openings, whose form differs), at most ``profile.heads.max_prompts`` of each. The two lists are tokenized
together (left padding), so a pair shares its width and its last token, as head patching needs; mean
ablation uses the mean head output over **train** neutral fitting prompts.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from emotion_assets.common import (
    RunConfig,
    all_emotion_words,
    effective_profile,
    json_metadata,
    limit_for_run,
    recorded,
    refuse_failing_checks,
)
from emotion_assets.confounds import confound_audit
from emotion_assets.dataset import emotion_dataset, evaluator_suite_for
from emotion_assets.io import (
    GENERATIONS_FILE,
    SCREENING_FILE,
    SPLIT_FILE,
    ArtifactHandle,
    audit_flags,
    prompts_of,
    vectors_of,
)
from emotion_assets.partitions import (
    REGISTRY,
    causal_model_profile_partitions,
    model_and_profile,
    profile_to_model_profile,
)
from emotion_assets.patching import TARGET_METRICS
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.profiles import ScreeningConfig
from emotion_assets.science.attribution_screening import screen_heads_atp_star
from emotion_assets.science.batched_heads import (
    Condition,
    HeadIntervention,
    generate_conditions,
    readout_conditions,
)
from emotion_assets.science.crossfit import (
    HALVES,
    FoldPlan,
    fold_plans,
    half_ids,
    heads_by_fold,
    honest_top_heads,
    join_ids,
    leaked_rows,
    other_half,
    rank_within_halves,
    split_table,
    top_of_half,
    top_set_overlap,
)
from emotion_assets.science.heads import (
    Head,
    OVReport,
    ablation_effects_per_prompt,
    attribution_scores,
    capture_attention,
    capture_head_outputs,
    head_layout,
    mean_head_outputs,
    ov_circuit,
    qk_attention_to_positions,
    role_heuristic,
    screen_heads_by_ablation,
    shared_positions,
)
from emotion_assets.science.prompts import NEUTRAL, fitting_mask
from emotion_assets.science.residual import tokenize_prompts
from emotion_assets.science.statistics import stable_seed
from emotion_assets.vectors import emotion_vectors
from jobs.jobs import HEADS_GROUP
from resources.evaluators import EvaluatorResource
from resources.models import ModelHandle, ModelResource
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource

SENTIMENT = "sentiment_compound"
N_RANDOM_SEEDS = 2
SCREENING_ASSET = "head_screening"
PATCHING_ASSET = "head_patching"
CIRCUITS_ASSET = "emotion_circuits"


# --- shared helpers ------------------------------------------------------------------------------------


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
    max_tokens: int  # the profile's max_prompt_tokens, kept for sub-pairs

    @property
    def n(self) -> int:
        return len(self.emotion)


def _tokenized_pair(handle: ModelHandle, emo: pd.DataFrame, neu: pd.DataFrame, max_tokens: int) -> PromptPair:
    """Tokenize paired prompt rows together (left padding), so pair ``i`` shares its width and last token; a
    prompt over ``max_tokens`` (the profile's ``max_prompt_tokens``) is an error, never cut."""
    n = len(emo)
    emo, neu = emo.reset_index(drop=True), neu.reset_index(drop=True)
    enc = tokenize_prompts(
        handle.tokenizer, emo["text"].tolist() + neu["text"].tolist(), all_emotion_words(), max_tokens,
        ids=emo["id"].astype(str).tolist() + neu["id"].astype(str).tolist(), setting="max_prompt_tokens",
    )  # fmt: skip
    keys = ("input_ids", "attention_mask", "emotion_mask")
    first = {k: enc[k][:n].to(handle.device) for k in keys}
    second = {k: enc[k][n:].to(handle.device) for k in keys}
    return PromptPair(emo, neu, first, second, max_tokens)


def prompt_pair(
    handle: ModelHandle, frame: pd.DataFrame, emotion: str, max_prompts: int | None, max_tokens: int
) -> PromptPair:
    """Pair the first ``n`` eval prompts of ``emotion`` and of neutral (``n`` = the smaller count).

    Both frames get a ``pair_index`` column (0..n-1) that :func:`sub_pair` keeps.
    """
    emo = eval_prompts(frame, emotion, max_prompts)
    neu = eval_prompts(frame, NEUTRAL, max_prompts)
    n = min(len(emo), len(neu))
    if n == 0:
        raise ValueError(f"No eval prompts to pair for {emotion!r} and {NEUTRAL!r}.")
    emo = emo.head(n).reset_index(drop=True).assign(pair_index=np.arange(n))
    neu = neu.head(n).reset_index(drop=True).assign(pair_index=np.arange(n))
    return _tokenized_pair(handle, emo, neu, max_tokens)


def sub_pair(handle: ModelHandle, pair: PromptPair, pair_indices: Sequence[int]) -> PromptPair:
    """The pairs of ``pair`` whose ``pair_index`` is in ``pair_indices``, tokenized together anew."""
    keep = pair.emotion["pair_index"].isin(list(pair_indices)).to_numpy()
    if not keep.any():
        raise ValueError(f"None of the pair indices {list(pair_indices)} is in the prompt pair.")
    return _tokenized_pair(handle, pair.emotion[keep], pair.neutral[keep], pair.max_tokens)


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


def emotions_of(vectors: dict[str, Tensor], strategy: str) -> list[str]:
    """Emotions with a target evaluator score and a vector for ``strategy``, in TARGET_METRICS order."""
    have = {key.split("/", 1)[1] for key in vectors if key.startswith(f"{strategy}/")}
    return [emotion for emotion in TARGET_METRICS if emotion in have]


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


# --- head_screening ------------------------------------------------------------------------------------


# Heads ablated in one forward of the screen (all 270 of SmolLM2-135M): bench/bench_heads.py measured
# 27, 90 and 270 per pass, and fewer, larger passes were fastest. The cap bounds memory for larger models.
SCREEN_HEADS_PER_PASS = 288


def screen_pairs(
    handle: ModelHandle,
    pair: PromptPair,
    direction: Tensor,
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
            handle.model, ids, mask, direction, n_layers, every_head, screening.shortlist,
            heads_per_pass=SCREEN_HEADS_PER_PASS, mode="zero",
        )  # fmt: skip
        ablation = atp["ablation_effect"].to_numpy()
        extra = {"confirmed": atp["confirmed"].to_numpy(), "atp_star": atp["atp_star"].to_numpy()}
    else:
        ablation = screen_heads_by_ablation(
            handle.model, ids, mask, direction, n_layers, every_head,
            heads_per_pass=SCREEN_HEADS_PER_PASS, mode="zero",
        ).double().numpy()  # fmt: skip
    attribution = attribution_scores(
        handle.model, pair.emotion_batch, pair.neutral_batch, direction, n_layers
    )  # [n_layers, n_heads]
    layout = head_layout(handle.model)
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


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    group_name=HEADS_GROUP,
    ins={
        "emotion_vectors": dg.AssetIn(emotion_vectors.key),
        "audit": dg.AssetIn(confound_audit.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    },
    kinds={"pytorch", "parquet"},
    code_version="4",
    description="Every attention head scored per emotion on each half of a seeded split of the eval prompt "
    "pairs (cross-fitting): forward-only zero-ablation effect on the final-boundary emotion readout and the "
    "attribution-patching estimate; each half's top-N heads with their held-out effect on the other half.",
)
def head_screening(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    emotion_vectors: ArtifactHandle,
    audit: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    """Ablation screening and attribution for every ``(layer, head)``, on each half of the prompts.

    Split. Each emotion's eval prompt pairs are split into halves ``A`` and ``B`` by a seeded hash of the
    emotion prompt's id (``split.parquet``: pair, both prompt ids, half, seed). Every score below is
    computed on each half separately (``screening.parquet`` has one row per emotion × half × head; ``rank``
    is within the half): heads chosen on one half are measured by ``head_patching`` and
    ``emotion_circuits`` on the other (``science/crossfit.py``).

    ``ablation_effect``: mean change of the readout on the half's emotion prompts when the head's output is
    zeroed at every position (``screen_heads_by_ablation``). ``attribution``: the linear estimate of the
    readout change on the paired neutral prompts when the head's output is copied from the emotion prompts
    at shared positions (``attribution_scores``). Heads that carry the emotion have opposite signs on the
    two scores: agreement shows as a **negative** correlation.

    Honest maxima (``top_heads.parquet``): each half's top-N heads, labelled with the half that selected
    them, with the selection effect (a maximum, biased away from 0) beside the held-out per-prompt effect on
    the other half and its bootstrap CI, the number to report.
    """
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    handle = models.get(model_name, device=config.device)
    if config.n_jobs > 1:
        torch.set_num_threads(config.n_jobs)
    frame = limit_for_run(prompts_of(dataset), profile)
    vectors, boundaries = vectors_of(emotion_vectors)
    strategy = profile.pooling[0]
    layout = head_layout(handle.model)
    n_layers = layout.n_layers
    every_head = [(ly, h) for ly in range(n_layers) for h in range(layout.n_heads)]
    emotions = emotions_of(vectors, strategy)
    top_n = profile.heads.top_n
    with recorded(
        context, tracking=tracking, store=store, phase="6-heads", model=model_name, profile=profile,
        device=str(handle.device), config=config, throughput_unit="head_scores",
    ) as rec:  # fmt: skip
        tables, splits, tops, corr_rows = [], [], [], []
        for number, emotion in enumerate(emotions, start=1):
            context.log.info(f"Screening {len(every_head)} heads for {emotion} ({number} of {len(emotions)})")
            pair = prompt_pair(handle, frame, emotion, profile.heads.max_prompts, profile.max_prompt_tokens)
            split = crossfit_split(pair, emotion, profile.seed)
            direction = final_direction(vectors, boundaries, strategy, emotion, n_layers)
            halves = {
                half: sub_pair(handle, pair, split.loc[split["half"] == half, "pair_index"].tolist())
                for half in HALVES
            }
            for half, half_pair in halves.items():
                table = screen_pairs(
                    handle, half_pair, direction, n_layers, every_head, profile.heads.screening
                )
                tables.append(table.assign(emotion=emotion, half=half))
            screened = rank_within_halves(pd.concat(tables[-len(HALVES) :], ignore_index=True))
            held_out = {}
            for half in HALVES:
                other = halves[other_half(half)]
                ids, mask = trimmed(other.emotion_batch)
                held_out[half] = ablation_effects_per_prompt(
                    handle.model, ids, mask, direction, n_layers, top_of_half(screened, emotion, half, top_n)
                )  # [n other-half prompts, top_n]
            tops.append(honest_top_heads(
                screened, emotion, top_n, held_out, n_boot=profile.n_bootstrap,
                seed=stable_seed(profile.seed, "head_screening", model_name),
            ))  # fmt: skip
            splits.append(split)
            for half in HALVES:
                rows = screened[(screened["half"] == half) & screened["ablation_effect"].notna()]
                pearson, spearman = correlation(rows["ablation_effect"], rows["attribution"])
                _, spearman_abs = correlation(rows["abs_ablation"], rows["attribution"].abs())
                corr_rows.append({
                    "emotion": emotion, "half": half, "n_heads": len(rows), "n_prompts": int(rows["n_prompts"].iloc[0]),
                    "pearson": pearson, "spearman": spearman, "spearman_abs": spearman_abs,
                    "top_set_overlap": top_set_overlap(screened, emotion, top_n),
                })  # fmt: skip
        rec.timing.samples = len(every_head) * len(emotions) * len(HALVES)
        screening = rank_within_halves(pd.concat(tables, ignore_index=True))
        leading = ["emotion", "half", "layer", "head"]
        screening = screening[leading + [c for c in screening.columns if c not in leading]]
        screening["readout_boundary"] = n_layers
        screening["strategy"] = strategy
        split = pd.concat(splits, ignore_index=True)
        top = pd.concat(tops, ignore_index=True)
        correlations = pd.DataFrame(corr_rows)
        # The blocking check's logic runs on the staged table: an incomplete screen is never published.
        refuse_failing_checks(
            SCREENING_ASSET,
            str(context.partition_key),
            {"head_screening_complete": screening_check(screening, split, layout.n_layers, layout.n_heads)},
        )

        out = store.directory(profile_name, SCREENING_ASSET, model_name)
        rec.artifacts(out)
        write_table(out / "screening.parquet", screening, csv=True)
        write_table(out / "split.parquet", split, csv=True)
        write_table(out / "top_heads.parquet", top, csv=True)
        write_table(out / "correlations.parquet", correlations, csv=True)
        plots = {}
        for emotion in emotions:
            for half in HALVES:
                rows = screening[(screening["emotion"] == emotion) & (screening["half"] == half)]
                grid = rows.pivot_table(index="layer", columns="head", values="ablation_effect")
                plots[f"ablation_effect_heatmap_{emotion}_{half}"] = save_figure(
                    heatmap(grid.to_numpy(), list(grid.index), list(grid.columns),
                            f"{model_name}: zero-ablation effect on the {emotion} readout, half {half}",
                            "head", "layer"),
                    out / f"ablation_effect_heatmap_{emotion}_{half}.png",
                )  # fmt: skip
        rec.metrics(
            **{f"spearman_{r.emotion}_{r.half}": r.spearman for r in correlations.itertuples()},
            **{f"top_set_overlap_{r.emotion}": r.top_set_overlap for r in correlations.itertuples()},
            **{f"mean_shrinkage_{e}": float(g["shrinkage"].mean()) for e, g in top.groupby("emotion")},
        )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "screening.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(screening)),
            "n_heads": dg.MetadataValue.int(len(every_head)),
            "readout_boundary": dg.MetadataValue.int(n_layers),
            "crossfit_split": markdown_table(
                split.groupby(["emotion", "half"]).size().rename("pairs").reset_index()
            ),
            # The readout is the emotion vector at the final boundary: what the confound audit says of it.
            "confound_flags": json_metadata(audit_flags(audit, strategy, [n_layers])),
            "top_heads": markdown_table(
                top[
                    [
                        "emotion",
                        "label",
                        "rank",
                        "layer",
                        "head",
                        "selection_effect",
                        "held_out_effect",
                        "held_out_ci_low",
                        "held_out_ci_high",
                        "n_held_out",
                    ]
                ],
                max_rows=len(HALVES) * top_n * max(len(emotions), 1),
            ),
            "correlations": markdown_table(correlations),
            **plots,
            **rec.metadata(),
        }
    )


@dg.asset_check(asset=head_screening, blocking=True, description="Every (layer, head) of the model is "
                "scored for every emotion on both halves of its prompt pairs, every score is finite, and the "
                "halves are disjoint.")  # fmt: skip
def head_screening_complete(
    context: dg.AssetCheckExecutionContext, head_screening: ArtifactHandle
) -> dg.AssetCheckResult:
    model_name, _ = model_and_profile(context)
    spec = REGISTRY.get(model_name)
    screening = head_screening.table(SCREENING_FILE)
    split = head_screening.table(SPLIT_FILE)
    return screening_check(screening, split, spec.layers, spec.heads)


def screening_check(
    screening: pd.DataFrame, split: pd.DataFrame, n_layers: int, n_heads: int
) -> dg.AssetCheckResult:
    """The logic of ``head_screening_complete``: every ``(layer, head)`` scored once per emotion and half,
    finitely, on halves that share no prompt."""
    expected = {(ly, h) for ly in range(n_layers) for h in range(n_heads)}
    missing = {}
    for emotion in screening["emotion"].unique():
        for half in HALVES:
            rows = screening[(screening["emotion"] == emotion) & (screening["half"] == half)]
            got = set(zip(rows["layer"].astype(int), rows["head"].astype(int), strict=True))
            if got != expected or len(rows) != len(expected):
                missing[f"{emotion}/{half}"] = len(expected - got) + abs(len(rows) - len(expected))
    overlapping = [
        str(emotion)
        for emotion, rows in split.groupby("emotion")
        if set(half_ids(rows, HALVES[0])) & set(half_ids(rows, HALVES[1]))
    ]
    # Under atp_star only the confirmed shortlist has an exact ablation effect (NaN elsewhere, by design).
    confirmed = (
        screening["confirmed"].astype(bool) if "confirmed" in screening else np.ones(len(screening), bool)
    )
    finite = bool(
        np.isfinite(screening.loc[confirmed, "ablation_effect"].to_numpy()).all()
        and np.isfinite(screening["attribution"].to_numpy()).all()
    )
    problems = [f"incomplete or repeated heads per emotion {missing}"] if missing else []
    if not finite:
        problems.append("non-finite ablation or attribution scores")
    if overlapping:
        problems.append(f"halves share a prompt for {overlapping}")
    if screening["emotion"].nunique() == 0:
        problems.append("no emotion was screened")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "Every head is scored once per emotion and half, finitely.",
        metadata={
            "emotions": sorted(screening["emotion"].unique().tolist()),
            "heads_per_emotion_and_half": len(expected),
            "incomplete": missing,
            "halves_sharing_a_prompt": overlapping,
            "all_finite": finite,
        },
    )


# --- head_patching -------------------------------------------------------------------------------------


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


POOLED_FOLD = "both"


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


def _fold_generations(
    handle: ModelHandle,
    plan: FoldPlan,
    pair: PromptPair,
    layout: Any,
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
        handle.model, handle.tokenizer, sets, [c.batched() for c in conditions], positions=positions,
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


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    group_name=HEADS_GROUP,
    ins={
        "head_screening": dg.AssetIn(head_screening.key),
        "emotion_vectors": dg.AssetIn(emotion_vectors.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    },
    kinds={"pytorch", "parquet"},
    code_version="3",
    pool="model",
    description="Greedy continuations with the top-N screened heads ablated (zero, mean; single and joint) "
    "or patched between paired emotion and neutral prompts (z, v_only, pattern_v), next to random-head "
    "controls; one row per prompt × condition with every evaluator score of the continuation.",
)
def head_patching(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    evaluators: EvaluatorResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    head_screening: ArtifactHandle,
    emotion_vectors: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    """Does removing or transplanting an emotion's top heads change what the model writes?

    Cross-fitted: per emotion and fold, the top-N heads by |ablation effect| on one half of the prompt pairs
    (``head_screening``) are measured on the other half (fold ``A_to_B``: chosen on A, measured on B; and
    ``B_to_A``). The folds' rows are concatenated: every prompt is continued once per condition, with heads
    chosen on the half it is not in. Each row stores ``fold``, ``selection_half``, ``measurement_half`` and
    ``selected_on_prompt_ids`` (every prompt id of the selecting half) beside its own ``prompt_id`` and
    ``source_prompt_id``; the blocking check ``head_patching_crossfit`` verifies from them that no head set
    was measured on a prompt that selected it. Random-head controls are drawn per fold, never a top head of
    that fold. Conditions:

    - ``baseline``: no intervention, on the emotion prompts and on the neutral prompts;
    - ``ablation``: each top head alone and all jointly, zero and mean (mean over train neutral prompts),
      on the emotion prompts;
    - ``patch``: the top heads jointly, ``neutral_to_emotion`` (destination = neutral prompts, source = the
      paired emotion prompts) and ``emotion_to_neutral`` (destination = emotion prompts, source = neutral
      prompts), modes ``z``, ``v_only``, ``pattern_v``, at positions where both prompts have real tokens;
    - ``random_ablation`` / ``random_patch``: 2 seeds of N random heads (never a top head), joint zero
      ablation and joint ``z`` patching in both directions.

    When interventions act. Ablations act on every forward, prompt and generated tokens alike. Patches act
    on the **prefill** only: their source tensors exist for the prompt's positions, not for tokens the
    destination has not generated yet. The patched prompt still shapes every generated token, through the
    residual stream of later layers and their key/value cache; the patched heads' own outputs at generated
    tokens are the destination's. Greedy decoding, ``profile.generation.max_new_tokens``; the continuation
    only is scored. ``condition_shifts`` pairs every condition with the baseline on the same prompts.
    """
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    handle = models.get(model_name, device=config.device)
    if config.n_jobs > 1:
        torch.set_num_threads(config.n_jobs)
    frame = limit_for_run(prompts_of(dataset), profile)
    screening = head_screening.table(SCREENING_FILE)
    splits = head_screening.table(SPLIT_FILE)
    vectors, _ = vectors_of(emotion_vectors)
    emotions = [e for e in emotions_of(vectors, profile.pooling[0]) if e in set(screening["emotion"])]
    layout = head_layout(handle.model)
    top_n = profile.heads.top_n
    max_new = profile.generation.max_new_tokens
    with recorded(
        context, tracking=tracking, store=store, phase="6-heads", model=model_name, profile=profile,
        device=str(handle.device), config=config, throughput_unit="generations",
    ) as rec:  # fmt: skip
        neutral_train = frame[
            ((frame["split"] == "train") & (frame["emotion"] == NEUTRAL)).to_numpy() & fitting_mask(frame)
        ].sort_values("id")
        enc = tokenize_prompts(
            handle.tokenizer, neutral_train["text"].tolist(), [], profile.max_prompt_tokens,
            ids=neutral_train["id"].astype(str).tolist(), setting="max_prompt_tokens",
        )  # fmt: skip
        ids, mask = enc["input_ids"].to(handle.device), enc["attention_mask"].to(handle.device)
        mean_z = mean_head_outputs(
            capture_head_outputs(handle.model, ids, mask, range(layout.n_layers)), mask
        )

        rows = []
        for number, emotion in enumerate(emotions, start=1):
            context.log.info(f"Generating the {emotion} conditions ({number} of {len(emotions)})")
            pair = prompt_pair(handle, frame, emotion, profile.heads.max_prompts, profile.max_prompt_tokens)
            split = splits[splits["emotion"] == emotion]
            check_split_matches(split, pair)
            for plan in fold_plans(split, screening, top_n):
                rows += _fold_generations(handle, plan, sub_pair(handle, pair, plan.measurement_pairs),
                                          layout, mean_z, max_new, profile.seed, profile.batch_size)  # fmt: skip
        generations = pd.DataFrame(rows)
        rec.timing.samples = len(generations)
        suite = evaluator_suite_for(evaluators, profile, frame)
        scores = suite.score(generations["continuation"].tolist())  # the continuation only
        scored = pd.concat([generations.reset_index(drop=True), scores.reset_index(drop=True)], axis=1)
        scored["seed"] = scored["seed"].astype("Int64")
        metrics = {e: [m for m in (TARGET_METRICS[e], SENTIMENT) if m in scored] for e in emotions}
        shifts = shift_table(scored, metrics)
        comparison = top_vs_random(shifts)
        # The blocking check's logic runs on the staged table: an incomplete sweep is never published.
        refuse_failing_checks(
            PATCHING_ASSET,
            str(context.partition_key),
            {
                "head_patching_complete": patching_check(scored),
                "head_patching_crossfit": crossfit_check(scored, splits),
            },
        )

        out = store.directory(profile_name, PATCHING_ASSET, model_name)
        rec.artifacts(out)
        write_table(out / "generations.parquet", scored, csv=True)
        write_table(out / "condition_shifts.parquet", shifts, csv=True)
        write_table(out / "top_vs_random.parquet", comparison, csv=True)
        rec.metrics(**{
            f"top_target_shift_{r.emotion}_{r.intervention.replace(' ', '_')}": r.top_target_shift
            for r in comparison.itertuples()
        })  # fmt: skip
        examples = scored[
            scored["kind"].isin(["baseline", "ablation", "patch"]) & (scored["pair_index"] == 0)
        ]
        examples = examples[examples["scope"] != "single"]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "generations.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(scored)),
            "n_conditions": dg.MetadataValue.int(int(scored.groupby(["emotion", "condition"]).ngroups)),
            "top_vs_random": markdown_table(comparison),
            "selection": dg.MetadataValue.text(
                "Cross-fitted: top heads chosen on one half of each emotion's prompt pairs, measured on the "
                "other; every number pools both folds (see condition_shifts fold = both)."
            ),
            "heads_by_fold": markdown_table(
                scored[scored["kind"] == "patch"].drop_duplicates(["emotion", "fold"])[
                    ["emotion", "fold", "selection_half", "measurement_half", "heads"]
                ]
            ),
            "condition_shifts": markdown_table(
                shifts.loc[
                    shifts["fold"] == POOLED_FOLD,
                    ["emotion", "condition", "n_prompts", "n_changed", "target_shift", "sentiment_shift"],
                ],
                max_rows=40,
            ),
            "examples": markdown_table(
                examples[["emotion", "condition", "prompt", "continuation"]], max_rows=30
            ),
            "null_metrics": dg.MetadataValue.json(suite.null_reasons),
            **rec.metadata(),
        }
    )


@dg.asset_check(asset=head_patching, blocking=True, description="Every condition of every emotion has a "
                "continuation for every prompt of its prompt set, exactly once.")  # fmt: skip
def head_patching_complete(head_patching: ArtifactHandle) -> dg.AssetCheckResult:
    scored = head_patching.table(GENERATIONS_FILE)
    return patching_check(scored)


def patching_check(scored: pd.DataFrame) -> dg.AssetCheckResult:
    """The logic of ``head_patching_complete``: every (emotion, condition) continues each of its emotion's
    baseline prompts exactly once, and every kind of condition is there."""
    incomplete = []
    for (emotion, condition), group in scored.groupby(["emotion", "condition"]):
        expected = set(
            scored.loc[(scored["emotion"] == emotion) & (scored["kind"] == "baseline"), "pair_index"]
        )
        if set(group["pair_index"]) != expected or group["pair_index"].duplicated().any():
            incomplete.append(f"{emotion}/{condition}")
    kinds = set(scored["kind"])
    needed = {"baseline", "ablation", "patch", "random_ablation", "random_patch"}
    problems = [f"conditions without one row per prompt: {incomplete[:20]}"] if incomplete else []
    if needed - kinds:
        problems.append(f"missing kinds of condition {sorted(needed - kinds)}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "Every condition has one row per prompt.",
        metadata={
            "conditions": int(scored.groupby(["emotion", "condition"]).ngroups),
            "incomplete": incomplete[:20],
            "missing_kinds": sorted(needed - kinds),
        },
    )


@dg.asset_check(asset=head_patching, blocking=True, description="Cross-fitting holds row by row: no head set "
                "is measured on a prompt of the half that selected it, and every prompt is measured by each "
                "condition in exactly one fold.",
                additional_ins={"head_screening": dg.AssetIn(head_screening.key)})  # fmt: skip
def head_patching_crossfit(
    head_patching: ArtifactHandle, head_screening: ArtifactHandle
) -> dg.AssetCheckResult:
    return crossfit_check(head_patching.table(GENERATIONS_FILE), head_screening.table(SPLIT_FILE))


def crossfit_check(scored: pd.DataFrame, split: pd.DataFrame) -> dg.AssetCheckResult:
    """The logic of ``head_patching_crossfit``: no row's prompt selected its heads, one fold per prompt."""
    leaks = leaked_rows(scored, split)
    folds_per_prompt = scored.groupby(["emotion", "condition", "pair_index"])["fold"].nunique()
    in_two = int((folds_per_prompt > 1).sum())
    problems = (
        [f"{len(leaks)} rows measured on a prompt that selected their heads"] if not leaks.empty else []
    )
    if in_two:
        problems.append(f"{in_two} prompt × condition cells measured in two folds")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "No head set is measured on a prompt that selected it.",
        metadata={
            "rows": len(scored),
            "leaking_rows": len(leaks),
            "leaks": leaks[["emotion", "condition", "fold", "prompt_id"]].head(20).to_dict("records"),
            "prompts_in_two_folds": in_two,
        },
    )


# --- emotion_circuits ----------------------------------------------------------------------------------


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
    model: torch.nn.Module,
    pair: PromptPair,
    top: list[Head],
    direction: Tensor,
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


def _joint_vs_sum_plot(effects: pd.DataFrame, title: str) -> plt.Figure:
    emotions = list(dict.fromkeys(effects["emotion"]))
    fig, axes = plt.subplots(1, len(emotions), figsize=(3.6 * len(emotions), 3.4), squeeze=False)
    for ax, emotion in zip(axes[0], emotions, strict=True):
        rows = effects[effects["emotion"] == emotion]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, rows["joint_effect"], width=0.4, label="joint")
        ax.bar(x + 0.2, rows["sum_single_effects"], width=0.4, label="sum of singles")
        ax.set_xticks(x, [name.replace("_", "\n") for name in rows["intervention"]], fontsize=7)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(emotion)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("Δ readout (final boundary)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


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
    handle: ModelHandle, plan: FoldPlan, pair: PromptPair, screening: pd.DataFrame, inputs: CircuitInputs
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
        handle.model, pair.emotion_batch["input_ids"], pair.emotion_batch["attention_mask"], layers
    )
    neu_att = capture_attention(
        handle.model, pair.neutral_batch["input_ids"], pair.neutral_batch["attention_mask"], layers
    )
    words = pair.emotion_batch["emotion_mask"].bool()  # [n, pos]
    same_positions = words & pair.neutral_batch["attention_mask"].bool()
    has_words = words.any(dim=1).cpu()  # [n]
    table, single_patch = circuit_effects(
        handle.model, pair, top, inputs.direction, inputs.n_layers, effects, inputs.batch_size
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
                handle.model,
                layer,
                head,
                own[boundaries.index(b_in)],
                emotion_directions=outs,
                unembed_top_k=10,
            )
        else:
            ov = OVReport(layer, head, head_layout(handle.model).kv_head(head), torch.zeros(0), math.nan,
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
            "ov_top_tokens": " | ".join(repr(handle.tokenizer.decode([t])) for t in ov.top_token_ids),
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


@dg.asset(
    partitions_def=causal_model_profile_partitions,
    group_name=HEADS_GROUP,
    ins={
        "head_screening": dg.AssetIn(head_screening.key),
        "emotion_vectors": dg.AssetIn(emotion_vectors.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    },
    kinds={"pytorch", "parquet"},
    code_version="3",
    pool="model",
    description="The top heads per emotion as circuit parts, cross-fitted (heads chosen on one half of the "
    "prompts, measured on the other): OV image of the emotion vector (gain, cosine, promoted tokens), "
    "attention from the final token to emotion words, a role, and joint vs summed single effects of "
    "ablating the heads (with and without their layers' MLPs) and of patching them.",
)
def emotion_circuits(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    head_screening: ArtifactHandle,
    emotion_vectors: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    """OV, QK, roles and circuit effects of each emotion's top-N heads, per cross-fitted fold.

    Folds: the top-N heads of half ``A`` (``head_screening``) are analysed on the pairs of half ``B`` and
    vice versa (``fold_circuit``); every row stores its fold, halves and the prompt ids that selected and
    measured it. ``circuit_effects.parquet`` adds fold ``both``: the folds pooled per prompt.

    OV: ``ov_circuit`` of the emotion vector at the head's ``resid_pre`` boundary (the last captured one
    before it when that block was not captured: ``boundary_in``), cosines with every emotion's vector at
    the first captured boundary ``>= layer + 1`` (``boundary_out``). QK: attention mass from the final
    token to emotion-word tokens on the emotion prompts. Neutral prompts contain no emotion words (their
    own value would be 0 by construction), so the neutral reference is the attention of the paired
    neutral prompt to the **same positions** (same distance from the end under left padding, real tokens
    only): it separates attending to the emotion word from attending to that position. Rows whose emotion
    prompt has no emotion-word token are left out of both means. Role: ``role_heuristic`` with the effect
    threshold at the 75th percentile of |ablation effect| over every head screened on the measurement
    half. Circuit effects: see ``circuit_effects``.
    """
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    handle = models.get(model_name, device=config.device)
    if config.n_jobs > 1:
        torch.set_num_threads(config.n_jobs)
    frame = limit_for_run(prompts_of(dataset), profile)
    screening = head_screening.table(SCREENING_FILE)
    splits = head_screening.table(SPLIT_FILE)
    vectors, boundaries = vectors_of(emotion_vectors)
    strategy = profile.pooling[0]
    emotions = [e for e in emotions_of(vectors, strategy) if e in set(screening["emotion"])]
    n_layers = head_layout(handle.model).n_layers
    with recorded(
        context, tracking=tracking, store=store, phase="8-circuits", model=model_name, profile=profile,
        device=str(handle.device), config=config, throughput_unit="heads",
    ) as rec:  # fmt: skip
        head_rows, effect_tables = [], []
        for emotion in emotions:
            pair = prompt_pair(handle, frame, emotion, profile.heads.max_prompts, profile.max_prompt_tokens)
            split = splits[splits["emotion"] == emotion]
            check_split_matches(split, pair)
            inputs = CircuitInputs(
                vectors, boundaries, strategy, emotions,
                final_direction(vectors, boundaries, strategy, emotion, n_layers), n_layers,
                profile.batch_size,
            )  # fmt: skip
            for plan in fold_plans(split, screening, profile.heads.top_n):
                rows, table = fold_circuit(
                    handle, plan, sub_pair(handle, pair, plan.measurement_pairs), screening, inputs
                )
                head_rows += rows
                effect_tables.append(table)
        rec.timing.samples = len(head_rows)
        heads_table = pd.DataFrame(head_rows)
        folds = pd.concat(effect_tables, ignore_index=True)
        pooled = pooled_circuit_effects(folds)
        effects_table = pd.concat([folds, pooled], ignore_index=True)
        leading = ["emotion", "fold", "intervention"]
        effects_table = effects_table[leading + [c for c in effects_table.columns if c not in leading]]
        summary = pd.DataFrame([
            {
                "emotion": emotion,
                "heads": " | ".join(f"{fold}: {head_label(list(zip(f['layer'], f['head'], strict=True)))}"
                                    for fold, f in g.groupby("fold")),
                "roles": " | ".join(f"{fold}: {','.join(f['role'])}" for fold, f in g.groupby("fold")),
                "mean_ov_cosine_own": float(g["ov_cosine_own"].mean()),
                "mean_attention_delta": float(g["attention_delta"].mean()),
                **{f"ratio_{r.intervention}": r.ratio for r in pooled[pooled["emotion"] == emotion].itertuples()},
            }
            for emotion, g in heads_table.groupby("emotion", sort=False)
        ])  # fmt: skip

        out = store.directory(profile_name, CIRCUITS_ASSET, model_name)
        rec.artifacts(out)
        write_table(out / "heads.parquet", heads_table, csv=True)
        write_table(out / "circuit_effects.parquet", effects_table, csv=True)
        write_table(out / "summary.parquet", summary, csv=True)
        plot = save_figure(
            _joint_vs_sum_plot(pooled, f"{model_name}: joint vs summed single effects (top heads, held out)"),
            out / "joint_vs_sum.png",
        )
        rec.metrics(**{f"ratio_{r.emotion}_{r.intervention}": r.ratio for r in pooled.itertuples()})
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "heads.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(heads_table)),
            "selection": dg.MetadataValue.text(
                "Cross-fitted: each fold's heads were selected on one half of the prompt pairs "
                "(selection_half) and every number here is measured on the other half (measurement_half)."
            ),
            "summary": markdown_table(summary),
            "heads": markdown_table(
                heads_table[
                    [
                        "emotion",
                        "fold",
                        "rank",
                        "layer",
                        "head",
                        "role",
                        "selection_effect",
                        "ablation_effect",
                        "ov_gain",
                        "ov_cosine_own",
                        "attention_emotion_words",
                        "attention_neutral_same_positions",
                        "ov_top_tokens",
                    ]
                ],
                max_rows=60,
            ),
            "circuit_effects": markdown_table(
                effects_table.drop(columns=["heads", "selected_on_prompt_ids", "measured_on_prompt_ids"]),
                max_rows=60,
            ),
            "joint_vs_sum": plot,
            **rec.metadata(),
        }
    )
