"""Artifact storage: ``results/<profile>/<asset>/<partition>/``, atomic writes, no pickle anywhere."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from emotion_assets.registry import PROJECT_ROOT


def default_results_root() -> str:
    return os.environ.get("EMOTION_RESULTS_DIR", str(PROJECT_ROOT / "results"))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    The temporary name starts with ``.tmp-`` so a crash leaves nothing that looks like a finished
    artifact, and ``os.replace`` makes the switch atomic on POSIX and Windows.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, payload: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default), encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata or {}))
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_table(path: Path, frame: pd.DataFrame, *, csv: bool = False) -> Path:
    """Parquet always; a CSV twin beside it when people will open it in a spreadsheet."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    if csv:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            frame.to_csv(tmp, index=False)
    return path


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class ArtifactStore(dg.ConfigurableResource):
    """Where assets write their artifacts: ``<root>/<profile>/<asset>/<partition>/``."""

    root_dir: str = Field(
        default="", description="Results folder; empty = $EMOTION_RESULTS_DIR or <project>/results."
    )

    @property
    def root(self) -> str:
        return self.root_dir or default_results_root()

    def directory(self, profile: str, asset: str, partition: str | None = None) -> Path:
        path = Path(self.root) / profile / asset
        if partition:
            path = path / partition
        path.mkdir(parents=True, exist_ok=True)
        return path

    def existing(self, profile: str, asset: str, partition: str | None = None) -> Path:
        """The directory of an upstream artifact; a clear error when it was never materialized."""
        path = Path(self.root) / profile / asset
        if partition:
            path = path / partition
        if not path.is_dir():
            part = f" partition {partition!r}" if partition else ""
            raise FileNotFoundError(
                f"Upstream artifact {asset!r}{part} for profile {profile!r} is missing at {path}. "
                f"Materialize {asset} for this partition first (or the whole job)."
            )
        return path


class NoPickleIOManager(dg.ConfigurableIOManager):
    """Assets here write their own files and return ``MaterializeResult``; nothing is ever pickled.

    Replaces Dagster's default pickling IO manager so an asset that accidentally returns a Python object
    fails loudly instead of writing a pickle.
    """

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is not None:
            raise TypeError(
                f"Asset {context.asset_key.to_user_string()} returned a {type(obj).__name__}; assets must "
                "write artifacts through ArtifactStore and return MaterializeResult (no pickling)."
            )

    def load_input(self, context: dg.InputContext) -> Any:
        raise TypeError(
            f"Input {context.name!r} cannot be loaded in memory: declare it with `deps=` and read its "
            "artifact files through ArtifactStore."
        )
