"""Phase 3: emotion directions (mean difference) and held-out linear probes."""

import dagster as dg
import pandas as pd
import torch

from emotion_assets.activations import activations
from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, refuse_failing_checks
from emotion_assets.context import Phase
from emotion_assets.io import (
    PROBE_FILE,
    VECTORS_FILE,
    ArtifactHandle,
    activations_of,
    token_norms_of,
    vectors_of,
)
from emotion_assets.partitions import model_profile_partitions
from emotion_assets.plots import heatmap, line_plot, markdown_table, save_figure
from emotion_assets.science.directions import (
    cosine_matrix,
    linear_probe_by_layer,
    vector_report,
)
from emotion_assets.science.directions import (
    emotion_vectors as mean_difference_vectors,
)
from emotion_assets.science.prompts import NEUTRAL, fitting_mask
from jobs.jobs import REPRESENTATION_GROUP
from resources.storage import ArtifactStore, reader_path, write_table, write_tensors
from resources.tracking import TrackingResource


def vector_key(strategy: str, emotion: str) -> str:
    return f"{strategy}/{emotion}"


@dg.asset(
    partitions_def=model_profile_partitions,
    deps=config_deps("emotion_vectors", model_profile_partitions),
    group_name=REPRESENTATION_GROUP,
    ins={"activations": dg.AssetIn(activations.key)},
    kinds={"pytorch", "sklearn"},
    code_version="2",
    description="Per emotion × boundary × pooling: mean(train emotion) − mean(train neutral); norms relative "
    "to the residual norm, the cosine matrix between emotions, and a held-out linear probe per layer.",
)
def emotion_vectors(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    activations: ArtifactHandle,
) -> dg.MaterializeResult:
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="3-vectors")
    model_name, profile = phase.model, phase.profile
    pooled, index, boundaries = activations_of(activations)
    token_norm = token_norms_of(activations)  # [n, n_boundaries]
    labels = index["emotion"].tolist()
    fitting = fitting_mask(index)  # steering-only prompts never fit a vector or a probe
    train = (index["split"] == "train").to_numpy() & fitting
    held_out = (index["split"] == "eval").to_numpy() & fitting
    with phase.recorded("boundaries") as rec:
        tensors: dict[str, torch.Tensor] = {}
        reports, probes, cosines = [], [], []
        for strategy, acts in pooled.items():  # acts: [n, n_boundaries, d_model]
            vectors = mean_difference_vectors(acts, labels, train, neutral_label=NEUTRAL)
            for emotion, vec in vectors.items():
                tensors[vector_key(strategy, emotion)] = vec
            # Relative norms against the typical non-sink token norm (the steering α reference).
            report = vector_report(vectors, acts, train, token_norm=token_norm)  # boundary = list position
            report["boundary"] = [boundaries[i] for i in report["boundary"]]
            report.insert(0, "strategy", strategy)
            reports.append(report)
            for position, boundary in enumerate(boundaries):
                cos = cosine_matrix(vectors, position)
                for a in cos.index:
                    for b in cos.columns:
                        cosines.append(
                            {
                                "strategy": strategy,
                                "boundary": boundary,
                                "emotion_a": a,
                                "emotion_b": b,
                                "cosine": float(cos.loc[a, b]),
                            }
                        )
            probe = linear_probe_by_layer(acts, labels, train, held_out, seed=profile.seed)
            probe["boundary"] = [boundaries[i] for i in probe["boundary"]]
            probe.insert(0, "strategy", strategy)
            probes.append(probe)
        rec.timing.samples = len(boundaries) * len(pooled)
        report = pd.concat(reports, ignore_index=True)
        probe_table = pd.concat(probes, ignore_index=True)
        cosine_table = pd.DataFrame(cosines)

        # The blocking check's logic runs on the staged vectors: failing vectors are never published.
        refuse_failing_checks(
            "emotion_vectors",
            str(context.partition_key),
            {"emotion_vectors_nonzero": nonzero_check(tensors, boundaries)},
        )

        out = phase.directory("emotion_vectors")

        rec.artifacts(out)
        tensors["boundaries"] = torch.tensor(boundaries, dtype=torch.int64)
        write_tensors(out / VECTORS_FILE, tensors)
        write_table(out / "vector_norms.parquet", report, csv=True)
        write_table(out / PROBE_FILE, probe_table, csv=True)
        write_table(out / "cosine_matrix.parquet", cosine_table, csv=True)

        first = profile.pooling[0]
        curves = probe_table[probe_table["strategy"] == first][["boundary", "accuracy"]].assign(
            model=model_name
        )
        chance = float(probe_table["chance"].iloc[0])
        fig = line_plot(
            curves, "boundary", "accuracy", "model", f"Held-out probe accuracy ({first} pooling)", "accuracy"
        )
        fig.axes[0].axhline(chance, color="grey", ls="--", lw=1, label="majority-class chance")
        probe_plot = save_figure(fig, out / "probe_accuracy_by_layer.png")
        best = probe_table.loc[probe_table["accuracy"].idxmax()]
        middle = boundaries[len(boundaries) // 2]
        cos_mid = cosine_table[(cosine_table["strategy"] == first) & (cosine_table["boundary"] == middle)]
        cos_wide = cos_mid.pivot(index="emotion_a", columns="emotion_b", values="cosine")
        cos_plot = save_figure(
            heatmap(
                cos_wide.to_numpy(),
                list(cos_wide.index),
                list(cos_wide.columns),
                f"Cosine between emotion vectors (boundary {middle}, {first})",
                "",
                "",
            ),
            out / "cosine_matrix.png",
        )
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / VECTORS_FILE)),
            "n_vectors": dg.MetadataValue.int(len(tensors) - 1),
            "best_probe_accuracy": dg.MetadataValue.float(float(best["accuracy"])),
            "best_probe_boundary": dg.MetadataValue.int(int(best["boundary"])),
            "best_probe_strategy": dg.MetadataValue.text(str(best["strategy"])),
            "probe_chance": dg.MetadataValue.float(chance),
            "probe_accuracy_by_layer": probe_plot,
            "cosine_matrix": cos_plot,
            "norms_preview": markdown_table(
                report[report["strategy"] == first].sort_values("relative_norm", ascending=False)
            ),
            **rec.metadata(),
        }
    )


