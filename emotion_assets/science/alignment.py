"""Cross-model alignment of residual spaces: linear maps A → B, subspace overlap with null controls, CKA.

A map is always fit on paired activations of the same neutral train prompts run through both models; the
two widths may differ (d_a ≠ d_b). Overlaps are the mean cos² of principal angles (0–1, chance ≈ k/d_b).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.linalg
from jaxtyping import Float
from threadpoolctl import threadpool_limits
from torch import Tensor

from emotion_assets.science.directions import (
    emotion_subspace,
    principal_angle_overlap,
    random_subspace_overlap_chance,
)

ArrayLike = Tensor | np.ndarray

RIDGE_ALPHA_FACTORS = np.logspace(-6, 2, 9)
"""``alpha="auto"`` grid: these factors × the mean squared singular value of the centered train A
(‖X_a‖_F² / min(n − 1, d_a))."""

RIDGE_CV_FOLDS = 5


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)


def _paired(x_a: ArrayLike, x_b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _np(x_a), _np(x_b)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"Expected 2-D activations [n, d], got shapes {a.shape} and {b.shape}.")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"Paired activations need the same prompts: n_a={a.shape[0]} vs n_b={b.shape[0]}.")
    return a, b


@dataclass(eq=False)
class LinearMap:
    """Affine map from model A's residual space to model B's: x_b ≈ (x_a − mean_a) @ weight + mean_b.

    ``alpha`` (ridge), ``r`` and ``scale`` (Procrustes) and ``info`` record how the map was fit.
    """

    mean_a: np.ndarray  # [d_a]
    mean_b: np.ndarray  # [d_b]
    weight: np.ndarray  # [d_a, d_b]
    method: str
    n_train: int
    alpha: float | None = None
    r: int | None = None
    scale: float | None = None
    info: dict[str, float] = field(default_factory=dict)

    @property
    def d_a(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_b(self) -> int:
        return int(self.weight.shape[1])

    def apply(self, x: Float[ArrayLike, "n d_a"]) -> np.ndarray:
        """Predict B activations from A activations (affine): ``[n, d_a] → [n, d_b]``."""
        return (_np(x) - self.mean_a) @ self.weight + self.mean_b  # [n, d_b]

    def apply_directions(self, basis: Float[ArrayLike, "k d_a"]) -> np.ndarray:
        """Map directions (linear part only, no translation): ``[k, d_a] → [k, d_b]``."""
        return _np(basis) @ self.weight  # [k, d_b]


def _shrink(s: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge filter s / (s² + α) per alpha ``[n_alpha, m]``; numerically null directions get 0."""
    keep = s > s.max(initial=0.0) * 1e-12  # [m]
    return np.where(keep, s / np.maximum(s**2 + alphas[:, None], 1e-300), 0.0)


