"""Per-profile roll-up across models and the findings report (Markdown + self-contained HTML)."""

import dagster as dg
import pandas as pd

from emotion_assets.activations import activations
from emotion_assets.alignment import subspace_alignment
from emotion_assets.automation import config_deps
from emotion_assets.circuits import emotion_circuits
from emotion_assets.common import RunConfig, effective_profile, recorded
from emotion_assets.confounds import confound_audit
from emotion_assets.dataset import emotion_dataset
from emotion_assets.evaluator_quality import evaluator_quality
from emotion_assets.head_patching import head_patching
from emotion_assets.head_screening import head_screening
from emotion_assets.io import COMPARISONS_FILE, ArtifactHandles, ProfileArtifacts
from emotion_assets.partitions import profile_partitions, profile_to_model_profile
from emotion_assets.patching import residual_patching
from emotion_assets.plots import markdown_table
from emotion_assets.report_pages import (
    claims_html,
    claims_markdown,
    page_html,
    page_markdown,
    place_figures,
    safe_markdown_html,
)
from emotion_assets.report_tables import report_sections, study_claims
from emotion_assets.science.claims import (
    verdict_counts,
)
from emotion_assets.statistics import k_selection, patching_statistics
from emotion_assets.subspaces import emotion_subspaces
from emotion_assets.vectors import emotion_vectors
from jobs.jobs import REPORT_GROUP
from resources.storage import ArtifactStore, reader_path, write_bytes, write_table
from resources.tracking import TrackingResource

ROLLUP_COLUMNS = ["model", "source", "comparison", "metric", "emotion", "other_emotion", "condition", "layer",
                  "alpha", "mode",
                  "direction", "heads", "destination", "n", "mean_diff", "effect_size", "effect_measure",
                  "diff_ci_low", "diff_ci_high", "p_t", "p_bh", "p_bonferroni", "family_t"]  # fmt: skip


@dg.asset(
    partitions_def=profile_partitions,
    deps=config_deps("patching_statistics_rollup", profile_partitions),
    group_name=REPORT_GROUP,
    ins={"statistics": dg.AssetIn(patching_statistics.key, partition_mapping=profile_to_model_profile)},
    kinds={"pandas"},
    code_version="3",
    description="Every model's patching statistics for the profile in one table, with per-model counts of "
    "effects that survive correction.",
)
def patching_statistics_rollup(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    statistics: ArtifactHandles,
) -> dg.MaterializeResult:
    """Every model's published ``patching_statistics`` of the profile, stacked in model order."""
    profile = effective_profile(context.partition_key, config)
    frames = [statistics[model].table(COMPARISONS_FILE) for model in statistics]
    stats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if stats.empty:
        raise FileNotFoundError(
            f"No patching_statistics found under {store.root}/{profile.name}/. Materialize "
            "patching_statistics for at least one model of this profile first."
        )
    missing = [c for c in ROLLUP_COLUMNS if c not in stats]
    if missing:
        raise ValueError(
            f"patching_statistics under {store.root}/{profile.name}/ lacks columns {missing} (written by an "
            "older version). Re-materialize patching_statistics for this profile's models, then the roll-up."
        )
    with recorded(
        context, tracking=tracking, store=store, phase="7-statistics", model="all", profile=profile,
        device="cpu", config=config, throughput_unit="comparisons",
    ) as rec:  # fmt: skip
        rollup = stats[ROLLUP_COLUMNS]
        by_model = (
            stats.groupby(["model", "source", "comparison"])
            .agg(comparisons=("p_t", "size"), survive_bh=("survives_bh", "sum"),
                 survive_bonferroni=("p_bonferroni", lambda p: int((p < 0.05).sum())),
                 max_abs_effect_size=("effect_size", lambda d: float(d.abs().max())))
            .reset_index()
        )  # fmt: skip
        rec.timing.samples = len(rollup)
        out = store.directory(profile.name, "patching_statistics_rollup")
        rec.artifacts(out)
        write_table(out / "rollup.parquet", rollup, csv=True)
        write_table(out / "by_model.parquet", by_model, csv=True)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "rollup.parquet")),
            "models": dg.MetadataValue.json(sorted(stats["model"].unique().tolist())),
            "by_model": markdown_table(by_model),
            **rec.metadata(),
        }
    )


