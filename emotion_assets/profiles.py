"""Experiment profiles (``data/profiles.yaml``): named, versioned run configurations."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emotion_assets.registry import DATA_DIR, PROJECT_ROOT
from emotion_assets.yaml_loading import check_name, load_yaml

DEFAULT_PROFILES_PATH = DATA_DIR / "profiles.yaml"
POOLING_STRATEGIES = ("last", "mean", "emotion_tokens")


class ProfileError(ValueError):
    """A profile is malformed or unknown."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SurfaceBalanceConfig(_Strict):
    """How far a surface feature may differ between neutral and an emotion class (fitting prompts)."""

    max_share_difference: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Largest allowed |share(emotion) - share(neutral)| of a binary surface feature "
        "(final punctuation, first/second person, starts with 'The', emotion keyword outside `implicit`).",
    )
    max_length_ratio: float = Field(
        1.3, ge=1.0, description="Largest allowed ratio of mean lengths in words (longer / shorter)."
    )


class DatasetConfig(_Strict):
    """Where the prompts come from and how they are split."""

    path: str = Field(description="JSONL / CSV / per-emotion JSON file or folder, relative to the project.")
    eval_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="Held-out share per emotion.")
    max_imbalance_ratio: float = Field(3.0, ge=1.0, description="Largest allowed max/min class count.")
    surface_balance: SurfaceBalanceConfig = SurfaceBalanceConfig()

    def resolved_path(self) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() else PROJECT_ROOT / p


class SteeringFluencyConfig(_Strict):
    """Which steering cells (layer, α) count as fluent; the best cell per emotion is chosen among these."""

    max_perplexity_ratio: float = Field(
        2.0,
        ge=1.0,
        description="Largest allowed ratio of a condition's perplexity (exp of minus the mean per-token "
        "log-likelihood of its continuations given their prompts, under the unsteered model) to the unsteered "
        "baseline's.",
    )
    max_degenerate_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Largest allowed share of degenerate continuations (empty, punctuation only, a single "
        "word, or repetitive).",
    )


class SteeringConfig(_Strict):
    """Residual steering sweep (phase 5)."""

    layers: list[int] | dict[str, list[float]] = Field(
        description="Block indices whose resid_pre is steered, or {depths: [...]}: fractions of the model's "
        "depth in [0, 1), block = floor(depth × n_layers + 0.5), so one profile fits models of any depth "
        "(SmolLM2's 30 blocks and Gemma-3-270M's 18 alike)."
    )
    alpha_grid: list[float] = Field(description="α relative to the mean residual norm at the layer.")
    n_random_directions: int = Field(2, ge=0, description="Random control directions per kind.")
    prompt_positions: Literal["all", "last", "none"] = "all"
    max_prompts: int | None = Field(None, gt=0, description="Cap on eval neutral prompts (None = all).")
    fluency: SteeringFluencyConfig = Field(
        SteeringFluencyConfig(), description="Bounds that decide which (layer, α) cells are fluent."
    )

    @field_validator("layers")
    @classmethod
    def _layers_shape(cls, value: Any) -> Any:
        if isinstance(value, dict):
            depths = value.get("depths")
            if set(value) != {"depths"} or not depths or any(not 0.0 <= d < 1.0 for d in depths):
                raise ValueError("steering.layers as a mapping must be {depths: [d, ...]} with 0 <= d < 1")
        elif not value or any(v < 0 for v in value):
            raise ValueError("steering.layers must be non-empty block indices >= 0, or {depths: [...]}")
        return value

    @property
    def n_listed(self) -> int:
        """How many layers or depths the profile lists: the steered blocks of any model, at most."""
        return len(self.layers["depths"]) if isinstance(self.layers, dict) else len(self.layers)

    def blocks(self, n_layers: int) -> list[int]:
        """The steered blocks of a model with ``n_layers`` blocks (depths rounded half up, deduplicated)."""
        if isinstance(self.layers, dict):
            return sorted({min(n_layers - 1, math.floor(d * n_layers + 0.5)) for d in self.layers["depths"]})
        return list(self.layers)

    @field_validator("alpha_grid")
    @classmethod
    def _alpha_has_zero_and_negative(cls, grid: list[float]) -> list[float]:
        if 0.0 not in grid:
            raise ValueError("alpha_grid must contain 0.0 (the unsteered check)")
        if not any(a < 0 for a in grid):
            raise ValueError("alpha_grid must contain at least one negative value")
        return sorted(grid)


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(16, gt=0, le=512)
    decoding: Literal["greedy", "sample"] = "greedy"
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class ScreeningConfig(_Strict):
    """How ``head_screening`` scores every head (``science/attribution_screening.py``)."""

    method: Literal["exhaustive", "atp", "atp_star"] = Field(
        "exhaustive", description="exhaustive: exact ablation of every head; atp: attribution-patching "
        "estimates of every head (any attention family), exact ablation of the shortlist only; atp_star: "
        "the same with the AtP* QK fix (Llama-style attention)."
    )  # fmt: skip
    shortlist: int = Field(
        24,
        gt=0,
        description="Heads confirmed by exact ablation under atp and atp_star (the largest |estimates|).",
    )


