"""Paired and unpaired comparisons, seeded vectorised bootstrap CIs, multiple-comparison correction, power
and the k-selection rule.

Conventions used throughout:

- ``a`` is the control arm and ``b`` the treatment arm; every effect is **treatment − control** (b − a).
- Statistics count unique prompts: rows sharing a prompt id are averaged first (:func:`dedupe_pairs`).
- Bootstraps draw all resample indices in one call, ``rng.integers(0, n, size=(n_boot, n))``, and reduce
  with array operations; there is no Python loop over resamples. Percentile CIs.
- Seeds come from :func:`stable_seed` (SHA-256 of the parts), so the same inputs give identical CIs in any
  process.
- p-values are never 0. The paired p (``p_t``) is the paired t-test's only when there are at least
  :data:`SIGN_FLIP_BELOW_N` pairs and the differences vary; otherwise it is the exact (or, above
  :data:`SIGN_FLIP_EXACT_MAX_N` pairs, seeded Monte Carlo) sign-flip permutation p of the mean difference,
  whose floor is 1 / number of sign patterns. ``p_method`` names the method of every p.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy import special, stats

#: Fraction of the reference SD below which an effect-size denominator is not allowed to fall.
SD_FLOOR_FRACTION = 0.1

#: With fewer pairs than this, the paired p is the sign-flip permutation p rather than the t-test's: the t
#: reference distribution rests on the mean difference being near-normal, which a handful of prompts
#: cannot show (30 is the usual rule of thumb for the central limit theorem to make t trustworthy).
SIGN_FLIP_BELOW_N = 30
#: Up to this many pairs every sign pattern is enumerated (2^(n−1) of them, using the symmetry under a
#: global flip: 524,288 at n = 20); above it the sign-flip p is a seeded Monte Carlo estimate.
SIGN_FLIP_EXACT_MAX_N = 20
#: Random sign patterns of the Monte Carlo sign-flip p; with the observed pattern counted,
#: p ≥ 1 / (N_SIGN_FLIPS + 1) ≈ 1e-5 (Bonferroni over 48 comparisons at 0.05 needs ≈ 1e-3).
N_SIGN_FLIPS = 100_000
#: Values of the sign-flipped statistic held in memory at once (rows × comparisons).
_FLIP_BLOCK = 1 << 22
#: Relative tolerance (of Σ|d|) under which a flipped sum counts as tying the observed one, so rounding in
#: the summation order never turns a tie (e.g. constant differences flipped as a whole) into a miss.
_TIE_RTOL = 1e-9

#: ``p_method`` values.
P_T, P_SIGN_FLIP_EXACT, P_SIGN_FLIP_MC = "t", "sign_flip_exact", "sign_flip_mc"
P_WELCH, P_PERMUTATION_EXACT, P_PERMUTATION_MC = "welch", "permutation_exact", "permutation_mc"


# --------------------------------------------------------------------------------------------- seeds


def stable_seed(*parts: str | int | float) -> int:
    """A 63-bit seed from strings/integers (floats allowed, e.g. an α grid value) via SHA-256.

    Unlike ``hash()``, which is salted per process, this gives the same seed in every process and on every
    machine. Each part is type-tagged, so ``stable_seed(1)`` ≠ ``stable_seed("1")``; numpy integers and
    floats are normalised to Python ``int``/``float`` first (``np.int64(3)`` seeds like ``3``).
    """
    tokens = []
    for part in parts:
        if isinstance(part, bool | np.bool_):
            tokens.append(f"b:{int(part)}")
        elif isinstance(part, int | np.integer):
            tokens.append(f"i:{int(part)}")
        elif isinstance(part, float | np.floating):
            tokens.append(f"f:{float(part)!r}")
        elif isinstance(part, str):
            tokens.append(f"s:{part}")
        else:
            raise TypeError(f"stable_seed accepts str, int or float parts, got {type(part).__name__}.")
    digest = hashlib.sha256("\x1f".join(tokens).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# ------------------------------------------------------------------------------------------ helpers


def _vector(x: Any, name: str) -> np.ndarray:
    out = np.asarray(x, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {out.shape}.")
    return out


def _quantiles(boot: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution [n_boot] (NaN if empty or all NaN)."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}.")
    finite = boot[np.isfinite(boot)]
    if finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [(1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0])
    return float(lo), float(hi)


def _sd(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if x.size >= 2 else math.nan


def effect_size_floor(a: np.ndarray, b: np.ndarray, sd_floor: float | None = None) -> float:
    """Lower bound for the SD in an effect-size denominator, in the metric's own units.

    ``floor = max(sd_floor, SD_FLOOR_FRACTION · s_ref)`` where ``s_ref`` is the pooled SD of the two arms,
    sqrt((var a + var b) / 2). A paired difference may be far less variable than the metric itself (near
    identical outputs), and d_z = mean / sd_diff then explodes; with the floor, |d_z| ≤ 10 · |mean_diff| /
    s_ref, i.e. at most ten times the effect measured against the metric's between-prompt spread. When both
    arms are constant (s_ref = 0) the metric's magnitude max(|mean a|, |mean b|) is used instead (|d_z| ≤ 20
    then), and 1.0 if that is 0 too (the difference is then 0). ``sd_floor`` lets the caller add an
    absolute floor, e.g. a fraction of a bounded metric's range.
    """
    va = float(np.var(a, ddof=1)) if a.size >= 2 else 0.0
    vb = float(np.var(b, ddof=1)) if b.size >= 2 else 0.0
    s_ref = math.sqrt((va + vb) / 2.0)
    if not s_ref > 0.0:
        s_ref = max(abs(float(np.mean(a))) if a.size else 0.0, abs(float(np.mean(b))) if b.size else 0.0)
    if not s_ref > 0.0:
        s_ref = 1.0
    return max(float(sd_floor or 0.0), SD_FLOOR_FRACTION * s_ref)


def _constant(x: np.ndarray) -> bool:
    """True when ``x`` is constant up to floating-point rounding (e.g. ``(a + 0.5) − a``)."""
    return bool(np.ptp(x) <= 1e-12 * np.max(np.abs(x)))


# ------------------------------------------------------------------------------ permutation p-values


def sign_flip_p(
    diffs: Any,
    *,
    seed: int,
    n_perm: int = N_SIGN_FLIPS,
    exact_max_n: int = SIGN_FLIP_EXACT_MAX_N,
) -> tuple[np.ndarray, str]:
    """Two-sided sign-flip permutation p of the mean paired difference, per column of ``diffs`` [n] or [n, G].

    Under H0 (the differences are symmetric about 0) every sign pattern s ∈ {±1}^n is equally likely;
    p = share of patterns with |Σ s_i d_i| ≥ |Σ d_i| (ties within ``_TIE_RTOL`` · Σ|d| count).

    - n ≤ ``exact_max_n``: exact. The statistic is symmetric under a global flip, so the 2^(n−1) patterns
      that keep the first sign are enumerated as a bit matrix [patterns, n−1] (pattern code k flips pair
      i+1 when bit i of k is set) in blocks, each block one matrix product with the differences;
      p = count / 2^(n−1), floor 2 / 2^n. Constant non-zero differences give exactly 2 / 2^n; all-zero
      differences give 1.
    - n > ``exact_max_n``: ``n_perm`` random patterns from ``np.random.default_rng(seed)`` (drawn in fixed
      blocks independent of G, so one column gives the same p alone or inside a family);
      p = (1 + count) / (n_perm + 1), the observed pattern counted, so p ≥ 1 / (n_perm + 1).

    Returns (p [G], method) with method ``"sign_flip_exact"`` or ``"sign_flip_mc"``.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"diffs must be [n] or [n, G] with n ≥ 1, got shape {np.shape(diffs)}.")
    if not np.isfinite(d).all():
        raise ValueError("sign_flip_p needs finite differences; drop non-finite pairs first.")
    n, n_groups = d.shape
    total = d.sum(axis=0)  # [G]
    threshold = np.abs(total) - _TIE_RTOL * np.abs(d).sum(axis=0)  # [G]
    block = max(1, _FLIP_BLOCK // max(n_groups, 1))
    count = np.zeros(n_groups, dtype=np.int64)
    if n <= exact_max_n:
        n_patterns = 1 << (n - 1)
        bit = np.arange(n - 1)  # [n−1]
        for start in range(0, n_patterns, block):
            codes = np.arange(start, min(start + block, n_patterns))[:, None]  # [c, 1]
            flips = ((codes >> bit) & 1).astype(np.float64)  # [c, n−1]
            flipped = total - 2.0 * (flips @ d[1:])  # [c, G]: Σ s_i d_i with s_i = −1 where flipped
            count += (np.abs(flipped) >= threshold).sum(axis=0)
        return count / n_patterns, P_SIGN_FLIP_EXACT
    rng = np.random.default_rng(seed)
    block = 1 << 14  # fixed, so the random stream does not depend on G
    width = max(1, _FLIP_BLOCK // block)  # comparisons per product
    for start in range(0, n_perm, block):
        flips = rng.integers(0, 2, size=(min(block, n_perm - start), n)).astype(np.float64)  # [c, n]
        for lo in range(0, n_groups, width):
            cols = slice(lo, lo + width)
            flipped = total[cols] - 2.0 * (flips @ d[:, cols])  # [c, g]
            count[cols] += (np.abs(flipped) >= threshold[cols]).sum(axis=0)
    return (count + 1.0) / (n_perm + 1.0), P_SIGN_FLIP_MC


def _paired_tests(diffs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paired t and the reported p for each column of ``diffs`` [n, G] (n ≥ 2).

    Returns (t_stat [G], p_student_t [G], p [G], p_method [G]). ``p_student_t`` is the two-sided paired
    t p (NaN where the differences have zero variance, with t = ±inf, or 0 when all are 0). ``p`` is that
    p where n ≥ :data:`SIGN_FLIP_BELOW_N`, the differences vary and the t p is > 0; otherwise the
    sign-flip p of :func:`sign_flip_p` seeded with ``stable_seed(seed, "sign_flip")``.
    """
    n = diffs.shape[0]
    mean_diff = diffs.mean(axis=0)  # [G]
    sd_diff = diffs.std(axis=0, ddof=1)  # [G]
    constant = np.ptp(diffs, axis=0) <= 1e-12 * np.max(np.abs(diffs), axis=0)  # [G]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_stat = mean_diff / (sd_diff / math.sqrt(n))
    t_stat = np.where(constant, np.where(mean_diff != 0, np.copysign(np.inf, mean_diff), 0.0), t_stat)
    p_student = np.where(constant, np.nan, 2.0 * stats.t.sf(np.abs(t_stat), n - 1))  # [G]
    flip = constant | (p_student == 0.0) | (n < SIGN_FLIP_BELOW_N)  # [G]
    p = p_student.copy()
    method = np.full(diffs.shape[1], P_T, dtype=object)
    if flip.any():
        p_flip, how = sign_flip_p(diffs[:, flip], seed=stable_seed(seed, "sign_flip"))
        p[flip], method[flip] = p_flip, how
    return t_stat, p_student, p, method


def _two_constant_arms_p(n_a: int, n_b: int, mean_diff: float) -> float:
    """Exact two-sided permutation p of |mean b − mean a| when each arm is constant.

    Of the C(n_a + n_b, n_b) ways to relabel the pooled values, only the observed one reaches the observed
    |difference| (plus the swap of the arms when n_a = n_b); no difference gives 1.
    """
    if mean_diff == 0.0:
        return 1.0
    return (1.0 + (n_a == n_b)) / math.comb(n_a + n_b, n_b)


def two_sample_permutation_p(a: np.ndarray, b: np.ndarray, *, seed: int, n_perm: int = N_SIGN_FLIPS) -> float:
    """Seeded Monte Carlo two-sided permutation p of |mean b − mean a| (labels reshuffled ``n_perm`` times).

    p = (1 + count) / (n_perm + 1), the observed labelling counted, so p ≥ 1 / (n_perm + 1).
    """
    pooled = np.concatenate([a, b])  # [N]
    n_b = b.size
    observed = abs(float(b.mean() - a.mean()))
    tol = _TIE_RTOL * float(np.abs(pooled).sum()) / max(a.size, 1)
    total = pooled.sum()
    rng = np.random.default_rng(seed)
    count, block = 0, 1 << 12
    for start in range(0, n_perm, block):
        c = min(block, n_perm - start)
        order = np.argsort(rng.random((c, pooled.size)), axis=1)  # [c, N] random relabellings
        sum_b = pooled[order[:, :n_b]].sum(axis=1)  # [c]
        diff = sum_b / n_b - (total - sum_b) / a.size  # [c]
        count += int((np.abs(diff) >= observed - tol).sum())
    return (count + 1.0) / (n_perm + 1.0)


# ----------------------------------------------------------------------------------------- bootstrap


def bootstrap_statistic(
    x: Any,
    statistic_fn: Callable[[np.ndarray], np.ndarray],
    n_boot: int,
    seed: int,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap over the rows of ``x`` [n] or [n, m].

    ``statistic_fn`` must be vectorised: it receives resamples [n_boot, n(, m)] and reduces axis 1,
    returning [n_boot]. The point estimate is ``statistic_fn(x[None])[0]``. Returns ``estimate``,
    ``ci_low``, ``ci_high`` and the bootstrap distribution ``samples`` [n_boot].
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim not in (1, 2):
        raise ValueError(f"x must be [n] or [n, m], got shape {arr.shape}.")
    n = arr.shape[0]
    if n == 0:
        return {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "samples": np.full(0, np.nan)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [n_boot, n]
    samples = np.asarray(statistic_fn(arr[idx]), dtype=np.float64)  # [n_boot]
    if samples.shape != (n_boot,):
        raise ValueError(f"statistic_fn must reduce to [n_boot], got shape {samples.shape}.")
    lo, hi = _quantiles(samples, ci)
    estimate = float(np.asarray(statistic_fn(arr[None]))[0])
    return {"estimate": estimate, "ci_low": lo, "ci_high": hi, "samples": samples}


def bootstrap_mean_ci(x: Any, n_boot: int, seed: int, ci: float = 0.95) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of ``x`` [n] by the vectorised percentile bootstrap."""
    out = bootstrap_statistic(_vector(x, "x"), lambda s: s.mean(axis=1), n_boot, seed, ci)
    return out["estimate"], out["ci_low"], out["ci_high"]


# --------------------------------------------------------------------------------- paired / unpaired


def dedupe_pairs(prompt_ids: Any, a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average the rows that share a prompt id, so each unique prompt counts once.

    Returns (unique ids [u] in sorted order, mean a [u], mean b [u]). A NaN in any duplicate of a prompt
    makes that prompt's mean NaN (it is then excluded, and counted, by :func:`paired_comparison`).
    """
    ids = np.asarray(prompt_ids)
    av, bv = _vector(a, "a"), _vector(b, "b")
    if not (ids.shape == av.shape == bv.shape) or ids.ndim != 1:
        raise ValueError(
            f"prompt_ids, a and b must share one 1-D shape: {ids.shape}, {av.shape}, {bv.shape}."
        )
    uniq, inverse = np.unique(ids, return_inverse=True)
    counts = np.bincount(inverse, minlength=uniq.size)  # [u]
    mean_a = np.bincount(inverse, weights=av, minlength=uniq.size) / counts  # [u]
    mean_b = np.bincount(inverse, weights=bv, minlength=uniq.size) / counts  # [u]
    return uniq, mean_a, mean_b


def paired_comparison(
    a: Any,
    b: Any,
    *,
    n_boot: int,
    seed: int,
    ci: float = 0.95,
    sd_floor: float | None = None,
) -> dict[str, Any]:
    """Paired comparison of control ``a`` [n] and treatment ``b`` [n] (one entry per unique prompt).

    Effect = b − a. Pairs with a non-finite value are excluded and counted in ``n_excluded``.

    - ``d_z`` = mean_diff / max(sd_diff, floor) with the floor of :func:`effect_size_floor`;
      ``d_z_floored`` says whether the floor was used.
    - ``p_t``: the two-sided p of the mean difference, never 0. The paired t p when n ≥
      :data:`SIGN_FLIP_BELOW_N` and the differences vary; otherwise (few pairs, zero-variance differences,
      or a t p that underflows to 0) the sign-flip permutation p of :func:`sign_flip_p` (exact up to
      :data:`SIGN_FLIP_EXACT_MAX_N` pairs, else Monte Carlo seeded with ``stable_seed(seed,
      "sign_flip")``). ``p_method`` is ``"t"``, ``"sign_flip_exact"`` or ``"sign_flip_mc"``;
      ``p_student_t`` keeps the t p for reference (NaN for zero-variance differences, where t = ±inf, or
      t = 0 if all differences are 0).
    - Wilcoxon signed-rank (``zero_method="wilcox"``: zero differences are dropped); all-zero → p = 1.
    - Percentile bootstrap CIs of mean_diff and d_z from the same resamples; the floor is held fixed at its
      full-sample value. Fewer than 2 pairs → tests and d_z are NaN.
    """
    av, bv = _vector(a, "a"), _vector(b, "b")
    if av.shape != bv.shape:
        raise ValueError(f"a and b must have the same shape, got {av.shape} and {bv.shape}.")
    keep = np.isfinite(av) & np.isfinite(bv)
    av, bv = av[keep], bv[keep]
    diffs = bv - av  # [n]
    n = int(diffs.size)
    out: dict[str, Any] = {
        "n": n,
        "n_excluded": int((~keep).sum()),
        "mean_a": float(av.mean()) if n else math.nan,
        "mean_b": float(bv.mean()) if n else math.nan,
        "mean_diff": float(diffs.mean()) if n else math.nan,
        "sd_diff": _sd(diffs),
        "sd_floor": math.nan,
        "d_z": math.nan,
        "d_z_floored": False,
        "t_stat": math.nan,
        "p_t": math.nan,
        "p_method": None,
        "p_student_t": math.nan,
        "wilcoxon_stat": math.nan,
        "p_wilcoxon": math.nan,
        "diff_ci_low": math.nan,
        "diff_ci_high": math.nan,
        "d_z_ci_low": math.nan,
        "d_z_ci_high": math.nan,
        "ci": ci,
        "n_boot": int(n_boot),
        "seed": int(seed),
    }
    if n < 2:
        return out
    mean_diff, sd_diff = out["mean_diff"], out["sd_diff"]
    floor = effect_size_floor(av, bv, sd_floor)
    out["sd_floor"] = floor
    out["d_z"] = mean_diff / max(sd_diff, floor)
    out["d_z_floored"] = bool(sd_diff < floor)

    t_stat, p_student, p, method = _paired_tests(diffs[:, None], seed)
    out["t_stat"], out["p_student_t"] = float(t_stat[0]), float(p_student[0])
    out["p_t"], out["p_method"] = float(p[0]), str(method[0])

    if not np.any(diffs != 0.0):
        out["wilcoxon_stat"], out["p_wilcoxon"] = 0.0, 1.0
    else:
        w = stats.wilcoxon(diffs, zero_method="wilcox")
        out["wilcoxon_stat"], out["p_wilcoxon"] = float(w.statistic), float(w.pvalue)

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [n_boot, n]
    resampled = diffs[idx]  # [n_boot, n]
    boot_mean = resampled.mean(axis=1)  # [n_boot]
    boot_d = boot_mean / np.maximum(resampled.std(axis=1, ddof=1), floor)  # [n_boot]
    out["diff_ci_low"], out["diff_ci_high"] = _quantiles(boot_mean, ci)
    out["d_z_ci_low"], out["d_z_ci_high"] = _quantiles(boot_d, ci)
    return out


def hedges_j(df: float) -> float:
    """Exact small-sample correction J(df) = Γ(df/2) / (√(df/2) · Γ((df−1)/2)) ≈ 1 − 3 / (4·df − 1)."""
    if df <= 1:
        return math.nan
    return math.exp(special.gammaln(df / 2.0) - special.gammaln((df - 1.0) / 2.0)) / math.sqrt(df / 2.0)


def unpaired_comparison(
    a: Any,
    b: Any,
    *,
    n_boot: int,
    seed: int,
    ci: float = 0.95,
    sd_floor: float | None = None,
) -> dict[str, Any]:
    """Unpaired comparison of control ``a`` [n_a] and treatment ``b`` [n_b]; effect = mean b − mean a.

    - Welch t (``ttest_ind(b, a, equal_var=False)``), two-sided, ``p_method = "welch"``. Never p = 0: two
      constant arms get the exact permutation p of :func:`_two_constant_arms_p` (1 / C(n_a + n_b, n_b),
      doubled when n_a = n_b; 1 if the means agree; ``"permutation_exact"``), and a Welch p that underflows
      to 0 is replaced by the Monte Carlo permutation p of :func:`two_sample_permutation_p`
      (``"permutation_mc"``, seeded with ``stable_seed(seed, "permutation")``).
    - Hedges' g = J · (mean b − mean a) / max(s_pooled, floor), s_pooled the df-weighted pooled SD,
      df = n_a + n_b − 2 and J the exact correction of :func:`hedges_j`; the floor is
      :func:`effect_size_floor` (only binds when both arms are constant or ``sd_floor`` is given).
    - Percentile bootstrap CIs of the difference and of g, each arm resampled independently (one index
      array per arm). Non-finite values are excluded and counted.
    """
    av_all, bv_all = _vector(a, "a"), _vector(b, "b")
    av, bv = av_all[np.isfinite(av_all)], bv_all[np.isfinite(bv_all)]
    n_a, n_b = int(av.size), int(bv.size)
    out: dict[str, Any] = {
        "n_a": n_a,
        "n_b": n_b,
        "n_excluded": int(av_all.size - n_a + bv_all.size - n_b),
        "mean_a": float(av.mean()) if n_a else math.nan,
        "mean_b": float(bv.mean()) if n_b else math.nan,
        "mean_diff": math.nan,
        "sd_a": _sd(av),
        "sd_b": _sd(bv),
        "sd_pooled": math.nan,
        "sd_floor": math.nan,
        "hedges_g": math.nan,
        "t_stat": math.nan,
        "df_welch": math.nan,
        "p_t": math.nan,
        "p_method": None,
        "diff_ci_low": math.nan,
        "diff_ci_high": math.nan,
        "g_ci_low": math.nan,
        "g_ci_high": math.nan,
        "ci": ci,
        "n_boot": int(n_boot),
        "seed": int(seed),
    }
    if n_a < 2 or n_b < 2:
        if n_a and n_b:
            out["mean_diff"] = out["mean_b"] - out["mean_a"]
        return out
    mean_diff = out["mean_b"] - out["mean_a"]
    df = n_a + n_b - 2
    s_pooled = math.sqrt(((n_a - 1) * out["sd_a"] ** 2 + (n_b - 1) * out["sd_b"] ** 2) / df)
    floor = effect_size_floor(av, bv, sd_floor)
    j = hedges_j(df)
    out.update(mean_diff=mean_diff, sd_pooled=s_pooled, sd_floor=floor)
    out["hedges_g"] = j * mean_diff / max(s_pooled, floor)

    va, vb = out["sd_a"] ** 2 / n_a, out["sd_b"] ** 2 / n_b
    if _constant(av) and _constant(bv):
        out["t_stat"] = math.copysign(math.inf, mean_diff) if mean_diff != 0.0 else 0.0
        out["p_t"], out["p_method"] = _two_constant_arms_p(n_a, n_b, mean_diff), P_PERMUTATION_EXACT
    else:
        t = stats.ttest_ind(bv, av, equal_var=False)
        out["t_stat"], out["p_t"], out["p_method"] = float(t.statistic), float(t.pvalue), P_WELCH
        out["df_welch"] = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
        if out["p_t"] == 0.0:  # underflow: the permutation p stays > 0
            perm_seed = stable_seed(seed, "permutation")
            out["p_t"], out["p_method"] = two_sample_permutation_p(av, bv, seed=perm_seed), P_PERMUTATION_MC

    rng = np.random.default_rng(seed)
    ra = av[rng.integers(0, n_a, size=(n_boot, n_a))]  # [n_boot, n_a]
    rb = bv[rng.integers(0, n_b, size=(n_boot, n_b))]  # [n_boot, n_b]
    boot_diff = rb.mean(axis=1) - ra.mean(axis=1)  # [n_boot]
    boot_sp = np.sqrt(
        ((n_a - 1) * ra.var(axis=1, ddof=1) + (n_b - 1) * rb.var(axis=1, ddof=1)) / df
    )  # [n_boot]
    boot_g = j * boot_diff / np.maximum(boot_sp, floor)  # [n_boot]
    out["diff_ci_low"], out["diff_ci_high"] = _quantiles(boot_diff, ci)
    out["g_ci_low"], out["g_ci_high"] = _quantiles(boot_g, ci)
    return out


# ------------------------------------------------------------------------------- multiple comparisons


def _pvector(pvalues: Any) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    if np.any((p[~np.isnan(p)] < 0) | (p[~np.isnan(p)] > 1)):
        raise ValueError("p-values must lie in [0, 1].")
    return p


def bh_fdr(pvalues: Any) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values [m] (step-up, monotone, capped at 1).

    NaN p-values stay NaN and are not counted in m (a test that could not be run is not part of the
    family). Equals statsmodels ``multipletests(p, method="fdr_bh")[1]`` on the non-NaN entries.
    """
    p = _pvector(pvalues)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    scaled = pv[order] * m / np.arange(1, m + 1)  # [m], ascending p
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    back = np.empty(m)
    back[order] = adjusted
    out[ok] = back
    return out


def bonferroni(pvalues: Any) -> np.ndarray:
    """Bonferroni adjusted p-values min(m·p, 1); NaN stays NaN and is not counted in m."""
    p = _pvector(pvalues)
    m = int((~np.isnan(p)).sum())
    return np.minimum(p * m, 1.0)


def correct_family(
    frame: pd.DataFrame,
    p_column: str,
    family_columns: Sequence[str],
    *,
    within_columns: Sequence[str] | None = None,
    suffix: str = "",
) -> pd.DataFrame:
    """Correct ``p_column`` within each family and write the family next to each p.

    A family is every row sharing the values of ``family_columns`` (e.g. model and profile: all metrics ×
    conditions of one model and profile). Adds ``p_bh{suffix}``, ``p_bonferroni{suffix}``, ``family``
    (e.g. ``"model=smollm2-135m|profile=smoke|metric×condition (m=48)"``, the middle part from
    ``within_columns``, i.e. what varies inside the family) and ``family_size`` (m: rows with a non-NaN p).
    Empty ``family_columns`` makes the whole frame one family (``"all rows (m=…)"``).
    """
    out = frame.copy()
    bh_col, bonf_col = f"p_bh{suffix}", f"p_bonferroni{suffix}"
    out[bh_col] = np.nan
    out[bonf_col] = np.nan
    out["family"] = ""
    out["family_size"] = 0
    within = "×".join(within_columns) if within_columns else ""
    fam_cols = list(family_columns)
    groups = out.groupby(fam_cols, dropna=False, sort=True).groups.items() if fam_cols else [((), out.index)]
    for key, index in groups:
        p = out.loc[index, p_column].to_numpy(dtype=np.float64)
        m = int((~np.isnan(p)).sum())
        values = key if isinstance(key, tuple) else (key,)
        parts = [f"{col}={val}" for col, val in zip(fam_cols, values, strict=True)]
        label = "|".join([*parts, within] if within else parts) or "all rows"
        out.loc[index, bh_col] = bh_fdr(p)
        out.loc[index, bonf_col] = bonferroni(p)
        out.loc[index, "family"] = f"{label} (m={m})"
        out.loc[index, "family_size"] = m
    return out


# --------------------------------------------------------------------------------------------- power


_ALTERNATIVES = ("two-sided", "larger", "smaller")


def paired_t_power(d: float, n: int, alpha: float = 0.05, alternative: str = "two-sided") -> float:
    """Exact power of the one-sample / paired t test at effect d_z = ``d`` with ``n`` pairs.

    The statistic is noncentral t with df = n − 1 and nc = d·√n; two-sided power counts both rejection
    tails, P(T > t_{1−α/2}) + P(T < t_{α/2}) (as statsmodels ``TTestPower``, which returns NaN where the
    far tail underflows; here it is ~0). ``"larger"``/``"smaller"``
    are the one-sided tests.
    """
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}.")
    if n < 2:
        return math.nan
    df, nc = n - 1, d * math.sqrt(n)
    a = alpha / 2.0 if alternative == "two-sided" else alpha
    power = 0.0
    if alternative in ("two-sided", "larger"):
        power += float(stats.nct.sf(stats.t.isf(a, df), df, nc))
    if alternative in ("two-sided", "smaller"):
        # P(T < t_a) = P(−T > −t_a) with −T ~ nct(df, −nc): the sf form stays finite where the far-tail
        # cdf returns NaN (large |nc|).
        power += float(stats.nct.sf(-stats.t.ppf(a, df), df, -nc))
    return power


def two_sample_t_power(d: float, n_a: int, n_b: int, alpha: float = 0.05) -> float:
    """Exact two-sided power of the two-sample (pooled-variance) t test at Hedges/Cohen ``d``.

    Noncentral t with df = n_a + n_b − 2 and nc = d·√(n_a·n_b / (n_a + n_b)), both rejection tails (as
    statsmodels ``TTestIndPower``). Used as the planning power of an unpaired comparison; the reported test
    is Welch's, whose power is close to this one for similar arm variances.
    """
    if n_a < 2 or n_b < 2:
        return math.nan
    df, nc = n_a + n_b - 2, d * math.sqrt(n_a * n_b / (n_a + n_b))
    crit = stats.t.isf(alpha / 2.0, df)
    return float(stats.nct.sf(crit, df, nc)) + float(stats.nct.sf(crit, df, -nc))


def required_n(
    d: float,
    power: float = 0.8,
    alpha: float = 0.05,
    alternative: str = "two-sided",
    max_n: int = 10_000_000,
) -> int:
    """Smallest n ≥ 2 with :func:`paired_t_power` ≥ ``power`` (doubling, then bisection; power is monotone
    in n for d ≠ 0). Raises if the target is unreachable (d = 0, wrong-signed one-sided d, or n > max_n).
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must lie in (0, 1), got {power}.")
    if d == 0.0 or not math.isfinite(d):
        raise ValueError(f"required n is undefined for d={d}.")

    def ok(n: int) -> bool:
        return paired_t_power(d, n, alpha, alternative) >= power

    if ok(2):
        return 2
    lo, hi = 2, 4  # invariant: not ok(lo)
    while not ok(hi):
        if hi >= max_n:
            raise ValueError(f"power {power} is not reached for d={d} with n ≤ {max_n}.")
        lo, hi = hi, min(hi * 2, max_n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def power_table(
    observed_d: float | None,
    n: int,
    targets: Sequence[float] = (0.2, 0.3, 0.5),
    alpha: float = 0.05,
    power: float = 0.8,
) -> pd.DataFrame:
    """Power at ``n`` pairs and the n required for ``power``, for each target d_z and the observed |d_z|.

    Columns: ``effect`` ("target" / "observed"), ``d``, ``n``, ``alpha``, ``power_at_n``, ``target_power``,
    ``required_n`` (None when unreachable, e.g. d = 0). A None or non-finite observed d adds no row.
    """
    rows = [("target", float(t)) for t in targets]
    if observed_d is not None and math.isfinite(observed_d):
        rows.append(("observed", abs(float(observed_d))))
    records = []
    for effect, d in rows:
        try:
            need: int | None = required_n(d, power, alpha)
        except ValueError:
            need = None
        records.append(
            {
                "effect": effect,
                "d": d,
                "n": int(n),
                "alpha": alpha,
                "power_at_n": paired_t_power(d, n, alpha),
                "target_power": power,
                "required_n": need,
            }
        )
    table = pd.DataFrame.from_records(records)
    table["required_n"] = table["required_n"].astype("Int64")
    return table


# ------------------------------------------------------------------------------------ many comparisons


def compare_many(
    frame: pd.DataFrame,
    *,
    id_col: str,
    group_cols: Sequence[str],
    control_col: str,
    treatment_col: str,
    n_boot: int,
    seed_parts: Sequence[str | int],
    ci: float = 0.95,
    sd_floor: float | None = None,
) -> pd.DataFrame:
    """:func:`paired_comparison` for every group of ``group_cols`` (e.g. metric × condition).

    ``frame`` is wide: one row per (prompt, group) with the control and treatment values in
    ``control_col`` / ``treatment_col``. Within a group, duplicated prompt ids are averaged first
    (:func:`dedupe_pairs`). Each group is bootstrapped with ``stable_seed(*seed_parts, *group values)``.
    Returns one row per group: the group values, ``n_rows`` (before dedupe) and every comparison field.
    """
    cols = list(group_cols)
    records = []
    for key, sub in frame.groupby(cols, sort=True, dropna=False):
        values = key if isinstance(key, tuple) else (key,)
        _, a, b = dedupe_pairs(sub[id_col].to_numpy(), sub[control_col], sub[treatment_col])
        scalars = (str, int, float, np.integer, np.floating, np.bool_)
        seed = stable_seed(*seed_parts, *(v if isinstance(v, scalars) else str(v) for v in values))
        result = paired_comparison(a, b, n_boot=n_boot, seed=seed, ci=ci, sd_floor=sd_floor)
        records.append({**dict(zip(cols, values, strict=True)), "n_rows": len(sub), **result})
    return pd.DataFrame.from_records(records)


# -------------------------------------------------------------------------------------- k-selection


def select_k(
    boot_overlaps: Mapping[int, np.ndarray],
    null_p95: Mapping[int, float],
    chance: Mapping[int, float],
    tolerance: float = 0.05,
) -> tuple[int | None, pd.DataFrame]:
    """Pick the subspace dimension k from bootstrap overlaps over prompts.

    Rule: for each k, ``lo`` / ``hi`` are the 5th / 95th percentiles and ``median`` the median of the
    bootstrap overlaps [n_boot]. k *passes* when ``lo`` > ``null_p95[k]`` (the 95th percentile of the null
    overlap, e.g. random subspaces through the same map). Among passing k, the chosen k is the **smallest**
    whose median is within ``tolerance`` (0.05) of the largest passing median (parsimony). If no k passes,
    k is None. Returns (k, table) with columns k, median, lo, hi, null_p95, chance, passes, chosen, reason;
    ``table.attrs["decision"]`` states the outcome in words.
    """
    summary = []
    for k in sorted(boot_overlaps):
        boot = np.asarray(boot_overlaps[k], dtype=np.float64)
        boot = boot[np.isfinite(boot)]
        lo, med, hi = (
            (float(v) for v in np.quantile(boot, [0.05, 0.5, 0.95])) if boot.size else (math.nan,) * 3
        )
        summary.append({"k": int(k), "median": med, "lo": lo, "hi": hi, "null_p95": float(null_p95[k]),
                        "chance": float(chance[k])})  # fmt: skip
    return select_k_from_bounds(pd.DataFrame(summary), tolerance)


def select_k_from_bounds(summary: pd.DataFrame, tolerance: float = 0.05) -> tuple[int | None, pd.DataFrame]:
    """The rule of :func:`select_k` applied to per-k ``median``, ``lo`` (5th pct), ``hi``, ``null_p95``,
    ``chance`` columns that were computed elsewhere (e.g. by the alignment sweep's bootstrap)."""
    rows = []
    for item in summary.sort_values("k").to_dict("records"):
        lo, null = float(item["lo"]), float(item["null_p95"])
        passes = bool(lo > null)
        reason = (
            f"lower 5% bound {lo:.3f} > null p95 {null:.3f}"
            if passes
            else f"lower 5% bound {lo:.3f} does not exceed null p95 {null:.3f}"
        )
        rows.append({**{c: item[c] for c in ("k", "median", "lo", "hi", "null_p95", "chance")},
                     "passes": passes, "chosen": False, "reason": reason})  # fmt: skip
    table = pd.DataFrame(
        rows, columns=["k", "median", "lo", "hi", "null_p95", "chance", "passes", "chosen", "reason"]
    )
    passing = table[table["passes"]]
    if passing.empty:
        table.attrs["decision"] = "no k passes: no lower 5% bootstrap bound exceeds the null 95th percentile"
        return None, table
    best = float(passing["median"].max())
    k = int(passing.loc[passing["median"] >= best - tolerance, "k"].min())
    table.loc[table["k"] == k, "chosen"] = True
    table.loc[table["k"] == k, "reason"] += (
        f"; smallest passing k with median within {tolerance} of {best:.3f}"
    )
    table.attrs["decision"] = (
        f"k={k}: smallest passing k whose median overlap is within {tolerance} of the best passing median "
        f"{best:.3f}"
    )
    return k, table


def select_k_at_best_layer(
    sweep: pd.DataFrame, past_embeddings: pd.DataFrame
) -> tuple[int, pd.DataFrame, pd.DataFrame]:
    """``k_selection``: per method and emotion of an alignment ``sweep``, :func:`select_k_from_bounds` at the
    layer of model A with the largest mean margin (overlap − null p95) over ``past_embeddings`` (the sweep's
    rows past the token embeddings).

    Returns the layer, the per-k table of every method × emotion and one decision row per method × emotion.
    """
    margin = past_embeddings.assign(margin=lambda f: f["overlap"] - f["null_p95"])
    best_layer = margin.groupby("layer_a")["margin"].mean().idxmax()
    tables, decisions = [], []
    for (method, emotion), group in sweep[sweep["layer_a"] == best_layer].groupby(["method", "emotion"]):
        summary = group.rename(columns={"overlap": "median", "boot_lo": "lo", "boot_hi": "hi"})
        k, table = select_k_from_bounds(summary[["k", "median", "lo", "hi", "null_p95", "chance"]])
        table.insert(0, "emotion", emotion)
        table.insert(0, "method", method)
        tables.append(table)
        decisions.append({"method": method, "emotion": emotion, "layer_a": int(best_layer), "k": k,
                          "decision": table.attrs["decision"]})  # fmt: skip
    return int(best_layer), pd.concat(tables, ignore_index=True), pd.DataFrame(decisions)


def _wilcoxon_columns(diffs: Float[np.ndarray, "n G"]) -> tuple[np.ndarray, np.ndarray]:
    """Wilcoxon signed-rank statistic and p of each column of ``diffs``, as one 1-D call per column gives.

    scipy's ``method="auto"`` decides exact vs asymptotic (vs permutation for n ≤ 13 with ties) from the
    whole array it is given, so columns are grouped by that decision (zeros or ties in ``|d|`` or neither)
    and each group goes through one vectorised call. Columns that are all zero get statistic 0 and p 1.
    """
    n, n_groups = diffs.shape
    w_stat, p_w = np.zeros(n_groups), np.ones(n_groups)
    nonzero = np.any(diffs != 0.0, axis=0)  # [G]
    magnitudes = np.sort(np.abs(diffs), axis=0)  # [n, G]
    irregular = np.any(diffs == 0.0, axis=0) | np.any(magnitudes[1:] == magnitudes[:-1], axis=0)  # [G]
    for group in (nonzero & ~irregular, nonzero & irregular):
        columns = np.flatnonzero(group)
        if columns.size == 0:
            continue
        if n <= 13 and irregular[columns[0]]:  # scipy's permutation test: column by column
            for g in columns:
                w = stats.wilcoxon(diffs[:, g], zero_method="wilcox")
                w_stat[g], p_w[g] = float(w.statistic), float(w.pvalue)
            continue
        w = stats.wilcoxon(diffs[:, columns], zero_method="wilcox", axis=0)
        w_stat[columns], p_w[columns] = np.asarray(w.statistic), np.asarray(w.pvalue)
    return w_stat, p_w


def paired_family(
    control: Any,
    treatment: Any,
    *,
    n_boot: int,
    seed: int,
    ci: float = 0.95,
    sd_floor: float | None = None,
) -> pd.DataFrame:
    """:func:`paired_comparison` for every column of ``control`` / ``treatment`` [n_prompts, G] at once.

    All G comparisons of a family (e.g. metric × condition of one model and profile) share the same unique
    prompts, so they share one prompt resample per bootstrap draw: the draw is
    ``rng.integers(0, n, size=(n_boot, n))`` exactly as in :func:`paired_comparison` with the same seed,
    turned into per-prompt counts [n_boot, n], and every group's resampled mean and SD follow from two
    matrix products (``counts @ diffs``, ``counts @ diffs²``). Each column therefore gets the same CIs as
    :func:`paired_comparison` called with this seed, and the joint resampling keeps the correlation between
    comparisons that share prompts. ``p_t`` / ``p_method`` follow :func:`paired_comparison` (the same
    sign patterns for every column, so each column's p equals the single call's). Rows with a non-finite
    value in any column must be removed first. Returns one row per column with the fields of
    :func:`paired_comparison`.
    """
    a = np.asarray(control, dtype=np.float64)
    b = np.asarray(treatment, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"control and treatment must share one [n, G] shape, got {a.shape} and {b.shape}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_family needs finite values; drop prompts with missing scores first.")
    n, n_groups = a.shape
    if n < 2:
        raise ValueError(f"paired_family needs at least 2 prompts, got {n}.")
    diffs = b - a  # [n, G]
    mean_diff = diffs.mean(axis=0)  # [G]
    sd_diff = diffs.std(axis=0, ddof=1)  # [G]
    s_ref = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / 2.0)  # [G]
    magnitude = np.maximum(np.abs(a.mean(axis=0)), np.abs(b.mean(axis=0)))
    s_ref = np.where(s_ref > 0, s_ref, np.where(magnitude > 0, magnitude, 1.0))
    floor = np.maximum(float(sd_floor or 0.0), SD_FLOOR_FRACTION * s_ref)  # [G]
    d_z = mean_diff / np.maximum(sd_diff, floor)

    t_stat, p_student, p_t, p_method = _paired_tests(diffs, seed)  # [G] each
    w_stat, p_w = _wilcoxon_columns(diffs)  # [G] each

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))  # [n_boot, n]
    idx += (np.arange(n_boot) * n)[:, None]  # row r's draws land in bins r·n … r·n + n − 1
    counts = np.bincount(idx.reshape(-1), minlength=n_boot * n).reshape(n_boot, n)  # [n_boot, n]
    # One product for both moments, transposed so each comparison's resamples are contiguous.
    moments = np.concatenate([diffs, diffs**2], axis=1).T @ counts.T.astype(np.float64)  # [2G, n_boot]
    boot_mean = moments[:n_groups] / n  # [G, n_boot]
    boot_var = (moments[n_groups:] / n - boot_mean**2) * n / (n - 1)  # [G, n_boot]
    boot_d = boot_mean / np.maximum(np.sqrt(np.maximum(boot_var, 0.0)), floor[:, None])  # [G, n_boot]
    lo_q, hi_q = (1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0
    bounds = np.quantile(np.concatenate([boot_mean, boot_d]), [lo_q, hi_q], axis=1)  # [2, 2G]
    (diff_lo, d_lo), (diff_hi, d_hi) = np.split(bounds[0], 2), np.split(bounds[1], 2)
    return pd.DataFrame(
        {
            "n": n,
            "n_excluded": 0,
            "mean_a": a.mean(axis=0),
            "mean_b": b.mean(axis=0),
            "mean_diff": mean_diff,
            "sd_diff": sd_diff,
            "sd_floor": floor,
            "d_z": d_z,
            "d_z_floored": sd_diff < floor,
            "t_stat": t_stat,
            "p_t": p_t,
            "p_method": p_method,
            "p_student_t": p_student,
            "wilcoxon_stat": w_stat,
            "p_wilcoxon": p_w,
            "diff_ci_low": diff_lo,
            "diff_ci_high": diff_hi,
            "d_z_ci_low": d_lo,
            "d_z_ci_high": d_hi,
            "ci": ci,
            "n_boot": int(n_boot),
            "seed": int(seed),
        }
    )
