"""Confound audit of the emotion vectors: surface baselines, nuisance directions, registers, validation sets."""

import math
from typing import Any

import dagster as dg
import pandas as pd
import torch
from pydantic import Field

from emotion_assets.activations import activations, extract_for_profile
from emotion_assets.automation import config_deps
from emotion_assets.common import (
    RunConfig,
    emotion_words,
)
from emotion_assets.context import Phase, evaluator_suite_for
from emotion_assets.dataset import EMOTION_COLUMNS, emotion_dataset
from emotion_assets.io import VECTOR_AUDIT_FILE, ArtifactHandle, activations_of, prompts_of, vectors_of
from emotion_assets.partitions import model_profile_partitions, profile_to_model_profile
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.profiles import Profile
from emotion_assets.science.confounds import (
    ALL,
    PUNCTUATION_NUISANCES,
    ConfoundAudit,
    audit_confounds,
    load_validation_set,
)
from emotion_assets.science.prompts import fitting_mask
from emotion_assets.vectors import emotion_vectors
from jobs.jobs import REPRESENTATION_GROUP
from resources.evaluators import EvaluatorResource
from resources.models import ModelResource
from resources.storage import (
    ArtifactStore,
    reader_path,
    write_json,
    write_table,
    write_tensors,
)
from resources.tracking import TrackingResource

ASSET = "confound_audit"
SUMMARY_FILE = "summary.json"
TABLES = {  # ConfoundAudit field → file stem (parquet + CSV)
    "surface_baselines": "surface_baselines",
    "nuisance_summary": "nuisance_directions",
    "vector_cosines": "vector_nuisance_cosines",
    "vector_audit": "vector_audit",
    "probe_by_register": "probe_by_register",
    "emotion_cosines": "emotion_cosines",
    "validation": "validation_scores",
}


class ConfoundConfig(RunConfig):
    """Run knobs plus the two thresholds of the confound flag."""

    cosine_threshold: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Flag a vector whose |cos| with any nuisance reaches this."
    )
    baseline_margin: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Flag a vector when the keyword rule or punctuation + length reaches the probe's accuracy "
        "within this margin.",
    )


def focus_boundaries(profile: Profile, boundaries: list[int], n_layers: int) -> list[int]:
    """The profile's steering layers among the captured boundaries; every boundary past the embeddings when
    none is captured (encoders)."""
    steered = [b for b in boundaries if b in profile.steering.blocks(n_layers)]
    return steered or [b for b in boundaries if b > 0] or boundaries


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _float(value: float | None) -> dg.MetadataValue:
    return dg.MetadataValue.float(math.nan if value is None else value)


def _by_boundary(frame: pd.DataFrame) -> dict[str, float | None]:
    return {str(int(b)): _finite(a) for b, a in zip(frame["boundary"], frame["accuracy"], strict=True)}


def key_numbers(audit: ConfoundAudit, focus: list[int], first_strategy: str) -> dict[str, Any]:
    """The headline numbers of an audit at the focus boundaries (JSON-safe: NaN → null)."""
    cos = audit.vector_cosines[audit.vector_cosines["boundary"].isin(focus)]
    punct = cos[cos["nuisance"].isin(PUNCTUATION_NUISANCES)]["cosine"].abs()
    shares = audit.vector_audit[audit.vector_audit["boundary"].isin(focus)]
    probe = audit.probe_by_register[
        audit.probe_by_register["boundary"].isin(focus)
        & (audit.probe_by_register["strategy"] == first_strategy)
    ]
    baselines = audit.surface_baselines[audit.surface_baselines["register"] == ALL]
    flags = audit.vector_audit
    return {
        "focus_boundaries": focus,
        "first_strategy": first_strategy,
        "max_abs_punctuation_cosine": _finite(punct.max()) if punct.notna().any() else None,
        "min_norm_share_left": _finite(shares["share_left"].min())
        if shares["share_left"].notna().any()
        else None,
        "probe_accuracy": _by_boundary(probe[probe["register"] == ALL]),
        "implicit_probe_accuracy": _by_boundary(probe[probe["register"] == "implicit"]),
        "surface_baselines": dict(
            zip(baselines["baseline"], map(_finite, baselines["accuracy"]), strict=True)
        ),
        "n_vectors": len(flags),
        "n_flagged": int(flags["flagged"].sum()),
        "n_flagged_at_focus": int(shares["flagged"].sum()),
        "nuisances_not_estimated": {
            r.nuisance: r.reason for r in audit.nuisance_summary.itertuples() if not r.estimated
        },
    }


