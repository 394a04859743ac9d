"""Emotion directions, linear probes and subspaces from pooled residual activations."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_bool_mask(mask: ArrayLike | Sequence[bool], n: int, name: str) -> np.ndarray:
    out = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
    if out.shape != (n,):
        raise ValueError(f"{name} has shape {out.shape}, expected ({n},).")
    return out


def _labels(labels: Sequence[str] | np.ndarray, n: int) -> np.ndarray:
    out = np.asarray(labels, dtype=object)
    if out.shape != (n,):
        raise ValueError(f"labels has shape {out.shape}, expected ({n},).")
    return out


def _float64(x: ArrayLike) -> np.ndarray:
    return (
        x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    ).copy()


def emotion_vectors(
    acts: Float[Tensor, "n n_boundaries d_model"],
    labels: Sequence[str],
    train_mask: Bool[Tensor, " n"] | Sequence[bool],
    neutral_label: str = "neutral",
) -> dict[str, Float[Tensor, "n_boundaries d_model"]]:
    """Per emotion: mean of its train activations minus the mean of the train neutral activations."""
    n = acts.shape[0]
    lab = _labels(labels, n)
    train = torch.as_tensor(_as_bool_mask(train_mask, n, "train_mask"), device=acts.device)
    neutral = train & torch.as_tensor(lab == neutral_label, device=acts.device)
    if not neutral.any():
        raise ValueError(f"No train prompts labelled {neutral_label!r}; cannot form emotion vectors.")
    neutral_mean = acts[neutral].double().mean(dim=0)  # [n_boundaries, d_model]
    emotions = sorted({str(x) for x in lab[train.cpu().numpy()]} - {neutral_label})
    if not emotions:
        raise ValueError("No emotion (non-neutral) train prompts; cannot form emotion vectors.")
    out = {}
    for emotion in emotions:
        rows = train & torch.as_tensor(lab == emotion, device=acts.device)
        out[emotion] = (acts[rows].double().mean(dim=0) - neutral_mean).to(
            acts.dtype
        )  # [n_boundaries, d_model]
    return out


def vector_report(
    vectors: dict[str, Float[Tensor, "n_boundaries d_model"]],
    acts: Float[Tensor, "n n_boundaries d_model"],
    train_mask: Bool[Tensor, " n"] | Sequence[bool],
    token_norm: Float[Tensor, "n n_boundaries"] | None = None,
) -> pd.DataFrame:
    """One row per emotion × boundary: ``norm``, ``mean_resid_norm`` and ``relative_norm`` = norm /
    mean_resid_norm.

    ``mean_resid_norm`` is the mean of ``token_norm`` (per-prompt mean ‖resid‖ over real non-sink tokens,
    ``PooledActivations.token_norm``) over train prompts when given, else the mean ‖act‖ over train prompts.
    """
    train = torch.as_tensor(_as_bool_mask(train_mask, acts.shape[0], "train_mask"), device=acts.device)
    if token_norm is None:
        resid_norm = acts[train].double().norm(dim=-1).mean(dim=0)  # [n_boundaries]
    else:
        if tuple(token_norm.shape) != tuple(acts.shape[:2]):
            raise ValueError(
                f"token_norm has shape {tuple(token_norm.shape)}, expected {tuple(acts.shape[:2])}."
            )
        resid_norm = token_norm.to(acts.device)[train].double().mean(dim=0)  # [n_boundaries]
    rows = []
    for emotion, vec in vectors.items():
        norms = vec.double().norm(dim=-1)  # [n_boundaries]
        for b in range(vec.shape[0]):
            rows.append(
                {
                    "emotion": emotion,
                    "boundary": b,
                    "norm": float(norms[b]),
                    "mean_resid_norm": float(resid_norm[b]),
                    "relative_norm": float(norms[b] / resid_norm[b]),
                }
            )
    return pd.DataFrame(rows)


def cosine_matrix(vectors: dict[str, Float[Tensor, "n_boundaries d_model"]], boundary: int) -> pd.DataFrame:
    """Cosine similarity between the emotion vectors at one boundary, ``[E, E]`` labelled by emotion."""
    names = list(vectors)
    mat = torch.stack([vectors[e][boundary].double() for e in names])  # [E, d_model]
    unit = mat / mat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (unit @ unit.T).numpy()  # [E, E]
    return pd.DataFrame(cos, index=names, columns=names)


def fit_standardized_logistic(
    x: np.ndarray, y: np.ndarray, seed: int, C: float, max_iter: int
) -> tuple[Pipeline, bool]:
    """Standardize, then multinomial logistic regression (L2, ``C``; lbfgs, ``max_iter`` iterations) on
    ``x`` ``[n, d]``; also whether lbfgs converged before ``max_iter``."""
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs", random_state=seed)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x, y)
    return probe, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def fit_probes_per_boundary(
    x: Float[np.ndarray, "n n_boundaries d_model"],
    y: np.ndarray,
    seed: int,
    C: float = 1.0,
    max_iter: int = 200,
) -> list[tuple[Pipeline, bool]]:
    """:func:`fit_standardized_logistic` at every boundary of ``x``, on one BLAS thread: lbfgs on a few
    hundred rows makes many small products, where a second BLAS thread costs more than it gives (≈ 8×
    slower on two cores)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return [fit_standardized_logistic(x[:, b], y, seed, C, max_iter) for b in range(x.shape[1])]


