"""Cross-model alignment of residual spaces: linear maps A → B, subspace overlap with null controls, CKA.

A map is always fit on paired activations of the same neutral train prompts run through both models (one
or more pooled views of each); the two widths may differ (d_a ≠ d_b). Overlaps are the mean cos² of principal angles (0–1, chance ≈ k/d_b).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
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
from emotion_assets.science.prompts import fitting_mask

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


def _ridge_cv(
    xa: np.ndarray, xb: np.ndarray, alphas: np.ndarray, n_folds: int, groups: np.ndarray
) -> np.ndarray:
    """Mean squared validation error per alpha over interleaved folds (a row of group g is in fold g mod K,
    so every row of one prompt is in the same fold)."""
    n = xa.shape[0]
    folds = groups % n_folds
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
    groups: np.ndarray | None = None,
) -> LinearMap:
    """Ridge least squares from A to B on paired (neutral train) activations, both sides centered.

    weight = (X_aᵀX_a + αI)⁻¹ X_aᵀX_b on the centered data, computed through the SVD of X_a (so n < d_a
    is cheap; with α = 0 it is the minimum-norm least-squares solution). ``alpha="auto"`` picks α from
    :data:`RIDGE_ALPHA_FACTORS` × ‖X_a‖_F² / min(n − 1, d_a) (centered) by 5-fold CV (interleaved folds) on the mean
    squared error; the CV errors are kept in ``info`` as ``cv_mse@<alpha>``. ``groups`` ``[n]`` (integer prompt
    ids, default one row per prompt) keeps the rows of one prompt, e.g. its pooled views, in one CV fold.
    """
    xa, xb = _paired(x_a, x_b)
    n = xa.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one entry per paired row ({n}), got shape {groups.shape}.")
    groups = np.unique(groups, return_inverse=True)[1]  # dense ids 0..G-1, so no fold is empty
    if n < 2:
        raise ValueError("A ridge map needs at least two paired prompts.")
    mu_a, mu_b = xa.mean(axis=0), xb.mean(axis=0)
    xc, yc = xa - mu_a, xb - mu_b
    info: dict[str, float] = {}
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"alpha must be a non-negative float or 'auto', got {alpha!r}.")
        n_folds = min(RIDGE_CV_FOLDS, len(np.unique(groups)))
        if n_folds < 2 or n - n // n_folds < 2:
            raise ValueError(f"alpha='auto' needs more paired prompts than {n}.")
        scale = float(np.sum(xc**2)) / max(min(n - 1, xa.shape[1]), 1)
        grid = RIDGE_ALPHA_FACTORS * max(scale, 1e-300)
        mse = _ridge_cv(xa, xb, grid, n_folds, groups)
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


SPECIFICITY_PERCENTILES = (2.5, 97.5)
"""Two-sided 95 % percentile-bootstrap interval of the emotion-specificity score."""


def _prefix_overlaps(q_a: np.ndarray, q_b: np.ndarray) -> np.ndarray:
    """Overlaps of the leading-k columns of two orthonormal bases for every k = 1..K, batched (broadcast):
    ``[..., d, K]``, ``[..., d, K] → [..., K]``.

    Householder QR orthonormalizes columns left to right, so the first k columns of one QR of K mapped
    directions span the first k of them; one Gram ``Q_aᵀ Q_b`` then serves every k through 2-D cumulative
    sums of its squares (Σ cos² over the leading k × k block, divided by k).
    """
    m2 = (np.swapaxes(q_a, -1, -2) @ q_b) ** 2  # [..., K, K]
    blocks = m2.cumsum(axis=-1).cumsum(axis=-2)  # [..., K, K]; [k-1, k-1] = Σ over the leading k × k block
    sums = np.diagonal(blocks, axis1=-2, axis2=-1)  # [..., K]
    return np.clip(sums / np.arange(1, q_a.shape[-1] + 1), 0.0, 1.0)


def _diagonal_off_diagonal(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the diagonal and of the off-diagonal entries of ``[E, E, ...]`` → ``[...]`` each (E ≥ 2)."""
    n = matrix.shape[0]
    trace = np.einsum("ii...->...", matrix)
    return trace / n, (matrix.sum(axis=(0, 1)) - trace) / (n * (n - 1))


