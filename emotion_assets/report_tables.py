"""The tables and sections of the findings report, built from the report's declared inputs."""

import html
from collections.abc import Mapping, Sequence

import dagster as dg
import pandas as pd

from emotion_assets.confounds import ASSET as CONFOUND_ASSET
from emotion_assets.confounds import SUMMARY_FILE as CONFOUND_SUMMARY
from emotion_assets.io import SWEEP_FILE, ArtifactHandle, ProfileArtifacts
from emotion_assets.partitions import REGISTRY
from emotion_assets.patching import TARGET_METRICS
from emotion_assets.profiles import Profile
from emotion_assets.registry import TwinSource
from emotion_assets.report_pages import (
    Section,
)
from emotion_assets.science.alignment import alignment_summary
from emotion_assets.science.claims import (
    AuditScope,
    alignment_claims,
    head_claims,
    representation_claims,
    steering_claims,
)
from emotion_assets.timing import profile_timings

ROLLUP_COLUMNS = ["model", "source", "comparison", "metric", "emotion", "other_emotion", "condition", "layer",
                  "alpha", "mode",
                  "direction", "heads", "destination", "n", "mean_diff", "effect_size", "effect_measure",
                  "diff_ci_low", "diff_ci_high", "p_t", "p_bh", "p_bonferroni", "family_t"]  # fmt: skip

TOP_HEADS_SHOWN = 3
# Steering against each kind of random control (never pooled), and the best cell per emotion as reported.
RANDOM_COMPARISONS = ["vs_random_isotropic", "vs_random_covariance"]
STEERING_COLUMNS = ["model", "emotion", "metric", "status", "selection", "layer", "alpha", "selection_shift",
                    "target_shift", "shift_ci_low", "shift_ci_high", "p_bh", "random_isotropic_shift",
                    "random_covariance_shift", "share_intended", "share_anti", "share_degenerate",
                    "perplexity_ratio", "n_cells_excluded"]  # fmt: skip
HEAD_TABLE_COLUMNS = ["model", "comparison", "emotion", "condition", "heads", "n", "mean_diff", "effect_size",
                      "diff_ci_low", "diff_ci_high", "p_bh", "p_bonferroni"]  # fmt: skip
ALIGNMENT_COLUMNS = ["method", "emotion", "selection", "layer_a", "layer_b", "k", "overlap", "overlap_before", "span_ceiling",
                     "null_p95", "chance", "margin", "beats_null", "specificity", "specificity_lo", "specific",
                     "headline_beats_null", "r2_heldout"]  # fmt: skip
SPECIFICITY_COLUMNS = ["model", "emotion", "other_emotion", "metric", "condition", "layer", "alpha", "n",
                       "mean_diff", "diff_ci_low", "diff_ci_high", "p_t", "p_bh", "family_t"]  # fmt: skip
VECTOR_CONFOUND_COLUMNS = ["model", "strategy", "boundary", "emotion", "cos_final_punctuation", "cos_exclamation",
                           "cos_question", "cos_length", "cos_person", "max_abs_cosine", "worst_nuisance",
                           "share_left", "flagged"]  # fmt: skip


def _escaped(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells HTML-escaped (and pipes neutralised) so no inserted string becomes markup."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(
                lambda v: html.escape(v).replace("|", "&#124;") if isinstance(v, str) else v
            )
    return out


def section_markdown(title: str, frame: pd.DataFrame | None, note: str = "", level: int = 2) -> str:
    heading = "#" * level
    if frame is None or frame.empty:
        return f"{heading} {title}\n\n_Not materialized for this profile yet._\n"
    table = _escaped(frame).to_markdown(index=False, floatfmt=".4g")
    return f"{heading} {title}\n\n{note}\n\n{table}\n"


def _audits(inputs: ProfileArtifacts) -> list[tuple[str, ArtifactHandle]]:
    """Every model's published confound audit that has a summary, in model order."""
    return [(model, handle) for model, handle in sorted(inputs.partitions(CONFOUND_ASSET).items())
            if handle.has(CONFOUND_SUMMARY)]  # fmt: skip


