"""The study's plan before it runs: jobs and partitions in order, per asset its work and an estimated time.

``python -m jobs.study --dry-run`` prints :func:`format_plan`. Work units are counted from the profile, the
prompt file (split and capped as ``emotion_dataset`` does) and the model registry, without loading a model.
The estimate of an asset is the median ``timing_elapsed_s`` of its earlier materializations of the same
partition (model × profile) in the Dagster instance. Without one, a record of the same model (or pair) on
another profile is scaled by the ratio of the asset's work (:func:`work_scale`: generated tokens, prompt
pairs × heads, fitting prompts, fitting prompts × layers), e.g. a ``baseline`` estimate from the ``smoke``
run; the plan says which, and marks a record made with another number of worker processes (``cpu_workers``),
which the scaling does not model. Scaling is linear, so a small profile's fixed costs (model loading) are
scaled too. Else "no record yet".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from emotion_assets.profiles import Profile
from emotion_assets.registry import ModelSpec
from emotion_assets.science.head_screen import SCREEN_HEADS_PER_PASS
from emotion_assets.science.prompts import steering_starts
from emotion_assets.science.steering_analysis import TARGET_METRICS
from emotion_assets.timing import past_estimate_s

TARGET_EMOTIONS = tuple(TARGET_METRICS)

# Assets that spread their work over ``cpu_workers`` processes; a record scaled from a profile with another
# worker count is marked, since the scaling counts work, not processes.
WORKER_ASSETS = frozenset({"head_screening", "head_patching", "residual_patching", "subspace_alignment"})


@dataclass(frozen=True)
class PlannedAsset:
    """One asset of one job run: what it will do and how long it took before."""

    job: str
    partition: str
    asset: str
    work: str
    estimate_s: float | None
    estimate_source: str = (
        ""  # "" (recorded for this partition) or how a record of another profile was scaled
    )


def prompt_frame(profile: Profile) -> pd.DataFrame:
    """The profile's prompts, split and capped as ``emotion_dataset`` does (no Dagster, no model)."""
    from emotion_assets.science.prompts import assign_splits, limit_per_emotion, load_prompts

    frame = load_prompts(Path(profile.dataset.path) if Path(profile.dataset.path).is_absolute() else
                         _root() / profile.dataset.path, max_imbalance_ratio=profile.dataset.max_imbalance_ratio)  # fmt: skip
    frame = assign_splits(frame, eval_fraction=profile.dataset.eval_fraction, seed=profile.seed)
    if profile.samples_per_emotion is not None:
        frame = limit_per_emotion(frame, profile.samples_per_emotion, profile.seed)
    return frame


def _root() -> Path:
    from emotion_assets.registry import PROJECT_ROOT

    return PROJECT_ROOT


def _fit(frame: pd.DataFrame) -> pd.DataFrame:
    from emotion_assets.science.prompts import fitting_mask

    return frame[fitting_mask(frame)]


def _head_pairs(frame: pd.DataFrame, profile: Profile) -> dict[str, int]:
    """Eval prompt pairs per target emotion (``science.head_pairs.prompt_pair``)."""
    fit = _fit(frame)
    count = fit[fit["split"] == "eval"].groupby("emotion").size()
    cap = profile.heads.max_prompts or math.inf
    neutral = min(int(count.get("neutral", 0)), cap)
    return {e: int(min(count.get(e, 0), cap, neutral)) for e in TARGET_EMOTIONS if count.get(e, 0)}