def _halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint halves of n prompts by position parity (even, odd); paired sides split identically."""
    return np.arange(0, n, 2), np.arange(1, n, 2)


@dataclass(frozen=True)
class _EmotionBases:
    """Emotion subspaces of every emotion (stacked in sorted order) on all train prompts and on two
    disjoint halves of them, each with its bootstrap resamples: ``full_*`` ``[E, K, d]``, ``boot_*``
    ``[E, n_boot, K, d]``, ``half_*`` ``[E, 2, K, d]``, ``half_boot_*`` ``[E, 2, n_boot, K, d]``."""

    full_a: np.ndarray
    full_b: np.ndarray
    boot_a: np.ndarray
    boot_b: np.ndarray
    half_a: np.ndarray
    half_b: np.ndarray
    half_boot_a: np.ndarray
    half_boot_b: np.ndarray


def _emotion_bases(
    emotions: Sequence[str],
    emotion_acts_a: Mapping[str, ArrayLike],
    emotion_acts_b: Mapping[str, ArrayLike],
    mu_a: np.ndarray,
    mu_b: np.ndarray,
    k_max: int,
    n_boot: int,
    seed: int,
) -> _EmotionBases:
    """Subspaces and bootstrap subspaces (:func:`_bootstrap_bases`) per emotion, on all prompts and halves.

    Seeds: ``[seed, crc32(emotion)]`` for all prompts (as before), ``[seed, crc32(emotion), 1 + half]``
    for each half.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _EmotionBases.__dataclass_fields__}
    for emotion in emotions:
        e_a, e_b = _np(emotion_acts_a[emotion]), _np(emotion_acts_b[emotion])
        for side, n in (("A", e_a.shape[0]), ("B", e_b.shape[0])):
            if n // 2 < k_max:
                raise ValueError(
                    f"Emotion {emotion!r} has {n} train prompts on side {side}; the cross-fitted "
                    f"specificity needs two disjoint halves of at least k_max={k_max} prompts each. Lower "
                    f"the profile's k_max to ≤ {n // 2} or add prompts."
                )
        crc = zlib.crc32(emotion.encode())
        parts["full_a"].append(emotion_subspace(e_a, mu_a, k_max)[0].double().numpy())  # [K, d_a]
        parts["full_b"].append(emotion_subspace(e_b, mu_b, k_max)[0].double().numpy())  # [K, d_b]
        boot = _bootstrap_bases(e_a, e_b, mu_a, mu_b, k_max, n_boot, [seed, crc])
        parts["boot_a"].append(boot[0])
        parts["boot_b"].append(boot[1])
        halves_a, halves_b = _halves(e_a.shape[0]), _halves(e_b.shape[0])
        half = [(e_a[ia], e_b[ib]) for ia, ib in zip(halves_a, halves_b, strict=True)]
        parts["half_a"].append(
            np.stack([emotion_subspace(h_a, mu_a, k_max)[0].double().numpy() for h_a, _ in half])
        )
        parts["half_b"].append(
            np.stack([emotion_subspace(h_b, mu_b, k_max)[0].double().numpy() for _, h_b in half])
        )
        half_boot = [
            _bootstrap_bases(h_a, h_b, mu_a, mu_b, k_max, n_boot, [seed, crc, 1 + h])
            for h, (h_a, h_b) in enumerate(half)
        ]
        parts["half_boot_a"].append(np.stack([a for a, _ in half_boot]))
        parts["half_boot_b"].append(np.stack([b for _, b in half_boot]))
    return _EmotionBases(**{name: np.stack(arrays) for name, arrays in parts.items()})


@dataclass(frozen=True)
class _MethodOverlaps:
    """Emotion × emotion overlaps through one map for every k: point ``[E, E, K]``, bootstrap
    ``[E, E, n_boot, K]``; ``same_prompts`` uses all prompts on both sides (its diagonal is the per-emotion
    overlap), ``crossfit`` compares disjoint halves (A on one half, B on the other, both ways averaged)."""

    same_prompts: np.ndarray
    same_prompts_boot: np.ndarray
    crossfit: np.ndarray
    crossfit_boot: np.ndarray


