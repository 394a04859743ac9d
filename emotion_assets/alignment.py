"""Phase 4: cross-model alignment of emotion subspaces (model A → model B) with null controls."""

import dagster as dg
import numpy as np
import pandas as pd

from emotion_assets.activations import activations
from emotion_assets.automation import config_deps
from emotion_assets.common import RunConfig, effective_profile, json_metadata, recorded
from emotion_assets.confounds import confound_audit
from emotion_assets.io import SWEEP_FILE, ArtifactHandle, ArtifactHandles, activations_of, audit_flags
from emotion_assets.partitions import REGISTRY, pair_and_profile, pair_profile_partitions
from emotion_assets.plots import heatmap, markdown_table, overlap_vs_k_plot, save_figure, specificity_heatmap
from emotion_assets.science.alignment import (
    alignment_rows,
    alignment_summary,
    beyond_embeddings,
    cka_matrix,
    headline_row,
    layer_pair_sweep,
    match_layers_by_depth,
    paired_rows,
    rows_at,
)
from emotion_assets.science.parallel import map_in_processes
from emotion_assets.science.prompts import NEUTRAL
from jobs.jobs import ALIGNMENT_GROUP
from resources.storage import ArtifactStore, reader_path, write_table
from resources.tracking import TrackingResource


def _pair_mapping() -> dg.MultiPartitionMapping:
    """model × profile upstream → model_pair × profile downstream: each pair reads both of its models."""
    pairs_of: dict[str, set[str]] = {name: set() for name in REGISTRY.names}
    for a, b in REGISTRY.pairs:
        key = f"{a}__{b}"
        pairs_of[a].add(key)
        pairs_of[b].add(key)
    return dg.MultiPartitionMapping(
        {
            "model": dg.DimensionPartitionMapping(
                dimension_name="model_pair",
                partition_mapping=dg.StaticPartitionMapping({m: p for m, p in pairs_of.items() if p}),
            ),
            "profile": dg.DimensionPartitionMapping(
                dimension_name="profile", partition_mapping=dg.IdentityPartitionMapping()
            ),
        }
    )


PAIR_KEYS = ["layer_a", "layer_b", "method", "k"]