def linear_probe_by_layer(
    acts: Float[Tensor, "n n_boundaries d_model"],
    labels: Sequence[str],
    train_mask: Bool[Tensor, " n"] | Sequence[bool],
    eval_mask: Bool[Tensor, " n"] | Sequence[bool],
    seed: int,
    C: float = 1.0,
    max_iter: int = 200,
) -> pd.DataFrame:
    """Held-out decodability of the labels at each boundary.

    Per boundary: standardize, then multinomial logistic regression (L2, ``C``; lbfgs, ``max_iter``
    iterations) fit on the train rows and scored on the eval rows (:func:`fit_probes_per_boundary`).
    ``chance`` is the eval accuracy of always predicting the most frequent train label. ``converged`` is False when lbfgs hit ``max_iter`` (the fit is still used: with standardized
    inputs it is close to the optimum by then).
    """
    n = acts.shape[0]
    lab = _labels(labels, n)
    train = _as_bool_mask(train_mask, n, "train_mask")
    held = _as_bool_mask(eval_mask, n, "eval_mask")
    if (train & held).any():
        raise ValueError(f"{int((train & held).sum())} prompts are in both the train and the eval split.")
    if len(set(lab[train])) < 2:
        raise ValueError("The probe needs at least two labels among the train prompts.")
    if not held.any():
        raise ValueError("The probe needs eval prompts.")
    x = acts.detach().cpu().float().numpy()  # [n, n_boundaries, d_model]
    y_train, y_eval = lab[train].astype(str), lab[held].astype(str)
    values, counts = np.unique(y_train, return_counts=True)
    chance = float(np.mean(y_eval == values[np.argmax(counts)]))
    rows = []
    fits = fit_probes_per_boundary(x[train], y_train, seed, C, max_iter)
    for b, (probe, converged) in enumerate(fits):
        predicted = probe.predict(x[held, b])
        rows.append(
            {
                "boundary": b,
                "accuracy": float(accuracy_score(y_eval, predicted)),
                "macro_f1": float(f1_score(y_eval, predicted, average="macro", zero_division=0)),
                "n_train": int(train.sum()),
                "n_eval": int(held.sum()),
                "chance": chance,
                "converged": converged,
            }
        )
    return pd.DataFrame(rows)


def _fix_signs(basis: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Flip each row so its projection on ``reference`` is positive, else its largest-|.| entry is."""
    basis = basis.copy()  # [k, d_model]
    for i, row in enumerate(basis):
        proj = float(row @ reference) if reference is not None else 0.0
        scale = np.linalg.norm(reference) if reference is not None else 0.0
        sign = (
            np.sign(proj) if abs(proj) > 1e-8 * max(scale, 1e-300) else np.sign(row[np.argmax(np.abs(row))])
        )
        basis[i] = row * (sign if sign != 0 else 1.0)
    return basis


def _top_k(centered: np.ndarray, k: int, reference: np.ndarray | None) -> tuple[Tensor, Tensor]:
    n, d = centered.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k={k} must be between 1 and min(n_prompts, d_model) = {min(n, d)}.")
    _, s, vt = np.linalg.svd(centered, full_matrices=False)  # s: [min(n, d)], vt: [min(n, d), d_model]
    total = float(np.sum(s**2))
    ratio = s[:k] ** 2 / total if total > 0 else np.zeros(k)
    basis = _fix_signs(vt[:k], reference)  # [k, d_model]
    return torch.from_numpy(basis).float(), torch.from_numpy(ratio).float()


def emotion_subspace(
    acts_emotion: Float[ArrayLike, "n d_model"],
    neutral_mean: Float[ArrayLike, " d_model"],
    k: int,
) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
    """Top-k right singular vectors of (emotion activations − neutral mean); the mean direction is kept.

    ``explained_variance_ratio[i]`` = s_i² / Σ_all s_j² (all components), so the k ratios sum to ≤ 1.
    Each basis row points towards the mean emotion vector (positive projection).
    """
    x = _float64(acts_emotion) - _float64(neutral_mean)[None, :]  # [n, d_model]
    return _top_k(x, k, reference=x.mean(axis=0))


def neutral_subspace(
    acts_neutral: Float[ArrayLike, "n d_model"], k: int
) -> tuple[Float[Tensor, "k d_model"], Float[Tensor, " k"]]:
    """PCA of neutral activations (centered at their own mean): top-k directions and variance ratios.

    Signs: the largest-magnitude entry of each basis row is positive.
    """
    x = _float64(acts_neutral)
    return _top_k(x - x.mean(axis=0, keepdims=True), k, reference=None)


def principal_angle_overlap(basis_a: Float[ArrayLike, "k_a d"], basis_b: Float[ArrayLike, "k_b d"]) -> float:
    """Mean cos² of the principal angles between two subspaces (rows span each), in [0, 1].

    Rows are re-orthonormalized first; with different k the mean runs over min(k_a, k_b) angles.
    """
    a, b = _float64(basis_a), _float64(basis_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Subspaces live in different spaces: d={a.shape[1]} vs d={b.shape[1]}.")
    qa, _ = np.linalg.qr(a.T)  # [d, k_a]
    qb, _ = np.linalg.qr(b.T)  # [d, k_b]
    cosines = np.linalg.svd(qa.T @ qb, compute_uv=False)  # [min(k_a, k_b)]
    return float(np.clip(np.mean(cosines**2), 0.0, 1.0))


def random_subspace_overlap_chance(k: int, d: int) -> float:
    """Expected :func:`principal_angle_overlap` of two uniformly random k-dim subspaces of R^d: k / d."""
    if not 1 <= k <= d:
        raise ValueError(f"k={k} must be between 1 and d={d}.")
    return k / d
