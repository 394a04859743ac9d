"""Phase 3: k-dimensional PCA subspaces of each emotion and of neutral."""

import math

import dagster as dg
import numpy as np
import pandas as pd
import torch

from emotion_assets.activations import activations
from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, refuse_failing_checks
from emotion_assets.context import Phase
from emotion_assets.io import (
    SUBSPACES_FILE,
    ArtifactHandle,
    activations_of,
    subspaces_of,
)
from emotion_assets.partitions import model_profile_partitions
from emotion_assets.plots import line_plot, markdown_table, save_figure
from emotion_assets.science.directions import (
    emotion_subspace,
    neutral_subspace,
)
from emotion_assets.science.prompts import NEUTRAL, fitting_mask
from jobs.jobs import REPRESENTATION_GROUP
from resources.storage import ArtifactStore, reader_path, write_table, write_tensors
from resources.tracking import TrackingResource


@dg.asset(
    partitions_def=model_profile_partitions,
    deps=config_deps("emotion_subspaces", model_profile_partitions),
    group_name=REPRESENTATION_GROUP,
    ins={"activations": dg.AssetIn(activations.key)},
    kinds={"pytorch"},
    code_version="2",
    description="Per emotion × boundary × pooling: top-k right singular vectors of (train emotion "
    "activations − train neutral mean), explained variance over the total; plus the neutral PCA subspace.",
)
def emotion_subspaces(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    activations: ArtifactHandle,
) -> dg.MaterializeResult:
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="3-vectors")
    profile = phase.profile
    pooled, index, boundaries = activations_of(activations)
    labels = index["emotion"].to_numpy()
    train = (index["split"] == "train").to_numpy() & fitting_mask(index)
    with phase.recorded("subspaces") as rec:
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for strategy, acts in pooled.items():  # [n, n_boundaries, d_model]
            x = acts.double().numpy()
            neutral_rows = train & (labels == NEUTRAL)
            neutral_mean = x[neutral_rows].mean(axis=0)  # [n_boundaries, d_model]
            groups = {e: train & (labels == e) for e in sorted(set(labels)) if e != NEUTRAL}
            k = min(profile.k_max, *(int(m.sum()) for m in [*groups.values(), neutral_rows]))
            for name, mask in [*groups.items(), (NEUTRAL, neutral_rows)]:
                bases, ratios = [], []
                for position in range(len(boundaries)):
                    if name == NEUTRAL:
                        basis, ratio = neutral_subspace(x[mask, position], k)
                    else:
                        basis, ratio = emotion_subspace(x[mask, position], neutral_mean[position], k)
                    bases.append(basis)
                    ratios.append(ratio)
                tensors[f"{strategy}/{name}/basis"] = torch.stack(bases)  # [n_boundaries, k, d_model]
                tensors[f"{strategy}/{name}/explained_variance_ratio"] = torch.stack(
                    ratios
                )  # [n_boundaries, k]
                for position, boundary in enumerate(boundaries):
                    cumulative = np.cumsum(ratios[position].numpy())
                    rows.extend(
                        {
                            "strategy": strategy,
                            "subspace": name,
                            "boundary": boundary,
                            "component": c + 1,
                            "explained_variance_ratio": float(ratios[position][c]),
                            "cumulative": float(cumulative[c]),
                        }
                        for c in range(k)
                    )
        rec.timing.samples = len(rows)
        table = pd.DataFrame(rows)
        # The blocking check's logic runs on the staged bases: failing subspaces are never published.
        refuse_failing_checks(
            "emotion_subspaces",
            str(context.partition_key),
            {"emotion_subspaces_orthonormal": orthonormal_check(tensors)},
        )
        out = phase.directory("emotion_subspaces")
        rec.artifacts(out)
        tensors["boundaries"] = torch.tensor(boundaries, dtype=torch.int64)
        write_tensors(out / SUBSPACES_FILE, tensors)
        write_table(out / "explained_variance.parquet", table, csv=True)
        first = profile.pooling[0]
        total = table[(table["strategy"] == first) & (table["component"] == table["component"].max())]
        plot = save_figure(
            line_plot(
                total,
                "boundary",
                "cumulative",
                "subspace",
                f"Variance explained by the top-{int(table['component'].max())} subspace ({first})",
                "cumulative ratio of total variance",
            ),
            out / "explained_variance_by_layer.png",
        )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / SUBSPACES_FILE)),
            "k": dg.MetadataValue.int(int(table["component"].max())),
            "n_subspaces": dg.MetadataValue.int(sum(1 for key in tensors if key.endswith("/basis"))),
            "explained_variance_by_layer": plot,
            "preview": markdown_table(total.sort_values("cumulative", ascending=False)),
            **rec.metadata(),
        }
    )


@dg.asset_check(
    asset=emotion_subspaces,
    blocking=True,
    description="Every basis is orthonormal (B Bᵀ = I) "
    "and the variance ratios lie in [0, 1] and sum to at most 1.",
)
def emotion_subspaces_orthonormal(emotion_subspaces: ArtifactHandle) -> dg.AssetCheckResult:
    tensors, _ = subspaces_of(emotion_subspaces)
    return orthonormal_check(tensors)


def orthonormal_check(tensors: dict[str, torch.Tensor], tolerance: float = 1e-4) -> dg.AssetCheckResult:
    """The logic of ``emotion_subspaces_orthonormal`` on ``{".../basis": [n_b, k, d],
    ".../explained_variance_ratio": [n_b, k]}``."""
    worst, worst_key = 0.0, ""
    bad_ratios = []
    for key, value in tensors.items():
        if key.endswith("/basis"):
            gram = value.double() @ value.double().transpose(-1, -2)  # [n_boundaries, k, k]
            error = float((gram - torch.eye(gram.shape[-1], dtype=gram.dtype)).abs().max())
            if not math.isnan(worst) and (math.isnan(error) or error > worst):  # NaN is the worst
                worst, worst_key = error, key
        elif (
            not torch.isfinite(value).all()
            or ((value < -1e-6) | (value.sum(-1, keepdim=True) > 1 + 1e-5)).any()
        ):
            bad_ratios.append(key)
    problems = []
    if not worst < tolerance:
        problems.append(f"basis {worst_key} is not orthonormal (max |B Bᵀ - I| = {worst:.3g} ≥ {tolerance})")
    if bad_ratios:
        problems.append(f"variance ratios outside [0, 1] or summing over 1: {bad_ratios}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "Every basis is orthonormal; ratios lie in [0, 1].",
        metadata={"max_orthonormality_error": worst, "bad_variance_ratios": bad_ratios},
    )
