"""Inputs through the IO manager: each asset receives its upstream artifacts as typed handles.

An asset declares what it reads as a function parameter (``ins={"activations": dg.AssetIn(...)}``, with a
partition mapping where the partitions differ). :class:`ArtifactIOManager` hands it

- an :class:`ArtifactHandle` when the parameter is annotated ``ArtifactHandle``: the one published version
  of the upstream partition, with checked loaders for its tables, tensors and JSON;
- an :class:`ArtifactHandles` when annotated ``ArtifactHandles``: the handles of every upstream partition the
  mapping names (both models of a pair, every model of a profile), keyed by model (or pair) name.

Every loader goes through the store's checked reads (``read_table`` / ``read_tensors`` / ``read_json``
compare the file with its version's manifest). Outputs are never stored by the IO manager: assets write
their own files through :class:`~resources.storage.ArtifactStore` and return ``MaterializeResult``;
any other returned object is refused (no pickle anywhere).

In a notebook: ``defs.load_asset_value("emotion_vectors", partition_key="smollm2-135m|smoke")`` returns the
handle of that partition; ``.tensors("vectors.safetensors")`` reads it.

The second half of the module holds the readers of this study's artifact formats (activations, vectors,
subspaces, the confound audit, head screening), shared by the assets that consume them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import torch
from jaxtyping import Float
from pydantic import Field
from torch import Tensor

from resources.storage import (
    MANIFEST_FILE,
    MATERIALIZE_HINT,
    ArtifactMissingError,
    ArtifactStore,
    read_json,
    read_table,
    read_tensors,
    verify_artifact_file,
)

PROFILE_DIMENSION = "profile"

# File names of artifacts read by other assets (the writers use the same names).
PROMPTS_FILE = "prompts.parquet"
ACTIVATIONS_FILE = "activations.safetensors"
INDEX_FILE = "index.parquet"
SINKS_FILE = "sinks.safetensors"
RESIDUAL_NORMS_FILE = "residual_norms.parquet"
VECTORS_FILE = "vectors.safetensors"
SUBSPACES_FILE = "subspaces.safetensors"
PROBE_FILE = "probe_accuracy.parquet"
VECTOR_AUDIT_FILE = "vector_audit.parquet"
GENERATIONS_FILE = "generations.parquet"
SCREENING_FILE = "screening.parquet"
SPLIT_FILE = "split.parquet"
SWEEP_FILE = "alignment_sweep.parquet"
COMPARISONS_FILE = "comparisons.parquet"


@dataclass(frozen=True)
class ArtifactHandle:
    """One published version of one asset partition, with checked loaders for its files.

    ``directory`` is the version folder (the pointer resolved once), so every file read through one handle
    comes from the same version even while a newer one is being published.
    """

    asset: str
    partition_key: str | None
    profile: str
    partition: str | None  # folder under the asset: model or model pair; None for a per-profile asset
    directory: Path
    manifest: Mapping[str, Any] = field(repr=False)

    @property
    def files(self) -> list[str]:
        """Relative paths of the files published in this version (empty for a pre-versioning folder)."""
        return sorted(self.manifest.get("files", {}))

    def has(self, name: str) -> bool:
        """Whether this version holds ``name`` (a file that older versions of the asset did not write)."""
        return name in self.manifest.get("files", {}) if self.manifest else (self.directory / name).is_file()

    def path(self, name: str) -> Path:
        """Path of file ``name`` after checking it against the manifest (for readers other than ours)."""
        return verify_artifact_file(self._file(name))

    def table(self, name: str) -> pd.DataFrame:
        return read_table(self._file(name))

    def tensors(self, name: str) -> dict[str, Tensor]:
        return read_tensors(self._file(name))

    def json(self, name: str) -> Any:
        return read_json(self._file(name))

    def _file(self, name: str) -> Path:
        path = self.directory / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise ValueError(f"{name!r} is not a file name inside {self.asset}'s artifact folder.")
        if not path.exists():
            raise ArtifactMissingError(
                f"File {name!r} is not in asset {self.asset!r}, partition {self.partition_key!r} "
                f"({self.directory}); it holds {self.files or 'no manifest'}. It was written by an older "
                f"version of {self.asset}: {materialize_hint(self.asset, self.partition_key)}."
            )
        return path


@dataclass(frozen=True)
class ArtifactHandles(Mapping[str, ArtifactHandle]):
    """The published upstream partitions a fan-in input maps to, keyed by model (or model pair).

    Iterating yields only the published ones (a roll-up reads what exists); indexing one that the mapping
    names but that was never published raises the error that names it and the fix.
    """

    asset: str
    profile: str
    published: Mapping[str, ArtifactHandle]
    missing: Mapping[str, str] = field(default_factory=dict)  # partition → why it is not readable

    def __getitem__(self, partition: str) -> ArtifactHandle:
        if partition in self.published:
            return self.published[partition]
        if partition in self.missing:
            raise ArtifactMissingError(self.missing[partition])
        raise KeyError(
            f"{partition!r} is not an upstream partition of {self.asset!r} for profile {self.profile!r}; "
            f"the input maps to {sorted({*self.published, *self.missing})}."
        )

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.published))

    def __len__(self) -> int:
        return len(self.published)


def materialize_hint(asset: str, partition_key: str | None) -> str:
    command = MATERIALIZE_HINT.format(
        asset=asset, partition=f" --partition '{partition_key}'" if partition_key else ""
    )
    return f"materialize it first (`{command}`)"


def split_partition_key(partitions_def: dg.PartitionsDefinition, key: str) -> tuple[str, str | None]:
    """(profile, folder) of a partition key: ``"smollm2-135m|smoke"`` → ``("smoke", "smollm2-135m")``."""
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        dims = dict(partitions_def.get_partition_key_from_str(key).keys_by_dimension)
        if PROFILE_DIMENSION not in dims or len(dims) != 2:
            raise ValueError(
                f"Partition {key!r} has dimensions {sorted(dims)}; artifacts are stored per profile and one "
                "other dimension (model or model_pair)."
            )
        profile = dims.pop(PROFILE_DIMENSION)
        return profile, next(iter(dims.values()))
    return key, None


def open_artifact(
    store: ArtifactStore, asset: str, partitions_def: dg.PartitionsDefinition | None, key: str | None
) -> ArtifactHandle:
    """The handle of the published version of ``asset`` at partition ``key``; a named error when none is."""
    if partitions_def is None or key is None:
        raise ValueError(
            f"Asset {asset!r} is not partitioned (or no partition key was given); every artifact of this "
            "study is stored per profile. Pass partition_key=..."
        )
    profile, partition = split_partition_key(partitions_def, key)
    try:
        directory = store.existing(profile, asset, partition)
    except ArtifactMissingError as exc:
        raise ArtifactMissingError(
            f"Asset {asset!r} has no published version for {key!r} under {store.root}: "
            f"{materialize_hint(asset, key)}."
        ) from exc
    manifest: Mapping[str, Any] = {}
    if (directory / MANIFEST_FILE).is_file():
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    return ArtifactHandle(
        asset=asset,
        partition_key=key,
        profile=profile,
        partition=partition,
        directory=directory,
        manifest=manifest,
    )


def _annotation(context: dg.InputContext) -> Any:
    with contextlib.suppress(Exception):
        return context.dagster_type.typing_type
    return None


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Loads upstream artifacts as :class:`ArtifactHandle` / :class:`ArtifactHandles`; stores nothing.

    Assets write their own files through :class:`ArtifactStore` and return ``MaterializeResult``; an asset
    that returns any other object fails loudly instead of having it pickled.
    """

    store: ArtifactStore = Field(default_factory=ArtifactStore, description="Where the artifacts live.")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is not None:
            raise TypeError(
                f"Asset {context.asset_key.to_user_string()} returned a {type(obj).__name__}; assets must "
                "write artifacts through ArtifactStore and return MaterializeResult (no pickling)."
            )

    def load_input(self, context: dg.InputContext) -> ArtifactHandle | ArtifactHandles:
        asset = context.asset_key.to_user_string()
        partitions_def = context.asset_partitions_def if context.has_asset_partitions else None
        keys = sorted(context.asset_partition_keys) if partitions_def is not None else [None]
        if _annotation(context) is ArtifactHandles:
            return self._many(asset, partitions_def, keys)
        if len(keys) > 1 and context.has_partition_key and str(context.partition_key) in keys:
            keys = [str(context.partition_key)]  # an asset check reads its asset at the run's partition
        if len(keys) != 1:
            raise TypeError(
                f"Input {context.name!r} maps to {len(keys)} partitions of {asset!r} ({keys}); annotate the "
                "parameter as ArtifactHandles to receive them all."
            )
        return open_artifact(self.store, asset, partitions_def, keys[0])

    def _many(
        self, asset: str, partitions_def: dg.PartitionsDefinition | None, keys: list[str | None]
    ) -> ArtifactHandles:
        published: dict[str, ArtifactHandle] = {}
        missing: dict[str, str] = {}
        profiles = set()
        for key in keys:
            if partitions_def is None or key is None:
                raise ValueError(f"Asset {asset!r} is not partitioned; ArtifactHandles needs partitions.")
            profile, partition = split_partition_key(partitions_def, key)
            profiles.add(profile)
            name = partition or profile
            try:
                published[name] = open_artifact(self.store, asset, partitions_def, key)
            except ArtifactMissingError as exc:
                missing[name] = str(exc)
        if len(profiles) > 1:
            raise ValueError(
                f"An input of {asset!r} spans profiles {sorted(profiles)}; map within one profile."
            )
        return ArtifactHandles(
            asset=asset, profile=next(iter(profiles), ""), published=published, missing=missing
        )