@dg.asset(
    partitions_def=pair_profile_partitions,
    deps=config_deps("subspace_alignment", pair_profile_partitions),
    group_name=ALIGNMENT_GROUP,
    ins={
        "activations": dg.AssetIn(activations.key, partition_mapping=_pair_mapping()),
        "audits": dg.AssetIn(confound_audit.key, partition_mapping=_pair_mapping()),
    },
    kinds={"numpy"},
    code_version="4",
    description="Linear maps A → B fit on paired neutral train activations (ridge, Procrustes in a shared "
    "PCA basis; fitting prompts only, each pooled view in `alignment.anchor_poolings`); per layer pair, emotion and k: subspace overlap after (and before) the "
    "map, chance k/d, a null band from random subspaces through the same map, held-out R², layer × layer "
    "linear CKA, and the emotion × emotion overlap matrix with a cross-fitted specificity score and its "
    "bootstrap CI. A headline row must beat the null AND be emotion-specific.",
)
def subspace_alignment(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    store: ArtifactStore,
    tracking: TrackingResource,
    activations: ArtifactHandles,
    audits: ArtifactHandles,
) -> dg.MaterializeResult:
    model_a, model_b, profile_name = pair_and_profile(context)
    profile = effective_profile(profile_name, config)
    pooled_a, index_a, bounds_a = activations_of(activations[model_a])
    pooled_b, index_b, bounds_b = activations_of(activations[model_b])
    strategy = profile.pooling[0]
    row_a, row_b, joined = paired_rows(index_a, index_b)
    settings = profile.alignment
    views_a = {p: pooled_a[p][row_a].double().numpy() for p in {strategy, *settings.anchor_poolings}}
    views_b = {p: pooled_b[p][row_b].double().numpy() for p in {strategy, *settings.anchor_poolings}}
    x_a, x_b = views_a[strategy], views_b[strategy]  # [n, L_a, d_a], [n, L_b, d_b]: the emotion subspaces
    rows = alignment_rows(joined, neutral=NEUTRAL)  # steering-only prompts never fit a map or subspace
    spec_a, spec_b = REGISTRY.get(model_a), REGISTRY.get(model_b)
    layer_pairs = match_layers_by_depth(bounds_a, spec_a.layers, bounds_b, spec_b.layers)
    with recorded(
        context, tracking=tracking, store=store, phase="4-alignment", model=f"{model_a}__{model_b}",
        profile=profile, device="cpu", config=config, throughput_unit="layer_pairs",
    ) as rec:  # fmt: skip
        tables: dict[str, list[pd.DataFrame]] = {"overlaps": [], "matrix": [], "specificity": []}
        skipped: dict[str, str] = {}
        fitted: list[tuple[int, int]] = []
        tasks: list[dict] = []
        for layer_a, layer_b in layer_pairs:
            ia, ib = bounds_a.index(layer_a), bounds_b.index(layer_b)
            constant = [
                side
                for side, x in ((f"{model_a} boundary {layer_a}", x_a[:, ia]), (f"{model_b} boundary {layer_b}", x_b[:, ib]))
                if not np.ptp(x[rows.neutral_train], axis=0).any()
            ]  # fmt: skip
            if constant:
                # e.g. `last` pooling at the embeddings when every neutral prompt ends in the same token: the
                # activations carry no information, so no map can be fit there.
                skipped[f"{layer_a}->{layer_b}"] = f"constant neutral activations at {', '.join(constant)}"
                continue
            fitted.append((layer_a, layer_b))
            tasks.append(dict(
                x_a=x_a[:, ia], x_b=x_b[:, ib], rows=rows,
                anchor_views=[(views_a[p][:, ia], views_b[p][:, ib]) for p in settings.anchor_poolings],
                k_max=profile.k_max, methods=settings.methods, r=settings.procrustes_rank, n_null=settings.n_null,
                n_boot=settings.n_boot, seed=profile.seed, ridge_alpha=settings.ridge_alpha,
                min_specificity=settings.min_specificity,
            ))  # fmt: skip
        for (layer_a, layer_b), result in zip(
            fitted, map_in_processes(layer_pair_sweep, tasks, profile.cpu_workers), strict=True
        ):
            for name in tables:
                table = getattr(result, name)
                table.insert(0, "layer_b", layer_b)
                table.insert(0, "layer_a", layer_a)
                table.insert(0, "depth", layer_a / spec_a.layers)
                table.insert(0, "strategy", strategy)
                tables[name].append(table)
        if not tables["overlaps"]:
            raise ValueError(
                f"No layer pair of {model_a} → {model_b} can be aligned: {skipped}. Give the profile `layers` "
                "past the token embeddings (data/profiles.yaml)."
            )
        sweep, matrix, specificity = (pd.concat(tables[n], ignore_index=True) for n in tables)
        train = rows.neutral_train | np.logical_or.reduce(list(rows.emotion_train.values()))
        cka = cka_matrix(x_a[train], x_b[train])  # [L_a, L_b]
        cka_table = pd.DataFrame(cka, index=bounds_a, columns=[str(b) for b in bounds_b]).reset_index(
            names="layer_a"
        )
        rec.timing.samples = len(layer_pairs)

        out = store.directory(profile_name, "subspace_alignment", f"{model_a}__{model_b}")
        rec.artifacts(out)
        write_table(out / SWEEP_FILE, sweep, csv=True)
        write_table(out / "specificity_matrix.parquet", matrix, csv=True)
        write_table(out / "specificity.parquet", specificity, csv=True)
        write_table(out / "cka_matrix.parquet", cka_table, csv=True)
        inner = beyond_embeddings(sweep).assign(margin=lambda f: f["overlap"] - f["null_p95"])
        best = headline_row(sweep)
        # Without a headline row the largest-margin row is shown for inspection only, labelled as such.
        shown = best if best is not None else inner.loc[inner["margin"].idxmax()]
        summary = alignment_summary(sweep)
        write_table(out / "summary.parquet", summary, csv=True)
        pair_spec = rows_at(specificity, shown, ["layer_a", "layer_b"])
        cell = rows_at(pair_spec, shown, ["method", "k"]).iloc[0]
        grid = rows_at(matrix, shown, PAIR_KEYS).pivot(index="emotion_a", columns="emotion_b",
                                                        values="overlap_crossfit")  # fmt: skip
        where = (f"{model_a} {int(shown['layer_a'])} → {model_b} {int(shown['layer_b'])}, {shown['method']}, "
                 f"k={int(shown['k'])} ({'headline' if best is not None else 'largest margin, NOT a finding'})")  # fmt: skip
        plots = {
            "cka_heatmap": save_figure(
                heatmap(cka, bounds_a, bounds_b, f"Linear CKA {model_a} vs {model_b} (train prompts)",
                        f"{model_b} boundary", f"{model_a} boundary", center=False),
                out / "cka_heatmap.png",
            ),
            "overlap_vs_k": save_figure(
                overlap_vs_k_plot(sweep, int(shown["layer_a"]), model_a, model_b), out / "overlap_vs_k.png"
            ),
            "specificity_heatmap": save_figure(
                specificity_heatmap(grid, where, model_a, model_b), out / "specificity_heatmap.png"
            ),
        }  # fmt: skip
        n_headline = int(sweep["headline_beats_null"].sum())
        # The audit's word on each side's emotion vectors at the shown layer pair.
        flags = {
            model: audit_flags(audits[model], strategy, [int(shown[column])])
            for model, column in ((model_a, "layer_a"), (model_b, "layer_b"))
        }
        best_metrics = (
            {}
            if best is None
            else {f"best_{c}": float(best[c]) for c in ("overlap", "null_p95", "r2_heldout")}
        )
        rec.metrics(fraction_beats_null=float(sweep["beats_null"].mean()), n_headline_rows=n_headline,
                    shown_specificity=float(cell["specificity"]), **best_metrics)  # fmt: skip
    spec_columns = ["method", "k", "specificity", "lo", "hi", "specific", "diagonal_mean", "off_diagonal_mean",
                    "same_prompts_specificity", "chance"]  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / "alignment_sweep.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(sweep)),
            "layer_pairs": dg.MetadataValue.json([list(p) for p in layer_pairs]),
            "anchor_poolings": dg.MetadataValue.json(list(settings.anchor_poolings)),
            "skipped_layer_pairs": dg.MetadataValue.json(skipped),
            "confound_flags": json_metadata(flags),
            "n_headline_rows": dg.MetadataValue.int(n_headline),
            **_headline_metadata(best, shown, cell),
            "fraction_beats_null": dg.MetadataValue.float(float(sweep["beats_null"].mean())),
            "fraction_specific": dg.MetadataValue.float(float(specificity["specific"].mean())),
            "specificity_layer_pair": dg.MetadataValue.json([int(shown["layer_a"]), int(shown["layer_b"])]),
            "specificity_table": markdown_table(pair_spec[spec_columns], max_rows=40),
            "specificity_rule": dg.MetadataValue.text(
                "specificity = mean diagonal − mean off-diagonal of the emotion × emotion overlap matrix, "
                "cross-fitted (A on one half of each emotion's train prompts, B on the other, both ways); 95 % "
                "CI = 2.5/97.5 percentiles over bootstrap resamples of the halves (map fixed); specific when "
                "the CI lies above 0. headline_beats_null = beats_null AND specific."
            ),
            "summary": markdown_table(summary),
            **plots,
            **rec.metadata(),
        }
    )


