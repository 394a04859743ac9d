"""Known-answer tests for cross-model alignment: maps, subspace overlap with null controls, CKA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from emotion_assets.profiles import Profile, get_profile
from emotion_assets.science.alignment import (
    AlignmentSweep,
    LinearMap,
    _orthonormal_rows,
    _prefix_overlaps,
    _top_k_weighted,
    alignment_rows,
    alignment_sweep,
    cka_matrix,
    fit_procrustes_map,
    fit_ridge_map,
    headline_row,
    heldout_r2,
    layer_pair_sweep,
    linear_cka,
    match_layers_by_depth,
    null_overlaps,
    subspace_overlap_after_map,
)
from emotion_assets.science.directions import principal_angle_overlap
from emotion_assets.science.parallel import map_in_processes, process_count
from tests.artifacts import materialize

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


def _run(model_a, model_b, **kwargs) -> AlignmentSweep:
    (a_tr, a_ev, e_a), (b_tr, b_ev, e_b) = model_a, model_b
    args = dict(k_max=K_MAX, n_null=100, n_boot=50, seed=0) | kwargs
    return alignment_sweep(a_tr, b_tr, a_ev, b_ev, e_a, e_b, a_tr.mean(0), b_tr.mean(0), **args)


def _sweep(model_a, model_b, **kwargs) -> pd.DataFrame:
    return _run(model_a, model_b, **kwargs).overlaps


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
    first = _run(model_a, model_b, n_null=20, n_boot=10, seed=3)
    again = _run(model_a, model_b, n_null=20, n_boot=10, seed=3)
    for name in ("overlaps", "matrix", "specificity"):
        assert getattr(first, name).equals(getattr(again, name)), name
    other = _run(model_a, model_b, n_null=20, n_boot=10, seed=4)
    assert not first.specificity["lo"].equals(other.specificity["lo"])


def test_bootstrap_bases_match_explicit_resample():
    rng = np.random.default_rng(4)
    for n, d in ((30, 12), (12, 30)):  # sample-Gram and covariance paths
        x = rng.standard_normal((n, d))
        idx = rng.integers(0, n, size=n)
        counts = np.bincount(idx, minlength=n)[None]  # [1, n]
        fast = _top_k_weighted(x, counts, 3)[0]  # [3, d]
        _, _, vt = np.linalg.svd(x[idx], full_matrices=False)
        np.testing.assert_allclose(np.abs(np.sum(fast * vt[:3], axis=1)), 1.0, atol=1e-8)


def _shared_direction_model(seed: int, d: int, n_neutral: int = 200, n_eval: int = 100, n_emotion: int = 80):
    """Like :func:`_model`, but every emotion is the SAME planted direction (a shift with spread along one
    unit vector) on fresh neutral-like samples: nothing distinguishes one emotion from another."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((8, d)) * np.linspace(2.0, 0.5, 8)[:, None] / np.sqrt(d)

    def neutral(n: int) -> np.ndarray:
        return 3.0 + rng.standard_normal((n, 8)) @ mix + 0.5 * rng.standard_normal((n, d))

    shared = _orthogonal(rng, d, 1)[:, 0]  # [d]
    emotions = {
        e: neutral(n_emotion) + (8.0 + 3.0 * rng.standard_normal((n_emotion, 1))) * shared for e in EMOTIONS
    }
    return neutral(n_neutral), neutral(n_eval), emotions


@pytest.fixture(scope="module")
def projection_48_32() -> np.ndarray:
    return _orthogonal(np.random.default_rng(4), 48, 32)  # [48, 32] semi-orthogonal: B is narrower


@pytest.fixture(scope="module")
def distinct_result(projection_48_32) -> AlignmentSweep:
    """Three emotions with distinct planted 3-dim subspaces (:func:`_model`); B = A @ projection + noise."""
    model_a = _model(0, 48)
    return _run(model_a, _twin(model_a, projection_48_32, seed=5, noise=0.3))


@pytest.fixture(scope="module")
def shared_result(projection_48_32) -> AlignmentSweep:
    model_a = _shared_direction_model(0, 48)
    return _run(model_a, _twin(model_a, projection_48_32, seed=5, noise=0.3))


