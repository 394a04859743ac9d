"""The model registry (``data/models.yaml``): which models exist and how each one is loaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emotion_assets.yaml_loading import check_name, load_yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = PROJECT_ROOT / "data"
DEFAULT_REGISTRY_PATH = DATA_DIR / "models.yaml"


class RegistryError(ValueError):
    """The model registry is malformed or names a model that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddedGgufSource(_Strict):
    type: Literal["embedded_gguf"]
    package: str
    file: str
    install: str = ""


class EmbeddedGgufChunksSource(_Strict):
    """A GGUF file shipped in chunk packages and joined by the package's ``assemble(output_path=...)``,
    which checks the joined file's sha256 (``chunk_paths()`` lists the chunks without joining them)."""

    type: Literal["embedded_gguf_chunks"]
    package: str
    file: str
    install: str = ""


class EmbeddedPackageSource(_Strict):
    type: Literal["embedded_package"]
    package: str
    subdir: str = ""
    install: str = ""


class TwinSource(_Strict):
    """A control derived from another registry model (`of`), with a seed."""

    of: str
    seed: int = 0


class RandomTwinSource(TwinSource):
    """Same config and tokenizer as `of`, weights drawn from `seed` (the null control)."""

    type: Literal["random_twin"]


class RotatedTwinSource(TwinSource):
    """`of`'s weights with norms folded and the residual basis rotated by a seeded orthogonal matrix:
    the same function in other coordinates (the positive control; see ``science.rotation``)."""

    type: Literal["rotated_twin"]


class HuggingFaceSource(_Strict):
    type: Literal["huggingface"]
    id: str
    path: str | None = None
    revision: str | None = None


class LocalSource(_Strict):
    """A local checkpoint of any supported family: a folder with config.json, safetensors weights and the
    tokenizer files (what ``save_pretrained`` writes). A relative path is taken from the project root."""

    type: Literal["local"]
    path: str

    def resolved_path(self) -> Path:
        path = Path(self.path).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


ModelSource = Annotated[
    EmbeddedGgufSource
    | EmbeddedGgufChunksSource
    | EmbeddedPackageSource
    | RandomTwinSource
    | RotatedTwinSource
    | HuggingFaceSource
    | LocalSource,
    Field(discriminator="type"),
]


class ModelSpec(_Strict):
    """One registry entry."""

    name: str
    kind: Literal["causal_lm", "encoder"]
    source: ModelSource
    width: int = Field(gt=0)
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(
        None, gt=0, description="Width of one attention head (q/k/v); None means width // heads."
    )
    description: str = ""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self

    @property
    def expected_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.heads

    @property
    def can_generate(self) -> bool:
        return self.kind == "causal_lm"