def _cross_overlaps(map: LinearMap, q_b: np.ndarray, rows_a: np.ndarray) -> np.ndarray:
    """Every A subspace (``rows_a`` ``[E, ..., K, d_a]``) through the map against every B basis (``q_b``
    ``[E, ..., d_b, K]``, orthonormal columns), every k: ``[E_a, E_b, ..., K]``."""
    q_a = _orthonormal_rows(_map_rows(map, rows_a))  # [E, ..., d_b, K]
    return _prefix_overlaps(q_a[:, None], q_b[None])


def _method_overlaps(map: LinearMap, bases: _EmotionBases) -> _MethodOverlaps:
    """Emotion × emotion overlaps through one map, on all prompts and cross-fitted, with bootstraps."""
    swap = partial(np.swapaxes, axis1=-1, axis2=-2)
    full = _cross_overlaps(map, _orthonormal_rows(bases.full_b), bases.full_a)  # [E, E, K]
    boot = _cross_overlaps(map, swap(bases.boot_b), bases.boot_a)  # [E, E, n_boot, K]
    half_q_b = _orthonormal_rows(bases.half_b)  # [E, 2, d_b, K]
    half_q_b_boot = swap(bases.half_boot_b)  # [E, 2, n_boot, d_b, K]
    half = _cross_overlaps(map, half_q_b[:, ::-1], bases.half_a).mean(axis=2)  # A half h vs B half 1 − h
    half_boot = _cross_overlaps(map, half_q_b_boot[:, ::-1], bases.half_boot_a).mean(axis=2)
    return _MethodOverlaps(full, boot, half, half_boot)


# Smallest specificity (diagonal minus off-diagonal overlap, on the 0-1 overlap scale) that counts as an
# emotion-specific alignment: a bootstrap interval can exclude 0 for a difference of 0.004 between overlaps
# of 0.81, which says the emotions' subspaces are practically the same.
MIN_SPECIFICITY = 0.05


def _specificity_rows(
    method: str, emotions: Sequence[str], ov: _MethodOverlaps, d_b: int, min_specificity: float
) -> list[dict]:
    """One row per k: the cross-fitted specificity with its bootstrap interval, and the same-prompt one.

    ``specific``: the interval lies above 0 **and** the score reaches ``min_specificity``."""
    k_max = ov.crossfit.shape[-1]
    if len(emotions) < 2:
        nan = np.full(k_max, np.nan)
        cf = sp = (nan, nan, nan, nan, nan)
    else:
        cf = _specificity_summary(ov.crossfit, ov.crossfit_boot)
        sp = _specificity_summary(ov.same_prompts, ov.same_prompts_boot)
    rows = []
    for k in range(1, k_max + 1):
        score, lo, hi, diag, off = (float(v[k - 1]) for v in cf)
        same, same_lo, same_hi, same_diag, same_off = (float(v[k - 1]) for v in sp)
        rows.append(
            {
                "method": method, "k": k, "specificity": score, "lo": lo, "hi": hi,
                "specific": bool(lo > 0 and score >= min_specificity),
                "diagonal_mean": diag, "off_diagonal_mean": off, "same_prompts_specificity": same,
                "same_prompts_lo": same_lo, "same_prompts_hi": same_hi, "same_prompts_diagonal_mean": same_diag,
                "same_prompts_off_diagonal_mean": same_off, "n_emotions": len(emotions),
                "chance": random_subspace_overlap_chance(k, d_b),
            }
        )  # fmt: skip
    return rows


def _specificity_summary(point: np.ndarray, boot: np.ndarray) -> tuple[np.ndarray, ...]:
    """(score, lo, hi, diagonal mean, off-diagonal mean), each ``[K]``, of ``[E, E, K]`` and its
    bootstrap ``[E, E, n_boot, K]``; the interval is the 2.5/97.5 percentile of the resampled scores."""
    diag, off = _diagonal_off_diagonal(point)  # [K]
    boot_diag, boot_off = _diagonal_off_diagonal(boot)  # [n_boot, K]
    lo, hi = np.percentile(boot_diag - boot_off, SPECIFICITY_PERCENTILES, axis=0)  # [K] each
    return diag - off, lo, hi, diag, off


