"""Phase 2: pooled residual-stream activations at every block boundary, per prompt."""

import dagster as dg
import torch

from emotion_assets.automation import config_deps
from emotion_assets.common import (
    RunConfig,
    all_emotion_words,
    check_layers_exist,
    refuse_failing_checks,
)
from emotion_assets.context import Phase
from emotion_assets.dataset import emotion_dataset
from emotion_assets.io import (
    ACTIVATIONS_FILE,
    INDEX_FILE,
    RESIDUAL_NORMS_FILE,
    SINKS_FILE,
    ArtifactHandle,
    activations_of,
)
from emotion_assets.partitions import model_profile_partitions, profile_to_model_profile
from emotion_assets.plots import line_plot, markdown_table, save_figure
from emotion_assets.profiles import Profile, ProfileError, profiles_path
from emotion_assets.science.prompts import ROLE_FIT, fitting_mask
from emotion_assets.science.residual import PooledActivations, residual_norm_table, sink_exclusion_table
from jobs.jobs import REPRESENTATION_GROUP
from resources.models import ModelHandle, ModelResource
from resources.storage import ArtifactStore, reader_path, write_table, write_tensors
from resources.tracking import TrackingResource


def capture_boundaries(profile: Profile, handle: ModelHandle) -> list[int]:
    """The profile's boundaries plus, for causal LMs, every steered layer (vectors are read where added).

    A steered layer the model does not have is an error here, before anything is captured: steering adds
    to resid_pre of a block, so blocks 0..n_layers-1 can be steered.
    """
    n_layers = handle.geometry.n_layers
    chosen = set(profile.boundaries(n_layers))
    if handle.spec.can_generate:
        check_steering_layers(profile, handle.name, n_layers)
        chosen |= set(profile.steering.blocks(n_layers))
    return sorted(chosen)


def check_steering_layers(profile: Profile, model: str, n_layers: int) -> None:
    """Refuse ``steering.layers`` outside the model's blocks, naming them, the valid range and the field."""
    bad = sorted({layer for layer in profile.steering.blocks(n_layers) if not 0 <= layer < n_layers})
    if bad:
        raise ProfileError(
            f"Profile {profile.name!r} field steering.layers has {bad}, which {model} does not have: it has "
            f"{n_layers} blocks, so steerable layers (resid_pre of a block) are 0..{n_layers - 1}. Change "
            f"steering.layers in {profiles_path()} (or give relative depths, {{depths: [0.4, 0.6]}}), or run "
            f"{model} under a profile whose steering layers fit it."
        )


def extract_for_profile(
    handle: ModelHandle,
    texts: list[str],
    profile: Profile,
    boundaries: list[int],
    strategies: list[str],
    *,
    prompt_ids: list[str] | None = None,
    purpose: str,
) -> PooledActivations:
    """Pooled activations the way ``profile`` pools them (sink rules, token limit, batch size), so every pass
    over a model (the activations asset, the confound audit's counterfactual edits) reads the same way."""
    return handle.extract(
        texts,
        boundaries=boundaries,
        strategies=strategies,
        emotion_words=all_emotion_words(),
        batch_size=profile.batch_size,
        exclude_first=profile.sinks.exclude_first,
        norm_ratio=profile.sinks.norm_ratio,
        max_length=profile.max_prompt_tokens,
        prompt_ids=prompt_ids,
        length_setting=f"max_prompt_tokens of profile {profile.name!r} ({purpose})",
    )


