"""What a steering sweep shows, with the right controls: per-prompt shifts and steerability, the fluency
each cell costs, the best cell per emotion selected on one half of the prompts and confirmed on the other,
and the paired comparisons of the steering family (baseline, random controls by kind, other emotions).

Inputs are the sweep's generations table: one row per prompt × condition with ``prompt_id``, the condition
columns of :data:`CONDITION_COLUMNS` (``kind`` is ``baseline``, ``emotion``, ``random_isotropic`` or
``random_covariance``; there is exactly one baseline condition) and one column per evaluator score.
Everything counts unique prompt ids: rows sharing one are averaged first, so a repeated prompt never adds n.

A *cell* is one ``(emotion, layer, α ≠ 0)`` condition. Its **shift** on a score is the mean over prompts of
(steered score − unsteered score of the same prompt). The **intended** direction of a cell is the sign of α
on the emotion's own target score (α > 0 should raise it, α < 0 lower it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from torch import nn

from emotion_assets.science.batch_cache import BatchCache
from emotion_assets.science.fluency import (
    continuation_logprob,
    fluency_summary,
    structural_degeneracy,
    text_fluency,
)
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.statistics import bh_fdr, bonferroni, paired_comparison, stable_seed

#: The evaluator score each emotion's steering should move (all are probabilities in [0, 1]).
TARGET_METRICS = {"gratitude": "emotion_gratitude", "anger": "emotion_anger", "apology": "emotion_apology"}
CONDITION_COLUMNS = ["condition", "kind", "emotion", "layer", "alpha", "seed"]
RANDOM_KINDS = ("random_isotropic", "random_covariance")
#: |shift| above which a prompt counts as moved (scores are floats; an unchanged text shifts by exactly 0).
MOVED_TOLERANCE = 1e-9
SELECTION_HALF, CONFIRMATION_HALF = "A", "B"
SELECTION_LABEL = "selected on half A, confirmed on half B"
#: Relative slack of the fluency bounds, so a value at a bound up to rounding (exp/log) counts as within it.
BOUND_RTOL = 1e-9
#: Fewest unique prompts per half: a paired comparison needs two.
MIN_PROMPTS_PER_HALF = 2


# ------------------------------------------------------------------------------- per-prompt shifts


def per_prompt_scores(scored: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """One row per unique ``prompt_id`` × condition with the mean of ``columns`` (duplicates averaged)."""
    missing = [c for c in ["prompt_id", *CONDITION_COLUMNS, *columns] if c not in scored]
    if missing:
        raise ValueError(
            f"The generations table lacks columns {missing}; it must come from residual_patching."
        )
    keys = ["prompt_id", *CONDITION_COLUMNS]
    return scored.groupby(keys, dropna=False, sort=False)[list(columns)].mean().reset_index()


def prompt_shifts(scored: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per unique prompt × condition: each metric's shift (condition score − baseline score of that prompt).

    Columns: ``prompt_id``, :data:`CONDITION_COLUMNS`, one column per metric holding the shift.
    """
    table = per_prompt_scores(scored, metrics)
    baseline_rows = table[table["kind"] == "baseline"]
    if baseline_rows["condition"].nunique() != 1:
        raise ValueError(
            f"Expected exactly one baseline condition, found {baseline_rows['condition'].nunique()}; "
            "build the sweep with build_conditions (one unsteered baseline)."
        )
    baseline = baseline_rows.set_index("prompt_id")[list(metrics)]
    unpaired = sorted(set(table["prompt_id"]) - set(baseline.index))
    if unpaired:
        raise ValueError(f"Prompts {unpaired[:5]} have steered rows but no baseline row; rerun the sweep.")
    out = table.copy()
    out[list(metrics)] = table[list(metrics)].to_numpy() - baseline.loc[table["prompt_id"]].to_numpy()
    return out