# ---------------------------------------------------------------- readers of this study's artifacts


def prompts_of(dataset: ArtifactHandle) -> pd.DataFrame:
    """The validated prompt table written by ``emotion_dataset``."""
    return dataset.table(PROMPTS_FILE)


def activations_of(
    handle: ArtifactHandle,
) -> tuple[dict[str, Float[Tensor, "n n_boundaries d_model"]], pd.DataFrame, list[int]]:
    """``({strategy: [n, n_boundaries, d_model]}, index, boundaries)`` written by ``activations``."""
    tensors = handle.tensors(ACTIVATIONS_FILE)
    boundaries = tensors.pop("boundaries").tolist()
    return tensors, handle.table(INDEX_FILE), boundaries


def token_norms_of(handle: ArtifactHandle) -> Float[Tensor, "n n_boundaries"]:
    """``token_norm`` written by ``activations``: mean ‖resid‖ over each prompt's real non-sink tokens, rows
    and boundaries as in :func:`activations_of`."""
    if not handle.has(SINKS_FILE):
        raise ArtifactMissingError(
            f"{handle.directory / SINKS_FILE} is missing (activations written before sink exclusion); "
            f"re-materialize activations for {handle.partition_key}."
        )
    return handle.tensors(SINKS_FILE)["token_norm"]


