"""Phase 4: cross-model alignment of emotion subspaces (model A → model B) with null controls."""

import dagster as dg
import numpy as np
import pandas as pd

from emotion_assets.activations import activations, load_activations
from emotion_assets.common import RunConfig, effective_profile, recorded
from emotion_assets.partitions import REGISTRY, pair_and_profile, pair_profile_partitions
from emotion_assets.plots import heatmap, markdown_table, save_figure
from emotion_assets.science.alignment import alignment_sweep, cka_matrix, match_layers_by_depth
from jobs.jobs import ALIGNMENT_GROUP
from resources.storage import ArtifactStore, read_table, write_table
from resources.tracking import TrackingResource

NEUTRAL = "neutral"


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


def beyond_embeddings(sweep: pd.DataFrame) -> pd.DataFrame:
    """Rows of an alignment sweep whose boundaries are both past the token embeddings (layer > 0).

    At boundary 0 a representation is a function of token identities alone, so any two models that read
    the same words align there (on ``baseline`` the random-weight twin reaches cos² ≈ 0.99 at k = 1). That
    is lexical overlap, not learned emotion structure, so "best layer" choices skip it.
    """
    inner = sweep[(sweep["layer_a"] > 0) & (sweep["layer_b"] > 0)]
    if inner.empty:
        raise ValueError(
            "The alignment sweep has no layer pair past the token embeddings (boundary 0); give the profile "
            "`layers` that include a boundary > 0 for both models (data/profiles.yaml)."
        )
    return inner