def test_distinct_emotion_subspaces_are_specific(distinct_result):
    spec, matrix, overlaps = distinct_result.specificity, distinct_result.matrix, distinct_result.overlaps
    assert len(spec) == 2 * K_MAX and len(matrix) == 2 * K_MAX * len(EMOTIONS) ** 2
    assert spec["specific"].all() and (spec["lo"] > 0.3).all(), spec
    assert (spec["lo"] <= spec["hi"]).all()
    ridge = spec[spec["method"] == "ridge"]
    assert (ridge["diagonal_mean"] > 0.7).all() and (ridge["off_diagonal_mean"] < ridge["chance"] + 0.1).all()
    np.testing.assert_allclose(spec["specificity"], spec["diagonal_mean"] - spec["off_diagonal_mean"])
    off = matrix[matrix["emotion_a"] != matrix["emotion_b"]]
    assert (off["overlap_crossfit"] < 0.25).all() and (off["overlap"] < 0.25).all()
    same = matrix[(matrix["emotion_a"] == matrix["emotion_b"]) & (matrix["method"] == "ridge")]
    assert (same["overlap_crossfit"] > 0.6).all()
    # The all-prompt matrix's diagonal is the per-emotion overlap of the sweep.
    diagonal = matrix[matrix["emotion_a"] == matrix["emotion_b"]].merge(
        overlaps, left_on=["method", "k", "emotion_a"], right_on=["method", "k", "emotion"]
    )
    np.testing.assert_allclose(diagonal["overlap_x"], diagonal["overlap_y"], atol=1e-12)
    assert overlaps["specific"].all()
    assert overlaps["headline_beats_null"].equals(overlaps["beats_null"] & overlaps["specific"])
    assert overlaps.loc[overlaps["method"] == "ridge", "headline_beats_null"].all()


def test_one_shared_direction_is_not_specific(shared_result):
    spec, overlaps = shared_result.specificity, shared_result.overlaps
    k1 = spec[(spec["method"] == "ridge") & (spec["k"] == 1)].iloc[0]
    assert k1["diagonal_mean"] > 0.8 and k1["off_diagonal_mean"] > 0.8  # every emotion maps onto every other
    assert overlaps.loc[overlaps["k"] == 1, "beats_null"].all()  # the overlap alone looks like a finding
    assert ((spec["lo"] < 0) & (spec["hi"] > 0)).all(), spec  # ... but the specificity CI contains 0
    assert not spec["specific"].any() and not overlaps["headline_beats_null"].any()
    # On all prompts the diagonal compares subspaces of the SAME prompts, which share their prompt-specific
    # directions through the map: a spurious "specificity" for k ≥ 2 that cross-fitting removes.
    same = spec[(spec["method"] == "ridge") & (spec["k"] >= 2)]
    assert (same["same_prompts_lo"] > 0).all() and (same["same_prompts_specificity"] > 0.1).all()


def test_headline_row_needs_specificity_and_skips_embeddings(distinct_result, shared_result):
    distinct = distinct_result.overlaps.assign(layer_a=1, layer_b=1)
    shared = shared_result.overlaps.assign(layer_a=2, layer_b=1)
    best = headline_row(pd.concat([distinct, shared], ignore_index=True))
    assert best is not None and best["layer_a"] == 1 and best["headline_beats_null"]
    at_embeddings = distinct.assign(layer_a=0, layer_b=0)
    assert headline_row(pd.concat([at_embeddings, shared], ignore_index=True)) is None
    assert headline_row(shared) is None


def test_single_emotion_has_no_specificity(projection_48_32):
    a_tr, a_ev, e_a = _model(0, 48, n_emotion=20)
    b_tr, b_ev, e_b = _twin((a_tr, a_ev, e_a), projection_48_32, seed=5)
    one = alignment_sweep(a_tr, b_tr, a_ev, b_ev, {"anger": e_a["anger"]}, {"anger": e_b["anger"]},
                          a_tr.mean(0), b_tr.mean(0), k_max=2, n_null=10, n_boot=5)  # fmt: skip
    assert one.specificity["specificity"].isna().all() and not one.overlaps["headline_beats_null"].any()