@dg.asset(
    partitions_def=profile_partitions,
    deps=config_deps("findings_report", profile_partitions),
    group_name=REPORT_GROUP,
    ins={
        "rollup": dg.AssetIn(patching_statistics_rollup.key),
        "quality": dg.AssetIn(evaluator_quality.key),
        "dataset": dg.AssetIn(emotion_dataset.key),
        **{
            name: dg.AssetIn(asset.key, partition_mapping=profile_to_model_profile)
            for name, asset in (
                ("activations", activations),
                ("subspaces", emotion_subspaces),
                ("vectors", emotion_vectors),
                ("audits", confound_audit),
                ("steering", residual_patching),
                ("statistics", patching_statistics),
                ("screening", head_screening),
                ("head_patches", head_patching),
                ("circuits", emotion_circuits),
                ("alignments", subspace_alignment),
                ("k_selections", k_selection),
            )
        },
    },
    kinds={"markdown", "html"},
    code_version="8",
    description="The results section of the study for one profile across models. It opens with the study's "
    "claims, each a sentence generated from the statistics with a verdict (supported / not supported / "
    "confounded / not tested) and links to its evidence; then the confound audit (surface baselines, nuisance "
    "cosines, registers, validation sets, flags), alignment controls, corrected-effect counts, what the "
    "controls changed (survivors of an uncontrolled reading beside the controlled one), evaluator "
    "quality, the dataset's surface balance, probe accuracy, steering against baseline, random controls and "
    "the other emotions' vectors, top heads, head patching against random heads, circuits, alignment overlaps "
    "with their null band, and the slowest phases; each section's plots sit beside its table.",
)
def findings_report(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    rollup: ArtifactHandles,  # per-profile inputs too: a section whose input is not published says so
    quality: ArtifactHandles,
    dataset: ArtifactHandles,
    activations: ArtifactHandles,
    subspaces: ArtifactHandles,
    vectors: ArtifactHandles,
    audits: ArtifactHandles,
    steering: ArtifactHandles,
    statistics: ArtifactHandles,
    screening: ArtifactHandles,
    head_patches: ArtifactHandles,
    circuits: ArtifactHandles,
    alignments: ArtifactHandles,
    k_selections: ArtifactHandles,
) -> dg.MaterializeResult:
    """The report of one profile, read only from its declared inputs (every model and pair partition of the
    profile that is published)."""
    profile = effective_profile(context.partition_key, config)
    inputs = ProfileArtifacts.of({
        "rollup": rollup, "quality": quality, "dataset": dataset, "activations": activations,
        "subspaces": subspaces, "vectors": vectors, "audits": audits, "steering": steering,
        "statistics": statistics, "screening": screening, "head_patches": head_patches, "circuits": circuits,
        "alignments": alignments, "k_selections": k_selections,
    })  # fmt: skip
    with recorded(
        context, tracking=tracking, store=store, phase="7-report", model="all", profile=profile,
        device="cpu", config=config, throughput_unit="sections",
    ) as rec:  # fmt: skip
        header, sections = report_sections(inputs, profile, context)
        claims = study_claims(inputs, profile)
        counts = verdict_counts(claims)
        sections = place_figures(sections, inputs.figures())
        known = {"claims", *(s.anchor for s in sections)}
        markdown = page_markdown(header, claims_markdown(claims, counts), sections)
        page = page_html(header, claims_html(claims, counts, known), sections)
        rec.timing.samples = len(sections) + 1
        out = store.directory(profile.name, "findings_report")
        rec.artifacts(out)
        write_table(out / "claims.parquet", claims, csv=True)
        write_bytes(out / "findings.md", markdown.encode("utf-8"))
        write_bytes(out / "findings.html", page.encode("utf-8"))
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "findings.html")),
            "markdown": dg.MetadataValue.path(reader_path(out / "findings.md")),
            "verdicts": markdown_table(counts),
            "claims": markdown_table(claims[["verdict", "sentence"]], max_rows=60),
            "report": dg.MetadataValue.md(markdown[:20000]),
            **rec.metadata(),
        }
    )


__all__ = ["findings_report", "patching_statistics_rollup", "safe_markdown_html", "study_claims"]