@dg.asset(
    partitions_def=model_profile_partitions,
    deps=config_deps("confound_audit", model_profile_partitions),
    group_name=REPRESENTATION_GROUP,
    ins={
        "activations": dg.AssetIn(activations.key),
        "vectors": dg.AssetIn(emotion_vectors.key),
        "dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile),
    },
    kinds={"pytorch", "sklearn"},
    code_version="1",
    pool="model",
    description="Is each emotion vector more than a surface feature? Surface baselines (bag of words, keyword "
    "rule, punctuation + length) beside the probe; cosine with nuisance directions estimated within one "
    "class (punctuation by counterfactual edits, length, person, register) and the norm left after "
    "projecting them out; probe accuracy per register; probe and evaluator on external validation sets.",
)
def confound_audit(
    context: dg.AssetExecutionContext,
    config: ConfoundConfig,
    models: ModelResource,
    evaluators: EvaluatorResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    activations: ArtifactHandle,
    vectors: ArtifactHandle,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="3-confounds", models=models)
    model_name, profile_name, profile = phase.model, phase.profile.name, phase.profile
    pooled, index, boundaries = activations_of(activations)
    stored, vector_boundaries = vectors_of(vectors)
    if vector_boundaries != boundaries:
        raise ValueError(
            f"emotion_vectors of {model_name}|{profile_name} were read at boundaries {vector_boundaries}, the "
            f"activations at {boundaries}. Re-materialize emotion_vectors for this partition."
        )
    by_strategy: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in stored.items():
        strategy, emotion = key.split("/", 1)
        by_strategy.setdefault(strategy, {})[emotion] = value
    frame = _with_texts(index, prompts_of(dataset), model_name, profile_name)
    fitting = fitting_mask(frame)
    handle = phase.handle
    words = emotion_words()
    validation = [load_validation_set(p, frame["text"].tolist()) for p in profile.resolved_validation_sets()]
    with phase.recorded("vectors") as rec:
        suite = evaluator_suite_for(evaluators, profile, frame[fitting]) if validation else None
        audit = audit_confounds(
            pooled, frame, boundaries, by_strategy, fitting=fitting, emotion_words=words, seed=profile.seed,
            extract=lambda texts: extract_for_profile(
                handle, texts, profile, boundaries, list(pooled), purpose="counterfactual edits"
            ).pooled,
            validation_sets=validation, score_texts=suite.score if suite else None, label_columns=EMOTION_COLUMNS,
            cosine_threshold=config.cosine_threshold, baseline_margin=config.baseline_margin,
        )  # fmt: skip
        rec.timing.samples = len(audit.vector_audit)
        focus = focus_boundaries(profile, boundaries, handle.geometry.n_layers)
        numbers = key_numbers(audit, focus, profile.pooling[0])
        out = phase.directory(ASSET)
        rec.artifacts(out)
        for attribute, stem in TABLES.items():
            write_table(out / f"{stem}.parquet", getattr(audit, attribute), csv=True)
        write_tensors(
            out / "nuisance_directions.safetensors",
            {f"{s}/{n.name}": d.float() for n in audit.nuisances for s, d in n.directions.items()}
            | {"boundaries": torch.tensor(boundaries, dtype=torch.int64)},
        )
        write_json(
            out / SUMMARY_FILE,
            {
                **numbers,
                "model": model_name,
                "profile": profile_name,
                "cosine_threshold": config.cosine_threshold,
                "baseline_margin": config.baseline_margin,
                "validation_sets": [v.name for v in validation],
            },
        )
        plot = _cosine_heatmap(audit, focus, profile.pooling[0], model_name, out)
        rec.metrics(
            **{k: v for k, v in numbers.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
    shown = audit.vector_audit[audit.vector_audit["boundary"].isin(focus)]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / VECTOR_AUDIT_FILE)),
            "max_abs_punctuation_cosine": _float(numbers["max_abs_punctuation_cosine"]),
            "min_norm_share_left": _float(numbers["min_norm_share_left"]),
            "implicit_probe_accuracy": dg.MetadataValue.json(numbers["implicit_probe_accuracy"]),
            "surface_baselines": dg.MetadataValue.json(numbers["surface_baselines"]),
            "n_flagged_vectors": dg.MetadataValue.int(numbers["n_flagged"]),
            "n_vectors": dg.MetadataValue.int(numbers["n_vectors"]),
            "focus_boundaries": dg.MetadataValue.json(focus),
            "nuisances_not_estimated": dg.MetadataValue.json(numbers["nuisances_not_estimated"]),
            "vector_audit": markdown_table(
                shown.drop(columns=["reason"]).sort_values("max_abs_cosine", ascending=False), max_rows=30
            ),
            "surface_baselines_table": markdown_table(audit.surface_baselines.drop(columns=["note"])),
            "validation_scores": markdown_table(
                audit.validation[audit.validation["boundary"].isin([*focus, -1])].drop(columns=["note"])
            ),
            "nuisance_cosine_heatmap": plot,
            "dg.row_count": dg.MetadataValue.int(len(audit.vector_audit)),
            **rec.metadata(),
        }
    )


