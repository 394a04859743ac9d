"""Per-profile roll-up across models and the findings report (Markdown + self-contained HTML)."""

import base64
import html
from pathlib import Path

import dagster as dg
import pandas as pd

from emotion_assets.alignment import subspace_alignment
from emotion_assets.common import RunConfig, effective_profile, recorded
from emotion_assets.dataset import evaluator_quality
from emotion_assets.heads import emotion_circuits
from emotion_assets.partitions import profile_partitions, profile_to_model_profile
from emotion_assets.plots import markdown_table
from emotion_assets.statistics import patching_statistics, rollup_frames
from emotion_assets.timing import read_timings
from jobs.jobs import REPORT_GROUP
from resources.storage import ArtifactStore, read_table, write_bytes, write_table
from resources.tracking import TrackingResource

ROLLUP_COLUMNS = ["model", "source", "comparison", "metric", "emotion", "condition", "layer", "alpha", "mode",
                  "direction", "heads", "destination", "n", "mean_diff", "effect_size", "effect_measure",
                  "diff_ci_low", "diff_ci_high", "p_t", "p_bh", "p_bonferroni", "family_t"]  # fmt: skip
TOP_HEADS_SHOWN = 3
HEAD_TABLE_COLUMNS = ["model", "comparison", "emotion", "condition", "heads", "n", "mean_diff", "effect_size",
                      "diff_ci_low", "diff_ci_high", "p_bh", "p_bonferroni"]  # fmt: skip


@dg.asset(
    partitions_def=profile_partitions,
    group_name=REPORT_GROUP,
    deps=[dg.AssetDep(patching_statistics, partition_mapping=profile_to_model_profile)],
    kinds={"pandas"},
    code_version="2",
    description="Every model's patching statistics for the profile in one table, with per-model counts of "
    "effects that survive correction.",
)
def patching_statistics_rollup(
    context: dg.AssetExecutionContext, config: RunConfig, store: ArtifactStore, tracking: TrackingResource
) -> dg.MaterializeResult:
    profile = effective_profile(context.partition_key, config)
    stats = rollup_frames(Path(store.root), profile.name)
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
            "path": dg.MetadataValue.path(str(out / "rollup.parquet")),
            "models": dg.MetadataValue.json(sorted(stats["model"].unique().tolist())),
            "by_model": markdown_table(by_model),
            **rec.metadata(),
        }
    )


def _section(title: str, frame: pd.DataFrame | None, note: str = "") -> str:
    if frame is None or frame.empty:
        return f"## {title}\n\n_Not materialized for this profile yet._\n"
    return f"## {title}\n\n{note}\n\n{frame.to_markdown(index=False, floatfmt='.4g')}\n"


