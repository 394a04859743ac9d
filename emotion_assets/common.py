"""What every asset shares: the per-run config knobs, the effective profile, upstream artifacts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field, field_validator

from emotion_assets.profiles import Profile, get_profile
from emotion_assets.registry import DATA_DIR
from emotion_assets.timing import TimingRecord, past_estimate_s, timed
from emotion_assets.yaml_loading import load_yaml
from resources.device import available_devices
from resources.storage import ArtifactStore, Publication
from resources.tracking import TrackedRun, TrackingResource

EMOTION_WORDS_PATH = DATA_DIR / "emotion_words.yaml"
DATASET_ASSET = "emotion_dataset"


class RunConfig(dg.Config):
    """Knobs for one run. Each one overrides the profile for this run only and is recorded in metadata."""

    batch_size: int | None = Field(default=None, description="Prompts per forward / generate batch.")
    device: str | None = Field(
        default=None, description="auto, cpu, cuda, cuda:N or mps (default: resource)."
    )
    max_samples_per_emotion: int | None = Field(
        default=None, description="Use at most this many prompts per emotion (quick runs)."
    )
    layers: list[int] | None = Field(
        default=None, description="Block boundaries to use instead of the profile's."
    )
    n_jobs: int = Field(
        default=1,
        description="CPU workers where work is parallel across processes. Most phases are vectorised "
        "instead (one batched tensor operation), so this only bounds torch's intra-op threads.",
    )

    @field_validator("batch_size", "max_samples_per_emotion")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be a positive integer, got {value}")
        return value

    @field_validator("n_jobs")
    @classmethod
    def _n_jobs(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"n_jobs must be >= 1, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        options = available_devices()
        if value not in options:
            raise ValueError(f"device {value!r} is not available here; available: auto, {', '.join(options)}")
        return value

    def overrides(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.model_dump().items() if v is not None and not (k == "n_jobs" and v == 1)
        }


def effective_profile(name: str, config: RunConfig | None) -> Profile:
    """The profile with this run's overrides applied (the file on disk is never changed)."""
    profile = get_profile(name)
    if config is None:
        return profile
    update: dict[str, Any] = {}
    if config.batch_size is not None:
        update["batch_size"] = config.batch_size
    if config.max_samples_per_emotion is not None:
        update["samples_per_emotion"] = config.max_samples_per_emotion
    if config.layers is not None:
        if not config.layers or any(layer < 0 for layer in config.layers):
            raise ValueError(f"layers override must be non-empty block indices >= 0, got {config.layers}")
        update["layers"] = list(config.layers)
    return profile.model_copy(update=update) if update else profile


def check_layers_exist(boundaries_requested: list[int] | None, n_layers: int, model: str) -> None:
    """Refuse a layer override the model does not have."""
    if boundaries_requested is None:
        return
    bad = [b for b in boundaries_requested if b > n_layers]
    if bad:
        raise ValueError(
            f"Run config layers {bad} do not exist in {model} ({n_layers} blocks; valid boundaries "
            f"0..{n_layers}, where {n_layers} is the final residual). Remove them from `layers`."
        )


def config_metadata(config: RunConfig | None) -> dict[str, dg.MetadataValue]:
    overrides = config.overrides() if config else {}
    return {"run_config_overrides": dg.MetadataValue.json(overrides)}


def refuse_failing_checks(asset: str, partition: str, results: dict[str, dg.AssetCheckResult]) -> None:
    """Raise inside a ``recorded`` block when a check fails, so the staged version is never published and
    the last good version stays in place."""
    failed = {name: result for name, result in results.items() if not result.passed}
    if failed:
        details = " ".join(f"{name}: {r.description}" for name, r in failed.items() if r.description)
        raise dg.Failure(
            description=f"{asset} for partition {partition!r} fails its blocking check(s) "
            f"{', '.join(failed)}; it was not published and the last good version (if any) is kept. "
            + (details + " " if details else "")
            + "See the metadata for what failed, fix the input, then re-materialize.",
            metadata={
                name: json_metadata({k: getattr(v, "value", v) for k, v in result.metadata.items()})
                for name, result in failed.items()
            },
        )


def limit_for_run(frame: pd.DataFrame, profile: Profile) -> pd.DataFrame:
    """Apply a per-run ``max_samples_per_emotion`` to an already materialized dataset."""
    from emotion_assets.science.prompts import limit_per_emotion

    if profile.samples_per_emotion is None:
        return frame
    counts = frame.groupby("emotion").size()
    if (counts <= profile.samples_per_emotion).all():
        return frame
    return limit_per_emotion(frame, profile.samples_per_emotion, profile.seed).reset_index(drop=True)