def spread(shifts: pd.Series, by: pd.Series) -> pd.DataFrame:
    """Per group of ``by``: ``shift`` (mean), ``shift_sd`` (ddof 1), ``shift_q25``, ``shift_q75``,
    ``shift_iqr``, ``share_up`` / ``share_down`` (share of prompts whose shift is above / below
    ±:data:`MOVED_TOLERANCE`). One row per group, indexed by it."""
    groups = shifts.groupby(by, sort=False)
    q25, q75 = groups.quantile(0.25), groups.quantile(0.75)
    return pd.DataFrame({
        "shift": groups.mean(), "shift_sd": groups.std(ddof=1), "shift_q25": q25, "shift_q75": q75,
        "shift_iqr": q75 - q25,
        "share_up": (shifts > MOVED_TOLERANCE).groupby(by, sort=False).mean(),
        "share_down": (shifts < -MOVED_TOLERANCE).groupby(by, sort=False).mean(),
    })  # fmt: skip


def intended_sign(kind: str, alpha: float) -> float:
    """+1 / −1: the direction steering should move the emotion's own target score; NaN for non-emotion
    conditions and α = 0."""
    if kind != "emotion" or not alpha:
        return math.nan
    return float(np.sign(alpha))


def shift_table(
    scored: pd.DataFrame, metrics: Sequence[str], target_metrics: Mapping[str, str]
) -> pd.DataFrame:
    """Per condition: the mean score and the per-prompt shift against the baseline of every metric, with the
    spread of the shift beside each mean, and the steerability of emotion cells on their own target score.

    Columns: :data:`CONDITION_COLUMNS`, ``n_prompts`` (unique), then per metric ``{m}_mean``, ``{m}_shift``,
    ``{m}_shift_sd``, ``{m}_shift_iqr``, ``{m}_share_up``, ``{m}_share_down``; then, for emotion conditions
    whose target score is among ``metrics``: ``target_metric``, ``target_shift``, ``target_shift_sd``,
    ``target_shift_iqr``, ``share_intended`` (prompts moved the intended way, see :func:`intended_sign`) and
    ``share_anti`` (moved the opposite way: anti-steerable); the last two are NaN at α = 0.
    """
    scores = per_prompt_scores(scored, metrics)
    shifts = prompt_shifts(scored, metrics)
    conditions = shifts.drop_duplicates("condition").set_index("condition")[CONDITION_COLUMNS[1:]]
    columns: dict[str, pd.Series] = {
        "n_prompts": shifts.groupby("condition", sort=False)["prompt_id"].nunique()
    }
    by_metric: dict[str, pd.DataFrame] = {}
    for metric in metrics:
        columns[f"{metric}_mean"] = scores.groupby("condition", sort=False)[metric].mean()
        by_metric[metric] = spread(shifts[metric], shifts["condition"])
        for column in ("shift", "shift_sd", "shift_iqr", "share_up", "share_down"):
            columns[f"{metric}_{column}"] = by_metric[metric][column]
    rows = []
    for name, cond in conditions.iterrows():
        metric = target_metrics.get(cond["emotion"]) if cond["kind"] == "emotion" else None
        if metric not in by_metric:
            rows.append({})
            continue
        stats, sign = by_metric[metric].loc[name], intended_sign(cond["kind"], cond["alpha"])
        up, down = stats["share_up"], stats["share_down"]
        rows.append({
            "target_metric": metric, "target_shift": stats["shift"], "target_shift_sd": stats["shift_sd"],
            "target_shift_iqr": stats["shift_iqr"],
            "share_intended": math.nan if math.isnan(sign) else (up if sign > 0 else down),
            "share_anti": math.nan if math.isnan(sign) else (down if sign > 0 else up),
        })  # fmt: skip
    target = pd.DataFrame(rows, index=conditions.index).reindex(
        columns=["target_metric", "target_shift", "target_shift_sd", "target_shift_iqr", "share_intended",
                 "share_anti"]
    )  # fmt: skip
    return pd.concat([conditions, pd.DataFrame(columns), target], axis=1).reset_index()


# ---------------------------------------------------------------------------------------- fluency


@dataclass(frozen=True)
class FluencyBounds:
    """A cell is fluent when its perplexity ratio against the baseline and its share of degenerate
    continuations are both within these bounds (inclusive)."""

    max_perplexity_ratio: float
    max_degenerate_share: float

    def describe(self) -> dict[str, float]:
        return {
            "max_perplexity_ratio": self.max_perplexity_ratio,
            "max_degenerate_share": self.max_degenerate_share,
        }