def _ridge_weight(xc: np.ndarray, yc: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Closed-form ridge solutions for centered data via one SVD: ``[n_alpha, d_a, d_b]``."""
    u, s, vt = np.linalg.svd(xc, full_matrices=False)  # u: [n, m], s: [m], vt: [m, d_a]
    uty = u.T @ yc  # [m, d_b]
    shrink = _shrink(s, alphas)  # [n_alpha, m]
    return (vt.T[None] * shrink[:, None, :]) @ uty  # [n_alpha, d_a, d_b]


def _ridge_cv(xa: np.ndarray, xb: np.ndarray, alphas: np.ndarray, n_folds: int) -> np.ndarray:
    """Mean squared validation error per alpha over interleaved folds (prompt i is in fold i mod K)."""
    n = xa.shape[0]
    folds = np.arange(n) % n_folds
    sse = np.zeros(alphas.size)
    for f in range(n_folds):
        tr, va = folds != f, folds == f
        mu_a, mu_b = xa[tr].mean(axis=0), xb[tr].mean(axis=0)
        u, s, vt = np.linalg.svd(xa[tr] - mu_a, full_matrices=False)  # u: [n_tr, m], vt: [m, d_a]
        shrink = _shrink(s, alphas)  # [n_alpha, m]
        t = (xa[va] - mu_a) @ vt.T  # [n_va, m]
        uty = u.T @ (xb[tr] - mu_b)  # [m, d_b]
        pred = (t[None] * shrink[:, None, :]) @ uty  # [n_alpha, n_va, d_b]
        sse += ((xb[va] - mu_b - pred) ** 2).sum(axis=(1, 2))
    return sse / (n * xb.shape[1])


def fit_ridge_map(
    x_a: Float[ArrayLike, "n d_a"],
    x_b: Float[ArrayLike, "n d_b"],
    alpha: float | Literal["auto"] = "auto",
) -> LinearMap:
    """Ridge least squares from A to B on paired (neutral train) activations, both sides centered.

    weight = (X_aᵀX_a + αI)⁻¹ X_aᵀX_b on the centered data, computed through the SVD of X_a (so n < d_a
    is cheap; with α = 0 it is the minimum-norm least-squares solution). ``alpha="auto"`` picks α from
    :data:`RIDGE_ALPHA_FACTORS` × ‖X_a‖_F² / min(n − 1, d_a) (centered) by 5-fold CV (interleaved folds) on the mean
    squared error; the CV errors are kept in ``info`` as ``cv_mse@<alpha>``.
    """
    xa, xb = _paired(x_a, x_b)
    n = xa.shape[0]
    if n < 2:
        raise ValueError("A ridge map needs at least two paired prompts.")
    mu_a, mu_b = xa.mean(axis=0), xb.mean(axis=0)
    xc, yc = xa - mu_a, xb - mu_b
    info: dict[str, float] = {}
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"alpha must be a non-negative float or 'auto', got {alpha!r}.")
        n_folds = min(RIDGE_CV_FOLDS, n)
        if n // n_folds < 1 or n - n // n_folds < 2:
            raise ValueError(f"alpha='auto' needs more paired prompts than {n}.")
        scale = float(np.sum(xc**2)) / max(min(n - 1, xa.shape[1]), 1)
        grid = RIDGE_ALPHA_FACTORS * max(scale, 1e-300)
        mse = _ridge_cv(xa, xb, grid, n_folds)
        chosen = float(grid[int(np.argmin(mse))])
        info = {f"cv_mse@{a:.4g}": float(m) for a, m in zip(grid, mse, strict=True)}
    else:
        chosen = float(alpha)
        if chosen < 0:
            raise ValueError(f"alpha must be non-negative, got {chosen}.")
    weight = _ridge_weight(xc, yc, np.array([chosen]))[0]  # [d_a, d_b]
    return LinearMap(mu_a, mu_b, weight, method="ridge", n_train=n, alpha=chosen, info=info)


def fit_procrustes_map(
    x_a: Float[ArrayLike, "n d_a"],
    x_b: Float[ArrayLike, "n d_b"],
    r: int | None = None,
) -> LinearMap:
    """Orthogonal Procrustes between the r-dim PCA coordinates of A and B, composed into one d_a×d_b map.

    1. Center each side with its train mean; P_A [r, d_a], P_B [r, d_b] = top-r principal axes.
    2. Coordinates Z_A = X_A P_Aᵀ, Z_B = X_B P_Bᵀ, each divided by its Frobenius norm (s_A, s_B).
    3. R = argmin over orthogonal R of ‖Z_A/s_A · R − Z_B/s_B‖ = U Vᵀ with U Σ Vᵀ = svd(Z_Aᵀ Z_B).
    4. weight = P_Aᵀ R P_B · (s_B / s_A); ``scale`` = s_B / s_A.

    The map has rank r: A directions outside A's top-r PCA span are dropped. ``r`` defaults to
    min(n − 1, d_a, d_b); ``info`` holds the train-variance fraction kept by the r components per side.
    """
    xa, xb = _paired(x_a, x_b)
    n, d_a = xa.shape
    d_b = xb.shape[1]
    r_max = min(n - 1, d_a, d_b)
    r = r_max if r is None else int(r)
    if not 1 <= r <= r_max:
        raise ValueError(f"r={r} must be between 1 and min(n − 1, d_a, d_b) = {r_max}.")
    mu_a, mu_b = xa.mean(axis=0), xb.mean(axis=0)
    _, s_a, vt_a = np.linalg.svd(xa - mu_a, full_matrices=False)  # vt_a: [m_a, d_a]
    _, s_b, vt_b = np.linalg.svd(xb - mu_b, full_matrices=False)  # vt_b: [m_b, d_b]
    p_a, p_b = vt_a[:r], vt_b[:r]  # [r, d_a], [r, d_b]
    z_a, z_b = (xa - mu_a) @ p_a.T, (xb - mu_b) @ p_b.T  # [n, r]
    norm_a, norm_b = np.linalg.norm(z_a), np.linalg.norm(z_b)
    if norm_a == 0 or norm_b == 0:
        raise ValueError("Procrustes needs non-constant activations on both sides.")
    u, _, vt = np.linalg.svd((z_a / norm_a).T @ (z_b / norm_b))  # [r, r]
    rot = u @ vt  # [r, r]
    scale = float(norm_b / norm_a)
    weight = p_a.T @ rot @ p_b * scale  # [d_a, d_b]
    info = {
        "pca_var_kept_a": float(np.sum(s_a[:r] ** 2) / np.sum(s_a**2)),
        "pca_var_kept_b": float(np.sum(s_b[:r] ** 2) / np.sum(s_b**2)),
    }
    return LinearMap(mu_a, mu_b, weight, method="procrustes", n_train=n, r=r, scale=scale, info=info)


def heldout_r2(
    map: LinearMap, x_a_eval: Float[ArrayLike, "n d_a"], x_b_eval: Float[ArrayLike, "n d_b"]
) -> float:
    """1 − SSE/SST of the map's predictions on eval pairs, SST around the eval mean of B (can be < 0)."""
    xa, xb = _paired(x_a_eval, x_b_eval)
    sse = float(np.sum((xb - map.apply(xa)) ** 2))
    sst = float(np.sum((xb - xb.mean(axis=0)) ** 2))
    if sst == 0:
        raise ValueError("Eval activations of B are constant; R² is undefined.")
    return 1.0 - sse / sst


def _centered_grams(x: np.ndarray) -> np.ndarray:
    """Gram matrices of column-centered data, one per layer: ``[n, L, d] → [L, n, n]``."""
    xc = x - x.mean(axis=0, keepdims=True)  # [n, L, d]
    per_layer = np.ascontiguousarray(xc.transpose(1, 0, 2))  # [L, n, d]
    return per_layer @ per_layer.transpose(0, 2, 1)  # [L, n, n]


def cka_matrix(acts_a: Float[ArrayLike, "n L_a d_a"], acts_b: Float[ArrayLike, "n L_b d_b"]) -> np.ndarray:
    """Linear CKA between every layer of A and every layer of B on the same prompts: ``[L_a, L_b]``.

    CKA(K, L) = ⟨K, L⟩_F / (‖K‖_F ‖L‖_F) with K, L the Gram matrices of the centered activations; each
    layer's Gram is computed once (memory ≈ (L_a + L_b)·n² floats).
    """
    a, b = _np(acts_a), _np(acts_b)
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"Expected [n, L, d] activations on the same prompts, got {a.shape} and {b.shape}.")
    n = a.shape[0]
    ka = _centered_grams(a).reshape(a.shape[1], n * n)  # [L_a, n²]
    kb = _centered_grams(b).reshape(b.shape[1], n * n)  # [L_b, n²]
    na, nb = np.linalg.norm(ka, axis=1), np.linalg.norm(kb, axis=1)  # [L_a], [L_b]
    denom = np.outer(na, nb)  # [L_a, L_b]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, (ka @ kb.T) / denom, np.nan)
    return np.clip(out, 0.0, 1.0)