def emotion_words(path: Path = EMOTION_WORDS_PATH) -> dict[str, list[str]]:
    raw = load_yaml(path, error=ValueError, label="Emotion word list")
    return {emotion: list(words or []) for emotion, words in raw["words"].items()}


def all_emotion_words(path: Path = EMOTION_WORDS_PATH) -> list[str]:
    return sorted({w for words in emotion_words(path).values() for w in words})


def progress_logger(
    context: dg.AssetExecutionContext, unit: str, every: float = 0.1
) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that writes a run-log line each time another ``every`` of the
    work is done (and at the end), so long materializations show where they are in the Dagster UI."""
    logged = -1

    def progress(done: int, total: int) -> None:
        nonlocal logged
        step = int(done / total / every) if total else 0
        if step > logged or done == total:
            logged = step
            context.log.info(f"{done} of {total} {unit} ({100 * done / max(total, 1):.0f} %)")

    return progress


def json_metadata(payload: Any) -> dg.MetadataValue:
    return dg.MetadataValue.json(json.loads(json.dumps(payload, default=str)))


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"prefix.a.b": 1}`` (lists kept as JSON strings), for MLflow params."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list | tuple) else value}


@dataclass
class Recorder:
    """Timing + MLflow run of one materialization; ``metadata()`` is merged into the result."""

    timing: TimingRecord
    tracked: TrackedRun
    config: RunConfig | None
    publication: Publication | None = None
    estimate_s: float | None = None  # median of this asset's earlier materializations of the partition

    def metrics(self, **values: Any) -> None:
        self.tracked.log_metrics(values)

    def artifacts(self, *paths: Path) -> None:
        self.tracked.log_artifacts(*paths)

    def metadata(self) -> dict[str, dg.MetadataValue]:
        published = self.publication.metadata() if self.publication is not None else {}
        estimate = (
            dg.MetadataValue.float(round(self.estimate_s, 1))
            if self.estimate_s is not None
            else dg.MetadataValue.text("no record yet")
        )
        return {
            **self.timing.metadata(),
            "estimated_seconds": estimate,
            **self.tracked.metadata(),
            **config_metadata(self.config),
            **published,
        }


@contextlib.contextmanager
def recorded(
    context: dg.AssetExecutionContext,
    *,
    tracking: TrackingResource,
    store: ArtifactStore,
    phase: str,
    model: str,
    profile: Profile,
    device: str,
    config: RunConfig | None,
    throughput_unit: str = "samples",
) -> Iterator[Recorder]:
    """Time the body into the materialization's metadata, and log params / metrics / artifacts to one MLflow
    run nested under the Dagster run's MLflow run.

    The folders the body gets from ``store.directory(...)`` are new versions, published together when the
    body succeeds (manifest, then an atomic pointer swap) and discarded when it raises; the published
    manifest digest becomes the asset's Dagster data version unless the asset returns its own.
    """
    asset = context.asset_key.to_user_string()
    params = {
        "asset": asset,
        "model": model,
        "profile": profile.name,
        "device": device,
        **flatten("config", config.overrides() if config else {}),
        **flatten("profile", profile.model_dump(exclude={"name", "description"})),
    }
    partition_key = str(context.partition_key) if context.has_partition_key else None
    with tracking.track(context, asset, params=params) as tracked:
        for run_id in tracked.orphans_ended:
            context.log.warning(
                f"MLflow run {run_id} was left RUNNING by a process of this host that is gone (killed or "
                "crashed); it is now marked KILLED with a note."
            )
        estimate_s = past_estimate_s(context.instance, asset, partition_key)  # earlier runs only
        with (
            timed(
                phase=phase,
                asset=asset,
                model=model,
                profile=profile.name,
                device=device,
                run_id=context.run_id,
                throughput_unit=throughput_unit,
            ) as timing,
            store.publishing(partition_key=partition_key) as publication,
        ):
            recorder = Recorder(
                timing=timing,
                tracked=tracked,
                config=config,
                publication=publication,
                estimate_s=estimate_s,
            )
            yield recorder
        if publication.digest:
            context.set_data_version(context.asset_key, dg.DataVersion(publication.digest))
        tracked.log_metrics(
            {
                "elapsed_s": timing.elapsed_s,
                f"{throughput_unit}_per_s": timing.throughput_per_s,
                "peak_memory_mb": timing.peak_memory_mb,
            }
        )