def _confound_tables(inputs: ProfileArtifacts) -> dict[str, pd.DataFrame | None]:
    """The confound audit of every model of the profile, at each model's focus (steering) boundaries."""
    baselines, vectors, validation, flags = [], [], [], []
    for model, folder in _audits(inputs):
        focus = folder.json(CONFOUND_SUMMARY)["focus_boundaries"]
        surface = folder.table("surface_baselines.parquet")
        probe = folder.table("probe_by_register.parquet")
        probe = probe[probe["boundary"].isin(focus)].assign(
            baseline=lambda f: "probe (" + f["strategy"] + ", boundary " + f["boundary"].astype(str) + ")"
        )
        both = pd.concat([surface, probe], ignore_index=True)
        wide = both.pivot_table(index="baseline", columns="register", values="accuracy", sort=False)
        table = pd.DataFrame({"model": model, "method": wide.index, "accuracy": wide.get("all")})
        table["accuracy_implicit"] = wide["implicit"].to_numpy() if "implicit" in wide else float("nan")
        baselines.append(table.reset_index(drop=True))
        audit = folder.table("vector_audit.parquet").assign(model=model)
        audit = audit[audit["boundary"].isin(focus)]
        vectors.append(audit[[c for c in VECTOR_CONFOUND_COLUMNS if c in audit]])
        flags.append(audit.loc[audit["flagged"], ["model", "strategy", "boundary", "emotion", "reason"]])
        scores = folder.table("validation_scores.parquet").assign(model=model)
        scores = scores[scores["boundary"].isin(focus) | (scores["scorer"] == "evaluator")]
        validation.append(scores[["model", "validation_set", "scorer", "strategy", "boundary", "accuracy",
                                  "macro_f1", "n", "note"]])  # fmt: skip

    def stacked(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
        return pd.concat(frames, ignore_index=True) if frames else None

    return {"baselines": stacked(baselines), "vectors": stacked(vectors), "validation": stacked(validation),
            "flags": stacked(flags)}  # fmt: skip


def _confound_sections(inputs: ProfileArtifacts) -> list[Section]:
    """The confound audit: an introduction, then one anchored section per table."""
    tables = _confound_tables(inputs)
    flags = tables["flags"]
    no_flags = flags is not None and flags.empty
    return [
        Section("confounds", "## Confounds\n\nRead these before any other number: they say whether the emotion "
                "vectors are more than surface features of the prompts (docs/science.md, *Confound audit*).\n"),
        Section("surface-baselines", section_markdown(
            "Surface baselines beside the probe (eval fitting prompts)", tables["baselines"],
            "accuracy: all eval prompts; accuracy_implicit: the keyword-free `implicit` register alone. A "
            "probe that a keyword rule or punctuation + length matches reads no more than the surface.", 3)),
        Section("confound-vectors", section_markdown(
            "Emotion vectors at the steering layers: nuisance cosines and norm left", tables["vectors"],
            "cos_*: cosine with a nuisance direction estimated within one class (NaN: not estimable, see "
            "nuisance_directions.csv); share_left: ‖v‖ left after projecting out every nuisance.", 3)),
        Section("validation-sets", section_markdown(
            "External validation sets (probe and evaluator fitted on train fitting prompts)",
            tables["validation"], "", 3)),
        Section("confound-flags",
                "### Flags\n\nNo emotion vector is flagged at the steering layers.\n" if no_flags else
                section_markdown("Flags (vectors at the steering layers flagged as confounded)", flags, "", 3)),
    ]  # fmt: skip


def confounds_markdown(inputs: ProfileArtifacts) -> str:
    return "\n".join(s.markdown for s in _confound_sections(inputs))


def alignment_controls(
    pairs: Sequence[tuple[str, str]], twins: Mapping[str, tuple[str, str]]
) -> list[tuple[str, str]]:
    """(role, pair key) of the headline pair (the registry's first pair) and of its registered controls:
    the pair with one side replaced by that model's twin, and a headline model against its own twin.
    Random-weight twins are negative controls (should sit at the null), rotated twins positive ones
    (should align near 1)."""
    if not pairs:
        return []
    head_a, head_b = pairs[0]
    roles = [("headline", f"{head_a}__{head_b}")]
    kinds = {
        "random_twin": "negative control: random-weight twin",
        "rotated_twin": "positive control: rotated twin",
    }
    for a, b in pairs[1:]:
        kind_a, of_a = twins.get(a, (None, None))
        kind_b, of_b = twins.get(b, (None, None))
        if of_a == head_a and b == head_b:
            roles.append((f"{kinds.get(kind_a, kind_a)} (A side)", f"{a}__{b}"))
        elif of_b == head_b and a == head_a:
            roles.append((f"{kinds.get(kind_b, kind_b)} (B side)", f"{a}__{b}"))
        elif a in (head_a, head_b) and of_b == a:
            roles.append((f"{kinds.get(kind_b, kind_b)} of {a}", f"{a}__{b}"))
    return roles


def alignment_control_table(inputs: ProfileArtifacts) -> pd.DataFrame:
    """The headline pair beside its controls; a pair without a summary is listed as not materialized."""
    rows = []
    for role, pair in alignment_controls(REGISTRY.pairs, _twins()):
        handle = inputs.partitions("subspace_alignment").get(pair)
        summary = (
            alignment_summary(handle.table(SWEEP_FILE))
            if handle is not None and handle.has(SWEEP_FILE)
            else None
        )
        if summary is None:
            rows.append(pd.DataFrame([{"role": role, "pair": pair, "status": "not materialized"}]))
            continue
        columns = [c for c in ALIGNMENT_COLUMNS if c in summary]
        rows.append(summary[columns].assign(role=role, pair=pair, status="materialized"))
    table = pd.concat(rows, ignore_index=True)
    return table[
        ["role", "pair", "status", *[c for c in table.columns if c not in ("role", "pair", "status")]]
    ]


def _alignment_summaries(inputs: ProfileArtifacts) -> pd.DataFrame | None:
    """Every pair's per-method summary (``science.alignment.alignment_summary``) from its sweep."""
    frames = [alignment_summary(handle.table(SWEEP_FILE)).assign(pair=pair)
              for pair, handle in sorted(inputs.partitions("subspace_alignment").items()) if handle.has(SWEEP_FILE)]  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else None


def _twins() -> dict[str, tuple[str, str]]:
    """Twin model → (twin kind, the model it is a twin of)."""
    return {name: (spec.source.type, spec.source.of) for name, spec in REGISTRY.models.items()
            if isinstance(spec.source, TwinSource)}  # fmt: skip


def _audit_inputs(inputs: ProfileArtifacts) -> dict[str, object]:
    """Every model's confound audit, stacked: vector verdicts (all boundaries), probes by register, surface
    baselines, and what each audit looked at (:class:`AuditScope`)."""
    audit, probes, surface, scopes = [], [], [], {}
    for model, folder in _audits(inputs):
        summary = folder.json(CONFOUND_SUMMARY)
        scopes[model] = AuditScope(summary["first_strategy"], tuple(int(b) for b in summary["focus_boundaries"]),
                                   float(summary["baseline_margin"]))  # fmt: skip
        audit.append(folder.table("vector_audit.parquet").assign(model=model))
        probes.append(folder.table("probe_by_register.parquet").assign(model=model))
        surface.append(folder.table("surface_baselines.parquet").assign(model=model))

    def stacked(frames: list[pd.DataFrame]) -> pd.DataFrame | None:
        return pd.concat(frames, ignore_index=True) if frames else None

    return {"audit": stacked(audit), "probes": stacked(probes), "surface": stacked(surface), "scopes": scopes}


def study_claims(inputs: ProfileArtifacts, profile: Profile) -> pd.DataFrame:
    """Every claim of the study for one profile (``science.claims``), from the report's inputs.

    Expected subjects come from the registry and what was materialized: steering and head claims for each
    causal model (twins excepted) with any artifact under the profile, representation claims for each model
    with activations or an audit, alignment claims for every registered pair. Missing evidence is a
    ``not tested`` claim."""
    twins = _twins()
    present = {model for asset in ("activations", CONFOUND_ASSET, "residual_patching", "head_patching",
                                   "patching_statistics") for model in inputs.partitions(asset)}  # fmt: skip
    causal = [m for m in sorted(present) if m in REGISTRY.models and REGISTRY.models[m].can_generate
              and m not in twins]  # fmt: skip
    emotions = list(TARGET_METRICS)
    strategy = profile.pooling[0]
    audits = _audit_inputs(inputs)
    audit = audits["audit"]
    best = inputs.stack("residual_patching", "best_per_emotion.parquet", "model")
    statistics = inputs.read("patching_statistics_rollup", "rollup.parquet")
    summaries = _alignment_summaries(inputs)
    scopes = {m: audits["scopes"].get(m) for m in sorted(present | set(audits["scopes"]))}  # type: ignore[union-attr]
    return pd.concat([
        steering_claims(best, statistics, audit, models=causal, emotions=emotions, strategy=strategy),
        head_claims(statistics, audit, models=causal, emotions=emotions, strategy=strategy,
                    readout_boundary={m: REGISTRY.models[m].layers for m in causal}),
        alignment_claims(summaries, audit, pairs=REGISTRY.pairs, emotions=emotions, twins=twins,
                         strategy=strategy),
        representation_claims(audits["probes"], audits["surface"], audit, scopes=scopes, emotions=emotions,
                              twins=twins),
    ], ignore_index=True)  # fmt: skip


def report_sections(
    inputs: ProfileArtifacts, profile: Profile, context: dg.AssetExecutionContext
) -> tuple[str, list[Section]]:
    """The report's header and its evidence sections (each with the anchor the claims link to); the slowest
    phases come from the instance's materialization records of the profile."""
    probes = inputs.stack("emotion_vectors", "probe_accuracy.parquet", "model")
    best_probe = (probes.sort_values("accuracy", ascending=False).groupby("model", as_index=False).first()
                  if probes is not None else None)  # fmt: skip
    steering = inputs.stack("residual_patching", "best_per_emotion.parquet", "model")
    selected = None
    if steering is not None and "condition" in steering:
        # Emotions without a confirmed cell (no fluent cell on half A) have no condition to look up.
        selected = steering.loc[steering["condition"].notna(), ["model", "condition"]].astype(str)
    steering = steering.reindex(columns=STEERING_COLUMNS) if steering is not None else None
    rollup = inputs.read("patching_statistics_rollup", "rollup.parquet")
    by_model = inputs.read("patching_statistics_rollup", "by_model.parquet")
    survivors = head_effects = specificity = None
    if rollup is not None:
        survivors = rollup[(rollup["p_bh"] < 0.05) & rollup["comparison"].isin(RANDOM_COMPARISONS)]
        survivors = survivors.sort_values("p_bh").head(25)
        survivors = survivors.drop(columns=["source", "mode", "direction", "heads", "destination"])
        heads_rows = rollup["comparison"].isin(["vs_random_heads", "emotion_vs_neutral_prompts"])
        head_effects = rollup.loc[heads_rows, HEAD_TABLE_COLUMNS]
        if selected is not None:
            others = rollup[rollup["comparison"] == "vs_other_emotion"].merge(
                selected, on=["model", "condition"]
            )
            specificity = others[SPECIFICITY_COLUMNS]
    control_ledger = inputs.stack("patching_statistics", "control_ledger.parquet", "model")
    maxima = inputs.stack("patching_statistics", "headline_maxima.parquet", "model")
    top_heads = inputs.stack("head_screening", "top_heads.parquet", "model")
    if top_heads is not None:
        top_heads = (top_heads[top_heads["rank"] <= TOP_HEADS_SHOWN]
                     .sort_values(["model", "emotion", "selected_on", "rank"])
                     [["model", "emotion", "label", "rank", "layer", "head", "selection_effect",
                       "held_out_effect", "held_out_ci_low", "held_out_ci_high", "n_held_out"]])  # fmt: skip
    circuits = inputs.stack("emotion_circuits", "summary.parquet", "model")
    alignment = _alignment_summaries(inputs)
    chosen_k = inputs.stack("k_selection", "chosen_k.parquet", "pair")
    dataset = inputs.read("emotion_dataset", "surface.parquet")
    if dataset is not None and "register" in dataset:
        dataset = dataset[dataset["register"] == "all"]
    timings = profile_timings(context.instance, profile.name)
    slowest = None
    if not timings.empty:
        slowest = (timings.groupby(["model", "asset"], as_index=False)["elapsed_s"].max()
                   .sort_values("elapsed_s", ascending=False).head(10))  # fmt: skip
    header = f"# Findings — profile `{profile.name}`\n\n{html.escape(profile.description)}\n"
    sections = [
        *_confound_sections(inputs),
        Section("alignment-controls", section_markdown("Alignment controls", alignment_control_table(inputs),
                "The headline pair beside its random-weight twin (negative control: same pair position, "
                "should sit at the null) and the rotated twin (positive control: should align near 1).")),
        Section("corrected-effects", section_markdown("Corrected effects at a glance", by_model,
                "Per model, source and comparison: comparisons declared, and how many survive BH-FDR "
                "(q < 0.05) and Bonferroni (p < 0.05) across the model's whole family (every source × "
                "comparison × emotion × metric × condition).")),
        Section("control-ledger", section_markdown("What the controls changed", control_ledger,
                "The same generations and screening scores read twice. Uncontrolled: Student t (p = 0 for "
                "constant shifts), isotropic and covariance-matched random directions pooled into one control, "
                "no comparison with the other emotions' vectors, no fluency bound, top heads tested on the "
                "prompts that chose them. Controlled: this study's family and rules. Comparison counts differ "
                "because the controls add comparisons; the cell and head rows compare like with like.")
                + section_markdown("Headline maxima: grid maximum vs selected and confirmed", maxima,
                "uncontrolled_cell / uncontrolled_shift: the largest intended shift of the target score over "
                "the whole grid, chosen and reported on every prompt, fluent or not. controlled_cell: the best "
                "fluent cell chosen on half A (selection_shift), confirmed_shift and its CI measured on half "
                "B.", 3)),
        Section("evaluator-quality", section_markdown("Evaluator quality (eval split)",
                                              inputs.read("evaluator_quality", "quality.parquet"))),
        Section("dataset", section_markdown("Dataset surface balance (all registers)", dataset,
                "Per class: share of prompts with each surface feature; the dataset check refuses an "
                "imbalance beyond the profile's thresholds.")),
        Section("linear-decodability", section_markdown("Linear decodability (best held-out probe per model)", best_probe)),
        Section("representations", "## Representations: residual norms, subspaces, vector cosines\n\n"
                "Residual norm per layer, explained variance of the emotion subspaces and the cosines between "
                "emotion vectors, per model.\n"),
        Section("steering", section_markdown(
            "Steering: best fluent layer and α per emotion (selected on half A, confirmed on half B)", steering,
            "The (layer, α) with the largest shift of the emotion's own score among fluent cells "
            "(perplexity ratio and share of degenerate continuations within the profile's bounds), "
            "chosen on half A of the steering prompts (selection_shift); target_shift, its CI and p "
            "are measured on half B only, next to the mean shift of the isotropic and "
            "covariance-matched random directions at the same layer and α, the share of prompts "
            "moved the intended and the opposite way, and the cell's fluency on half B.")),
        Section("steering-specificity", section_markdown(
            "Steering specificity: the selected cell against the other emotions' vectors", specificity,
            "The selected cell of each emotion against each other emotion's vector at the same layer and α "
            "(same norm), on the first emotion's own target score, paired per prompt over every steering "
            "prompt; p_bh is corrected across the model's whole family.")),
        Section("random-controls", section_markdown(
            "Emotion vectors vs random directions surviving BH-FDR (q < 0.05)", survivors,
            "Paired per unique prompt, each random kind (isotropic, covariance-matched) on its own; "
            "the family is every metric × condition of a model and profile.")),
        Section("top-heads", section_markdown(f"Attention heads: top {TOP_HEADS_SHOWN} per emotion by ablation effect",
            top_heads,
            "Cross-fitted: heads selected on one half of the prompts (label), reported on the other. "
            "selection_effect: the mean change of the emotion readout (final boundary, last token) "
            "when the head's output is zeroed, on the selecting half (a maximum, biased away from "
            "0); held_out_effect and its bootstrap CI: the same on the held-out half, the estimate "
            "to read.")),
        Section("head-patching", section_markdown("Head patching: top heads vs random-head controls", head_effects,
            "vs_random_heads: the joint top-N intervention against the mean of random-head sets of "
            "the same size, mode and direction, paired per prompt, on the emotion's target score "
            "(effect_size = d_z). emotion_vs_neutral_prompts: the unintervened gap between emotion "
            "and neutral prompts (unpaired, Welch t; effect_size = Hedges' g).")),
        Section("circuits", section_markdown("Circuits (top heads: roles, OV/QK readouts, joint vs summed effects)",
            circuits,
            "roles: reader / mover / writer heuristic of docs/science.md; mean_ov_cosine_own: cosine "
            "between what the heads write and the emotion direction; ratio_*: joint effect of the "
            "heads (and MLPs) over the sum of single-head effects.")),
        Section("alignment", section_markdown("Cross-model alignment (best layer pair and k per method and emotion)",
            alignment,
            "Overlap = mean cos² of principal angles; chance = k/d; null = random subspaces through "
            "the same map; margin = overlap − null p95, the ranking criterion. The token-embedding "
            "boundary (0) is excluded: there any two models that read the same words align (see the "
            "random-weight twin).")),
        Section("k-selection", section_markdown("k-selection", chosen_k)),
        Section("slowest-phases", section_markdown("Slowest phases", slowest)),
    ]  # fmt: skip
    return header, sections
