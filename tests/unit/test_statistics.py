"""Statistics agree with scipy/statsmodels, are seeded stably across processes and behave at the edges."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from emotion_assets.science.statistics import (
    N_SIGN_FLIPS,
    SD_FLOOR_FRACTION,
    SIGN_FLIP_BELOW_N,
    bh_fdr,
    bonferroni,
    bootstrap_mean_ci,
    bootstrap_statistic,
    compare_many,
    correct_family,
    dedupe_pairs,
    paired_comparison,
    paired_family,
    paired_t_power,
    power_table,
    required_n,
    select_k,
    sign_flip_p,
    stable_seed,
    two_sample_t_power,
    unpaired_comparison,
)

ROOT = Path(__file__).resolve().parents[2]


def _pair(n: int = 40, shift: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.5, 0.2, n)
    return a, a + shift + rng.normal(0.0, 0.4, n)


def test_paired_tests_agree_with_scipy():
    a, b = _pair()
    out = paired_comparison(a, b, n_boot=500, seed=1)
    t = stats.ttest_rel(b, a)
    w = stats.wilcoxon(b - a, zero_method="wilcox")
    assert out["n"] == 40
    assert out["mean_diff"] == pytest.approx(np.mean(b - a))
    assert out["t_stat"] == pytest.approx(t.statistic) and out["p_t"] == pytest.approx(t.pvalue)
    assert out["p_method"] == "t" and out["p_student_t"] == out["p_t"]
    assert out["wilcoxon_stat"] == pytest.approx(w.statistic)
    assert out["p_wilcoxon"] == pytest.approx(w.pvalue)
    assert not out["d_z_floored"]
    assert out["d_z"] == pytest.approx(np.mean(b - a) / np.std(b - a, ddof=1))
    assert out["diff_ci_low"] < out["mean_diff"] < out["diff_ci_high"]
    assert out["d_z_ci_low"] < out["d_z"] < out["d_z_ci_high"]


def test_wilcoxon_drops_zero_differences_and_all_zero_gives_p_one():
    a, b = _pair(n=25)
    b[:5] = a[:5]
    out = paired_comparison(a, b, n_boot=200, seed=0)
    assert out["p_wilcoxon"] == pytest.approx(stats.wilcoxon(b - a, zero_method="wilcox").pvalue)
    same = paired_comparison(a, a.copy(), n_boot=200, seed=0)
    assert same["p_wilcoxon"] == 1.0 and same["p_t"] == 1.0 and same["d_z"] == 0.0


def test_zero_variance_difference_keeps_d_bounded():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.0, 1.0, 30)
    out = paired_comparison(a, a + 0.5, n_boot=300, seed=0)
    s_ref = math.sqrt(np.var(a, ddof=1))  # both arms share the same spread
    assert out["d_z_floored"] and math.isfinite(out["d_z"])
    assert abs(out["d_z"]) <= 0.5 / (SD_FLOOR_FRACTION * s_ref) + 1e-9
    # n = 30 > 20 with zero variance: Monte Carlo sign-flip p, at its floor, never 0.
    assert out["p_t"] == 1.0 / (N_SIGN_FLIPS + 1) and out["p_method"] == "sign_flip_mc"
    assert math.isnan(out["p_student_t"])
    assert math.isfinite(out["d_z_ci_low"]) and math.isfinite(out["d_z_ci_high"])
    # Both arms constant: the floor falls back to the metric's magnitude.
    const = paired_comparison(np.full(10, 0.2), np.full(10, 0.7), n_boot=100, seed=0)
    assert math.isfinite(const["d_z"]) and 0 < const["d_z"] <= 1.0 / SD_FLOOR_FRACTION * 2
    assert const["p_t"] == 2.0 / 2**10 and const["t_stat"] == math.inf
    # A caller-supplied absolute floor (e.g. a fraction of a [0, 1] metric's range) is honoured.
    ranged = paired_comparison(a, a + 0.5, n_boot=100, seed=0, sd_floor=0.1)
    assert ranged["d_z"] == pytest.approx(0.5 / max(0.1, SD_FLOOR_FRACTION * s_ref))


def test_dedupe_never_increases_n():
    a, b = _pair(n=20)
    ids = np.array([f"p{i:02d}" for i in range(20)])
    base = paired_comparison(a, b, n_boot=300, seed=5)
    dup_ids = np.concatenate([ids, ids[:7], ids[:3]])
    dup_a, dup_b = np.concatenate([a, a[:7], a[:3]]), np.concatenate([b, b[:7], b[:3]])
    uid, ua, ub = dedupe_pairs(dup_ids, dup_a, dup_b)
    assert list(uid) == list(ids)
    again = paired_comparison(ua, ub, n_boot=300, seed=5)
    assert again["n"] == 20
    assert again == pytest.approx(base, nan_ok=True)
    # Differing duplicates are averaged.
    _, ma, mb = dedupe_pairs(["x", "x", "y"], [1.0, 3.0, 5.0], [0.0, 1.0, 2.0])
    assert list(ma) == [2.0, 5.0] and list(mb) == [0.5, 2.0]


def test_non_finite_pairs_are_excluded_and_counted():
    a, b = _pair(n=12)
    b[2] = np.nan
    out = paired_comparison(a, b, n_boot=100, seed=0)
    assert out["n"] == 11 and out["n_excluded"] == 1


def test_vectorised_bootstrap_equals_loop_with_same_indices():
    a, b = _pair(n=35)
    diffs = b - a
    n_boot, seed = 1000, 11
    out = paired_comparison(a, b, n_boot=n_boot, seed=seed)
    idx = np.random.default_rng(seed).integers(0, diffs.size, size=(n_boot, diffs.size))
    loop = np.array([diffs[row].mean() for row in idx])
    lo, hi = np.quantile(loop, [0.025, 0.975])
    assert out["diff_ci_low"] == pytest.approx(lo, abs=1e-12)
    assert out["diff_ci_high"] == pytest.approx(hi, abs=1e-12)
    mean, mlo, mhi = bootstrap_mean_ci(diffs, n_boot, seed)
    assert (mean, mlo, mhi) == pytest.approx((diffs.mean(), lo, hi), abs=1e-12)
    # Generic [n, m] statistic: resampled rows, reduced over axis 1.
    x = np.stack([a, b], axis=1)  # [n, 2]
    gen = bootstrap_statistic(x, lambda s: (s[..., 1] - s[..., 0]).mean(axis=1), n_boot, seed)
    assert gen["samples"] == pytest.approx(loop, abs=1e-12)
    assert gen["estimate"] == pytest.approx(diffs.mean())


def test_same_seed_identical_cis_in_fresh_process():
    a, b = _pair(n=30)
    seed = stable_seed("smollm2-135m", "smoke", "sentiment", 0.5)
    here = paired_comparison(a, b, n_boot=2000, seed=seed)
    code = (
        "import json, numpy as np\n"
        "from emotion_assets.science.statistics import paired_comparison, stable_seed\n"
        f"a = np.array({a.tolist()!r}); b = np.array({b.tolist()!r})\n"
        "seed = stable_seed('smollm2-135m', 'smoke', 'sentiment', 0.5)\n"
        "out = paired_comparison(a, b, n_boot=2000, seed=seed)\n"
        "print(json.dumps({'seed': seed, 'ci': [out['diff_ci_low'], out['diff_ci_high'],"
        " out['d_z_ci_low'], out['d_z_ci_high']]}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there["seed"] == seed
    assert there["ci"] == [here["diff_ci_low"], here["diff_ci_high"], here["d_z_ci_low"], here["d_z_ci_high"]]


def test_stable_seed_distinguishes_types_and_normalises_numpy():
    assert stable_seed("a", 1) == stable_seed("a", np.int64(1))
    assert stable_seed("a", 1) != stable_seed("a", "1")
    assert stable_seed("a", "b") != stable_seed("ab")
    assert 0 <= stable_seed("x") < 2**63
    with pytest.raises(TypeError):
        stable_seed(object())  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # the near-constant arm below
def test_welch_and_hedges_g():
    rng = np.random.default_rng(8)
    a, b = rng.normal(0.0, 1.0, 14), rng.normal(0.6, 1.8, 9)
    out = unpaired_comparison(a, b, n_boot=500, seed=2)
    t = stats.ttest_ind(b, a, equal_var=False)
    assert out["t_stat"] == pytest.approx(t.statistic) and out["p_t"] == pytest.approx(t.pvalue)
    n_a, n_b = a.size, b.size
    df = n_a + n_b - 2
    sp = math.sqrt(((n_a - 1) * a.var(ddof=1) + (n_b - 1) * b.var(ddof=1)) / df)
    j = special.gamma(df / 2) / (math.sqrt(df / 2) * special.gamma((df - 1) / 2))
    assert out["hedges_g"] == pytest.approx(j * (b.mean() - a.mean()) / sp, rel=1e-12)
    approx = (1 - 3 / (4 * df - 1)) * (b.mean() - a.mean()) / sp
    assert out["hedges_g"] == pytest.approx(approx, rel=1e-3)
    assert out["diff_ci_low"] < out["mean_diff"] < out["diff_ci_high"]
    assert out["g_ci_low"] < out["hedges_g"] < out["g_ci_high"]
    const = unpaired_comparison(np.full(5, 1.0), np.full(6, 2.0), n_boot=50, seed=0)
    # Two constant arms: exact permutation p, only the observed labelling of C(11, 6) reaches |diff|.
    assert const["p_t"] == 1.0 / math.comb(11, 6) and const["p_method"] == "permutation_exact"
    assert math.isfinite(const["hedges_g"])
    same = unpaired_comparison(np.full(4, 1.0), np.full(4, 1.0), n_boot=50, seed=0)
    assert same["p_t"] == 1.0
    # Welch p that underflows to 0 (near-constant, far-apart arms) becomes the Monte Carlo permutation p.
    tiny = np.arange(30) * 1e-30
    far = unpaired_comparison(tiny, np.full(30, 1.0), n_boot=50, seed=0)
    assert far["p_method"] == "permutation_mc" and far["p_t"] == 1.0 / (N_SIGN_FLIPS + 1)


def test_bh_and_bonferroni_match_statsmodels():
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(0, 0.05, 10), rng.uniform(0, 1, 30), [0.01, 0.01, 1.0]])
    assert bh_fdr(p) == pytest.approx(multipletests(p, method="fdr_bh")[1], abs=1e-15)
    assert bonferroni(p) == pytest.approx(multipletests(p, method="bonferroni")[1], abs=1e-15)
    with_nan = p.copy()
    with_nan[[3, 17]] = np.nan
    ok = ~np.isnan(with_nan)
    for fn, method in ((bh_fdr, "fdr_bh"), (bonferroni, "bonferroni")):
        adj = fn(with_nan)
        assert np.isnan(adj[~ok]).all()
        assert adj[ok] == pytest.approx(multipletests(with_nan[ok], method=method)[1], abs=1e-15)


def test_correct_family_per_model_and_profile():
    rng = np.random.default_rng(0)
    rows = [
        {"model": m, "profile": "smoke", "metric": met, "condition": c, "p": rng.uniform()}
        for m in ("m1", "m2")
        for met in ("sentiment", "politeness")
        for c in ("a", "b", "c")
    ]
    frame = pd.DataFrame(rows)
    frame.loc[0, "p"] = np.nan
    out = correct_family(frame, "p", ["model", "profile"], within_columns=["metric", "condition"])
    m1 = out[out["model"] == "m1"]
    assert (m1["family"] == "model=m1|profile=smoke|metric×condition (m=5)").all()
    assert (m1["family_size"] == 5).all() and (out.loc[out["model"] == "m2", "family_size"] == 6).all()
    assert m1["p_bh"].to_numpy() == pytest.approx(bh_fdr(m1["p"].to_numpy()), nan_ok=True)
    assert m1["p_bonferroni"].to_numpy() == pytest.approx(bonferroni(m1["p"].to_numpy()), nan_ok=True)
    whole = correct_family(frame, "p", [])
    assert (whole["family"] == "all rows (m=11)").all()


@pytest.mark.parametrize("alternative", ["two-sided", "larger", "smaller"])
def test_power_matches_statsmodels(alternative):
    tp = TTestPower()
    for d in (0.2, 0.3, 0.5, -0.35):
        for n in (5, 24, 150):
            ref = tp.power(effect_size=d, nobs=n, alpha=0.05, alternative=alternative)
            assert paired_t_power(d, n, alternative=alternative) == pytest.approx(ref, abs=1e-6)


def test_two_sample_power_matches_statsmodels():
    tp = TTestIndPower()
    for d in (0.2, 0.5, -0.8):
        for n_a, n_b in ((5, 5), (24, 40), (150, 90)):
            ref = tp.power(effect_size=d, nobs1=n_a, ratio=n_b / n_a, alpha=0.05)
            assert two_sample_t_power(d, n_a, n_b) == pytest.approx(ref, abs=1e-6)
    assert math.isnan(two_sample_t_power(0.5, 1, 10))


def test_required_n_matches_statsmodels():
    tp = TTestPower()
    for d in (0.2, 0.3, 0.5, 0.8):
        n = required_n(d, power=0.8)
        assert n == math.ceil(tp.solve_power(effect_size=d, power=0.8, alpha=0.05))
        assert paired_t_power(d, n) >= 0.8 > paired_t_power(d, n - 1)
    with pytest.raises(ValueError):
        required_n(0.0)
    table = power_table(0.25, 48)
    assert list(table["effect"]) == ["target", "target", "target", "observed"]
    assert table.loc[0, "required_n"] == required_n(0.2)
    assert len(power_table(None, 48)) == 3


def test_compare_many_uses_unique_prompts_and_stable_group_seeds():
    rng = np.random.default_rng(1)
    rows = []
    for metric in ("sentiment", "politeness"):
        for cond in ("alpha=0.5", "random"):
            for i in range(15):
                c = rng.normal()
                rows.append(
                    {"prompt_id": f"p{i}", "metric": metric, "condition": cond, "ctl": c, "trt": c + 0.2}
                )
    frame = pd.DataFrame(rows)
    frame = pd.concat([frame, frame.iloc[:4]], ignore_index=True)  # duplicated prompts
    out = compare_many(
        frame,
        id_col="prompt_id",
        group_cols=["metric", "condition"],
        control_col="ctl",
        treatment_col="trt",
        n_boot=200,
        seed_parts=["m1", "smoke"],
    )
    assert len(out) == 4 and (out["n"] == 15).all()
    dup_group = out[(out["metric"] == "sentiment") & (out["condition"] == "alpha=0.5")]
    assert dup_group["n_rows"].tolist() == [19]
    first = out.iloc[0]
    assert first["seed"] == stable_seed("m1", "smoke", first["metric"], first["condition"])


def test_select_k_rule():
    rng = np.random.default_rng(0)

    def boot(center: float) -> np.ndarray:
        return center + rng.normal(0.0, 0.02, 2000)

    overlaps = {1: boot(0.30), 2: boot(0.62), 4: boot(0.70), 8: boot(0.73), 16: boot(0.74)}
    null = {1: 0.40, 2: 0.30, 4: 0.30, 8: 0.30, 16: 0.30}
    chance = {k: k / 64 for k in overlaps}
    k, table = select_k(overlaps, null, chance)
    # k=1 fails (lo ≈ 0.27 < 0.40); best passing median ≈ 0.74 → smallest within 0.05 is k=4 (0.70).
    assert k == 4
    assert list(table["passes"]) == [False, True, True, True, True]
    assert table.loc[table["chosen"], "k"].tolist() == [4]
    assert list(table.columns[:8]) == ["k", "median", "lo", "hi", "null_p95", "chance", "passes", "chosen"]
    k_none, table_none = select_k(overlaps, dict.fromkeys(overlaps, 0.9), chance)
    assert k_none is None and not table_none["chosen"].any()
    assert "no k passes" in table_none.attrs["decision"]


def test_paired_family_equals_paired_comparison_per_column():
    from emotion_assets.science.statistics import paired_comparison, paired_family

    rng = np.random.default_rng(3)
    control = rng.normal(size=(40, 6))
    treatment = control + rng.normal(0.2, 0.5, size=(40, 6))
    treatment[:, 5] = control[:, 5] + 0.25  # zero-variance difference: floored d, degenerate t
    family = paired_family(control, treatment, n_boot=500, seed=11)
    for g in range(6):
        single = paired_comparison(control[:, g], treatment[:, g], n_boot=500, seed=11)
        for key in ("mean_diff", "d_z", "p_t", "p_wilcoxon", "diff_ci_low", "diff_ci_high", "d_z_ci_low"):
            assert family.loc[g, key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), (g, key)
    assert np.isfinite(family.loc[5, "d_z"]) and abs(family.loc[5, "d_z"]) <= 20


def _brute_force_sign_flip(d: np.ndarray) -> float:
    observed = abs(d.sum())
    flipped = [abs(np.dot(signs, d)) for signs in itertools.product((1.0, -1.0), repeat=d.size)]
    return float(np.mean(np.asarray(flipped) >= observed - 1e-12))


def test_sign_flip_p_equals_brute_force_enumeration():
    rng = np.random.default_rng(12)
    diffs = np.column_stack([rng.normal(shift, 1.0, 8) for shift in (0.0, 0.5, 1.5, -0.8)])  # [8, 4]
    p, method = sign_flip_p(diffs, seed=0)
    assert method == "sign_flip_exact"
    for g in range(diffs.shape[1]):
        assert p[g] == pytest.approx(_brute_force_sign_flip(diffs[:, g]), abs=1e-15)
    # A planted shift is found, no shift is not.
    assert p[2] < 0.05 < p[0]


def test_sign_flip_constant_and_zero_differences():
    for n in (2, 5, 10, 20):
        p, _ = sign_flip_p(np.full(n, 0.2), seed=0)
        assert p[0] == 2.0 / 2**n > 0.0
        p_neg, _ = sign_flip_p(np.full(n, -0.2), seed=0)
        assert p_neg[0] == p[0]
    zero, _ = sign_flip_p(np.zeros(9), seed=0)
    assert zero[0] == 1.0
    # (a + c) − a is constant only up to rounding: the tolerance keeps the global flip a tie.
    a = np.random.default_rng(0).uniform(size=12)
    rounded, _ = sign_flip_p((a + 0.3) - a, seed=0)
    assert rounded[0] == 2.0 / 2**12


def test_sign_flip_monte_carlo_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(5)
    diffs = np.column_stack([rng.normal(shift, 1.0, 16) for shift in (0.0, 0.3, 0.7, 1.2)])  # [16, 4]
    exact, how = sign_flip_p(diffs, seed=3)
    mc, how_mc = sign_flip_p(diffs, seed=3, n_perm=50_000, exact_max_n=10)
    again, _ = sign_flip_p(diffs, seed=3, n_perm=50_000, exact_max_n=10)
    other, _ = sign_flip_p(diffs, seed=4, n_perm=50_000, exact_max_n=10)
    assert (how, how_mc) == ("sign_flip_exact", "sign_flip_mc")
    assert np.array_equal(mc, again) and not np.array_equal(mc, other)
    # Binomial SE at 50k draws is ≤ 0.0023; 5 SE.
    assert np.abs(mc - exact).max() < 0.012
    # One column alone gets the same p as inside the family (same random patterns).
    alone, _ = sign_flip_p(diffs[:, 2], seed=3, n_perm=50_000, exact_max_n=10)
    assert alone[0] == mc[2]
    # Constant differences: only the observed pattern counts, the floor 1 / (n_perm + 1).
    floor, _ = sign_flip_p(np.full(25, 0.2), seed=0, n_perm=2_000)
    assert floor[0] == 1.0 / 2_001


def test_small_n_uses_sign_flip_and_large_n_uses_t():
    a, b = _pair(n=12, shift=0.4)
    small = paired_comparison(a, b, n_boot=100, seed=2)
    assert small["p_method"] == "sign_flip_exact"
    assert small["p_t"] == pytest.approx(_brute_force_sign_flip(b - a), abs=1e-15)
    assert small["p_student_t"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    a, b = _pair(n=SIGN_FLIP_BELOW_N + 1)
    assert paired_comparison(a, b, n_boot=100, seed=2)["p_method"] == "t"


def test_paired_family_never_passes_p_zero_to_the_correction():
    rng = np.random.default_rng(9)
    control = rng.normal(size=(10, 4))
    treatment = control + rng.normal(0.0, 0.3, size=(10, 4))
    treatment[:, 0] = control[:, 0] + 0.2  # the p = 0 case of the t-test: every prompt shifted +0.2
    treatment[:, 1] = control[:, 1]  # no change at all
    family = paired_family(control, treatment, n_boot=200, seed=1)
    assert family.loc[0, "p_t"] == 2.0 / 2**10 and family.loc[1, "p_t"] == 1.0
    assert (family["p_method"] == "sign_flip_exact").all()
    for g in range(4):
        single = paired_comparison(control[:, g], treatment[:, g], n_boot=200, seed=1)
        assert family.loc[g, "p_t"] == single["p_t"] and family.loc[g, "p_method"] == single["p_method"]
    corrected = correct_family(family.assign(model="m", profile="p"), "p_t", ["model", "profile"])
    for column in ("p_t", "p_bh", "p_bonferroni"):
        assert (corrected[column] > 0.0).all(), column
    assert corrected.loc[0, "p_bonferroni"] == 4 * 2.0 / 2**10


@pytest.mark.parametrize("n", [9, 30, 80])
def test_paired_family_wilcoxon_matches_one_call_per_column(n):
    """Columns with ties, zeros, neither or only zeros each get the p of their own 1-D scipy call."""
    from emotion_assets.science.statistics import paired_comparison, paired_family

    rng = np.random.default_rng(n)
    control = rng.normal(size=(n, 5))
    treatment = control + rng.normal(0.3, 1.0, size=(n, 5))
    treatment[:, 1] = control[:, 1] + np.round(rng.normal(0.3, 1.0, n), 1)  # ties in |d|
    treatment[:, 2] = control[:, 2] + np.where(
        np.arange(n) % 4 == 0, 0.0, rng.normal(0.5, 1.0, n)
    )  # exact zeros
    treatment[:, 3] = control[:, 3]  # all zero
    family = paired_family(control, treatment, n_boot=50, seed=2)
    for g in range(5):
        single = paired_comparison(control[:, g], treatment[:, g], n_boot=50, seed=2)
        assert family.loc[g, "wilcoxon_stat"] == single["wilcoxon_stat"], g
        assert family.loc[g, "p_wilcoxon"] == pytest.approx(single["p_wilcoxon"], rel=1e-12), g
    assert family.loc[3, "p_wilcoxon"] == 1.0
    assert family.loc[0, "p_wilcoxon"] < 0.05 or n < 30  # the planted shift is found at moderate n