def _with_texts(index: pd.DataFrame, dataset: pd.DataFrame, model: str, profile: str) -> pd.DataFrame:
    """The activations index with each prompt's text (and role, when only the dataset has it), row-aligned."""
    columns = ["id", "text", *(["role"] if "role" in dataset and "role" not in index else [])]
    frame = index.merge(dataset[columns], on="id", how="left", validate="one_to_one")
    if frame["text"].isna().any():
        missing = frame.loc[frame["text"].isna(), "id"].tolist()[:5]
        raise ValueError(
            f"activations of {model}|{profile} hold prompts {missing} that emotion_dataset no longer has. "
            "Re-materialize activations (and emotion_vectors) for this partition."
        )
    return frame


def _cosine_heatmap(
    audit: ConfoundAudit, focus: list[int], strategy: str, model: str, out
) -> dg.MetadataValue:
    cos = audit.vector_cosines[
        (audit.vector_cosines["strategy"] == strategy) & audit.vector_cosines["boundary"].isin(focus)
    ]
    wide = cos.assign(vector=cos["emotion"] + " @ " + cos["boundary"].astype(str)).pivot(
        index="vector", columns="nuisance", values="cosine"
    )[list(dict.fromkeys(cos["nuisance"]))]
    return save_figure(
        heatmap(
            wide.to_numpy(dtype=float), list(wide.index), list(wide.columns),
            f"{model}: emotion vector × nuisance cosine ({strategy})", "nuisance direction", "emotion @ boundary",
        ),
        out / "nuisance_cosine_heatmap.png",
    )  # fmt: skip


@dg.asset_check(
    asset=confound_audit,
    blocking=False,
    description="Warns when any emotion vector is flagged as confounded: |cos| with a nuisance direction at or "
    "above the threshold, or a surface baseline as accurate as the probe.",
)
def emotion_vectors_unconfounded(confound_audit: ArtifactHandle) -> dg.AssetCheckResult:
    table = confound_audit.table(VECTOR_AUDIT_FILE)
    summary = confound_audit.json(SUMMARY_FILE)
    flagged = table[table["flagged"]].sort_values("max_abs_cosine", ascending=False)
    named = [f"{r.strategy}/{r.emotion} @ {r.boundary}: {r.reason}" for r in flagged.head(20).itertuples()]
    return dg.AssetCheckResult(
        passed=flagged.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "n_flagged": dg.MetadataValue.int(len(flagged)),
            "n_vectors": dg.MetadataValue.int(len(table)),
            "flagged_vectors": dg.MetadataValue.json(named),
            "cosine_threshold": dg.MetadataValue.float(float(summary["cosine_threshold"])),
            "baseline_margin": dg.MetadataValue.float(float(summary["baseline_margin"])),
        },
    )