def test_crossfit_needs_two_halves_of_k_max_prompts(projection_48_32):
    model_a = _model(0, 48, n_emotion=5)
    with pytest.raises(ValueError, match="k_max"):
        _run(model_a, _twin(model_a, projection_48_32, seed=5), n_null=5, n_boot=5)


def test_prefix_overlaps_match_principal_angles():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((4, 20)), rng.standard_normal((4, 20))  # [K, d]
    got = _prefix_overlaps(_orthonormal_rows(a), _orthonormal_rows(b))  # [K]
    want = [principal_angle_overlap(a[:k], b[:k]) for k in range(1, 5)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def _with_steering_rows(model_a, model_b, steering: np.random.Generator, scale: float):
    """Joined activations [n, d] of both models plus an index, with steering-only rows interleaved among
    the fitting rows of every group (their activations drawn at ``scale``)."""
    parts_a, parts_b, index = [], [], []
    (a_tr, a_ev, e_a), (b_tr, b_ev, e_b) = model_a, model_b
    groups = [("neutral", "train", a_tr, b_tr), ("neutral", "eval", a_ev, b_ev)]
    groups += [(e, "train", e_a[e], e_b[e]) for e in EMOTIONS]
    for emotion, split, x_a, x_b in groups:
        for i in range(x_a.shape[0]):
            parts_a.append(x_a[i])
            parts_b.append(x_b[i])
            index.append({"emotion": emotion, "split": split, "role": "fit"})
            if i % 4 == 0:  # one steering-only prompt after every fourth fitting prompt
                parts_a.append(scale * steering.standard_normal(x_a.shape[1]))
                parts_b.append(scale * steering.standard_normal(x_b.shape[1]))
                index.append({"emotion": emotion, "split": split, "role": "steering_prompt"})
    return np.stack(parts_a), np.stack(parts_b), pd.DataFrame(index)


def test_steering_prompts_never_enter_the_fit():
    model_a = _model(5, 24, n_neutral=60, n_eval=30, n_emotion=30)
    model_b = _twin(model_a, _orthogonal(np.random.default_rng(6), 24, 16), seed=7, noise=0.3)
    x_a, x_b, index = _with_steering_rows(model_a, model_b, np.random.default_rng(0), scale=1.0)
    bad_a, bad_b, _ = _with_steering_rows(model_a, model_b, np.random.default_rng(1), scale=1e3)
    rows = alignment_rows(index)
    assert not index.loc[rows.neutral_train | rows.neutral_eval, "role"].eq("steering_prompt").any()
    assert sorted(rows.emotion_train) == sorted(EMOTIONS)
    args = dict(k_max=2, n_null=20, n_boot=10, seed=1)
    clean, corrupted = layer_pair_sweep(x_a, x_b, rows, **args), layer_pair_sweep(bad_a, bad_b, rows, **args)
    direct = _run(model_a, model_b, **args)  # the same fit rows without any steering rows at all
    for name in ("overlaps", "matrix", "specificity"):
        pd.testing.assert_frame_equal(getattr(clean, name), getattr(corrupted, name))
        pd.testing.assert_frame_equal(getattr(clean, name), getattr(direct, name))
    # Without the role column every row fits, and the corrupted rows do change the result.
    everything = alignment_rows(index.drop(columns="role"))
    assert not layer_pair_sweep(x_a, x_b, everything, **args).overlaps.equals(
        layer_pair_sweep(bad_a, bad_b, everything, **args).overlaps
    )


def test_alignment_rows_need_neutral_prompts_in_both_splits():
    index = pd.DataFrame({"emotion": ["neutral", "anger", "neutral"], "split": ["train", "train", "eval"],
                          "role": ["fit", "fit", "steering_prompt"]})  # fmt: skip
    with pytest.raises(ValueError, match="eval: 0"):
        alignment_rows(index)


def _write_fake_activations(root, corrupt_steering: bool) -> None:
    """Activations of smollm2-135m (6 boundaries) and minilm-l6 (7) on a planted three-emotion dataset with
    steering-only rows, written where ``subspace_alignment`` reads them (profile ``smoke``)."""
    import torch

    from emotion_assets.activations import ACTIVATIONS_FILE, INDEX_FILE
    from resources.storage import ArtifactStore, write_table, write_tensors

    rng = np.random.default_rng(0)
    groups = [("neutral", "train", 30), ("neutral", "eval", 12), *((e, "train", 12) for e in EMOTIONS)]
    rows = [(e, s, "fit") for e, s, n in groups for _ in range(n)]
    rows += [(e, s, "steering_prompt") for e, s, _ in groups for _ in range(2)]
    index = pd.DataFrame(rows, columns=["emotion", "split", "role"]).assign(
        id=lambda f: [f"p{i}" for i in f.index]
    )
    d_a, d_b, bounds_a, bounds_b = 24, 16, [0, 6, 12, 18, 24, 30], list(range(7))
    planted = {e: _orthogonal(rng, d_a, 1)[:, 0] for e in EMOTIONS}
    x_a = rng.standard_normal((len(rows), len(bounds_a), d_a))
    for i, (emotion, _, _) in enumerate(rows):
        if emotion != "neutral":
            x_a[i] += (6.0 + rng.standard_normal()) * planted[emotion]
    proj = _orthogonal(rng, d_a, d_b)
    x_b = np.stack([x_a[:, min(j, 5)] @ proj for j in range(len(bounds_b))], axis=1)
    x_b += 0.1 * rng.standard_normal(x_b.shape)
    steering = (index["role"] == "steering_prompt").to_numpy()
    if corrupt_steering:
        x_a[steering], x_b[steering] = 1e3 * rng.standard_normal(x_a[steering].shape), 0.0
    store = ArtifactStore(root_dir=str(root))
    for model, x, bounds in (("smollm2-135m", x_a, bounds_a), ("minilm-l6", x_b, bounds_b)):
        with store.publishing():
            folder = store.directory("smoke", "activations", model)
            # `mean` is a second anchor view (alignment.anchor_poolings): the same map, other samples.
            mean = x + 0.5 * np.random.default_rng(1).standard_normal(x.shape) @ np.eye(x.shape[-1])
            tensors = {"last": torch.from_numpy(x).float(), "mean": torch.from_numpy(mean).float(),
                       "boundaries": torch.tensor(bounds)}  # fmt: skip
            write_tensors(folder / ACTIVATIONS_FILE, tensors)
            write_table(folder / INDEX_FILE, index)
        with store.publishing():  # the alignment reads the audit's flags of both sides
            audit = pd.DataFrame(
                {"strategy": "last", "boundary": bounds, "emotion": "anger", "flagged": False,
                 "worst_nuisance": "length", "max_abs_cosine": 0.1, "reason": ""}
            )  # fmt: skip
            write_table(store.directory("smoke", "confound_audit", model) / "vector_audit.parquet", audit)


def test_asset_writes_specificity_and_ignores_steering_rows(tmp_path):
    import dagster as dg

    from emotion_assets.alignment import subspace_alignment, subspace_alignment_ranges
    from resources.storage import ArtifactStore
    from resources.tracking import TrackingResource

    key = dg.MultiPartitionKey({"model_pair": "smollm2-135m__minilm-l6", "profile": "smoke"})
    outputs = {}
    for corrupt in (False, True):
        root = tmp_path / f"corrupt_{corrupt}"
        _write_fake_activations(root, corrupt)
        store = ArtifactStore(root_dir=str(root))
        result = materialize(
            [subspace_alignment, subspace_alignment_ranges], store=store, partition_key=key,
            resources={"store": store, "tracking": TrackingResource(enabled=False)},
            instance=dg.DagsterInstance.ephemeral(),
        )  # fmt: skip
        assert all(check.passed for check in result.get_asset_check_evaluations())
        metadata = result.asset_materializations_for_node("subspace_alignment")[0].metadata
        folder = root / "smoke" / "subspace_alignment" / "smollm2-135m__minilm-l6"
        outputs[corrupt] = {name: pd.read_parquet(folder / f"{name}.parquet")
                            for name in ("alignment_sweep", "specificity_matrix", "specificity")}  # fmt: skip
        assert (folder / "specificity_heatmap.png").is_file() and (folder / "specificity.csv").is_file()
        # Distinct planted emotions: a headline row exists and its specificity CI lies above 0.
        assert metadata["n_headline_rows"].value > 0 and metadata["best_specificity_ci"].value[0] > 0
        assert "specificity" in metadata["headline"].value
    for name, clean in outputs[False].items():
        pd.testing.assert_frame_equal(clean, outputs[True][name])


def test_span_ceiling_is_one_inside_the_neutral_span_and_zero_outside():
    from emotion_assets.science.alignment import neutral_span, span_ceiling

    rng = np.random.default_rng(0)
    d = 12
    full = neutral_span(rng.standard_normal((40, d)))  # n > d: the span is everything
    assert full.shape == (d, d) and span_ceiling(full, rng.standard_normal((2, d))) == pytest.approx(1.0)
    few = np.zeros((4, d))
    few[:, :3] = rng.standard_normal((4, 3))  # 4 prompts in the first 3 coordinates: a 3-dim span
    span = neutral_span(few)
    assert span.shape[0] == 3
    inside, outside = np.eye(d)[:1], np.eye(d)[5:6]
    assert span_ceiling(span, inside) == pytest.approx(1.0)
    assert span_ceiling(span, outside) == pytest.approx(0.0, abs=1e-12)
    half = (np.eye(d)[0] + np.eye(d)[5])[None] / np.sqrt(2)
    assert span_ceiling(span, half) == pytest.approx(0.5)


def test_a_second_pooled_view_determines_the_map_on_more_dimensions():
    """Known answer: B is a rotation of A. With n neutral prompts < d the map is Q only on an (n − 1)-dim
    span, so the overlap is the span ceiling < 1; a second pooled view of the same prompts (another sample of
    the same rotation) lifts both to ≈ 1. Without a rotation (B unrelated) neither view finds anything."""
    rng = np.random.default_rng(3)
    d, n_train, n_eval, n_emotion = 24, 14, 10, 12
    q = _orthogonal(rng, d, d)
    n = n_train + n_eval + 2 * n_emotion
    index = pd.DataFrame({"emotion": ["neutral"] * (n_train + n_eval) + ["anger"] * n_emotion + ["joy"] * n_emotion,
                          "split": ["train"] * n_train + ["eval"] * n_eval + ["train"] * (2 * n_emotion),
                          "role": "fit"})  # fmt: skip
    rows = alignment_rows(index)
    last, mean = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    for emotion, direction in (("anger", rng.standard_normal(d)), ("joy", rng.standard_normal(d))):
        last[(index.emotion == emotion).to_numpy()] += 4.0 * direction / np.linalg.norm(direction)
    args = {"k_max": 1, "methods": ("ridge",), "n_null": 10, "n_boot": 10, "ridge_alpha": 0.0}
    one = layer_pair_sweep(last, last @ q, rows, **args).overlaps
    two = layer_pair_sweep(
        last, last @ q, rows, anchor_views=[(last, last @ q), (mean, mean @ q)], **args
    ).overlaps
    assert (one.span_ceiling < 0.9).all() and np.allclose(one.overlap, one.span_ceiling, atol=1e-6)
    assert (two.span_ceiling > 0.999).all() and (two.overlap > 0.999).all()
    assert (two.n_train_pairs == 2 * n_train).all() and (two.r2_heldout > 0.999).all()
    unrelated = rng.standard_normal((n, d))
    null = layer_pair_sweep(last, unrelated, rows, anchor_views=[(last, unrelated), (mean, rng.standard_normal((n, d)))],
                            **args).overlaps  # fmt: skip
    assert (null.r2_heldout < 0).all() and not null.headline_beats_null.any()


def test_ridge_cv_keeps_the_views_of_one_prompt_in_one_fold():
    from emotion_assets.science.alignment import fit_ridge_map

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 6))
    groups = np.tile(np.arange(10), 2)
    fitted = fit_ridge_map(x, x @ _orthogonal(rng, 6, 6), "auto", groups=groups)
    assert fitted.n_train == 20 and fitted.alpha is not None
    with pytest.raises(ValueError, match="one entry per paired row"):
        fit_ridge_map(x, x, "auto", groups=groups[:5])
    with pytest.raises(ValueError, match="more paired prompts"):
        fit_ridge_map(x, x, "auto", groups=np.zeros(20, dtype=int))  # one prompt, many views: no CV