def _headline_metadata(
    best: pd.Series | None, shown: pd.Series, cell: pd.Series
) -> dict[str, dg.MetadataValue]:
    """``headline`` text plus ``best_*`` entries, or, when no row qualifies, a plain statement and the
    largest-margin row as ``shown_*`` (for inspection, not a finding). ``cell``: the row's specificity."""
    ci = dg.MetadataValue.json([float(cell["lo"]), float(cell["hi"])])
    if best is None:
        return {
            "headline": dg.MetadataValue.text(
                "No row qualifies as a headline: no (layer pair past the embeddings, method, k, emotion) both "
                "beats the null band and has an emotion-specificity CI above 0. The `shown_*` entries and plots "
                f"are the largest-margin row ({shown['method']}, layer {int(shown['layer_a'])} → "
                f"{int(shown['layer_b'])}, k={int(shown['k'])}, {shown['emotion']}), for inspection only."
            ),
            "shown_overlap": dg.MetadataValue.float(float(shown["overlap"])),
            "shown_null_p95": dg.MetadataValue.float(float(shown["null_p95"])),
            "shown_specificity": dg.MetadataValue.float(float(cell["specificity"])),
            "shown_specificity_ci": ci,
        }
    return {
        "headline": dg.MetadataValue.text(
            f"{best['emotion']}: {best['method']}, layer {int(best['layer_a'])} → {int(best['layer_b'])}, "
            f"k={int(best['k'])}: overlap {best['overlap']:.3f} vs null p95 {best['null_p95']:.3f} "
            f"(chance {best['chance']:.3f}); specificity {cell['specificity']:.3f} "
            f"[{cell['lo']:.3f}, {cell['hi']:.3f}] (95 % bootstrap CI)."
        ),
        "best_layer_a": dg.MetadataValue.int(int(best["layer_a"])),
        "best_layer_b": dg.MetadataValue.int(int(best["layer_b"])),
        "best_k": dg.MetadataValue.int(int(best["k"])),
        "best_method": dg.MetadataValue.text(str(best["method"])),
        "best_emotion": dg.MetadataValue.text(str(best["emotion"])),
        "best_overlap": dg.MetadataValue.float(float(best["overlap"])),
        "best_null_p95": dg.MetadataValue.float(float(best["null_p95"])),
        "best_chance": dg.MetadataValue.float(float(best["chance"])),
        "best_r2_heldout": dg.MetadataValue.float(float(best["r2_heldout"])),
        "best_specificity": dg.MetadataValue.float(float(cell["specificity"])),
        "best_specificity_ci": ci,
    }