@dg.asset_check(
    asset=emotion_vectors,
    blocking=True,
    description="Every vector is finite, and non-zero past the token embeddings. At boundary 0 a zero vector "
    "is allowed and reported: there a pooled vector is a function of the token identities alone, so "
    "classes that end in the same tokens (matched punctuation, `last` pooling) have exactly equal means.",
)
def emotion_vectors_nonzero(emotion_vectors: ArtifactHandle) -> dg.AssetCheckResult:
    vectors, boundaries = vectors_of(emotion_vectors)
    return nonzero_check(vectors, boundaries)


def nonzero_check(vectors: dict[str, torch.Tensor], boundaries: list[int]) -> dg.AssetCheckResult:
    """The logic of ``emotion_vectors_nonzero`` on ``{"strategy/emotion": [n_boundaries, d_model]}``."""
    non_finite = [k for k, v in vectors.items() if not torch.isfinite(v).all()]
    zero_at: dict[str, list[int]] = {
        k: [boundaries[i] for i in (v.norm(dim=-1) == 0).nonzero().flatten().tolist()]
        for k, v in vectors.items()
    }
    zero_inside = {k: [b for b in bs if b > 0] for k, bs in zero_at.items() if any(b > 0 for b in bs)}
    zero_embeddings = sorted(k for k, bs in zero_at.items() if 0 in bs)
    problems = [f"non-finite vectors {non_finite}"] if non_finite else []
    if zero_inside:
        problems.append(
            f"zero vectors past the embeddings {zero_inside} (the emotion's train mean equals neutral's: "
            "check the labels and splits of the dataset)"
        )
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or "Every vector is finite and non-zero past boundary 0.",
        metadata={
            "non_finite_vectors": non_finite,
            "zero_vectors_past_embeddings": zero_inside,
            "zero_at_boundary_0": zero_embeddings,
            "n_vectors": len(vectors),
        },
    )