class HeadsConfig(_Strict):
    top_n: int = Field(4, gt=0)
    max_prompts: int | None = Field(None, gt=0)
    screening: ScreeningConfig = ScreeningConfig()

    @model_validator(mode="after")
    def _shortlist_holds_top_n(self) -> "HeadsConfig":
        if self.screening.method != "exhaustive" and self.screening.shortlist < self.top_n:
            raise ValueError(
                f"heads.screening.shortlist ({self.screening.shortlist}) must be >= heads.top_n ({self.top_n}): "
                "the top heads are taken from the exactly confirmed shortlist."
            )
        return self


class AlignmentConfig(_Strict):
    """Cross-model alignment (phase 4)."""

    methods: list[Literal["ridge", "procrustes"]] = Field(default=["ridge", "procrustes"])
    procrustes_rank: int | None = Field(None, gt=0, description="Shared PCA rank r (None = n_train - 1).")
    ridge_alpha: float | Literal["auto"] = Field("auto", description="Ridge strength, or 'auto' (5-fold CV).")
    n_null: int = Field(100, ge=10, description="Random subspaces per k for the null band.")
    n_boot: int = Field(100, ge=10, description="Bootstrap resamples of the emotion prompts.")
    min_specificity: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Smallest specificity (diagonal minus off-diagonal overlap) that counts as emotion-specific, "
        "besides a bootstrap interval above 0.",
    )
    anchor_poolings: list[Literal["last", "mean", "emotion_tokens"]] = Field(
        default=["last", "mean"],
        min_length=1,
        description="Pooled views of each neutral train prompt the maps are fit on (each must be in the profile's "
        "`pooling`). Every view is a paired sample of the same change of coordinates, so two views of n prompts "
        "determine a map on up to 2n − 1 dimensions instead of n − 1.",
    )


class SinkConfig(_Strict):
    """Which positions ``mean`` / ``emotion_tokens`` pooling treats as attention sinks and never reads."""

    exclude_first: bool = Field(
        True,
        description="Exclude the first real position (BOS when the tokenizer adds one, else the first token).",
    )
    norm_ratio: float | None = Field(
        10.0,
        gt=1.0,
        description="Also exclude any token whose residual norm at a boundary exceeds this multiple of the "
        "prompt's median token norm there (None = off).",
    )