def paired_rows(index_a: pd.DataFrame, index_b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Row positions of the prompts both models saw, in the same order (joined on prompt id)."""
    a = index_a.reset_index(names="row_a")
    b = index_b.reset_index(names="row_b")[["id", "row_b"]]
    joined = a.merge(b, on="id", how="inner").sort_values("row_a")
    if joined.empty:
        raise ValueError("The two models share no prompt ids: materialize both on the same dataset.")
    return joined["row_a"].to_numpy(), joined["row_b"].to_numpy(), joined


@dg.asset(
    partitions_def=pair_profile_partitions,
    group_name=ALIGNMENT_GROUP,
    deps=[dg.AssetDep(activations, partition_mapping=_pair_mapping())],
    kinds={"numpy"},
    code_version="1",
    description="Linear maps A → B fit on paired neutral train activations (ridge, Procrustes in a shared "
    "PCA basis); per layer pair, emotion and k: subspace overlap after (and before) the map, chance k/d, "
    "a null band from random subspaces through the same map, held-out R², and layer × layer linear CKA.",
)
def subspace_alignment(
    context: dg.AssetExecutionContext, config: RunConfig, store: ArtifactStore, tracking: TrackingResource
) -> dg.MaterializeResult:
    model_a, model_b, profile_name = pair_and_profile(context)
    profile = effective_profile(profile_name, config)
    pooled_a, index_a, bounds_a = load_activations(store, profile_name, model_a)
    pooled_b, index_b, bounds_b = load_activations(store, profile_name, model_b)
    strategy = profile.pooling[0]
    rows_a, rows_b, joined = paired_rows(index_a, index_b)
    x_a = pooled_a[strategy][rows_a].double().numpy()  # [n, L_a, d_a]
    x_b = pooled_b[strategy][rows_b].double().numpy()  # [n, L_b, d_b]
    emotion = joined["emotion"].to_numpy()
    train = (joined["split"] == "train").to_numpy()
    neutral_train = train & (emotion == NEUTRAL)
    neutral_eval = (joined["split"] == "eval").to_numpy() & (emotion == NEUTRAL)
    emotions = sorted(set(emotion) - {NEUTRAL})
    spec_a, spec_b = REGISTRY.get(model_a), REGISTRY.get(model_b)
    layer_pairs = match_layers_by_depth(bounds_a, spec_a.layers, bounds_b, spec_b.layers)
    settings = profile.alignment
    with recorded(
        context, tracking=tracking, store=store, phase="4-alignment", model=f"{model_a}__{model_b}",
        profile=profile, device="cpu", config=config, throughput_unit="layer_pairs",
    ) as rec:  # fmt: skip
        tables = []
        for layer_a, layer_b in layer_pairs:
            ia, ib = bounds_a.index(layer_a), bounds_b.index(layer_b)
            table = alignment_sweep(
                x_a[neutral_train, ia], x_b[neutral_train, ib], x_a[neutral_eval, ia], x_b[neutral_eval, ib],
                {e: x_a[train & (emotion == e), ia] for e in emotions},
                {e: x_b[train & (emotion == e), ib] for e in emotions},
                x_a[neutral_train, ia].mean(axis=0), x_b[neutral_train, ib].mean(axis=0),
                k_max=profile.k_max, methods=settings.methods, r=settings.procrustes_rank,
                n_null=settings.n_null, n_boot=settings.n_boot, seed=profile.seed,
                ridge_alpha=settings.ridge_alpha,
            )  # fmt: skip
            table.insert(0, "layer_b", layer_b)
            table.insert(0, "layer_a", layer_a)
            table.insert(0, "depth", layer_a / spec_a.layers)
            tables.append(table)
        sweep = pd.concat(tables, ignore_index=True)
        sweep.insert(0, "strategy", strategy)
        cka = cka_matrix(x_a[train], x_b[train])  # [L_a, L_b]
        cka_table = pd.DataFrame(cka, index=bounds_a, columns=[str(b) for b in bounds_b]).reset_index(
            names="layer_a"
        )
        rec.timing.samples = len(layer_pairs)

        out = store.directory(profile_name, "subspace_alignment", f"{model_a}__{model_b}")
        rec.artifacts(out)
        write_table(out / "alignment_sweep.parquet", sweep, csv=True)
        write_table(out / "cka_matrix.parquet", cka_table, csv=True)
        inner = beyond_embeddings(sweep).assign(margin=lambda f: f["overlap"] - f["null_p95"])
        best = inner.loc[inner["margin"].idxmax()]
        summary = (
            inner.sort_values("margin", ascending=False)
            .groupby(["method", "emotion"], as_index=False)
            .first()[["method", "emotion", "layer_a", "layer_b", "k", "overlap", "null_p95", "margin", "chance",
                      "null_mean", "overlap_before", "beats_null", "r2_heldout"]]
        )  # fmt: skip
        write_table(out / "summary.parquet", summary, csv=True)
        cka_plot = save_figure(
            heatmap(cka, bounds_a, bounds_b, f"Linear CKA {model_a} vs {model_b} (train prompts)",
                    f"{model_b} boundary", f"{model_a} boundary", center=False),
            out / "cka_heatmap.png",
        )  # fmt: skip
        curve_plot = save_figure(
            _overlap_vs_k(sweep, int(best["layer_a"]), model_a, model_b), out / "overlap_vs_k.png"
        )
        rec.metrics(
            best_overlap=float(best["overlap"]), best_null_p95=float(best["null_p95"]),
            best_r2_heldout=float(best["r2_heldout"]), fraction_beats_null=float(sweep["beats_null"].mean()),
        )  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out / "alignment_sweep.parquet")),
            "dg.row_count": dg.MetadataValue.int(len(sweep)),
            "layer_pairs": dg.MetadataValue.json([list(p) for p in layer_pairs]),
            "best_layer_a": dg.MetadataValue.int(int(best["layer_a"])),
            "best_k": dg.MetadataValue.int(int(best["k"])),
            "best_method": dg.MetadataValue.text(str(best["method"])),
            "best_overlap": dg.MetadataValue.float(float(best["overlap"])),
            "best_null_p95": dg.MetadataValue.float(float(best["null_p95"])),
            "best_chance": dg.MetadataValue.float(float(best["chance"])),
            "best_r2_heldout": dg.MetadataValue.float(float(best["r2_heldout"])),
            "fraction_beats_null": dg.MetadataValue.float(float(sweep["beats_null"].mean())),
            "summary": markdown_table(summary),
            "cka_heatmap": cka_plot,
            "overlap_vs_k": curve_plot,
            **rec.metadata(),
        }
    )


def _overlap_vs_k(sweep: pd.DataFrame, layer_a: int, model_a: str, model_b: str):
    import matplotlib.pyplot as plt

    at_layer = sweep[sweep["layer_a"] == layer_a]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for (method, emotion), group in at_layer.groupby(["method", "emotion"]):
        ax.plot(group["k"], group["overlap"], marker="o", ms=3, label=f"{method} · {emotion}")
    null = at_layer.groupby("k")[["null_mean", "null_p95", "chance"]].mean().reset_index()
    ax.fill_between(null["k"], 0, null["null_p95"], color="grey", alpha=0.25, label="null (≤ p95)")
    ax.plot(null["k"], null["chance"], color="black", ls=":", lw=1, label="chance k/d")
    ax.set_xlabel("k")
    ax.set_ylabel("overlap (mean cos²)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{model_a} → {model_b}, A boundary {layer_a}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig


@dg.asset_check(asset=subspace_alignment, description="Overlaps and chance levels lie in [0, 1].")
def subspace_alignment_ranges(
    context: dg.AssetCheckExecutionContext, store: ArtifactStore
) -> dg.AssetCheckResult:
    keys = context.partition_key.keys_by_dimension  # type: ignore[union-attr]
    sweep = read_table(
        store.existing(keys["profile"], "subspace_alignment", keys["model_pair"]) / "alignment_sweep.parquet"
    )
    columns = ["overlap", "chance", "null_mean", "null_p95"]
    bad = int(((sweep[columns] < -1e-9) | (sweep[columns] > 1 + 1e-9)).sum().sum())
    return dg.AssetCheckResult(passed=bad == 0, metadata={"out_of_range_values": bad, "rows": len(sweep)})