@dg.asset_check(
    asset=subspace_alignment,
    description="Overlaps and chance levels lie in [0, 1]; the emotion × emotion matrix's diagonal equals the "
    "per-emotion overlap; every specificity lies in [−1, 1] with lo ≤ hi.",
)
def subspace_alignment_ranges(subspace_alignment: ArtifactHandle) -> dg.AssetCheckResult:
    sweep = subspace_alignment.table(SWEEP_FILE)
    matrix = subspace_alignment.table("specificity_matrix.parquet")
    specificity = subspace_alignment.table("specificity.parquet")
    columns = ["overlap", "chance", "null_mean", "null_p95"]
    bad = int(((sweep[columns] < -1e-9) | (sweep[columns] > 1 + 1e-9)).sum().sum())
    cells = matrix[["overlap", "overlap_crossfit"]]
    bad_matrix = int(((cells < -1e-9) | (cells > 1 + 1e-9)).sum().sum())
    diagonal = matrix[matrix["emotion_a"] == matrix["emotion_b"]].merge(
        sweep, left_on=[*PAIR_KEYS, "emotion_a"], right_on=[*PAIR_KEYS, "emotion"], suffixes=("", "_sweep")
    )
    diagonal_gap = float((diagonal["overlap"] - diagonal["overlap_sweep"]).abs().max())
    scored = specificity.dropna(subset=["specificity", "lo", "hi"])
    bad_specificity = int(
        (~scored["specificity"].between(-1 - 1e-9, 1 + 1e-9) | (scored["lo"] > scored["hi"] + 1e-12)).sum()
    )
    passed = bad == 0 and bad_matrix == 0 and diagonal_gap < 1e-9 and bad_specificity == 0
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "out_of_range_values": bad, "out_of_range_matrix_values": bad_matrix,
            "max_diagonal_gap": diagonal_gap, "bad_specificity_rows": bad_specificity, "rows": len(sweep),
        },
    )  # fmt: skip