def vectors_of(handle: ArtifactHandle) -> tuple[dict[str, Float[Tensor, "n_boundaries d_model"]], list[int]]:
    """``({"strategy/emotion": [n_boundaries, d_model]}, boundaries)`` written by ``emotion_vectors``."""
    tensors = handle.tensors(VECTORS_FILE)
    return tensors, tensors.pop("boundaries").tolist()


def subspaces_of(handle: ArtifactHandle) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``({"strategy/emotion/basis": [n_b, k, d], ".../explained_variance_ratio": [n_b, k]}, boundaries)``."""
    tensors = handle.tensors(SUBSPACES_FILE)
    return tensors, tensors.pop("boundaries").tolist()


def audit_flags(audit: ArtifactHandle, strategy: str, boundaries: list[int]) -> list[dict[str, Any]]:
    """The confound audit's flagged vectors of one pooling at ``boundaries`` (what a downstream result
    that uses those vectors must be read with): emotion, boundary, worst nuisance, its cosine, reason."""
    table = audit.table(VECTOR_AUDIT_FILE)
    rows = table[(table["strategy"] == strategy) & table["boundary"].isin(boundaries) & table["flagged"]]
    return [
        {
            "emotion": str(r.emotion),
            "boundary": int(r.boundary),
            "worst_nuisance": str(r.worst_nuisance),
            "max_abs_cosine": _finite(r.max_abs_cosine),
            "reason": str(r.reason),
        }
        for r in rows.itertuples()
    ]


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
