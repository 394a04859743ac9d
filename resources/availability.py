"""Which registry models can run on this machine, checked from files only (no weights are loaded).

``model_availability`` mirrors what ``resources.models`` needs at run time (where a missing model raises
``ModelUnavailableError``), so automation can skip a partition whose weights are absent and say why.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from emotion_assets.registry import (
    EmbeddedGgufChunksSource,
    EmbeddedGgufSource,
    EmbeddedPackageSource,
    HuggingFaceSource,
    LocalSource,
    ModelRegistry,
    TwinSource,
)
from resources.packages import installed_package_dir


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # short: what is missing
    hint: str = ""  # how to provide it


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HF_HINT = (
    "nothing is downloaded at run time: run `huggingface-cli download <id>` on a connected machine and copy "
    "the Hugging Face cache here, or set `path:` in data/models.yaml to a local model folder"
)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").exists() and (
        any((folder / name).exists() for name in WEIGHT_FILES) or any(folder.glob("*.safetensors"))
    )


def _chunks_present(package: str) -> bool:
    """Whether a chunked GGUF package and every chunk it lists are installed (the chunks are not read)."""
    if installed_package_dir(package) is None:
        return False
    try:
        paths = importlib.import_module(package).chunk_paths()
    except (ImportError, AttributeError, FileNotFoundError):
        return False
    return all(Path(p).exists() for p in paths)


def _in_hf_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return False
    return any(
        isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str) for name in WEIGHT_FILES
    )


def model_availability(
    name: str, registry: ModelRegistry, _seen: frozenset[str] = frozenset()
) -> Availability:
    """Whether ``name``'s weights are on this machine, checked from files only (cheap, nothing loaded).

    Mirrors what ``resources.models`` needs at run time (where a missing model raises
    ``ModelUnavailableError``); ``hint`` says how to provide a missing model.
    """
    spec = registry.models.get(name)
    if spec is None:
        return Availability(False, "not in the model registry", "add it to data/models.yaml")
    src = spec.source
    if isinstance(src, EmbeddedGgufSource):
        root = installed_package_dir(src.package)
        if root is None or not (root / src.file).exists():
            return Availability(
                False, f"embedded file {src.package}/{src.file} is missing", f"`{src.install}`"
            )
        return Availability(True)
    if isinstance(src, EmbeddedGgufChunksSource):
        if not _chunks_present(src.package):
            return Availability(
                False, f"GGUF chunks of {src.package} are missing or incomplete", f"`{src.install}`"
            )
        return Availability(True)
    if isinstance(src, EmbeddedPackageSource):
        root = installed_package_dir(src.package)
        folder = (root / src.subdir if src.subdir else root) if root else None
        if folder is None or not _has_weights(folder):
            return Availability(False, f"package {src.package} is missing or incomplete", f"`{src.install}`")
        return Availability(True)
    if isinstance(src, TwinSource):
        if src.of in _seen:
            return Availability(False, f"{src.type} cycle through {src.of}", "fix data/models.yaml")
        base = model_availability(src.of, registry, _seen | {name})
        if base.available:
            return base
        return Availability(False, f"{src.type} of {src.of}, which is unavailable ({base.reason})", base.hint)
    if isinstance(src, HuggingFaceSource):
        if src.path:
            if _has_weights(Path(src.path).expanduser()):
                return Availability(True)
            return Availability(False, f"{src.path} has no config.json and weights", "fix `path:`")
        if _in_hf_cache(src.id, src.revision):
            return Availability(True)
        return Availability(False, f"{src.id} is not in the local Hugging Face cache", HF_HINT)
    if isinstance(src, LocalSource):
        if _has_weights(src.resolved_path()):
            return Availability(True)
        return Availability(False, f"{src.resolved_path()} has no config.json and weights", "fix `path:`")
    return Availability(False, f"unsupported source {type(src).__name__}", "fix data/models.yaml")


def describe_unavailable(unavailable: Mapping[str, Availability]) -> str:
    """``gpt2 (gpt2 is not in the local Hugging Face cache), ...`` plus each distinct hint once."""
    if not unavailable:
        return ""
    models = ", ".join(f"{name} ({found.reason})" for name, found in sorted(unavailable.items()))
    hints = sorted({found.hint for found in unavailable.values() if found.hint})
    return models + (". To provide them: " + "; ".join(hints) if hints else "")


__all__ = ["Availability", "describe_unavailable", "model_availability"]
