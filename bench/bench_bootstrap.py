"""Vectorised paired bootstrap against a per-resample Python loop on a realistic comparison table.

Table: ``--groups`` groups (metric × condition) × ``--prompts`` unique prompts, one paired difference per
row. Both methods compute the percentile CI of the mean difference with ``--n-boot`` resamples per group,
seeded per group by ``stable_seed``; the loop draws ``rng.integers(0, n, size=n)`` once per resample, the
vectorised path draws all indices in one ``rng.integers(0, n, size=(n_boot, n))`` call. Both draw the
same index stream from the same seed, so their CIs must agree exactly; this is checked for every group the
loop runs on. The loop is timed on ``--loop-groups`` groups and scaled linearly to all groups (the output
says so) unless ``--loop-groups`` equals ``--groups``.

Run: ``python bench/bench_bootstrap.py`` (add ``--loop-groups 48`` to time the loop on every group).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emotion_assets.science.statistics import bootstrap_mean_ci, compare_many, stable_seed


def make_table(n_groups: int, n_prompts: int, seed: int = 0) -> np.ndarray:
    """Paired differences [n_groups, n_prompts]: small shifted effects with group-specific spread."""
    rng = np.random.default_rng(seed)
    shift = rng.normal(0.05, 0.05, size=(n_groups, 1))
    spread = rng.uniform(0.05, 0.3, size=(n_groups, 1))
    return shift + spread * rng.standard_normal((n_groups, n_prompts))  # [G, n]


def ci_vectorised(diffs: np.ndarray, n_boot: int, seed: int, ci: float) -> tuple[float, float]:
    """The library path: one ``rng.integers(0, n, size=(n_boot, n))`` draw, ``diffs[idx].mean(axis=1)``."""
    _, lo, hi = bootstrap_mean_ci(diffs, n_boot, seed, ci)
    return lo, hi


def ci_shared(table: np.ndarray, n_boot: int, seed: int, ci: float) -> np.ndarray:
    """Alternative design (not the library path): one prompt resample shared by every group.

    Counts [n_boot, n] of each prompt per resample, then one matmul gives every group's bootstrap means
    [n_boot, G]. Valid per group, but groups share their resamples, so it needs one seed per family and the
    same prompts in every group. Returns the CIs [G, 2].
    """
    n = table.shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [n_boot, n]
    rows = np.repeat(np.arange(n_boot) * n, n)  # [n_boot · n]
    counts = np.bincount(rows + idx.reshape(-1), minlength=n_boot * n).reshape(n_boot, n)  # [n_boot, n]
    boot = counts @ table.T / n  # [n_boot, G]
    return np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0).T  # [G, 2]


def ci_loop(diffs: np.ndarray, n_boot: int, seed: int, ci: float) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, diffs.size, size=diffs.size)
        stats.append(diffs[idx].mean())
    lo, hi = np.quantile(np.asarray(stats), [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=10_000)
    parser.add_argument("--loop-groups", type=int, default=6, help="groups the loop baseline is timed on")
    parser.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    parser.add_argument("--ci", type=float, default=0.95)
    args = parser.parse_args()
    n_loop = min(args.loop_groups, args.groups)

    table = make_table(args.groups, args.prompts)  # [G, n]
    seeds = [stable_seed("bench", "smoke", g) for g in range(args.groups)]
    print(
        f"table: {args.groups} groups × {args.prompts} unique prompts = {table.size} rows; "
        f"n_boot = {args.n_boot}; numpy {np.__version__}"
    )

    def best_of(fn):  # -> (min seconds over repeats, last result)
        times, result = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return min(times), result

    t_vec, vec = best_of(
        lambda: [ci_vectorised(table[g], args.n_boot, seeds[g], args.ci) for g in range(args.groups)]
    )
    t_loop_measured, loop = best_of(
        lambda: [ci_loop(table[g], args.n_boot, seeds[g], args.ci) for g in range(n_loop)]
    )
    t_loop = t_loop_measured * args.groups / n_loop
    t_shared, _ = best_of(lambda: ci_shared(table, args.n_boot, stable_seed("bench", "smoke"), args.ci))

    identical = all(vec[g] == loop[g] for g in range(n_loop))
    print(f"vectorised, all {args.groups} groups:         {t_vec:8.3f} s")
    if n_loop == args.groups:
        print(f"per-resample loop, all {args.groups} groups:  {t_loop:8.3f} s")
    else:
        print(
            f"per-resample loop, {n_loop} groups:           {t_loop_measured:8.3f} s measured → "
            f"{t_loop:.3f} s for all {args.groups} groups (scaled linearly)"
        )
    print(f"speed-up: {t_loop / t_vec:.1f}× (target ≥ 20×); timings are best of {args.repeat} runs")
    print(f"identical CIs for the same indices on {n_loop} groups: {identical}")
    print(
        f"shared resample across groups (counts @ table, other design, one seed): {t_shared:8.3f} s "
        f"→ {t_loop / t_shared:.0f}× the loop"
    )

    # The full paired comparison (t, Wilcoxon, CIs of mean_diff and d_z) on the same table, for scale.
    import pandas as pd

    frame = pd.DataFrame(
        {
            "prompt_id": np.tile(np.arange(args.prompts), args.groups),
            "group": np.repeat(np.arange(args.groups), args.prompts),
            "control": 0.0,
            "treatment": table.reshape(-1),
        }
    )
    t0 = time.perf_counter()
    compare_many(
        frame,
        id_col="prompt_id",
        group_cols=["group"],
        control_col="control",
        treatment_col="treatment",
        n_boot=args.n_boot,
        seed_parts=["bench", "smoke"],
    )
    print(f"compare_many (all fields, {args.groups} groups): {time.perf_counter() - t0:8.3f} s")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