def work_units(asset: str, profile: Profile, spec: ModelSpec, frame: pd.DataFrame) -> str:
    """A one-line count of what ``asset`` computes for this model × profile ("" when not counted)."""
    batch = profile.batch_size
    fit = _fit(frame)
    pairs = _head_pairs(frame, profile)
    n_pairs = sum(pairs.values())
    top = profile.heads.top_n
    heads = spec.layers * spec.heads if spec.layers and spec.heads else 0
    units: dict[str, Callable[[], str]] = {
        "emotion_dataset": lambda: f"{len(frame)} prompts",
        "activations": lambda: (
            f"{len(fit)} prompts, {math.ceil(len(fit) / batch)} forward passes of ≤ {batch}, "
            f"{len(profile.boundaries(spec.layers))} boundaries × {len(profile.pooling)} poolings"
        ),
        "residual_patching": lambda: _steering_units(profile, frame),
        "head_screening": lambda: (
            f"{len(pairs)} emotions × 2 halves × {heads} heads on {n_pairs} prompt pairs: ≥ "
            f"{len(pairs) * 2 * math.ceil(heads / SCREEN_HEADS_PER_PASS)} batched ablation passes, "
            f"{len(pairs) * 2} attribution forward+backward passes, {len(pairs) * 2 * top} held-out head forwards"
        ),
        "head_patching": lambda: (
            f"{2 * top + 16} conditions × {n_pairs} prompt pairs = {(2 * top + 16) * n_pairs} generations of "
            f"{profile.generation.max_new_tokens} tokens in ≈ "
            f"{sum(2 * math.ceil((2 * top + 16) * math.ceil(n / 2) / batch) for n in pairs.values())} "
            f"batched generate calls"
        ),
        "emotion_circuits": lambda: (
            f"{len(pairs)} emotions × 2 folds × ≤ {2 * top + 4} readout conditions on {n_pairs} prompt pairs"
        ),
    }
    return units[asset]() if asset in units else ""


def _steering_counts(profile: Profile, frame: pd.DataFrame) -> tuple[int, int]:
    """(conditions, prompts) of the sweep: prompts are the openings it steers from (``steering_starts``, as
    ``residual_patching``)."""
    steering = profile.steering
    alphas = sorted(set(steering.alpha_grid) | {0.0})
    fit = _fit(frame)
    emotions = [e for e in TARGET_EMOTIONS if (fit["emotion"] == e).any()]
    per_layer = len(emotions) * len(alphas) + 2 * steering.n_random_directions * (len(alphas) - 1)
    starts = len(steering_starts(frame)[0])
    return 1 + steering.n_listed * per_layer, min(starts, steering.max_prompts or starts)


def _steering_units(profile: Profile, frame: pd.DataFrame) -> str:
    conditions, prompts = _steering_counts(profile, frame)
    return (
        f"≈ {conditions} conditions × {prompts} prompts = {conditions * prompts} generations of "
        f"{profile.generation.max_new_tokens} tokens, ≈ {math.ceil(conditions * prompts / profile.batch_size)} "
        "generate calls"
    )


def _steering_generations(profile: Profile, frame: pd.DataFrame) -> int:
    conditions, prompts = _steering_counts(profile, frame)
    return conditions * prompts


def work_scale(
    asset: str, profile: Profile, spec: ModelSpec, frame: pd.DataFrame
) -> tuple[float, str] | None:
    """The count ``asset``'s time grows with on this model × profile and its unit, to scale a record of
    another profile; None for assets whose work is not counted (the roll-ups and the report)."""
    pairs = sum(_head_pairs(frame, profile).values())
    top = profile.heads.top_n
    heads = spec.layers * spec.heads if spec.layers and spec.heads else 0
    fitting = len(_fit(frame))
    boundaries = len(profile.boundaries(spec.layers)) if spec.layers else 1
    new_tokens = profile.generation.max_new_tokens
    scales: dict[str, Callable[[], tuple[float, str]]] = {
        "emotion_dataset": lambda: (len(frame), "prompts"),
        "evaluator_quality": lambda: (len(frame), "prompts"),
        "model_card": lambda: (1, "model load"),
        # Generation, scoring and the log-likelihood pass all grow with the tokens generated.
        "residual_patching": lambda: (
            _steering_generations(profile, frame) * new_tokens,
            "generations × new tokens",
        ),
        # Vectorised tests: fixed costs dominate (4.4 s on smoke, 7-17 s on baseline for smollm2-135m).
        "patching_statistics": lambda: (1, "run"),
        "head_screening": lambda: (pairs * heads, "prompt pairs × heads"),
        "head_patching": lambda: ((2 * top + 16) * pairs * new_tokens, "generations × new tokens"),
        "emotion_circuits": lambda: ((2 * top + 4) * pairs, "readout conditions × prompt pairs"),
    }
    # One forward pass captures every layer: the capture and the audit grow with the prompts.
    for name in ("activations", "confound_audit", "k_selection"):
        scales[name] = lambda: (fitting, "fitting prompts")
    # Fitted per captured layer (alignment: per layer pair, one per layer of the first model).
    for name in ("emotion_vectors", "emotion_subspaces", "subspace_alignment"):
        scales[name] = lambda: (fitting * boundaries, "fitting prompts × layers")
    if asset not in scales:
        return None
    count, unit = scales[asset]()
    return (float(count), unit) if count > 0 else None


