"""Known-answer tests for cross-model alignment: maps, subspace overlap with null controls, CKA."""

from __future__ import annotations

import numpy as np
import pytest

from emotion_assets.science.alignment import (
    LinearMap,
    _top_k_weighted,
    alignment_sweep,
    cka_matrix,
    fit_procrustes_map,
    fit_ridge_map,
    heldout_r2,
    linear_cka,
    match_layers_by_depth,
    null_overlaps,
    subspace_overlap_after_map,
)

EMOTIONS = ("anger", "apology", "gratitude")
K_MAX = 3


def _orthogonal(rng: np.random.Generator, d: int, m: int | None = None) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, m or d)))
    return q  # [d, m], orthonormal columns


def _model(seed: int, d: int, n_neutral: int = 200, n_eval: int = 100, n_emotion: int = 80):
    """Neutral = 8-dim latent structure + isotropic noise; each emotion adds a planted 3-dim signal
    (a mean shift and two spread directions of decreasing size) on top of fresh neutral-like samples."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((8, d)) * np.linspace(2.0, 0.5, 8)[:, None] / np.sqrt(d)  # row norms ≈ 2 … 0.5

    def neutral(n: int) -> np.ndarray:
        return 3.0 + rng.standard_normal((n, 8)) @ mix + 0.5 * rng.standard_normal((n, d))

    train, held = neutral(n_neutral), neutral(n_eval)
    emotions = {}
    for name in EMOTIONS:
        u = _orthogonal(rng, d, 3).T  # [3, d]
        spread = rng.standard_normal((n_emotion, 2)) * np.array([5.0, 3.5])
        emotions[name] = neutral(n_emotion) + 8.0 * u[0] + spread @ u[1:]
    return train, held, emotions


def _twin(model, proj: np.ndarray, seed: int, noise: float = 0.05):
    """Model B = model A's activations @ proj + small noise (same prompts)."""
    rng = np.random.default_rng(seed)
    train, held, emotions = model

    def push(x: np.ndarray) -> np.ndarray:
        return x @ proj + noise * rng.standard_normal((x.shape[0], proj.shape[1]))

    return push(train), push(held), {e: push(x) for e, x in emotions.items()}


def _sweep(model_a, model_b, **kwargs):
    (a_tr, a_ev, e_a), (b_tr, b_ev, e_b) = model_a, model_b
    args = dict(k_max=K_MAX, n_null=100, n_boot=50, seed=0) | kwargs
    return alignment_sweep(a_tr, b_tr, a_ev, b_ev, e_a, e_b, a_tr.mean(0), b_tr.mean(0), **args)


@pytest.fixture(scope="module")
def rotation_sweep():
    model_a = _model(0, 48)
    q = _orthogonal(np.random.default_rng(1), 48)
    return _sweep(model_a, _twin(model_a, q, seed=2))


@pytest.fixture(scope="module")
def unrelated_sweep():
    return _sweep(_model(0, 48), _model(7, 48))


def test_rotation_is_recovered_by_both_methods(rotation_sweep):
    df = rotation_sweep
    assert len(df) == 2 * len(EMOTIONS) * K_MAX
    assert set(df.method) == {"ridge", "procrustes"}
    assert (df.overlap >= 0.95).all(), df[["method", "emotion", "k", "overlap"]]
    assert df.beats_null.all()
    assert (df.boot_lo >= 0.9).all()
    np.testing.assert_allclose(df.chance, df.k / 48)
    # Without the map the two bases are unrelated (B is a random rotation): overlap stays near chance.
    assert (df.overlap_before < 3 * df.chance + 0.1).all()
    assert df.overlap_before.mean() < 3 * df.chance.mean()
    assert (df.null_p95 < 0.5).all()
    assert (df.r2_heldout > 0.98).all()
    assert (df.n_train_pairs == 200).all() and (df.d_a == 48).all() and (df.d_b == 48).all()


def test_unrelated_model_stays_at_null(unrelated_sweep):
    df = unrelated_sweep
    # A fixed unrelated pair is one draw from (about) the null, so a row clears the null's 95th percentile
    # about 5 % of the time; the bootstrap only adds prompt-sampling noise. Allow at most 2 of 18 rows.
    assert df.beats_null.sum() <= 2
    assert (df.overlap < 0.2).all()
    assert abs(df.overlap.mean() - df.null_mean.mean()) < 0.03
    assert (df.overlap <= df.null_p95).mean() >= 0.75
    assert (df.overlap <= df.null_p95 + 0.05).all()
    assert (df.r2_heldout < 0.1).all()


def test_different_widths_end_to_end():
    model_a = _model(3, 64)
    proj = _orthogonal(np.random.default_rng(4), 64, 40)  # [64, 40] semi-orthogonal
    df = _sweep(model_a, _twin(model_a, proj, seed=5), n_null=50, n_boot=20)
    assert len(df) == 2 * len(EMOTIONS) * K_MAX
    assert df.overlap_before.isna().all()
    for col in ("overlap", "null_mean", "null_p95", "boot_lo", "boot_hi"):
        assert df[col].between(0.0, 1.0).all(), col
    assert (df.d_a == 64).all() and (df.d_b == 40).all()
    np.testing.assert_allclose(df.chance, df.k / 40)
    ridge = df[df.method == "ridge"]
    assert (ridge.r2_heldout > 0.98).all()
    assert (ridge.overlap > 0.9).all() and ridge.beats_null.all()
    # Procrustes can only rotate (and scale) the shared PCA coordinates, so a projection is fit roughly.
    procrustes = df[df.method == "procrustes"]
    assert (procrustes.r2_heldout > 0.5).all() and (procrustes.overlap > procrustes.null_p95).mean() > 0.5


