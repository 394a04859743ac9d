"""Known-answer tests for emotion vectors, subspaces, probes and subspace overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from emotion_assets.science.directions import (
    cosine_matrix,
    emotion_subspace,
    emotion_vectors,
    fit_probes_per_boundary,
    linear_probe_by_layer,
    neutral_subspace,
    principal_angle_overlap,
    random_subspace_overlap_chance,
    vector_report,
)

D = 64


def _planted(n_per: int = 200, c: float = 4.0, seed: int = 0):
    """Neutral = base + noise; joy = neutral + c·u; anger = neutral − c·w. Two boundaries, u planted in both."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u /= u.norm()
    w = torch.randn(D, generator=g)
    w -= (w @ u) * u
    w /= w.norm()
    base = 3 * torch.randn(D, generator=g)
    labels = ["neutral"] * n_per + ["joy"] * n_per + ["anger"] * n_per
    shift = torch.cat([torch.zeros(n_per, D), c * u.expand(n_per, D), -c * w.expand(n_per, D)])
    acts = base + 0.5 * torch.randn(3 * n_per, 2, D, generator=g) + shift[:, None, :]  # [n, 2, D]
    train = torch.arange(3 * n_per) % 4 != 0
    return acts, labels, train, u, w


def test_planted_direction_recovered():
    acts, labels, train, u, w = _planted()
    vectors = emotion_vectors(acts, labels, train)
    assert sorted(vectors) == ["anger", "joy"]
    assert vectors["joy"].shape == (2, D)
    for b in range(2):
        assert torch.cosine_similarity(vectors["joy"][b], u, dim=0) >= 0.99
        assert torch.cosine_similarity(vectors["anger"][b], -w, dim=0) >= 0.99
    report = vector_report(vectors, acts, train)
    assert len(report) == 4
    row = report[(report.emotion == "joy") & (report.boundary == 0)].iloc[0]
    assert row.norm == pytest.approx(4.0, rel=0.05)
    assert row.relative_norm == pytest.approx(row.norm / row.mean_resid_norm)
    cos = cosine_matrix(vectors, 0)
    assert cos.shape == (2, 2) and np.allclose(np.diag(cos.values), 1.0)
    assert abs(cos.loc["joy", "anger"]) < 0.1


def test_vectors_use_train_split_only():
    acts, labels, train, _, _ = _planted()
    moved = acts.clone()
    moved[~train] += 100.0
    for e, v in emotion_vectors(moved, labels, train).items():
        torch.testing.assert_close(v, emotion_vectors(acts, labels, train)[e])


def test_emotion_subspace_contains_planted_direction():
    acts, labels, train, u, _ = _planted()
    lab = np.array(labels)
    neutral_mean = acts[torch.as_tensor(lab == "neutral") & train, 0].mean(dim=0)
    joy = acts[torch.as_tensor(lab == "joy") & train, 0]
    basis, ratio = emotion_subspace(joy, neutral_mean, k=5)
    assert basis.shape == (5, D) and ratio.shape == (5,)
    assert torch.cosine_similarity(basis[0], u, dim=0) >= 0.99  # sign follows the mean emotion vector
    torch.testing.assert_close(basis @ basis.T, torch.eye(5), atol=1e-5, rtol=0)
    # Ratios are relative to the total variance over all components.
    centered = (joy - neutral_mean).double()
    s = torch.linalg.svdvals(centered)
    torch.testing.assert_close(ratio.double(), s[:5] ** 2 / (s**2).sum(), atol=1e-6, rtol=0)
    assert float(ratio.sum()) <= 1.0
    full_basis, full_ratio = emotion_subspace(joy, neutral_mean, k=D)
    assert float(full_ratio.sum()) == pytest.approx(1.0, abs=1e-5)
    assert full_basis.shape == (D, D)


def test_neutral_subspace_is_pca():
    g = torch.Generator().manual_seed(1)
    scales = torch.cat([torch.tensor([10.0, 6.0, 3.0]), torch.full((D - 3,), 0.5)])
    x = 7 + torch.randn(500, D, generator=g) * scales  # three dominant axes
    basis, ratio = neutral_subspace(x, k=3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3), atol=1e-5, rtol=0)
    assert basis[:, :3].abs().diagonal().min() >= 0.95
    assert (basis[torch.arange(3), basis.abs().argmax(dim=1)] > 0).all()  # sign convention
    var = (x - x.mean(0)).double().pow(2).sum(0)
    assert float(ratio[0]) == pytest.approx(float(var[0] / var.sum()), rel=0.05)
    assert float(ratio.sum()) <= 1.0
    with pytest.raises(ValueError, match="k="):
        neutral_subspace(x[:4], k=5)


def test_probe_separable_and_noise():
    acts, labels, train, _, _ = _planted()
    held = ~train
    probe = linear_probe_by_layer(acts, labels, train, held, seed=0)
    assert list(probe.columns) == [
        "boundary",
        "accuracy",
        "macro_f1",
        "n_train",
        "n_eval",
        "chance",
        "converged",
    ]
    assert (probe.accuracy >= 0.97).all()
    assert probe.n_eval.iloc[0] == int(held.sum())
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1200, 1, D, generator=g)
    noise_labels = [["a", "b", "c", "d"][i] for i in torch.randint(0, 4, (1200,), generator=g).tolist()]
    train = torch.arange(1200) < 800
    null = linear_probe_by_layer(noise, noise_labels, train, ~train, seed=0)
    assert abs(null.accuracy.iloc[0] - 0.25) < 0.08
    assert 0.2 <= null.chance.iloc[0] <= 0.33
    with pytest.raises(ValueError, match="both"):
        linear_probe_by_layer(noise, noise_labels, train, train, seed=0)


def test_principal_angle_overlap():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    a, b = q[:, :4].T, q[:, 4:8].T  # [4, D] each, mutually orthogonal
    assert principal_angle_overlap(a, a) == pytest.approx(1.0)
    mixed = torch.tensor([[1.0, 2, 0, 0], [0, 1, 3, 0], [0, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.float64)
    assert principal_angle_overlap(a, mixed @ a) == pytest.approx(1.0)  # same span, other basis
    assert principal_angle_overlap(a, b) == pytest.approx(0.0, abs=1e-12)
    k, d = 5, 200
    rng = np.random.default_rng(0)
    sims = [principal_angle_overlap(rng.normal(size=(k, d)), rng.normal(size=(k, d))) for _ in range(200)]
    assert np.mean(sims) == pytest.approx(random_subspace_overlap_chance(k, d), rel=0.15)
    assert random_subspace_overlap_chance(k, d) == k / d


def test_probes_per_boundary_on_one_blas_thread_decode_a_planted_label_and_match_a_plain_fit():
    """Every boundary's probe equals a plain scikit-learn fit of the same pipeline, and a planted label
    shift is decoded at every boundary."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["anger", "joy", "neutral"], 40)
    x = rng.standard_normal((120, 3, 16))  # [n, n_boundaries, d_model]
    for i, label in enumerate(["anger", "joy", "neutral"]):
        x[labels == label, :, i] += 3.0  # planted: each label shifts its own coordinate
    fits = fit_probes_per_boundary(x, labels, seed=0)
    assert len(fits) == 3 and all(converged for _, converged in fits)
    for b, (probe, _) in enumerate(fits):
        plain = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200, random_state=0))
        plain.fit(x[:, b], labels)
        np.testing.assert_allclose(probe[-1].coef_, plain[-1].coef_, rtol=1e-6, atol=1e-8)
        assert (probe.predict(x[:, b]) == labels).mean() > 0.9