def _matrix_table(method: str, emotions: Sequence[str], ov: _MethodOverlaps, d_b: int) -> pd.DataFrame:
    """Tidy emotion × emotion overlaps of one method: one row per k × emotion_a × emotion_b."""
    n, k_max = len(emotions), ov.same_prompts.shape[-1]
    k, i, j = np.meshgrid(np.arange(1, k_max + 1), np.arange(n), np.arange(n), indexing="ij")  # [K, E, E]
    names = np.asarray(emotions, dtype=object)
    return pd.DataFrame(
        {
            "method": method,
            "k": k.ravel(),
            "emotion_a": names[i.ravel()],
            "emotion_b": names[j.ravel()],
            "overlap": np.moveaxis(ov.same_prompts, -1, 0).ravel(),  # [K, E, E]
            "overlap_crossfit": np.moveaxis(ov.crossfit, -1, 0).ravel(),
            "chance": k.ravel() / d_b,
        }
    )


@dataclass(frozen=True)
class AlignmentSweep:
    """Outputs of :func:`alignment_sweep` for one layer pair.

    - ``overlaps``: one row per method × emotion × k (the per-emotion overlap, null and bootstrap bands,
      and the specificity of the row's method and k broadcast onto it);
    - ``matrix``: one row per method × k × emotion_a × emotion_b (tidy emotion × emotion overlaps);
    - ``specificity``: one row per method × k.
    """

    overlaps: pd.DataFrame
    matrix: pd.DataFrame
    specificity: pd.DataFrame


def neutral_span(neutral_a: Float[ArrayLike, "n d_a"]) -> np.ndarray:
    """Orthonormal rows ``[rank, d_a]`` spanning the centered neutral activations a map is fit on."""
    x = _np(neutral_a)
    _, s, vt = np.linalg.svd(x - x.mean(axis=0, keepdims=True), full_matrices=False)  # vt: [min(n, d), d_a]
    return vt[s > s.max() * 1e-10]