def test_ridge_map_exact_and_affine():
    rng = np.random.default_rng(0)
    x_a = rng.standard_normal((60, 10))
    w, shift = rng.standard_normal((10, 6)), rng.standard_normal(6)
    x_b = x_a @ w + shift
    fitted = fit_ridge_map(x_a, x_b, alpha=0.0)
    assert fitted.weight.shape == (10, 6) and fitted.method == "ridge" and fitted.n_train == 60
    np.testing.assert_allclose(fitted.weight, w, atol=1e-8)
    np.testing.assert_allclose(fitted.apply(x_a[:5]), x_b[:5], atol=1e-8)
    np.testing.assert_allclose(fitted.apply_directions(np.eye(10)[:2]), w[:2], atol=1e-8)  # no translation
    auto = fit_ridge_map(x_a, x_b + 0.01 * rng.standard_normal(x_b.shape), alpha="auto")
    assert auto.alpha is not None and auto.alpha >= 0 and any(key.startswith("cv_mse@") for key in auto.info)
    assert heldout_r2(auto, x_a, x_b) > 0.999
    with pytest.raises(ValueError):
        fit_ridge_map(x_a, x_b[:-1], alpha=1.0)


def test_procrustes_recovers_scaled_rotation():
    rng = np.random.default_rng(1)
    x_a = rng.standard_normal((80, 12)) * np.linspace(3, 1, 12)
    q = _orthogonal(rng, 12)
    x_b = 2.0 * x_a @ q + 5.0
    fitted = fit_procrustes_map(x_a, x_b)
    assert fitted.r == 12 and fitted.scale == pytest.approx(2.0)
    np.testing.assert_allclose(fitted.weight, 2.0 * q, atol=1e-8)
    assert heldout_r2(fitted, x_a, x_b) == pytest.approx(1.0)
    basis_a = _orthogonal(rng, 12, 3).T  # [3, 12]
    assert subspace_overlap_after_map(fitted, basis_a, basis_a @ q) == pytest.approx(1.0)
    low = fit_procrustes_map(x_a, x_b, r=4)
    assert np.linalg.matrix_rank(low.weight) == 4 and 0 < low.info["pca_var_kept_a"] < 1
    with pytest.raises(ValueError):
        fit_procrustes_map(x_a, x_b, r=13)


def test_linear_cka():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 20)) @ rng.standard_normal((20, 20))
    assert linear_cka(x, 3.0 * x @ _orthogonal(rng, 20) + 1.0) == pytest.approx(1.0)
    assert linear_cka(rng.standard_normal((300, 10)), rng.standard_normal((300, 10))) < 0.15
    acts_a = rng.standard_normal((50, 4, 16))
    same = cka_matrix(acts_a, acts_a)
    assert same.shape == (4, 4)
    np.testing.assert_allclose(np.diag(same), 1.0)
    acts_b = rng.standard_normal((50, 3, 8))
    mixed = cka_matrix(acts_a, acts_b)
    assert mixed.shape == (4, 3) and ((mixed >= 0) & (mixed <= 1)).all()
    assert mixed[1, 2] == pytest.approx(linear_cka(acts_a[:, 1], acts_b[:, 2]))


def test_match_layers_by_depth():
    pairs = match_layers_by_depth(list(range(31)), 30, list(range(7)), 6)
    assert len(pairs) == 31 and [a for a, _ in pairs] == list(range(31))
    lookup = dict(pairs)
    assert lookup[0] == 0 and lookup[30] == 6 and lookup[15] == 3 and lookup[5] == 1 and lookup[3] == 1
    assert [b for _, b in pairs] == sorted(b for _, b in pairs)
    for a, b in pairs:
        assert abs(a / 30 - b / 6) <= 1 / 12 + 1e-12


def test_null_overlaps_seeded_and_at_chance():
    rng = np.random.default_rng(3)
    d, k = 40, 2
    rotation = LinearMap(np.zeros(d), np.zeros(d), _orthogonal(rng, d), method="test", n_train=0)
    basis_b = _orthogonal(rng, d, k).T  # [k, d]
    first = null_overlaps(rotation, basis_b, k, n_draws=2000, seed=11)
    np.testing.assert_array_equal(first, null_overlaps(rotation, basis_b, k, n_draws=2000, seed=11))
    assert not np.array_equal(first, null_overlaps(rotation, basis_b, k, n_draws=2000, seed=12))
    assert first.shape == (2000,) and ((first >= 0) & (first <= 1)).all()
    assert first.mean() == pytest.approx(k / d, rel=0.1)


def test_sweep_is_reproducible_for_a_seed():
    model_a = _model(5, 24, n_neutral=60, n_eval=30, n_emotion=30)
    model_b = _twin(model_a, _orthogonal(np.random.default_rng(6), 24), seed=7, noise=0.5)
    first = _sweep(model_a, model_b, n_null=20, n_boot=10, seed=3)
    again = _sweep(model_a, model_b, n_null=20, n_boot=10, seed=3)
    assert first.equals(again)


def test_bootstrap_bases_match_explicit_resample():
    rng = np.random.default_rng(4)
    for n, d in ((30, 12), (12, 30)):  # sample-Gram and covariance paths
        x = rng.standard_normal((n, d))
        idx = rng.integers(0, n, size=n)
        counts = np.bincount(idx, minlength=n)[None]  # [1, n]
        fast = _top_k_weighted(x, counts, 3)[0]  # [3, d]
        _, _, vt = np.linalg.svd(x[idx], full_matrices=False)
        np.testing.assert_allclose(np.abs(np.sum(fast * vt[:3], axis=1)), 1.0, atol=1e-8)