def continuation_fluency(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    generated_tokens: Sequence[int],
    *,
    batch_size: int,
    device: Any = None,
    cache: BatchCache | None = None,
    fingerprint: str = "",
    workers: ModelWorkers | None = None,
) -> pd.DataFrame:
    """Per continuation, in order: :func:`text_fluency` (``generated_tokens``, ``n_text_tokens``,
    ``distinct_2``, ``repetition_rate``, ``degenerate``, ``degenerate_reason``) and the unsteered
    ``model``'s :func:`continuation_logprob` given the prompt (``mean_logprob``, ``n_scored_tokens``,
    ``perplexity``), batched. Call it outside any steering hook: the log-likelihood is the unsteered one.
    ``cache``, ``fingerprint`` and ``workers`` go to :func:`continuation_logprob`."""
    text = text_fluency(continuations, generated_tokens)
    logprob = continuation_logprob(
        model, tokenizer, prompts, continuations, batch_size=batch_size, device=device, cache=cache,
        fingerprint=fingerprint, workers=workers,
    )  # fmt: skip
    return pd.concat([text.reset_index(drop=True), logprob.reset_index(drop=True)], axis=1)


def attach_fluency(scored: pd.DataFrame, fluency: pd.DataFrame) -> pd.DataFrame:
    """``scored`` (sweep + evaluator scores, row for row with ``fluency``) with the fluency columns added.

    The evaluator suite's own ``degenerate`` flag (texts it scored as neutral: empty, no words or one word)
    is kept as ``scored_as_neutral``; it must agree with the structural reasons in ``degenerate_reason``,
    else the two judged different texts and the error says so. ``degenerate`` is then the fluency flag,
    which also counts repetitive loops.
    """
    if len(scored) != len(fluency):
        raise ValueError(
            f"Fluency has {len(fluency)} rows for {len(scored)} generations; compute it per row."
        )
    out = scored.reset_index(drop=True).rename(columns={"degenerate": "scored_as_neutral"})
    if "scored_as_neutral" in out:
        structural = np.array([structural_degeneracy(t) is not None for t in out["continuation"]], dtype=bool)
        if not np.array_equal(out["scored_as_neutral"].to_numpy(dtype=bool), structural):
            raise ValueError(
                "The evaluator suite's degenerate flag disagrees with the structural degeneracy of the "
                "continuations; score the continuation text (not the prompt) with the suite."
            )
    clash = sorted(set(fluency.columns) & set(out.columns) - {"generated_tokens"})
    if clash:
        raise ValueError(f"Fluency columns {clash} already exist in the generations table.")
    return pd.concat([out.drop(columns=["generated_tokens"], errors="ignore"), fluency.reset_index(drop=True)],
                     axis=1)  # fmt: skip


def condition_fluency(frame: pd.DataFrame, bounds: FluencyBounds) -> pd.DataFrame:
    """Per condition: :func:`fluency_summary` (means, ``share_degenerate``, ``perplexity``,
    ``perplexity_ratio`` against the baseline condition) and the gate of :func:`fluency_gate`."""
    summary = fluency_summary(frame, CONDITION_COLUMNS, baseline={"kind": "baseline"})
    return fluency_gate(summary, bounds)


def fluency_gate(summary: pd.DataFrame, bounds: FluencyBounds) -> pd.DataFrame:
    """``summary`` with ``fluent`` (bool) and ``fluency_exclusion`` (why not, e.g.
    ``"share_degenerate 0.33 > 0.1; perplexity_ratio 2.6 > 2"``; empty when fluent)."""
    reasons = []
    for share, ratio in zip(summary["share_degenerate"], summary["perplexity_ratio"], strict=True):
        why = []
        if not share <= bounds.max_degenerate_share * (1 + BOUND_RTOL):
            why.append(f"share_degenerate {share:.3g} > {bounds.max_degenerate_share:g}")
        if not np.isfinite(ratio):
            why.append("perplexity_ratio undefined (no continuation token to score)")
        elif ratio > bounds.max_perplexity_ratio * (1 + BOUND_RTOL):
            why.append(f"perplexity_ratio {ratio:.3g} > {bounds.max_perplexity_ratio:g}")
        reasons.append("; ".join(why))
    out = summary.copy()
    out["fluency_exclusion"] = reasons
    out["fluent"] = out["fluency_exclusion"] == ""
    return out