def _read(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.exists() else None


def _stack(paths: list[Path], key: str) -> pd.DataFrame | None:
    frames = [read_table(p).assign(**{key: p.parent.name}) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else None


@dg.asset(
    partitions_def=profile_partitions,
    group_name=REPORT_GROUP,
    deps=[
        patching_statistics_rollup,
        evaluator_quality,
        dg.AssetDep(subspace_alignment, partition_mapping=profile_to_model_profile),
        dg.AssetDep(emotion_circuits, partition_mapping=profile_to_model_profile),
    ],
    kinds={"markdown", "html"},
    code_version="2",
    description="The results section of the study for one profile across models: corrected-effect counts, "
    "evaluator quality, probe accuracy, steering effects against baseline and random controls, top heads, "
    "head patching against random-head controls, circuit summaries, alignment overlaps with their null band, "
    "and the slowest phases.",
)
def findings_report(
    context: dg.AssetExecutionContext, config: RunConfig, store: ArtifactStore, tracking: TrackingResource
) -> dg.MaterializeResult:
    profile = effective_profile(context.partition_key, config)
    base = Path(store.root) / profile.name
    with recorded(
        context, tracking=tracking, store=store, phase="7-report", model="all", profile=profile,
        device="cpu", config=config, throughput_unit="sections",
    ) as rec:  # fmt: skip
        probes = _stack(sorted(base.glob("emotion_vectors/*/probe_accuracy.parquet")), "model")
        best_probe = (probes.sort_values("accuracy", ascending=False).groupby("model", as_index=False).first()
                      if probes is not None else None)  # fmt: skip
        steering = _stack(sorted(base.glob("residual_patching/*/best_per_emotion.parquet")), "model")
        rollup = _read(base / "patching_statistics_rollup" / "rollup.parquet")
        by_model = _read(base / "patching_statistics_rollup" / "by_model.parquet")
        survivors = head_effects = None
        if rollup is not None:
            survivors = rollup[(rollup["p_bh"] < 0.05) & (rollup["comparison"] == "vs_random")]
            survivors = survivors.sort_values("p_bh").head(25)
            survivors = survivors.drop(columns=["source", "mode", "direction", "heads", "destination"])
            heads_rows = rollup["comparison"].isin(["vs_random_heads", "emotion_vs_neutral_prompts"])
            head_effects = rollup.loc[heads_rows, HEAD_TABLE_COLUMNS]
        top_heads = _stack(sorted(base.glob("head_screening/*/screening.parquet")), "model")
        if top_heads is not None:
            top_heads = (top_heads[top_heads["rank_by_abs_ablation"] <= TOP_HEADS_SHOWN]
                         .sort_values(["model", "emotion", "rank_by_abs_ablation"])
                         [["model", "emotion", "rank_by_abs_ablation", "layer", "head", "kv_head",
                           "ablation_effect", "attribution", "n_prompts"]])  # fmt: skip
        circuits = _stack(sorted(base.glob("emotion_circuits/*/summary.parquet")), "model")
        alignment = _stack(sorted(base.glob("subspace_alignment/*/summary.parquet")), "pair")
        chosen_k = _stack(sorted(base.glob("k_selection/*/chosen_k.parquet")), "pair")
        timings, timing_problems = read_timings(base)
        for problem in timing_problems:
            context.log.warning(f"Skipped an unreadable timing record: {problem}")
        slowest = None
        if timings is not None:
            slowest = (timings.groupby(["model", "asset"], as_index=False)["elapsed_s"].max()
                       .sort_values("elapsed_s", ascending=False).head(10))  # fmt: skip
        sections = [
            f"# Findings — profile `{profile.name}`\n\n{profile.description}\n",
            _section("Corrected effects at a glance", by_model,
                     "Per model, source and comparison: comparisons declared, and how many survive BH-FDR "
                     "(q < 0.05) and Bonferroni (p < 0.05) across the model's whole family (every source × "
                     "comparison × emotion × metric × condition)."),
            _section("Evaluator quality (eval split)", _read(base / "evaluator_quality" / "quality.parquet")),
            _section("Linear decodability (best held-out probe per model)", best_probe),
            _section("Steering: best layer and α per emotion", steering,
                     "Shift of the matching evaluator score against the unsteered baseline, next to the mean "
                     "and max shift of norm-matched random directions at the same layer and α."),
            _section("Emotion vectors vs random directions surviving BH-FDR (q < 0.05)", survivors,
                     "Paired per unique prompt; the family is every metric × condition of a model and profile."),
            _section(f"Attention heads: top {TOP_HEADS_SHOWN} per emotion by ablation effect", top_heads,
                     "ablation_effect: mean change of the emotion readout (final boundary, last token) when "
                     "the head's output is zeroed; attribution: first-order estimate of patching the head "
                     "from emotion into neutral prompts (opposite sign to the ablation for an emotion head)."),
            _section("Head patching: top heads vs random-head controls", head_effects,
                     "vs_random_heads: the joint top-N intervention against the mean of random-head sets of "
                     "the same size, mode and direction, paired per prompt, on the emotion's target score "
                     "(effect_size = d_z). emotion_vs_neutral_prompts: the unintervened gap between emotion "
                     "and neutral prompts (unpaired, Welch t; effect_size = Hedges' g)."),
            _section("Circuits (top heads: roles, OV/QK readouts, joint vs summed effects)", circuits,
                     "roles: reader / mover / writer heuristic of docs/science.md; mean_ov_cosine_own: cosine "
                     "between what the heads write and the emotion direction; ratio_*: joint effect of the "
                     "heads (and MLPs) over the sum of single-head effects."),
            _section("Cross-model alignment (best layer pair and k per method and emotion)", alignment,
                     "Overlap = mean cos² of principal angles; chance = k/d; null = random subspaces through "
                     "the same map; margin = overlap − null p95, the ranking criterion. The token-embedding "
                     "boundary (0) is excluded: there any two models that read the same words align (see the "
                     "random-weight twin)."),
            _section("k-selection", chosen_k),
            _section("Slowest phases", slowest),
        ]  # fmt: skip
        markdown = "\n".join(sections)
        rec.timing.samples = len(sections)
        out = store.directory(profile.name, "findings_report")
        rec.artifacts(out)
        write_bytes(out / "findings.md", markdown.encode("utf-8"))
        write_bytes(out / "findings.html", _html(markdown, base).encode("utf-8"))
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out / "findings.html")),
            "markdown": dg.MetadataValue.path(str(out / "findings.md")),
            "report": dg.MetadataValue.md(markdown[:20000]),
            "timing_record_problems": dg.MetadataValue.json(timing_problems),
            **rec.metadata(),
        }
    )


def _html(markdown: str, base: Path) -> str:
    """A self-contained page: the Markdown tables as preformatted sections plus every plot inlined."""
    body = safe_markdown_html(markdown)
    figures = []
    for png in sorted(base.glob("*/*/*.png")) + sorted(base.glob("*/*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        caption = html.escape(str(png.relative_to(base)))
        figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}'
                       "</figcaption></figure>")  # fmt: skip
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
             "figure{display:inline-block;margin:8px}img{max-width:520px}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Findings</title><style>{style}</style>"
            f"</head><body>{body}<h2>Plots</h2>{''.join(figures)}</body></html>")  # fmt: skip


def safe_markdown_html(markdown: str) -> str:
    """Markdown to HTML with raw HTML escaped and links left as text: profile descriptions and table cells
    come from user files, and the page must not run or link to anything they contain."""
    import markdown as md_lib

    converter = md_lib.Markdown(extensions=["tables"])
    converter.preprocessors.deregister("html_block")
    for pattern in ("html", "link", "image_link", "reference", "image_reference", "short_reference",
                    "short_image_ref", "autolink", "automail"):  # fmt: skip
        converter.inlinePatterns.deregister(pattern)
    return converter.convert(markdown)
