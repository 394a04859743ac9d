"""Phase 2: pooled residual-stream activations at every block boundary, per prompt."""

import dagster as dg
import pandas as pd
import torch

from emotion_assets.common import (
    RunConfig,
    all_emotion_words,
    check_layers_exist,
    effective_profile,
    limit_for_run,
    load_dataset,
    recorded,
)
from emotion_assets.dataset import emotion_dataset
from emotion_assets.partitions import model_and_profile, model_profile_partitions, profile_to_model_profile
from emotion_assets.plots import line_plot, save_figure
from emotion_assets.profiles import Profile
from jobs.jobs import REPRESENTATION_GROUP
from resources.models import ModelHandle, ModelResource
from resources.storage import ArtifactStore, read_table, read_tensors, write_table, write_tensors
from resources.tracking import TrackingResource

ACTIVATIONS_FILE = "activations.safetensors"
INDEX_FILE = "index.parquet"


def capture_boundaries(profile: Profile, handle: ModelHandle) -> list[int]:
    """The profile's boundaries plus, for causal LMs, every steered layer (vectors are read where added)."""
    chosen = set(profile.boundaries(handle.geometry.n_layers))
    if handle.spec.can_generate:
        chosen |= {layer for layer in profile.steering.layers if layer < handle.geometry.n_layers}
    return sorted(chosen)


def load_activations(
    store: ArtifactStore, profile: str, model: str
) -> tuple[dict[str, torch.Tensor], pd.DataFrame, list[int]]:
    """``({strategy: [n, n_boundaries, d_model]}, index, boundaries)`` written by ``activations``."""
    folder = store.existing(profile, "activations", model)
    tensors = read_tensors(folder / ACTIVATIONS_FILE)
    boundaries = tensors.pop("boundaries").tolist()
    return tensors, read_table(folder / INDEX_FILE), boundaries


@dg.asset(
    partitions_def=model_profile_partitions,
    group_name=REPRESENTATION_GROUP,
    deps=[dg.AssetDep(emotion_dataset, partition_mapping=profile_to_model_profile)],
    kinds={"pytorch", "safetensors"},
    code_version="1",
    pool="model",
    description="Residual stream at every block boundary (resid_pre of each block + final pre-norm), pooled "
    "per prompt over real tokens: last, mean, emotion_tokens. [n_prompts, n_boundaries, d_model] per strategy.",
)
def activations(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
) -> dg.MaterializeResult:
    model_name, profile_name = model_and_profile(context)
    profile = effective_profile(profile_name, config)
    handle = models.get(model_name, device=config.device)
    check_layers_exist(config.layers, handle.geometry.n_layers, model_name)
    if config.n_jobs > 1:
        torch.set_num_threads(config.n_jobs)
    prompts = limit_for_run(load_dataset(store, profile_name), profile)
    boundaries = capture_boundaries(profile, handle)
    with recorded(
        context,
        tracking=tracking,
        store=store,
        phase="2-activations",
        model=model_name,
        profile=profile,
        device=str(handle.device),
        config=config,
        throughput_unit="tokens",
    ) as rec:
        result = handle.extract(
            prompts["text"].tolist(),
            boundaries=boundaries,
            strategies=profile.pooling,
            emotion_words=all_emotion_words(),
            batch_size=profile.batch_size,
        )
        rec.timing.samples = int(result.n_tokens.sum())

        out = store.directory(profile_name, "activations", model_name)

        rec.artifacts(out)
        tensors = {**result.pooled, "boundaries": torch.tensor(boundaries, dtype=torch.int64)}
        write_tensors(
            out / ACTIVATIONS_FILE, tensors, metadata={"boundary_names": ",".join(result.boundary_names)}
        )
        index = prompts[["id", "emotion", "split", "register"]].copy()
        index["n_tokens"] = result.n_tokens.numpy()
        index["emotion_token_fallback"] = result.emotion_fallback.numpy()
        write_table(out / INDEX_FILE, index)

        reference = result.pooled[profile.pooling[0]]  # [n, n_boundaries, d_model]
        norms = pd.DataFrame(
            {"boundary": boundaries, "mean_residual_norm": reference.norm(dim=-1).mean(dim=0).numpy()}
        )
        write_table(out / "residual_norms.parquet", norms)
        plot = save_figure(
            line_plot(
                norms,
                "boundary",
                "mean_residual_norm",
                None,
                f"{model_name}: mean residual norm ({profile.pooling[0]} pooling)",
                "‖resid‖",
            ),
            out / "residual_norm_by_layer.png",
        )
        n_bytes = sum(t.numel() * t.element_size() for t in result.pooled.values())
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out / ACTIVATIONS_FILE)),
            "shape": dg.MetadataValue.text(str(list(reference.shape)) + " per strategy"),
            "strategies": dg.MetadataValue.json(list(result.pooled)),
            "boundaries": dg.MetadataValue.json(boundaries),
            "boundary_names": dg.MetadataValue.json(result.boundary_names),
            "bytes": dg.MetadataValue.int(n_bytes),
            "dg.row_count": dg.MetadataValue.int(len(index)),
            "tokens_per_s": dg.MetadataValue.float(round(rec.timing.throughput_per_s, 1)),
            "emotion_token_fallbacks": dg.MetadataValue.int(int(index["emotion_token_fallback"].sum())),
            "residual_norm_by_layer": plot,
            **rec.metadata(),
        }
    )


@dg.asset_check(
    asset=activations,
    blocking=True,
    description="Every pooled activation is finite and the index matches the tensors row for row.",
)
def activations_finite(context: dg.AssetCheckExecutionContext, store: ArtifactStore) -> dg.AssetCheckResult:
    model_name, profile_name = model_and_profile(context)
    tensors, index, boundaries = load_activations(store, profile_name, model_name)
    non_finite = {s: int((~torch.isfinite(t)).sum()) for s, t in tensors.items()}
    rows_match = all(t.shape[0] == len(index) and t.shape[1] == len(boundaries) for t in tensors.values())
    return dg.AssetCheckResult(
        passed=rows_match and not any(non_finite.values()),
        metadata={"non_finite_values": non_finite, "rows_match_index": rows_match},
    )