def _sweep_rows(rows: list[tuple[int, int, float, float, bool]]) -> pd.DataFrame:
    """(layer_a, layer_b, overlap, null_p95, specific) rows of one method × emotion."""
    frame = pd.DataFrame(rows, columns=["layer_a", "layer_b", "overlap", "null_p95", "specific"])
    frame = frame.assign(method="ridge", emotion="anger", k=1, chance=0.002)
    frame["beats_null"] = frame["overlap"] > frame["null_p95"]
    frame["headline_beats_null"] = frame["beats_null"] & frame["specific"]
    return frame


def test_summary_selects_the_largest_margin_among_specific_rows_not_the_earliest_block():
    from emotion_assets.science.alignment import SELECTED_HEADLINE, alignment_summary

    # A rotated twin: every block aligns perfectly; only the later blocks are emotion-specific.
    sweep = _sweep_rows([(0, 0, 1.0, 0.0, False), (1, 1, 1.0, 0.01, False), (8, 8, 0.99, 0.01, True),
                         (12, 12, 0.98, 0.01, True)])  # fmt: skip
    row = alignment_summary(sweep).iloc[0]
    assert (row["layer_a"], row["specific"], row["selection"]) == (8, True, SELECTED_HEADLINE)


def test_summary_without_a_specific_row_shows_the_largest_margin_as_not_a_finding():
    from emotion_assets.science.alignment import SELECTED_NO_HEADLINE, alignment_summary

    sweep = _sweep_rows([(0, 0, 0.99, 0.0, False), (2, 1, 0.5, 0.1, False), (6, 3, 0.3, 0.1, False)])
    row = alignment_summary(sweep).iloc[0]
    assert (row["layer_a"], bool(row["headline_beats_null"]), row["selection"]) == (
        2,
        False,
        SELECTED_NO_HEADLINE,
    )