@dg.asset(
    partitions_def=model_profile_partitions,
    deps=config_deps("activations", model_profile_partitions),
    group_name=REPRESENTATION_GROUP,
    ins={"dataset": dg.AssetIn(emotion_dataset.key, partition_mapping=profile_to_model_profile)},
    kinds={"pytorch", "safetensors"},
    code_version="2",
    pool="model",
    description="Residual stream at every block boundary (resid_pre of each block + final pre-norm), pooled "
    "per prompt over real tokens: last, mean, emotion_tokens (mean / emotion_tokens skip attention sinks: the "
    "first position and massive-norm tokens, recorded per boundary). [n_prompts, n_boundaries, d_model] per "
    "strategy; residual_norms = mean non-sink token norm of train fitting prompts (the steering α reference).",
)
def activations(
    context: dg.AssetExecutionContext,
    config: RunConfig,
    models: ModelResource,
    store: ArtifactStore,
    tracking: TrackingResource,
    dataset: ArtifactHandle,
) -> dg.MaterializeResult:
    phase = Phase.of(context, config, store=store, tracking=tracking, phase="2-activations", models=models)
    model_name, profile, handle = phase.model, phase.profile, phase.handle
    check_layers_exist(config.layers, handle.geometry.n_layers, model_name)
    prompts = phase.prompts(dataset)
    boundaries = capture_boundaries(profile, handle)
    with phase.recorded("tokens") as rec:
        result = extract_for_profile(
            handle,
            prompts["text"].tolist(),
            profile,
            boundaries,
            list(profile.pooling),
            prompt_ids=prompts["id"].astype(str).tolist(),
            purpose=f"tokens of {model_name}",
        )
        rec.timing.samples = int(result.n_tokens.sum())
        # The blocking check's logic runs on the staged tensors: failing activations are never published.
        refuse_failing_checks(
            "activations",
            str(context.partition_key),
            {"activations_finite": finite_check(result.pooled, len(prompts), len(boundaries))},
        )

        out = phase.directory("activations")

        rec.artifacts(out)
        boundary_tensor = torch.tensor(boundaries, dtype=torch.int64)
        tensors = {**result.pooled, "boundaries": boundary_tensor}
        write_tensors(
            out / ACTIVATIONS_FILE, tensors, metadata={"boundary_names": ",".join(result.boundary_names)}
        )
        write_tensors(
            out / SINKS_FILE,
            {
                "sink_excluded": result.sink_excluded,
                "token_norm": result.token_norm,
                "boundaries": boundary_tensor,
            },
            metadata={
                "exclude_first": str(profile.sinks.exclude_first),
                "norm_ratio": str(profile.sinks.norm_ratio),
            },
        )
        index = prompts[["id", "emotion", "split", "register"]].copy()
        index["role"] = prompts["role"].fillna(ROLE_FIT) if "role" in prompts else ROLE_FIT
        index["n_tokens"] = result.n_tokens.numpy()
        index["emotion_token_fallback"] = result.emotion_fallback.numpy()
        index["first_position_excluded"] = result.first_excluded.numpy()
        index["n_norm_sinks"] = result.norm_excluded.sum(dim=1).numpy()  # summed over boundaries
        index["mean_fallback_boundaries"] = result.mean_fallback.sum(dim=1).numpy()
        write_table(out / INDEX_FILE, index)

        sinks = sink_exclusion_table(result)
        write_table(out / "sink_exclusions.parquet", sinks, csv=True)
        reference_rows = (index["split"] == "train").to_numpy() & fitting_mask(index)
        norms = residual_norm_table(result, reference_rows, profile.pooling[0])
        write_table(out / RESIDUAL_NORMS_FILE, norms)
        plot = save_figure(
            line_plot(
                norms.melt("boundary", ["mean_residual_norm", "pooled_vector_norm"], "norm", "value"),
                "boundary",
                "value",
                "norm",
                f"{model_name}: non-sink token norm (train fit) vs ‖{profile.pooling[0]} vector‖",
                "‖resid‖",
            ),
            out / "residual_norm_by_layer.png",
        )
        n_bytes = sum(t.numel() * t.element_size() for t in result.pooled.values())
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(reader_path(out / ACTIVATIONS_FILE)),
            "shape": dg.MetadataValue.text(
                str(list(result.pooled[profile.pooling[0]].shape)) + " per strategy"
            ),
            "strategies": dg.MetadataValue.json(list(result.pooled)),
            "boundaries": dg.MetadataValue.json(boundaries),
            "boundary_names": dg.MetadataValue.json(result.boundary_names),
            "bytes": dg.MetadataValue.int(n_bytes),
            "dg.row_count": dg.MetadataValue.int(len(index)),
            "tokens_per_s": dg.MetadataValue.float(round(rec.timing.throughput_per_s, 1)),
            "emotion_token_fallbacks": dg.MetadataValue.int(int(index["emotion_token_fallback"].sum())),
            "sink_rules": dg.MetadataValue.json(profile.sinks.model_dump()),
            "sink_positions_excluded": dg.MetadataValue.int(int(result.sink_excluded.sum())),
            "sink_first_positions_excluded": dg.MetadataValue.int(int(result.first_excluded.sum())),
            "sink_norm_positions_excluded": dg.MetadataValue.int(int(result.norm_excluded.sum())),
            "mean_fallbacks": dg.MetadataValue.int(int(result.mean_fallback.sum())),
            "sink_exclusions": markdown_table(sinks, max_rows=len(sinks)),
            "residual_norm_reference_prompts": dg.MetadataValue.int(int(reference_rows.sum())),
            "residual_norm_by_layer": plot,
            **rec.metadata(),
        }
    )


@dg.asset_check(
    asset=activations,
    blocking=True,
    description="Every pooled activation is finite and the index matches the tensors row for row.",
)
def activations_finite(activations: ArtifactHandle) -> dg.AssetCheckResult:
    tensors, index, boundaries = activations_of(activations)
    return finite_check(tensors, len(index), len(boundaries))


def finite_check(pooled: dict[str, torch.Tensor], n_prompts: int, n_boundaries: int) -> dg.AssetCheckResult:
    """The logic of ``activations_finite``: every ``[n_prompts, n_boundaries, d_model]`` tensor is finite and
    has one row per prompt and one column per boundary."""
    non_finite = {s: int((~torch.isfinite(t)).sum()) for s, t in pooled.items()}
    rows_match = all(t.shape[0] == n_prompts and t.shape[1] == n_boundaries for t in pooled.values())
    problems = [
        f"{s}: {int((~torch.isfinite(t)).any(dim=-1).sum())} non-finite vector(s) (prompt × boundary)"
        for s, t in pooled.items()
        if non_finite[s]
    ]
    if not rows_match:
        shapes = {s: list(t.shape) for s, t in pooled.items()}
        problems.append(f"shapes {shapes} do not match {n_prompts} prompts × {n_boundaries} boundaries")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) + ". Check the model dtype (try float32) and the weights."
        if problems
        else "Every pooled activation is finite and matches the index.",
        metadata={"non_finite_values": non_finite, "rows_match_index": rows_match},
    )