def span_ceiling(span: Float[ArrayLike, "rank d_a"], basis_a: Float[ArrayLike, "k d_a"]) -> float:
    """The largest overlap any linear map fit on the neutral prompts of ``span`` can give A's ``basis_a``.

    A map fit on n paired rows (prompts × pooled views) is determined only on the span of their centered
    activations (rank ≤ n − 1); outside it, it is shrunk to zero (ridge) or undefined. So even when B is an exact change of
    coordinates of A, the mapped subspace keeps only its part inside that span: the ceiling is the overlap
    of ``basis_a`` with its projection onto the span (:func:`neutral_span`). Read overlaps against it.
    """
    span, basis = _np(span), _np(basis_a)
    return principal_angle_overlap(basis @ span.T @ span, basis)


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
    min_specificity: float = MIN_SPECIFICITY,
    train_groups: np.ndarray | None = None,
) -> AlignmentSweep:
    """Emotion-subspace alignment for ONE matched layer pair, with an emotion × emotion specificity test.

    Each map is fit once on the paired neutral train activations (``ridge``: :func:`fit_ridge_map` with
    ``ridge_alpha``; ``procrustes``: :func:`fit_procrustes_map` with ``r``); ``r2_heldout`` is its R² on
    the eval neutral pairs. The train rows may hold several pooled views of each prompt
    (:func:`layer_pair_sweep`); ``train_groups`` ``[n]`` then names each row's prompt so ridge CV keeps a
    prompt's views in one fold. Emotion subspaces are the top-k directions of (emotion − neutral mean) on each
    side (:func:`emotion_subspace`). Columns of ``overlaps`` (one row per method × emotion × k):

    - ``overlap``: mean cos² of principal angles between A's mapped subspace and B's (0–1);
      ``overlap_before``: the same without a map, only when d_a == d_b (else NaN); ``chance`` = k / d_b;
      ``span_ceiling``: the most any map fit on these neutral prompts can give (:func:`span_ceiling`).
    - ``null_mean``, ``null_p95``: ``n_null`` random k-dim A subspaces pushed through the same map
      (:func:`null_overlaps`; the same draws for every emotion and method).
    - ``boot_lo``, ``boot_hi``: 5th / 95th percentiles of the overlap over ``n_boot`` bootstrap resamples
      of the emotion prompts (with replacement; jointly by index when both sides have the same number of
      prompts, i.e. the same prompts in the same order, else independently), subspaces recomputed on both
      sides, the map held fixed.
    - ``beats_null``: overlap > null_p95 AND boot_lo > null_p95 (a bootstrap test, not a permutation test).
    - ``specificity``, ``specificity_lo``, ``specificity_hi``, ``specific``: the row's (method, k) entry of
      ``specificity`` (below); ``headline_beats_null`` = ``beats_null`` AND ``specific``.

    Emotion specificity (``matrix``, ``specificity``): A's subspace of emotion i through the map against
    B's subspace of emotion j, for every i, j. ``matrix.overlap`` uses all train prompts on both sides (its
    diagonal equals ``overlaps.overlap``). There the diagonal compares subspaces of the SAME prompts, whose
    prompt-specific variance both models share, while off-diagonal entries compare different prompts; so
    for k ≥ 2 the diagonal is inflated even when every emotion shares one direction. The specificity test
    is therefore cross-fitted: each emotion's prompts are split into two disjoint halves by position parity,
    ``matrix.overlap_crossfit`` = mean over h of overlap(A half h of i, B half 1 − h of j), and

    - ``specificity`` = mean of the diagonal − mean of the off-diagonal of the cross-fitted matrix;
      ``diagonal_mean``, ``off_diagonal_mean``; ``lo``, ``hi``: 2.5 / 97.5 percentiles of the same score
      over ``n_boot`` resamples of each half (:func:`_bootstrap_bases`, the scheme of ``boot_lo``, the
      map fixed; each emotion and half resampled on its own, resample b of all of them giving score b);
      ``specific``: lo > 0. Resampled subspaces are noisier, which lowers a true diagonal more than a
      chance-level off-diagonal, so the interval is conservative for ``specific``.
    - ``same_prompts_*``: the same score, interval and means on all prompts (``matrix.overlap``), for
      reference only (inflated by shared prompts, see above).

    With a single emotion the specificity columns are NaN and ``specific`` is False. Each emotion needs at
    least 2·k_max prompts per side.
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
        "ridge": lambda: fit_ridge_map(xa_tr, xb_tr, ridge_alpha, groups=train_groups),
        "procrustes": lambda: fit_procrustes_map(xa_tr, xb_tr, r),
    }
    unknown = set(methods) - set(fitters)
    if unknown:
        raise ValueError(f"Unknown alignment methods {sorted(unknown)}; use {sorted(fitters)}.")
    emotions = sorted(emotion_acts_a)
    # Many small decompositions: multi-threaded BLAS only adds overhead here (and stalls on busy hosts).
    with threadpool_limits(limits=1, user_api="blas"):
        maps = {m: fitters[m]() for m in methods}
        r2 = {m: heldout_r2(mp, xa_ev, xb_ev) for m, mp in maps.items()}
        nulls = {
            (m, k): _null_bases(mp, k, n_null, seed) for m, mp in maps.items() for k in range(1, k_max + 1)
        }
        bases = _emotion_bases(emotions, emotion_acts_a, emotion_acts_b, mu_a, mu_b, k_max, n_boot, seed)
        q_b = _orthonormal_rows(bases.full_b)  # [E, d_b, K]; prefixes span the top-k subspaces
        span_a = neutral_span(xa_tr)  # [rank, d_a]: where the maps are determined
        per_method = {m: _method_overlaps(mp, bases) for m, mp in maps.items()}
    spec_rows = [
        row for m in maps for row in _specificity_rows(m, emotions, per_method[m], d_b, min_specificity)
    ]
    specificity = pd.DataFrame(spec_rows)
    by_key = specificity.set_index(["method", "k"])
    rows = []
    for i, emotion in enumerate(emotions):
        for method, ov in per_method.items():
            for k in range(1, k_max + 1):
                overlap = float(ov.same_prompts[i, i, k - 1])
                full_a, full_b = bases.full_a[i, :k], bases.full_b[i, :k]
                before = principal_angle_overlap(full_a, full_b) if d_a == d_b else np.nan
                ceiling = span_ceiling(span_a, full_a)
                null = _overlap_cols(nulls[method, k], q_b[i, :, :k])  # [n_null]
                null_p95 = float(np.percentile(null, 95))
                boot = ov.same_prompts_boot[i, i, :, k - 1]  # [n_boot]
                boot_lo, boot_hi = (float(v) for v in np.percentile(boot, [5, 95]))
                spec = by_key.loc[(method, k)]
                beats = bool(overlap > null_p95 and boot_lo > null_p95)
                rows.append(
                    {
                        "method": method, "emotion": emotion, "k": k, "overlap": overlap,
                        "overlap_before": float(before), "span_ceiling": ceiling,
                        "chance": random_subspace_overlap_chance(k, d_b),
                        "null_mean": float(null.mean()), "null_p95": null_p95, "boot_lo": boot_lo,
                        "boot_hi": boot_hi, "beats_null": beats, "r2_heldout": r2[method], "d_a": d_a,
                        "d_b": d_b, "n_train_pairs": xa_tr.shape[0], "specificity": float(spec["specificity"]),
                        "specificity_lo": float(spec["lo"]), "specificity_hi": float(spec["hi"]),
                        "specific": bool(spec["specific"]), "headline_beats_null": beats and bool(spec["specific"]),
                    }
                )  # fmt: skip
    matrix = pd.concat(
        [_matrix_table(m, emotions, ov, d_b) for m, ov in per_method.items()], ignore_index=True
    )
    return AlignmentSweep(pd.DataFrame(rows), matrix, specificity)


@dataclass(frozen=True)
class AlignmentRows:
    """Boolean row masks ``[n]`` over a joined activations index, fitting rows (role ``fit``) only."""

    neutral_train: np.ndarray
    neutral_eval: np.ndarray
    emotion_train: dict[str, np.ndarray]


def alignment_rows(index: pd.DataFrame, neutral: str = "neutral") -> AlignmentRows:
    """Rows that may fit maps and subspaces (:func:`fitting_mask`): neutral train (maps, neutral mean),
    neutral eval (held-out R²) and each emotion's train rows (subspaces). ``steering_prompt`` rows never
    enter; ``index`` needs ``emotion`` and ``split`` columns."""
    missing = {"emotion", "split"} - set(index.columns)
    if missing:
        raise ValueError(
            f"The activations index lacks columns {sorted(missing)}; rematerialize `activations`."
        )
    fit = fitting_mask(index)
    emotion = index["emotion"].to_numpy()
    train = fit & (index["split"] == "train").to_numpy()
    masks = AlignmentRows(
        neutral_train=train & (emotion == neutral),
        neutral_eval=fit & (index["split"] == "eval").to_numpy() & (emotion == neutral),
        emotion_train={e: train & (emotion == e) for e in sorted(set(emotion[fit]) - {neutral})},
    )
    if not masks.neutral_train.any() or not masks.neutral_eval.any():
        raise ValueError(
            f"Alignment needs fitting {neutral!r} prompts in both splits (train: {int(masks.neutral_train.sum())}, "
            f"eval: {int(masks.neutral_eval.sum())}); check the dataset's `split` and `role` columns."
        )
    return masks


def layer_pair_sweep(
    x_a: Float[ArrayLike, "n d_a"],
    x_b: Float[ArrayLike, "n d_b"],
    rows: AlignmentRows,
    anchor_views: Sequence[tuple[Float[ArrayLike, "n d_a"], Float[ArrayLike, "n d_b"]]] | None = None,
    **kwargs,
) -> AlignmentSweep:
    """:func:`alignment_sweep` on one layer pair of paired activations (row i of both = the same prompt),
    restricted to ``rows``; emotion subspaces and the neutral means come from ``x_a`` / ``x_b``.

    ``anchor_views``: the paired activations the maps are fit on (train rows) and scored on (eval rows), one
    ``(a, b)`` per pooled view of the same prompts (e.g. ``last`` and ``mean``); default ``x_a``/``x_b``
    alone. If B is a linear change of coordinates of A, every pooled view is a sample of that same map, so
    v views of n prompts determine it on up to v·n − 1 dimensions instead of n − 1 (:func:`span_ceiling`).
    ``kwargs`` go to the sweep."""
    a, b = _paired(x_a, x_b)
    nt, ne = rows.neutral_train, rows.neutral_eval
    views = [(a, b)] if anchor_views is None else [_paired(va, vb) for va, vb in anchor_views]
    if not views or any(va.shape[0] != a.shape[0] for va, _ in views):
        raise ValueError(f"anchor_views must be non-empty pairs with {a.shape[0]} rows each.")
    train_a, train_b = (np.concatenate([v[side][nt] for v in views]) for side in (0, 1))
    eval_a, eval_b = (np.concatenate([v[side][ne] for v in views]) for side in (0, 1))
    groups = np.tile(np.arange(int(nt.sum())), len(views))  # row → prompt, for ridge CV folds
    return alignment_sweep(
        train_a, train_b, eval_a, eval_b,
        {e: a[m] for e, m in rows.emotion_train.items()}, {e: b[m] for e, m in rows.emotion_train.items()},
        a[nt].mean(axis=0), b[nt].mean(axis=0), train_groups=groups, **kwargs,
    )  # fmt: skip


SUMMARY_COLUMNS = ["method", "emotion", "selection", "layer_a", "layer_b", "k", "overlap", "null_p95", "margin",
                   "chance", "null_mean", "overlap_before", "span_ceiling", "beats_null", "specificity",
                   "specificity_lo", "specific", "headline_beats_null", "r2_heldout"]  # fmt: skip
SELECTED_HEADLINE = "largest margin among rows that beat the null and are emotion-specific"
SELECTED_NO_HEADLINE = "largest margin; no row beats the null and is emotion-specific (not a finding)"


def alignment_summary(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per method × emotion of an alignment sweep past the token embeddings (``layer > 0``).

    The row is the headline rule's: the largest margin (overlap − null p95) among rows that beat the null
    AND whose (layer pair, method, k) is emotion-specific (``headline_beats_null``); where no row does, the
    largest-margin row, labelled as not a finding (``selection``). Ranking by margin alone picks the
    earliest blocks (near the embeddings), where every map of a rotated twin reaches overlap 1 and emotion
    directions are least distinct, so the specificity check would be judged where it is weakest. The
    random-weight twin pairs go through the same selection, so they calibrate it.
    """
    inner = sweep[(sweep["layer_a"] > 0) & (sweep["layer_b"] > 0)]
    inner = inner.assign(margin=inner["overlap"] - inner["null_p95"])
    ranked = inner.sort_values(["headline_beats_null", "margin"], ascending=[False, False], kind="stable")
    summary = ranked.groupby(["method", "emotion"], as_index=False, sort=True).first()
    summary["selection"] = np.where(summary["headline_beats_null"], SELECTED_HEADLINE, SELECTED_NO_HEADLINE)
    return summary[[c for c in SUMMARY_COLUMNS if c in summary]]