def test_layer_pairs_spread_over_processes_give_the_numbers_of_one_process():
    """The asset's layer pairs in two spawned processes (``alignment.workers``) equal the in-process sweep."""
    tasks = []
    for seed in (5, 8, 11):
        model_a = _model(seed, 24, n_neutral=60, n_eval=30, n_emotion=30)
        model_b = _twin(
            model_a, _orthogonal(np.random.default_rng(seed + 1), 24, 16), seed=seed + 2, noise=0.3
        )
        x_a, x_b, index = _with_steering_rows(model_a, model_b, np.random.default_rng(0), scale=1.0)
        tasks.append(
            dict(x_a=x_a, x_b=x_b, rows=alignment_rows(index), k_max=2, n_null=20, n_boot=10, seed=1)
        )
    with threadpool_limits(limits=1, user_api="blas"):
        alone = map_in_processes(layer_pair_sweep, tasks, workers=1)
    spread = map_in_processes(layer_pair_sweep, tasks, workers=2)
    for one, two in zip(alone, spread, strict=True):
        for name in ("overlaps", "matrix", "specificity"):
            pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name))
    assert process_count(2, n_tasks=1) == 1  # never more processes than tasks
    with pytest.raises(ValueError, match="workers"):
        process_count(0, n_tasks=3)


def test_profile_cpu_workers_must_be_a_count_or_auto():
    smoke = get_profile("smoke").model_dump()
    assert Profile.model_validate({**smoke, "cpu_workers": "auto"}).cpu_workers == "auto"
    assert Profile.model_validate({**smoke, "cpu_workers": 2}).cpu_workers == 2
    for bad in (0, "all"):
        with pytest.raises(ValidationError, match="cpu_workers"):
            Profile.model_validate({**smoke, "cpu_workers": bad})