class ModelRegistry(_Strict):
    version: int
    file: str = Field("", description="The registry file this was read from (named in error messages).")
    default_model: str
    models: dict[str, ModelSpec]
    pairs: list[tuple[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_exist(self) -> ModelRegistry:
        names = set(self.models)
        if self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not a key of `models`")
        for spec in self.models.values():
            if isinstance(spec.source, TwinSource):
                _check_twin(spec, self.models)
        for a, b in self.pairs:
            for side in (a, b):
                if side not in names:
                    raise ValueError(f"pair ({a}, {b}) names unknown model {side!r}")
            if a == b:
                raise ValueError(f"pair ({a}, {b}) pairs a model with itself")
        return self

    def get(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise RegistryError(
                f"Unknown model {name!r}. Registered models: {', '.join(sorted(self.models))}. "
                f"Add it to {self.file or DEFAULT_REGISTRY_PATH} or pick one of these."
            )
        return self.models[name]

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def twins_of(self, name: str) -> list[str]:
        """Registry models derived from ``name`` (``random_twin`` / ``rotated_twin`` with ``of: name``)."""
        return [n for n, s in self.models.items() if isinstance(s.source, TwinSource) and s.source.of == name]

    @property
    def pair_keys(self) -> list[str]:
        return [pair_key(a, b) for a, b in self.pairs]


def _check_twin(spec: ModelSpec, models: dict[str, ModelSpec]) -> None:
    """A twin names an existing, non-twin model of the same kind (a rotated twin: a causal LM)."""
    src = spec.source
    kind = src.type
    if src.of not in models:
        raise ValueError(
            f"model {spec.name!r}: {kind} of unknown model {src.of!r}; set `of:` to one of {sorted(models)}"
        )
    base = models[src.of]
    if isinstance(base.source, TwinSource):
        raise ValueError(
            f"model {spec.name!r}: {kind} of {src.of!r}, which is itself a {base.source.type}; "
            "point `of:` at the real model"
        )
    if spec.kind != base.kind:
        raise ValueError(
            f"model {spec.name!r}: kind {spec.kind!r} differs from its base {src.of!r} ({base.kind!r})"
        )
    if isinstance(src, RotatedTwinSource) and spec.kind != "causal_lm":
        raise ValueError(
            f"model {spec.name!r}: rotated_twin needs a causal_lm base (the LM head absorbs the final norm), "
            f"got {base.kind!r} model {src.of!r}"
        )


PAIR_SEPARATOR = "__"


def pair_key(model_a: str, model_b: str) -> str:
    """Partition key of a model pair, e.g. ``smollm2-135m__minilm-l6``."""
    return f"{model_a}{PAIR_SEPARATOR}{model_b}"


def split_pair_key(key: str) -> tuple[str, str]:
    parts = key.split(PAIR_SEPARATOR)
    if len(parts) != 2 or not all(parts):
        raise RegistryError(f"Model pair key {key!r} must look like 'MODEL_A{PAIR_SEPARATOR}MODEL_B'.")
    return parts[0], parts[1]


def registry_path() -> Path:
    """The registry file in use: ``$EMOTION_MODEL_REGISTRY`` or ``data/models.yaml``."""
    return Path(os.environ.get("EMOTION_MODEL_REGISTRY", DEFAULT_REGISTRY_PATH))


def load_registry(path: str | Path | None = None) -> ModelRegistry:
    """Read and validate the registry; every problem is reported with the entry it belongs to."""
    path = Path(path) if path is not None else registry_path()
    raw = load_yaml(path, error=RegistryError, label="Model registry")
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict):
        raise RegistryError(f"Model registry {path} must be a mapping with a `models:` mapping of entries.")
    models = {}
    problems = []
    _check_names(path, raw)
    for name, entry in raw["models"].items():
        if not isinstance(entry, dict):
            problems.append(f"models.{name}: expected a mapping of fields, got {type(entry).__name__}")
            continue
        try:
            models[name] = ModelSpec(name=name, **entry)
        except ValidationError as exc:
            problems.extend(_format_validation(f"models.{name}", exc))
        except TypeError as exc:
            problems.append(f"models.{name}: {exc}")
    if problems:
        raise RegistryError(
            f"Model registry {path} has invalid entries:\n  - "
            + "\n  - ".join(problems)
            + "\nFix these fields (see the comment at the top of the file for the allowed values)."
        )
    try:
        return ModelRegistry(
            version=raw.get("version", 1),
            file=str(path),
            default_model=raw.get("default_model", next(iter(models), "")),
            models=models,
            pairs=[tuple(p) for p in raw.get("pairs", [])],
        )
    except ValidationError as exc:
        raise RegistryError(
            f"Model registry {path} is inconsistent:\n  - " + "\n  - ".join(_format_validation("", exc))
        ) from exc


def _format_validation(prefix: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        where = ".".join(p for p in (prefix, loc) if p)
        lines.append(f"{where}: {err['msg']}" + (f" (got {err['input']!r})" if "input" in err else ""))
    return lines


def _check_names(path: Path, raw: dict) -> None:
    """Model names and pair entries become folder names and partition keys: refuse unsafe ones."""
    for name in raw["models"]:
        check_name(name, file=path, entry="model name", error=RegistryError, model=True)
    pairs = raw.get("pairs", [])
    if not isinstance(pairs, list):
        raise RegistryError(f"{path}: `pairs` must be a list of [MODEL_A, MODEL_B] entries.")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise RegistryError(f"{path}: pairs[{i}] must be a [MODEL_A, MODEL_B] list, got {pair!r}.")
        for side in pair:
            check_name(side, file=path, entry=f"pairs[{i}] model", error=RegistryError, model=True)