def linear_cka(x: Float[ArrayLike, "n d1"], y: Float[ArrayLike, "n d2"]) -> float:
    """Linear CKA of two representations of the same n prompts, in [0, 1] (NaN if one is constant)."""
    a, b = _paired(x, y)
    return float(cka_matrix(a[:, None, :], b[:, None, :])[0, 0])


def match_layers_by_depth(
    boundaries_a: Sequence[int], n_layers_a: int, boundaries_b: Sequence[int], n_layers_b: int
) -> list[tuple[int, int]]:
    """Pair each A boundary with the B boundary of nearest relative depth (boundary / n_layers).

    Distances are compared exactly (|a·n_b − b·n_a|); a tie goes to the shallower B boundary.
    """
    if n_layers_a < 1 or n_layers_b < 1 or not boundaries_b:
        raise ValueError("Need n_layers ≥ 1 on both sides and at least one B boundary.")
    sorted_b = sorted(int(b) for b in boundaries_b)
    return [
        (int(a), min(sorted_b, key=lambda b, a=int(a): abs(a * n_layers_b - b * n_layers_a)))
        for a in boundaries_a
    ]


def _orthonormal_rows(x: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the row span, batched: ``[..., k, d] → [..., d, k]`` (as columns)."""
    q, _ = np.linalg.qr(np.swapaxes(x, -1, -2))
    return q


def _overlap_cols(q_a: np.ndarray, q_b: np.ndarray) -> np.ndarray:
    """Mean cos² of principal angles between orthonormal column bases ``[..., d, k_a]``, ``[..., d, k_b]``.

    Σ cos² = ‖Q_aᵀ Q_b‖_F², averaged over min(k_a, k_b) angles (same as ``principal_angle_overlap``).
    """
    m = np.swapaxes(q_a, -1, -2) @ q_b  # [..., k_a, k_b]
    k = min(q_a.shape[-1], q_b.shape[-1])
    return np.clip((m**2).sum(axis=(-2, -1)) / k, 0.0, 1.0)


def _map_rows(map: LinearMap, rows: np.ndarray) -> np.ndarray:
    """Linear part of the map on stacked directions: ``[..., k, d_a] → [..., k, d_b]`` (one matmul)."""
    return (rows.reshape(-1, map.d_a) @ map.weight).reshape(*rows.shape[:-1], map.d_b)


def subspace_overlap_after_map(
    map: LinearMap, basis_a: Float[ArrayLike, "k d_a"], basis_b: Float[ArrayLike, "k d_b"]
) -> float:
    """Overlap (mean cos², 0–1) of A's subspace pushed through the map (then re-orthonormalized) with B's."""
    return principal_angle_overlap(map.apply_directions(basis_a), _np(basis_b))


def _null_bases(map: LinearMap, k: int, n_draws: int, seed: int) -> np.ndarray:
    """Random k-dim subspaces of A (Gaussian) pushed through the map, orthonormalized: ``[n_draws, d_b, k]``.

    The span of k Gaussian vectors is a uniformly random k-dim subspace, and a linear map sends the span
    of any basis to the same image, so the A-side QR is skipped.
    """
    if not 1 <= k <= map.d_a:
        raise ValueError(f"k={k} must be between 1 and d_a={map.d_a}.")
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n_draws, k, map.d_a))  # [n_draws, k, d_a]
    return _orthonormal_rows(_map_rows(map, g))  # [n_draws, d_b, k]


def null_overlaps(
    map: LinearMap, basis_b: Float[ArrayLike, "k d_b"], k: int, n_draws: int, seed: int
) -> np.ndarray:
    """Null control: overlaps with B's subspace of ``n_draws`` random k-dim A subspaces pushed through the
    same map ``[n_draws]``; seeded with ``numpy.random.default_rng(seed)``."""
    q_b = _orthonormal_rows(_np(basis_b))  # [d_b, k_b]
    return _overlap_cols(_null_bases(map, k, n_draws, seed), q_b)


def _top_k_weighted(x: np.ndarray, counts: np.ndarray, k: int) -> np.ndarray:
    """Top-k right singular vectors of each bootstrap resample of ``x`` ``[n, d]``, given as row counts
    ``[n_boot, n]`` (a resample repeats row i counts[i] times): ``[n_boot, k, d]``.

    Exact: the top-k eigenvectors of Xᵀ diag(c) X, from the weighted sample Gram of the resampled rows
    (mapped back through X) when n ≤ d, else from the weighted covariance itself.
    """
    n_boot, (n, d) = counts.shape[0], x.shape
    out = np.zeros((n_boot, k, d))
    gram = x @ x.T if n <= d else None  # [n, n], shared by all resamples
    for i in range(n_boot):
        keep = np.flatnonzero(counts[i])
        w = np.sqrt(counts[i, keep])  # [m]
        if gram is not None:
            mat = gram[np.ix_(keep, keep)] * w[:, None] * w[None, :]  # [m, m] = Y Yᵀ, Y = diag(w) X_keep
        else:
            y = x[keep] * w[:, None]  # [m, d]
            mat = y.T @ y  # [d, d] = Yᵀ Y
        size = mat.shape[0]
        kk = min(k, size)
        vals, vecs = scipy.linalg.eigh(mat, subset_by_index=[size - kk, size - 1])  # ascending
        vals, vecs = vals[::-1], vecs[:, ::-1]
        if gram is not None:
            vecs = x[keep].T @ (vecs * w[:, None]) / np.sqrt(np.maximum(vals, 1e-300))  # [d, kk]
        out[i, :kk] = vecs.T
    return out


def _bootstrap_bases(
    e_a: np.ndarray,
    e_b: np.ndarray,
    mu_a: np.ndarray,
    mu_b: np.ndarray,
    k: int,
    n_boot: int,
    seed: int | Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Emotion subspaces recomputed on prompt resamples: ``[n_boot, k, d_a]``, ``[n_boot, k, d_b]``.

    Resampling with replacement is drawn as multinomial row counts. Equal prompt counts on both sides are
    resampled jointly by index (paired prompts), else independently per side.
    """
    rng = np.random.default_rng(seed)
    n_a, n_b = e_a.shape[0], e_b.shape[0]
    counts_a = rng.multinomial(n_a, np.full(n_a, 1.0 / n_a), size=n_boot)  # [n_boot, n_a]
    counts_b = counts_a if n_a == n_b else rng.multinomial(n_b, np.full(n_b, 1.0 / n_b), size=n_boot)
    return _top_k_weighted(e_a - mu_a, counts_a, k), _top_k_weighted(e_b - mu_b, counts_b, k)


def alignment_sweep(
    acts_a_train_neutral: Float[ArrayLike, "n d_a"],
    acts_b_train_neutral: Float[ArrayLike, "n d_b"],
    acts_a_eval_neutral: Float[ArrayLike, "n_eval d_a"],
    acts_b_eval_neutral: Float[ArrayLike, "n_eval d_b"],
    emotion_acts_a: Mapping[str, Float[ArrayLike, "n_e d_a"]],
    emotion_acts_b: Mapping[str, Float[ArrayLike, "n_e d_b"]],
    neutral_mean_a: Float[ArrayLike, " d_a"],
    neutral_mean_b: Float[ArrayLike, " d_b"],
    k_max: int,
    methods: Sequence[str] = ("ridge", "procrustes"),
    r: int | None = None,
    n_null: int = 100,
    n_boot: int = 100,
    seed: int = 0,
    ridge_alpha: float | Literal["auto"] = "auto",
) -> pd.DataFrame:
    """Emotion-subspace alignment for ONE matched layer pair, one row per method × emotion × k (1..k_max).

    Each map is fit once on the paired neutral train activations (``ridge``: :func:`fit_ridge_map` with
    ``ridge_alpha``; ``procrustes``: :func:`fit_procrustes_map` with ``r``); ``r2_heldout`` is its R² on
    the eval neutral pairs. Emotion subspaces are the top-k directions of (emotion − neutral mean) on each
    side (:func:`emotion_subspace`). Columns:

    - ``overlap``: mean cos² of principal angles between A's mapped subspace and B's (0–1);
      ``overlap_before``: the same without a map, only when d_a == d_b (else NaN); ``chance`` = k / d_b.
    - ``null_mean``, ``null_p95``: ``n_null`` random k-dim A subspaces pushed through the same map
      (:func:`null_overlaps`; the same draws for every emotion and method).
    - ``boot_lo``, ``boot_hi``: 5th / 95th percentiles of the overlap over ``n_boot`` bootstrap resamples
      of the emotion prompts (with replacement; jointly by index when both sides have the same number of
      prompts, i.e. the same prompts in the same order, else independently), subspaces recomputed on both
      sides, the map held fixed.
    - ``beats_null``: overlap > null_p95 AND boot_lo > null_p95 (a bootstrap test, not a permutation test).
    """
    xa_tr, xb_tr = _paired(acts_a_train_neutral, acts_b_train_neutral)
    xa_ev, xb_ev = _paired(acts_a_eval_neutral, acts_b_eval_neutral)
    d_a, d_b = xa_tr.shape[1], xb_tr.shape[1]
    if xa_ev.shape[1] != d_a or xb_ev.shape[1] != d_b:
        raise ValueError("Eval activations have a different width from the train activations.")
    if set(emotion_acts_a) != set(emotion_acts_b):
        raise ValueError(f"Emotions differ: {sorted(emotion_acts_a)} vs {sorted(emotion_acts_b)}.")
    if n_null < 1 or n_boot < 1:
        raise ValueError("n_null and n_boot must both be at least 1.")
    mu_a, mu_b = _np(neutral_mean_a), _np(neutral_mean_b)
    fitters = {
        "ridge": lambda: fit_ridge_map(xa_tr, xb_tr, ridge_alpha),
        "procrustes": lambda: fit_procrustes_map(xa_tr, xb_tr, r),
    }
    unknown = set(methods) - set(fitters)
    if unknown:
        raise ValueError(f"Unknown alignment methods {sorted(unknown)}; use {sorted(fitters)}.")
    # Many small decompositions: multi-threaded BLAS only adds overhead here (and stalls on busy hosts).
    with threadpool_limits(limits=1, user_api="blas"):
        maps = {m: fitters[m]() for m in methods}
        r2 = {m: heldout_r2(mp, xa_ev, xb_ev) for m, mp in maps.items()}
        nulls = {
            (m, k): _null_bases(mp, k, n_null, seed) for m, mp in maps.items() for k in range(1, k_max + 1)
        }
        rows = []
        for emotion in sorted(emotion_acts_a):
            e_a, e_b = _np(emotion_acts_a[emotion]), _np(emotion_acts_b[emotion])
            basis_a = emotion_subspace(e_a, mu_a, k_max)[0].double().numpy()  # [k_max, d_a]
            basis_b = emotion_subspace(e_b, mu_b, k_max)[0].double().numpy()  # [k_max, d_b]
            q_b = _orthonormal_rows(basis_b)  # [d_b, k_max]; its prefixes span the top-k subspaces
            boot_seed = [seed, zlib.crc32(emotion.encode())]
            boot_a, boot_b = _bootstrap_bases(e_a, e_b, mu_a, mu_b, k_max, n_boot, boot_seed)
            for method, mp in maps.items():
                boot_mapped = _map_rows(mp, boot_a)  # [n_boot, k_max, d_b]
                for k in range(1, k_max + 1):
                    overlap = subspace_overlap_after_map(mp, basis_a[:k], basis_b[:k])
                    before = principal_angle_overlap(basis_a[:k], basis_b[:k]) if d_a == d_b else np.nan
                    null = _overlap_cols(nulls[method, k], q_b[:, :k])  # [n_null]
                    boot_q_b = np.swapaxes(boot_b[:, :k], 1, 2)  # [n_boot, d_b, k]
                    boot = _overlap_cols(_orthonormal_rows(boot_mapped[:, :k]), boot_q_b)  # [n_boot]
                    null_p95 = float(np.percentile(null, 95))
                    boot_lo, boot_hi = (float(v) for v in np.percentile(boot, [5, 95]))
                    rows.append(
                        {
                            "method": method,
                            "emotion": emotion,
                            "k": k,
                            "overlap": overlap,
                            "overlap_before": float(before),
                            "chance": random_subspace_overlap_chance(k, d_b),
                            "null_mean": float(null.mean()),
                            "null_p95": null_p95,
                            "boot_lo": boot_lo,
                            "boot_hi": boot_hi,
                            "beats_null": bool(overlap > null_p95 and boot_lo > null_p95),
                            "r2_heldout": r2[method],
                            "d_a": d_a,
                            "d_b": d_b,
                            "n_train_pairs": xa_tr.shape[0],
                        }
                    )
    return pd.DataFrame(rows)
