"""Vectorised family bootstrap (``paired_family``) against per-resample Python loops.

A family of ``--groups`` paired comparisons (metric × condition) over ``--prompts`` unique prompts, with
``--n-boot`` resamples. The vectorised path draws every resample at once, turns it into per-prompt counts
and gets every comparison's resampled mean and SD from two matrix products. Baselines on the same
resamples: (1) the plain design, one Python iteration per resample for each comparison (timed on
``--loop-groups`` comparisons and scaled linearly, as printed), and (2) a stronger loop, one iteration per
resample with the whole family inside. All three must give identical CIs; the script exits 1 otherwise.

Run: ``python bench/bench_bootstrap.py`` (``--loop-groups 48`` times the plain loop on every comparison).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emotion_assets.science.statistics import bootstrap_mean_ci, paired_family, stable_seed


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


def family_loop(control: np.ndarray, treatment: np.ndarray, n_boot: int, seed: int, ci: float) -> np.ndarray:
    """Baseline for ``paired_family``: the same resamples, one Python iteration per resample.

    Each iteration draws ``rng.integers(0, n, size=n)`` (the same stream as the vectorised draw) and
    computes every group's resampled mean difference and d_z; returns the four CI bounds [G, 4].
    """
    diffs = treatment - control  # [n, G]
    n = diffs.shape[0]
    s_ref = np.sqrt((control.var(axis=0, ddof=1) + treatment.var(axis=0, ddof=1)) / 2.0)
    floor = 0.1 * np.where(s_ref > 0, s_ref, 1.0)
    rng = np.random.default_rng(seed)
    means, ds = [], []
    for _ in range(n_boot):
        sample = diffs[rng.integers(0, n, size=n)]  # [n, G]
        mean = sample.mean(axis=0)
        means.append(mean)
        ds.append(mean / np.maximum(sample.std(axis=0, ddof=1), floor))
    q = [(1 - ci) / 2, 1 - (1 - ci) / 2]
    return np.column_stack(
        [*np.quantile(np.asarray(means), q, axis=0), *np.quantile(np.asarray(ds), q, axis=0)]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--groups", type=int, default=48, help="comparisons in the family (metric × condition)"
    )
    parser.add_argument("--prompts", type=int, default=200, help="unique prompts per comparison")
    parser.add_argument("--n-boot", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="timings are the median of this many runs")
    parser.add_argument("--loop-groups", type=int, default=8, help="comparisons the plain loop is timed on")
    parser.add_argument("--ci", type=float, default=0.95)
    args = parser.parse_args()

    table = make_table(args.groups, args.prompts).T  # [n, G] paired differences
    control = np.random.default_rng(1).normal(size=table.shape)
    treatment = control + table
    seed = stable_seed("bench", "smoke")
    print(
        f"family: {args.groups} comparisons × {args.prompts} unique prompts = {table.size} rows; "
        f"n_boot = {args.n_boot}; numpy {np.__version__}"
    )

    def median_of(fn):
        times, result = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), result

    t_vec, family = median_of(
        lambda: paired_family(control, treatment, n_boot=args.n_boot, seed=seed, ci=args.ci)
    )
    # Baseline 1 (the plain design): for each comparison, one Python iteration per resample.
    n_loop = min(args.loop_groups, args.groups)
    t_plain_measured, plain = median_of(
        lambda: [ci_loop(table[:, g], args.n_boot, seed, args.ci) for g in range(n_loop)]
    )
    t_plain = t_plain_measured * args.groups / n_loop
    # Baseline 2 (stronger): one Python iteration per resample, every comparison of the family inside it.
    t_loop, loop = median_of(lambda: family_loop(control, treatment, args.n_boot, seed, args.ci))
    vec_bounds = family[["diff_ci_low", "diff_ci_high", "d_z_ci_low", "d_z_ci_high"]].to_numpy()
    same = bool(np.allclose(vec_bounds, loop, rtol=1e-9, atol=1e-12))
    same_plain = all(np.allclose(vec_bounds[g, :2], plain[g], rtol=1e-9) for g in range(n_loop))
    scaled = "" if n_loop == args.groups else f" ({t_plain_measured:.3f} s on {n_loop}, scaled)"
    print(f"vectorised paired_family (all fields incl. t, Wilcoxon): {t_vec:8.3f} s")
    print(f"per-comparison, per-resample loop (mean-diff CI only): {t_plain:8.3f} s{scaled}")
    print(f"per-resample loop over the whole family (both CIs):     {t_loop:8.3f} s")
    print(f"speed-up vs per-comparison loop: {t_plain / t_vec:.1f}x (target >= 50x)")
    print(f"speed-up vs per-resample family loop: {t_loop / t_vec:.1f}x")
    print(f"identical CIs for the same resamples: {same and same_plain}; median of {args.repeat} runs")

    t_groups, _ = median_of(
        lambda: [
            ci_vectorised(table[:, g], args.n_boot, stable_seed("bench", g), args.ci)
            for g in range(args.groups)
        ]
    )
    print(f"for scale, per-comparison vectorised bootstrap (own seed each): {t_groups:8.3f} s")
    return 0 if same and same_plain else 1


if __name__ == "__main__":
    raise SystemExit(main())