def beyond_embeddings(sweep: pd.DataFrame) -> pd.DataFrame:
    """Rows of an alignment sweep whose boundaries are both past the token embeddings (layer > 0).

    At boundary 0 a representation is a function of token identities alone, so any two models that read
    the same words align there (on ``baseline`` the random-weight twin reaches cos² ≈ 0.99 at k = 1). That
    is lexical overlap, not learned emotion structure, so "best layer" choices skip it.
    """
    inner = sweep[(sweep["layer_a"] > 0) & (sweep["layer_b"] > 0)]
    if inner.empty:
        raise ValueError(
            "The alignment sweep has no layer pair past the token embeddings (boundary 0); give the profile "
            "`layers` that include a boundary > 0 for both models (data/profiles.yaml)."
        )
    return inner


def paired_rows(index_a: pd.DataFrame, index_b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Row positions of the prompts both models saw, in the same order (joined on prompt id)."""
    a = index_a.reset_index(names="row_a")
    b = index_b.reset_index(names="row_b")[["id", "row_b"]]
    joined = a.merge(b, on="id", how="inner").sort_values("row_a")
    if joined.empty:
        raise ValueError("The two models share no prompt ids: materialize both on the same dataset.")
    return joined["row_a"].to_numpy(), joined["row_b"].to_numpy(), joined


def headline_row(sweep: pd.DataFrame) -> pd.Series | None:
    """The headline row: largest margin (overlap − null p95) among rows past the token embeddings that beat
    the null AND whose (layer pair, method, k) is emotion-specific (``headline_beats_null``); None if none."""
    inner = beyond_embeddings(sweep)
    passing = inner[inner["headline_beats_null"]]
    if passing.empty:
        return None
    return passing.loc[(passing["overlap"] - passing["null_p95"]).idxmax()]


def rows_at(frame: pd.DataFrame, row: pd.Series, keys: list[str]) -> pd.DataFrame:
    """Rows of ``frame`` whose ``keys`` columns equal those of ``row``."""
    return frame[np.logical_and.reduce([frame[key] == row[key] for key in keys])]