@dataclass(frozen=True)
class Estimate:
    """An asset's estimated seconds and, when scaled from another profile's record, how."""

    seconds: float
    source: str = ""


def estimates(
    instance: Any,
    planned: list[tuple[str, str]],
    scale: Callable[[str, str], tuple[float, str] | None] | None = None,
) -> dict[tuple[str, str], Estimate]:
    """Per (asset, partition) of ``planned``: the median past seconds of that partition in ``instance`` (a
    ``DagsterInstance``); else, with ``scale(asset, profile)`` (:func:`work_scale` of the planned model),
    the record of the same subject on another profile times the ratio of the two scales (the profile whose
    work is closest to the planned one). Pairs with neither are left out."""
    from emotion_assets.partitions import PROFILES

    found: dict[tuple[str, str], Estimate] = {}
    for asset, partition in planned:
        seconds = past_estimate_s(instance, asset, partition)
        if seconds is not None:
            found[(asset, partition)] = Estimate(seconds)
            continue
        if scale is None:
            continue
        subject, profile = partition.rsplit("|", 1) if "|" in partition else ("", partition)
        target = scale(asset, profile)
        if target is None:
            continue
        options = []
        for other in PROFILES:
            other_scale = scale(asset, other) if other != profile else None
            other_partition = f"{subject}|{other}" if subject else other
            past = past_estimate_s(instance, asset, other_partition) if other_scale else None
            if past is not None and other_scale is not None:
                options.append((abs(math.log(target[0] / other_scale[0])), other, past, other_scale[0]))
        if options:
            _, other, past, count = min(options)
            found[(asset, partition)] = Estimate(
                past * target[0] / count,
                f"scaled from {other}: {past:.3g} s × {target[0]:.0f} / {count:.0f} {target[1]}"
                + _worker_caveat(asset, PROFILES[other], PROFILES[profile]),
            )
    return found


def _worker_caveat(asset: str, recorded: Profile, planned: Profile) -> str:
    """A note when ``asset`` spreads over worker processes and the two profiles run different numbers."""
    from emotion_assets.science.parallel import process_count

    if asset not in WORKER_ASSETS:
        return ""
    before, after = (process_count(p.cpu_workers, n_tasks=1 << 16) for p in (recorded, planned))
    if before == after:
        return ""
    return f"; recorded with {before} worker process(es), runs with {after}: not in the estimate"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "no record yet"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_plan(planned: list[PlannedAsset], model: str, profile: str) -> str:
    """The plan as text: one block per job run, one line per asset, and the known total."""
    lines = [f"Study plan for {model} on profile {profile!r} (dry run: nothing is materialized)", ""]
    table = pd.DataFrame([p.__dict__ for p in planned], columns=list(PlannedAsset.__dataclass_fields__))
    for (job, partition), group in table.groupby(["job", "partition"], sort=False):
        lines.append(f"{job}  [{partition}]")
        for row in group.itertuples():
            work = f"  {row.work}" if row.work else ""
            estimate = None if pd.isna(row.estimate_s) else float(row.estimate_s)
            scaled = f"  [{row.estimate_source}]" if row.estimate_source else ""
            lines.append(f"  {row.asset:<28} {format_seconds(estimate):>14}{work}{scaled}")
        lines.append("")
    known = [p.estimate_s for p in planned if p.estimate_s is not None]
    missing = len(planned) - len(known)
    scaled = sum(1 for p in planned if p.estimate_s is not None and p.estimate_source)
    source = (
        "medians of the Dagster instance's earlier materializations, model conversion and loading included "
        "where they happened"
        + (f"; {scaled} scaled from another profile by the ratio of their work" if scaled else "")
        + "."
    )
    if known:
        lines.append(
            f"Estimated total: {format_seconds(sum(known))} for {len(known)} of {len(planned)} assets with a "
            f"record" + (f" ({missing} without one)" if missing else "") + f"; {source}"
        )
    else:
        lines.append(f"Estimated total: no record yet for any of the {len(planned)} assets ({source})")
    return "\n".join(lines)