# ----------------------------------------------------------------------------- selection / confirmation


def split_halves(prompt_ids: Sequence[str], seed: int) -> pd.DataFrame:
    """A seeded split of the unique prompt ids into a selection half ``A`` and a confirmation half ``B``.

    The ids are sorted (so input order does not matter) and permuted by ``np.random.default_rng(seed)``;
    the first ⌊n/2⌋ form A, the rest B (the confirmation half gets the odd prompt). Returns one row per id:
    ``prompt_id``, ``half``, sorted by id.
    """
    ids = np.array(sorted({str(i) for i in prompt_ids}), dtype=object)
    if ids.size < 2 * MIN_PROMPTS_PER_HALF:
        raise ValueError(
            f"Selecting on one half and confirming on the other needs at least {2 * MIN_PROMPTS_PER_HALF} "
            f"unique steering prompts, got {ids.size}; raise steering.max_prompts or add steering prompts."
        )
    order = np.random.default_rng(seed).permutation(ids.size)
    half = np.full(ids.size, CONFIRMATION_HALF, dtype=object)
    half[order[: ids.size // 2]] = SELECTION_HALF
    return pd.DataFrame({"prompt_id": ids, "half": half})


def _on_half(frame: pd.DataFrame, halves: pd.DataFrame, half: str) -> pd.DataFrame:
    ids = set(halves.loc[halves["half"] == half, "prompt_id"])
    unknown = sorted(set(frame["prompt_id"].astype(str)) - set(halves["prompt_id"]))
    if unknown:
        raise ValueError(f"Prompts {unknown[:5]} are in neither half; split the ids of this table.")
    return frame[frame["prompt_id"].astype(str).isin(ids)]


def _scored(frame: pd.DataFrame, metric: str) -> bool:
    """Whether ``metric`` is a column with at least one score (an evaluator that could not run is all NaN)."""
    return metric in frame and bool(frame[metric].notna().any())


def _ids(frame: pd.DataFrame) -> str:
    return json.dumps(sorted(frame["prompt_id"].astype(str).unique().tolist()))


def select_cells(
    scored: pd.DataFrame, target_metrics: Mapping[str, str], bounds: FluencyBounds
) -> pd.DataFrame:
    """Every candidate cell with its target shift and fluency on ``scored`` (the selection half), and per
    emotion the fluent cell with the largest target shift marked ``selected``.

    Candidates are the emotion cells with α > 0: the best cell is the strongest fluent push **towards** the
    emotion (a negative α should lower its score; those cells stay in the shift table and the statistics).
    Without any fluent candidate an emotion has no selected cell.

    Columns: ``emotion``, ``layer``, ``alpha``, ``condition``, ``target_metric``, ``selection_shift``,
    ``n_selection``, ``share_degenerate``, ``perplexity_ratio``, ``fluent``, ``fluency_exclusion``,
    ``selected``. Ties go to the first cell in (layer, α) order. Emotions whose target score is missing or
    all NaN have no cells.
    """
    metrics = sorted({m for m in target_metrics.values() if _scored(scored, m)})
    shifts = shift_table(scored, metrics, target_metrics)
    fluency = condition_fluency(scored, bounds).set_index("condition")
    cells = shifts[(shifts["kind"] == "emotion") & (shifts["alpha"] > 0) & shifts["target_metric"].notna()]
    cells = cells.sort_values(["emotion", "layer", "alpha"])
    out = pd.DataFrame({
        "emotion": cells["emotion"], "layer": cells["layer"].astype(int), "alpha": cells["alpha"],
        "condition": cells["condition"], "target_metric": cells["target_metric"],
        "selection_shift": cells["target_shift"], "n_selection": cells["n_prompts"],
    })  # fmt: skip
    gate = fluency.loc[
        out["condition"], ["share_degenerate", "perplexity_ratio", "fluent", "fluency_exclusion"]
    ]
    out = pd.concat([out.reset_index(drop=True), gate.reset_index(drop=True)], axis=1)
    out["selected"] = False
    for _, group in out[out["fluent"] & out["selection_shift"].notna()].groupby("emotion", sort=False):
        out.loc[group["selection_shift"].idxmax(), "selected"] = True
    return out


def _control_shift(shifts: pd.DataFrame, kind: str, layer: int, alpha: float, metric: str) -> pd.DataFrame:
    """Per prompt: the shift of each ``kind`` control direction at (layer, α) [prompt, direction]."""
    rows = shifts[(shifts["kind"] == kind) & (shifts["layer"] == layer) & np.isclose(shifts["alpha"], alpha)]
    return rows.pivot_table(index="prompt_id", columns="condition", values=metric)


def confirm_cells(
    scored: pd.DataFrame,
    selected: pd.DataFrame,
    bounds: FluencyBounds,
    *,
    n_boot: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The selected cells re-measured on ``scored`` (the confirmation half only).

    Per selected cell (a row of :func:`select_cells`): the target shift against the baseline, paired per
    unique prompt (:func:`paired_comparison`: ``target_shift``, ``shift_ci_low``/``high``, ``d_z``, ``p``,
    ``p_method``, ``n_confirmation``); the same cell against the mean of each random-control kind at its
    (layer, α) (``random_isotropic_shift``, ``random_isotropic_max_shift`` (the largest direction's mean),
    ``vs_random_isotropic_diff``/``_ci_low``/``_ci_high``/``_p``, likewise ``random_covariance``); its
    against each other emotion's vector at the same (layer, α) on the cell's target metric
    (``vs_emotion_<other>_diff``/``_ci_low``/``_ci_high``/``_p``: does *this* vector move its own score more
    than a vector of another emotion, same norm, same prompts?); its
    steerability (``share_intended``, ``share_anti``, ``shift_sd``, ``shift_iqr``) and fluency
    (``share_degenerate``, ``perplexity_ratio``, ``fluent_on_confirmation``); and
    ``confirmation_prompt_ids`` (JSON list of the ids the numbers come from). Bootstrap seeds are
    ``stable_seed(seed, emotion, comparison)``.

    Also returns the per-prompt shifts behind them: ``emotion``, ``prompt_id``, ``series``
    (``emotion vector``, a random kind averaged over its directions, or ``<other> vector``), ``shift``.
    """
    metrics = sorted(set(selected["target_metric"]))
    shifts = prompt_shifts(scored, metrics)
    fluency = condition_fluency(scored, bounds).set_index("condition")
    rows, per_prompt = [], []
    for cell in selected.itertuples():
        metric = cell.target_metric
        base = scored[scored["kind"] == "baseline"]
        steered = shifts[shifts["condition"] == cell.condition].set_index("prompt_id")[metric]
        if steered.empty:
            raise ValueError(f"Condition {cell.condition!r} has no rows on the confirmation half.")
        scores = per_prompt_scores(scored[scored["condition"].isin([cell.condition, base["condition"].iloc[0]])],
                                   [metric])  # fmt: skip
        wide = scores.pivot_table(index="prompt_id", columns="kind", values=metric).loc[steered.index]
        main = paired_comparison(wide["baseline"].to_numpy(), wide["emotion"].to_numpy(), n_boot=n_boot,
                                 seed=stable_seed(seed, cell.emotion, "vs_baseline"))  # fmt: skip
        spread_row = spread(steered, pd.Series("cell", index=steered.index)).iloc[0]
        sign = intended_sign("emotion", cell.alpha)
        row = {
            "emotion": cell.emotion, "metric": metric, "layer": cell.layer, "alpha": cell.alpha,
            "condition": cell.condition, "target_shift": main["mean_diff"], "shift_ci_low": main["diff_ci_low"],
            "shift_ci_high": main["diff_ci_high"], "d_z": main["d_z"], "p": main["p_t"],
            "p_method": main["p_method"], "n_confirmation": main["n"],
            "share_intended": spread_row["share_up"] if sign > 0 else spread_row["share_down"],
            "share_anti": spread_row["share_down"] if sign > 0 else spread_row["share_up"],
            "shift_sd": spread_row["shift_sd"], "shift_iqr": spread_row["shift_iqr"],
        }  # fmt: skip
        per_prompt.append(pd.DataFrame({"emotion": cell.emotion, "prompt_id": steered.index,
                                        "series": "emotion vector", "shift": steered.to_numpy()}))  # fmt: skip
        for kind in RANDOM_KINDS:
            controls = _control_shift(shifts, kind, cell.layer, cell.alpha, metric).reindex(steered.index)
            name = kind.removeprefix("random_")
            if controls.shape[1] == 0:
                row |= {f"random_{name}_shift": math.nan, f"random_{name}_max_shift": math.nan,
                        f"vs_random_{name}_diff": math.nan, f"vs_random_{name}_ci_low": math.nan,
                        f"vs_random_{name}_ci_high": math.nan, f"vs_random_{name}_p": math.nan}  # fmt: skip
                continue
            mean_control = controls.mean(axis=1)  # [prompt]
            versus = paired_comparison(mean_control.to_numpy(), steered.to_numpy(), n_boot=n_boot,
                                       seed=stable_seed(seed, cell.emotion, f"vs_{kind}"))  # fmt: skip
            row |= {
                f"random_{name}_shift": float(mean_control.mean()),
                f"random_{name}_max_shift": float(controls.mean(axis=0).max()),
                f"vs_random_{name}_diff": versus["mean_diff"], f"vs_random_{name}_ci_low": versus["diff_ci_low"],
                f"vs_random_{name}_ci_high": versus["diff_ci_high"], f"vs_random_{name}_p": versus["p_t"],
            }  # fmt: skip
            per_prompt.append(pd.DataFrame({"emotion": cell.emotion, "prompt_id": mean_control.index,
                                            "series": kind, "shift": mean_control.to_numpy()}))  # fmt: skip
        others = shifts[(shifts["kind"] == "emotion") & (shifts["emotion"] != cell.emotion)
                        & (shifts["layer"] == cell.layer) & np.isclose(shifts["alpha"], cell.alpha)]  # fmt: skip
        for other, other_rows in others.groupby("emotion", sort=True):
            other_shift = other_rows.set_index("prompt_id")[metric].reindex(steered.index)
            versus = paired_comparison(other_shift.to_numpy(), steered.to_numpy(), n_boot=n_boot,
                                       seed=stable_seed(seed, cell.emotion, f"vs_emotion_{other}"))  # fmt: skip
            row |= {f"vs_emotion_{other}_diff": versus["mean_diff"], f"vs_emotion_{other}_ci_low": versus["diff_ci_low"],
                    f"vs_emotion_{other}_ci_high": versus["diff_ci_high"], f"vs_emotion_{other}_p": versus["p_t"]}  # fmt: skip
            per_prompt.append(pd.DataFrame({"emotion": cell.emotion, "prompt_id": other_shift.index,
                                            "series": f"{other} vector", "shift": other_shift.to_numpy()}))  # fmt: skip
        gate = fluency.loc[cell.condition]
        row |= {
            "share_degenerate": gate["share_degenerate"], "perplexity_ratio": gate["perplexity_ratio"],
            "fluent_on_confirmation": bool(gate["fluent"]),
            "confirmation_prompt_ids": json.dumps(sorted(str(i) for i in steered.index)),
        }  # fmt: skip
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table["p_bonferroni"] = bonferroni(table["p"].to_numpy())
        table["p_bh"] = bh_fdr(table["p"].to_numpy())
        table["confirmation_family"] = (
            f"the selected cell of each emotion (m={int(table['p'].notna().sum())})"
        )
    columns = ["emotion", "prompt_id", "series", "shift"]
    return table, (pd.concat(per_prompt, ignore_index=True) if per_prompt else pd.DataFrame(columns=columns))


def selected_and_confirmed(
    scored: pd.DataFrame,
    halves: pd.DataFrame,
    target_metrics: Mapping[str, str],
    bounds: FluencyBounds,
    *,
    n_boot: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The honest best cell per emotion: chosen among fluent cells on half A, reported on half B.

    Returns ``(best, cells, per_prompt)``: ``best`` has one row per emotion of ``target_metrics``, with
    ``status`` (``confirmed``, ``no fluent cell on half A``, ``target score not scored``), ``selection``
    (:data:`SELECTION_LABEL`), the cell, its half-A ``selection_shift``, cell counts (``n_cells``,
    ``n_cells_fluent``, ``n_cells_excluded``), every confirmation field of :func:`confirm_cells` and
    ``selection_prompt_ids`` (JSON list of the ids the choice was made on); ``cells`` is
    :func:`select_cells` on half A; ``per_prompt`` holds the half-B per-prompt shifts.
    """
    on_a, on_b = _on_half(scored, halves, SELECTION_HALF), _on_half(scored, halves, CONFIRMATION_HALF)
    for name, part in (("A", on_a), ("B", on_b)):
        if part["prompt_id"].nunique() < MIN_PROMPTS_PER_HALF:
            raise ValueError(f"Half {name} has {part['prompt_id'].nunique()} prompts; split more prompts.")
    cells = select_cells(on_a, target_metrics, bounds)
    confirmed, per_prompt = confirm_cells(on_b, cells[cells["selected"]], bounds, n_boot=n_boot, seed=seed)
    confirmed = confirmed.set_index("emotion") if len(confirmed) else pd.DataFrame()
    rows = []
    for emotion, metric in target_metrics.items():
        mine = cells[cells["emotion"] == emotion]
        row: dict[str, Any] = {"emotion": emotion, "metric": metric, "selection": SELECTION_LABEL,
                               "n_cells": len(mine), "n_cells_fluent": int(mine["fluent"].sum()),
                               "n_cells_excluded": int((~mine["fluent"]).sum())}  # fmt: skip
        if not _scored(scored, metric):
            row["status"] = "target score not scored"
        elif emotion not in confirmed.index:
            row["status"] = "no fluent cell on half A" if len(mine) else "no cell with α > 0 for this emotion"
        else:
            chosen = mine[mine["selected"]].iloc[0]
            row |= {"status": "confirmed", "selection_shift": chosen["selection_shift"],
                    "n_selection": int(chosen["n_selection"]), "selection_prompt_ids": _ids(on_a),
                    **confirmed.loc[emotion].drop("metric").to_dict()}  # fmt: skip
        rows.append(row)
    best = pd.DataFrame(rows)
    lead = ["emotion", "metric", "status", "selection", "layer", "alpha", "condition", "selection_shift",
            "target_shift", "shift_ci_low", "shift_ci_high", "p", "p_bh", "p_bonferroni"]  # fmt: skip
    best = best.reindex(columns=[*lead, *[c for c in best.columns if c not in lead]])
    return best, cells, per_prompt


# ------------------------------------------------------------------------------- the steering family


def steering_comparisons(
    table: pd.DataFrame, metrics: Sequence[str], target_metrics: Mapping[str, str]
) -> tuple[list[dict[str, Any]], Float[np.ndarray, "prompt G"], Float[np.ndarray, "prompt G"], np.ndarray]:
    """Control and treatment scores [n_prompts, G] of every declared steering comparison, paired per prompt.

    ``table``: one row per unique ``prompt_id`` × condition (:func:`per_prompt_scores`) with ``metrics``.

    - ``vs_baseline``: every steered condition against the unsteered baseline, every metric;
    - ``vs_random_isotropic`` / ``vs_random_covariance``: every emotion cell (α ≠ 0) against the mean of the
      random directions **of that kind** at the same layer and α (same norm, same prompts), its target
      score. The two kinds are separate comparisons, never pooled;
    - ``vs_other_emotion``: every emotion cell against each other emotion's vector at the same layer and α
      (same norm, same prompts), on the first emotion's target score; ``other_emotion`` names the other.

    Each spec holds ``comparison``, ``metric``, the treatment's condition columns, ``control`` (the control
    condition, or ``mean(...)`` of several) and ``other_emotion`` (None except for ``vs_other_emotion``).
    Returns (specs, control, treatment, prompt ids in row order).
    """
    prompts = np.sort(table["prompt_id"].unique())
    wide = {m: table.pivot_table(index="prompt_id", columns="condition", values=m, dropna=False).reindex(prompts)
            for m in metrics}  # fmt: skip
    conditions = table.drop_duplicates("condition").set_index("condition")[CONDITION_COLUMNS[1:]]
    baselines = conditions.index[conditions["kind"] == "baseline"]
    if len(baselines) != 1:
        raise ValueError(f"Expected one baseline condition, found {list(baselines)}.")
    specs: list[dict[str, Any]] = []
    control: list[np.ndarray] = []
    treatment: list[np.ndarray] = []

    def add(comparison: str, metric: str, name: str, controls: list[str], other: str | None = None) -> None:
        label = controls[0] if len(controls) == 1 else f"mean({', '.join(controls)})"
        specs.append({"comparison": comparison, "metric": metric, "condition": name,
                      **conditions.loc[name].to_dict(), "control": label, "other_emotion": other})  # fmt: skip
        control.append(wide[metric][controls].mean(axis=1).to_numpy())
        treatment.append(wide[metric][name].to_numpy())

    for name, cond in conditions.iterrows():
        if cond["kind"] != "baseline":
            for metric in metrics:
                add("vs_baseline", metric, name, [baselines[0]])
    cells = conditions[(conditions["kind"] == "emotion") & (conditions["alpha"] != 0)]
    for name, cond in cells.iterrows():
        metric = target_metrics.get(cond["emotion"])
        if metric not in wide:
            continue
        same_cell = (conditions["layer"] == cond["layer"]) & np.isclose(conditions["alpha"], cond["alpha"])
        for kind in RANDOM_KINDS:
            randoms = list(conditions.index[same_cell & (conditions["kind"] == kind)])
            if randoms:
                add(f"vs_{kind}", metric, name, randoms)
        others = conditions[
            same_cell & (conditions["kind"] == "emotion") & (conditions["emotion"] != cond["emotion"])
        ]
        for other_name, other in others.sort_values("emotion").iterrows():
            add("vs_other_emotion", metric, name, [other_name], other["emotion"])
    if not specs:
        raise ValueError("No steering comparison could be declared; the table has no steered condition.")
    return specs, np.column_stack(control), np.column_stack(treatment), prompts


def specificity_summary(stats: pd.DataFrame, q: float = 0.05) -> pd.DataFrame:
    """Per emotion × other emotion (``vs_other_emotion`` rows of a corrected family): cells compared, how
    many move the emotion's own target score more than the other vector does (mean_diff > 0) and how many
    of those survive BH at ``q``, and the median contrast."""
    rows = stats[stats["comparison"] == "vs_other_emotion"]
    if rows.empty:
        return pd.DataFrame(columns=["emotion", "other_emotion", "metric", "cells", "larger", "larger_survive_bh",
                                     "median_diff"])  # fmt: skip
    larger = rows["mean_diff"] > 0
    return (
        rows.assign(larger=larger, larger_survive_bh=larger & (rows["p_bh"] < q))
        .groupby(["emotion", "other_emotion", "metric"], as_index=False)
        .agg(cells=("mean_diff", "size"), larger=("larger", "sum"), larger_survive_bh=("larger_survive_bh", "sum"),
             median_diff=("mean_diff", "median"))
    )  # fmt: skip


def steering_examples(scored: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Baseline and best-condition continuations for the first three prompts of each ``best`` cell."""
    rows = []
    for item in best.itertuples():
        chosen = scored[(scored["kind"] == "emotion") & (scored["emotion"] == item.emotion)
                        & (scored["layer"] == item.layer) & np.isclose(scored["alpha"], item.alpha)]  # fmt: skip
        for row in chosen.head(3).itertuples():
            base = scored[(scored["kind"] == "baseline") & (scored["prompt_index"] == row.prompt_index)]
            rows.append({"emotion": item.emotion, "layer": item.layer, "alpha": item.alpha, "prompt": row.prompt,
                         "baseline": base["continuation"].iloc[0], "steered": row.continuation})  # fmt: skip
    return pd.DataFrame(rows)
