"""The control ledger: what a study would claim without its controls, beside what survives them.

The *uncontrolled reading* applies the rules a steering and head study commonly uses when the controls of
SPEC §7 are missing, to the same generations and screening scores:

- steering: Student's paired t (p = 0 for constant non-zero differences), one random control that pools
  isotropic and covariance-matched directions, no comparison with the other emotions' vectors, no fluency
  bound, and every cell chosen and reported on the same prompts;
- heads: the top heads by |ablation effect| tested on the prompts that selected them.

The *controlled reading* is the study's own: the corrected family of ``patching_statistics`` (exact sign-flip
p where t breaks down, random controls by kind, the other emotions' vectors, fluency bounds) and top heads
measured on the held-out half. The ledger counts survivors under both, so a report can say how many
findings the controls removed and which.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from emotion_assets.science.statistics import bh_fdr, bonferroni, paired_family
from emotion_assets.science.steering_analysis import RANDOM_KINDS, intended_sign, steering_comparisons

UNCONTROLLED_STEERING_RULES = (
    "Student t, isotropic and covariance-matched random directions pooled, no other-emotion contrast, "
    "no fluency bound, cells chosen and reported on the same prompts"
)
CONTROLLED_STEERING_RULES = (
    "exact sign-flip p where t breaks down, beats the baseline and each random kind and every other "
    "emotion's vector (BH), fluency within bounds"
)
Q = 0.05
#: Random head sets drawn per permutation test of the top heads.
N_HEAD_SETS = 10_000


def uncontrolled_steering_family(
    table: pd.DataFrame,
    metrics: Sequence[str],
    target_metrics: Mapping[str, str],
    *,
    seed: int,
    n_boot: int = 200,
) -> pd.DataFrame:
    """Steering comparisons under the uncontrolled rules, with BH and Bonferroni over their own family.

    ``table``: one row per unique ``prompt_id`` × condition with the columns of :data:`CONDITION_COLUMNS` and
    ``metrics``. Rows: every steered condition vs the baseline on every metric (``vs_baseline``) and every
    emotion cell vs the mean of all random directions at its layer and α, both kinds pooled, on its target
    score (``vs_random_pooled``). ``p`` is Student's paired t p (0 when the differences are constant).
    """
    specs, control, treatment, _ = steering_comparisons(table, metrics, target_metrics)
    frame = pd.DataFrame(specs)
    keep = list(np.flatnonzero(frame["comparison"] == "vs_baseline"))
    columns_a, columns_b, pooled_specs = [control[:, keep]], [treatment[:, keep]], [frame.iloc[keep]]
    kinds = frame[frame["comparison"].isin([f"vs_{kind}" for kind in RANDOM_KINDS])]
    for _, group in kinds.groupby("condition", sort=False):
        if len(group) != len(RANDOM_KINDS):
            continue  # a cell without both kinds has no pooled control of the same composition
        # Equal numbers of directions per kind: the mean of the two kind means is the pooled mean.
        columns_a.append(control[:, group.index].mean(axis=1, keepdims=True))
        columns_b.append(treatment[:, group.index[:1]])
        pooled_specs.append(
            group.iloc[:1].assign(comparison="vs_random_pooled", control="all random directions")
        )
    specs_frame = pd.concat(pooled_specs, ignore_index=True)
    control, treatment = np.hstack(columns_a), np.hstack(columns_b)
    results = paired_family(control, treatment, n_boot=n_boot, seed=seed)
    family = pd.concat([specs_frame, results[["n", "mean_diff", "diff_ci_low", "diff_ci_high"]]], axis=1)
    # Student's t p from t itself: constant non-zero differences have t = ±inf and get p = 0, as a plain
    # paired t-test reports them.
    family["p"] = 2.0 * stats.t.sf(np.abs(results["t_stat"].to_numpy()), results["n"].to_numpy() - 1)
    family["p_bh"] = bh_fdr(family["p"])
    family["p_bonferroni"] = bonferroni(family["p"])
    family["rules"] = UNCONTROLLED_STEERING_RULES
    return family


def _intended(frame: pd.DataFrame) -> pd.Series:
    sign = [intended_sign(k, a) for k, a in zip(frame["kind"], frame["alpha"], strict=True)]
    return pd.Series(np.sign(frame["mean_diff"].to_numpy()) == np.asarray(sign), index=frame.index)


def _target_rows(frame: pd.DataFrame, comparison: str, target_metrics: Mapping[str, str]) -> pd.DataFrame:
    rows = frame[(frame["comparison"] == comparison) & (frame["kind"] == "emotion") & (frame["alpha"] != 0)]
    return rows[rows["metric"] == rows["emotion"].map(target_metrics)]


def uncontrolled_cells(family: pd.DataFrame, target_metrics: Mapping[str, str], q: float = Q) -> pd.DataFrame:
    """Emotion cells the uncontrolled reading calls findings: the target score moves the intended way, and the
    shift beats the baseline and the pooled random control (BH at ``q``, Student t)."""
    wins = {}
    for comparison in ("vs_baseline", "vs_random_pooled"):
        rows = _target_rows(family, comparison, target_metrics)
        wins[comparison] = set(rows.loc[(rows["p_bh"] < q) & _intended(rows), "condition"])
    cells = _target_rows(family, "vs_baseline", target_metrics)
    return cells[cells["condition"].isin(wins["vs_baseline"] & wins["vs_random_pooled"])]


def controlled_cells(
    stats: pd.DataFrame, fluent: Mapping[str, bool], target_metrics: Mapping[str, str], q: float = Q
) -> pd.DataFrame:
    """Emotion cells that survive every control of the corrected family ``stats`` (``patching_statistics``
    rows of source ``residual``): baseline, each random kind and every other emotion's vector, BH at ``q`` in
    the intended direction, and the cell fluent (``fluent``: condition → within the fluency bounds)."""
    residual = stats[stats["source"] == "residual"]
    cells = _target_rows(residual, "vs_baseline", target_metrics)
    keep = set(cells.loc[(cells["p_bh"] < q) & _intended(cells), "condition"])
    for comparison in (*(f"vs_{kind}" for kind in RANDOM_KINDS), "vs_other_emotion"):
        rows = _target_rows(residual, comparison, target_metrics)
        if rows.empty:
            return cells.iloc[0:0]
        ok = (rows["p_bh"] < q) & _intended(rows)
        keep &= set(rows["condition"]) - set(rows.loc[~ok, "condition"])
    keep = {c for c in keep if fluent.get(c, False)}
    return cells[cells["condition"].isin(keep)]


def screening_effect_column(screening: pd.DataFrame) -> str:
    """``ablation_effect`` when every head has an exact ablation effect (exhaustive screening); else the
    screen's own estimate, ``atp_star`` or ``atp`` (those screens ablate only a shortlist exactly), or the
    emotion→neutral ``attribution`` without one."""
    if screening["ablation_effect"].notna().all():
        return "ablation_effect"
    return next((column for column in ("atp_star", "atp") if column in screening), "attribution")


def top_head_selection_tests(
    screening: pd.DataFrame, top_n: int, *, seed: int, n_sets: int = N_HEAD_SETS
) -> pd.DataFrame:
    """Top-``top_n`` heads by |screening effect| on one half, tested on that half and on the other.

    ``screening``: one row per emotion × half × head (``emotion``, ``half``, ``layer``, ``head`` and the
    effect column of :func:`screening_effect_column`) covering every head on each half. Per emotion and
    selecting half the statistic is the
    mean |effect| of the selected heads; its p is the share of ``n_sets`` random head sets of the same size
    (seeded) whose mean |effect| on the same half reaches it, the observed set counted:
    ``(1 + count) / (n_sets + 1)``. ``same_prompts`` tests the heads on the half that chose them (the
    uncontrolled reading); ``held_out`` on the other half.
    """
    column = screening_effect_column(screening)
    if screening[column].isna().any():
        raise ValueError(
            f"Screening has heads without an {column!r}; every head of each half must be screened."
        )
    rng = np.random.default_rng(seed)
    rows = []
    for emotion, group in screening.groupby("emotion", sort=False):
        halves = {h: g.set_index(["layer", "head"])[column].abs() for h, g in group.groupby("half")}
        if len(halves) != 2:
            raise ValueError(f"Screening of {emotion!r} must cover two halves, found {sorted(halves)}.")
        for selecting, effects in halves.items():
            other = next(h for h in halves if h != selecting)
            chosen = effects.nlargest(top_n).index
            for reading, measured_on in (("same_prompts", selecting), ("held_out", other)):
                values = halves[measured_on].reindex(effects.index).to_numpy()  # [heads]
                observed = float(values[effects.index.get_indexer(chosen)].mean())
                draws = np.argsort(rng.random((n_sets, len(values))), axis=1)[:, :top_n]  # [n_sets, top_n]
                null = values[draws].mean(axis=1)
                rows.append({
                    "emotion": emotion, "selected_on": selecting, "measured_on": measured_on, "reading": reading,
                    "top_n": top_n, "heads": ",".join(f"L{layer}H{head}" for layer, head in chosen),
                    "effect_column": column, "mean_abs_effect": observed, "random_mean_abs_effect": float(null.mean()),
                    "p": (1.0 + float((null >= observed).sum())) / (n_sets + 1.0),
                })  # fmt: skip
    tests = pd.DataFrame(rows)
    for _, group in tests.groupby("reading"):
        tests.loc[group.index, "p_bh"] = bh_fdr(group["p"])
        tests.loc[group.index, "p_bonferroni"] = bonferroni(group["p"])
    return tests


def ledger(
    uncontrolled: pd.DataFrame,
    stats: pd.DataFrame,
    fluent: Mapping[str, bool],
    target_metrics: Mapping[str, str],
    head_tests: pd.DataFrame | None,
    q: float = Q,
) -> pd.DataFrame:
    """Survivor counts per claim family under the uncontrolled and the controlled reading.

    Columns: ``family``, ``reading``, ``rules``, ``tests``, ``survive_bh``, ``survive_bonferroni`` and
    ``findings`` (the cells or heads the reading would report, comma-separated).
    """
    residual = stats[stats["source"] == "residual"]
    naive_cells = uncontrolled_cells(uncontrolled, target_metrics, q)
    kept_cells = controlled_cells(stats, fluent, target_metrics, q)
    rows = [
        {"family": "steering comparisons", "reading": "uncontrolled", "rules": UNCONTROLLED_STEERING_RULES,
         "tests": len(uncontrolled), "survive_bh": int((uncontrolled["p_bh"] < q).sum()),
         "survive_bonferroni": int((uncontrolled["p_bonferroni"] < q).sum()), "findings": ""},
        {"family": "steering comparisons", "reading": "controlled", "rules": CONTROLLED_STEERING_RULES,
         "tests": len(residual), "survive_bh": int((residual["p_bh"] < q).sum()),
         "survive_bonferroni": int((residual["p_bonferroni"] < q).sum()), "findings": ""},
        {"family": "steering cells (target score)", "reading": "uncontrolled", "rules": UNCONTROLLED_STEERING_RULES,
         "tests": len(_target_rows(uncontrolled, "vs_baseline", target_metrics)), "survive_bh": len(naive_cells),
         "survive_bonferroni": np.nan, "findings": ", ".join(naive_cells["condition"])},
        {"family": "steering cells (target score)", "reading": "controlled", "rules": CONTROLLED_STEERING_RULES,
         "tests": len(_target_rows(residual, "vs_baseline", target_metrics)), "survive_bh": len(kept_cells),
         "survive_bonferroni": np.nan, "findings": ", ".join(kept_cells["condition"])},
    ]  # fmt: skip
    if head_tests is not None and len(head_tests):
        for reading, rules in (("same_prompts", "top heads tested on the prompts that selected them"),
                               ("held_out", "top heads tested on the held-out half")):  # fmt: skip
            group = head_tests[head_tests["reading"] == reading]
            survived = group[group["p_bh"] < q]
            effect = group["mean_abs_effect"].mean()
            rows.append({
                "family": "top heads vs random heads (screening effect)",
                "reading": "uncontrolled" if reading == "same_prompts" else "controlled", "rules": rules,
                "tests": len(group), "survive_bh": len(survived),
                "survive_bonferroni": int((group["p_bonferroni"] < q).sum()),
                "findings": f"mean |effect| of the top heads {effect:.3g}: "
                + ", ".join(f"{e} (chosen on {s})" for e, s in zip(survived["emotion"], survived["selected_on"],
                                                                   strict=True)),
            })  # fmt: skip
    head_rows = stats[(stats["source"] == "heads") & (stats["comparison"] == "vs_random_heads")]
    if len(head_rows):
        survived = head_rows[head_rows["p_bh"] < q]
        rows.append({
            "family": "top heads vs random heads (generations)", "reading": "controlled",
            "rules": "top heads chosen on one half, continuations generated and tested on the other (family BH)",
            "tests": len(head_rows), "survive_bh": len(survived),
            "survive_bonferroni": int((head_rows["p_bonferroni"] < q).sum()),
            "findings": ", ".join(f"{e} {m} {mode}" for e, m, mode in zip(survived["emotion"], survived["metric"],
                                                                        survived["mode"], strict=True)),
        })  # fmt: skip
    return pd.DataFrame(rows)


def headline_maxima(condition_shifts: pd.DataFrame, best: pd.DataFrame) -> pd.DataFrame:
    """Per emotion, the best steering cell as the uncontrolled reading reports it (largest intended shift of
    the target score over the whole grid, chosen and reported on all prompts, fluent or not) beside the
    controlled one (the best fluent cell of the selection half, its shift on the confirmation half).

    ``condition_shifts``: one row per condition with ``kind``, ``emotion``, ``alpha``, ``target_shift``;
    ``best``: ``residual_patching``'s best cell per emotion (``layer``, ``alpha``, ``selection_shift``,
    ``target_shift``, ``shift_ci_low``, ``shift_ci_high``, ``status``).
    """
    rows = []
    cells = condition_shifts[(condition_shifts["kind"] == "emotion") & (condition_shifts["alpha"] != 0)]
    for emotion, group in cells.groupby("emotion", sort=False):
        intended = group["target_shift"] * np.sign(group["alpha"])
        top = group.loc[intended.idxmax()]
        row = {
            "emotion": emotion,
            "uncontrolled_cell": top["condition"],
            "uncontrolled_shift": top["target_shift"],
        }
        chosen = best[best["emotion"] == emotion]
        if len(chosen):
            c = chosen.iloc[0]
            row |= {"controlled_cell": c["condition"], "selection_shift": c["selection_shift"], "confirmed_shift": c["target_shift"],
                    "confirmed_ci_low": c["shift_ci_low"], "confirmed_ci_high": c["shift_ci_high"],
                    "status": c["status"]}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)