class Profile(_Strict):
    """One experiment configuration (SPEC §5)."""

    name: str
    description: str = ""
    dataset: DatasetConfig
    samples_per_emotion: int | None = Field(None, ge=2, description="Prompts per emotion (None = all).")
    layers: Literal["all"] | list[int] | dict[str, int] = Field(
        "all", description="'all', an explicit list of block boundaries, or {stride: n}."
    )
    pooling: list[Literal["last", "mean", "emotion_tokens"]] = Field(default=list(POOLING_STRATEGIES))
    k_max: int = Field(4, gt=0)
    steering: SteeringConfig
    generation: GenerationConfig = GenerationConfig()
    heads: HeadsConfig = HeadsConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    n_bootstrap: int = Field(1000, ge=10)
    batch_size: int = Field(32, gt=0)
    cpu_workers: int | Literal["auto"] = Field(
        1,
        description="Worker processes on a CPU, each on one thread: the alignment's layer pairs, and the "
        "model batches of the steering sweep and its log-likelihood pass, head screening (the two halves) "
        "and head patching, each worker holding its own copy of the model (memory: one model per worker). "
        "'auto': one per CPU thread the run may use. The numbers do not depend on it (the same batches run, "
        "and one- and two-thread forwards agree bit for bit on the tested CPU); starting a process takes a "
        "few seconds, which small profiles do not earn back. Ignored on an accelerator.",
    )
    max_prompt_tokens: int = Field(
        128,
        gt=0,
        description="Longest prompt, in tokens of the model's tokenizer (special tokens included). A longer "
        "prompt is an error naming it when `activations` tokenizes it, never cut: truncation would drop "
        "the words that carry its emotion.",
    )
    seed: int = Field(0, ge=0)
    evaluators: dict[str, Any] = Field(default_factory=dict)
    sinks: SinkConfig = SinkConfig()
    validation_sets: list[str] = Field(
        default_factory=list,
        description="External prompt files (same formats as the dataset) that nothing is fitted on; probes "
        "and the embedded evaluator fitted on the train split are scored on each.",
    )

    @field_validator("cpu_workers")
    @classmethod
    def _cpu_workers(cls, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"cpu_workers must be a positive integer or 'auto', got {value!r}.")
        return value

    def resolved_validation_sets(self) -> list[Path]:
        """``validation_sets`` as absolute paths (relative ones are taken from the project root)."""
        return [Path(p) if Path(p).is_absolute() else PROJECT_ROOT / p for p in self.validation_sets]

    @field_validator("layers")
    @classmethod
    def _layers_shape(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) != {"stride"} or value["stride"] < 1:
                raise ValueError("layers as a mapping must be {stride: N} with N >= 1")
        elif isinstance(value, list) and (not value or any(v < 0 for v in value)):
            raise ValueError("layers as a list must be non-empty block indices >= 0")
        return value

    @model_validator(mode="after")
    def _pooling_nonempty(self) -> Profile:
        if not self.pooling:
            raise ValueError("pooling must list at least one strategy")
        missing = [p for p in self.alignment.anchor_poolings if p not in self.pooling]
        if missing:
            raise ValueError(
                f"alignment.anchor_poolings {missing} are not captured: add them to `pooling` "
                f"({self.pooling}) or remove them from alignment.anchor_poolings"
            )
        return self

    def boundaries(self, n_layers: int) -> list[int]:
        """Residual boundaries to capture: 0..n_layers-1 are resid_pre of each block, n_layers is final.

        A stride keeps every N-th block plus the final boundary; an explicit list is validated against
        the model.
        """
        if self.layers == "all":
            return list(range(n_layers + 1))
        if isinstance(self.layers, dict):
            chosen = set(range(0, n_layers + 1, self.layers["stride"])) | {n_layers}
            return sorted(chosen)
        bad = [b for b in self.layers if b > n_layers]
        if bad:
            raise ProfileError(
                f"Profile {self.name!r}: layers {bad} do not exist in a model with {n_layers} blocks "
                f"(valid boundaries 0..{n_layers}). Lower them or use a stride."
            )
        return sorted(set(self.layers))


def profiles_path() -> Path:
    """The profile file in use: ``$EMOTION_PROFILES`` or ``data/profiles.yaml``."""
    return Path(os.environ.get("EMOTION_PROFILES", DEFAULT_PROFILES_PATH))


def load_profiles(path: str | Path | None = None) -> dict[str, Profile]:
    path = Path(path) if path is not None else profiles_path()
    raw = load_yaml(path, error=ProfileError, label="Profile file")
    if not isinstance(raw, dict) or not isinstance(raw.get("profiles"), dict) or not raw["profiles"]:
        raise ProfileError(f"Profile file {path} must contain a non-empty `profiles:` mapping.")
    profiles: dict[str, Profile] = {}
    problems: list[str] = []
    for name, body in raw["profiles"].items():
        check_name(name, file=path, entry="profile name", error=ProfileError)
        if not isinstance(body, dict):
            problems.append(f"profiles.{name}: expected a mapping, got {type(body).__name__}")
            continue
        try:
            profiles[name] = Profile(name=name, **body)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                got = (
                    f" (got {err['input']!r})"
                    if "input" in err and not isinstance(err["input"], dict)
                    else ""
                )
                problems.append(f"profiles.{name}.{loc}: {err['msg']}{got}")
    if problems:
        raise ProfileError(
            f"Profile file {path} has invalid fields:\n  - "
            + "\n  - ".join(problems)
            + "\nFix them; every field is described in docs/profiles.md."
        )
    return profiles


def get_profile(name: str, path: str | Path | None = None) -> Profile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(
            f"Unknown profile {name!r}. Defined profiles: {', '.join(profiles)}. "
            f"Add it to {profiles_path()} or pick one of these."
        )
    return profiles[name]
