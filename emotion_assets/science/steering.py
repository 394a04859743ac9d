"""Steering sweeps: scaled emotion vectors, norm-matched random controls and batched generation.

Every added vector is ``α · ‖resid‖_L · v̂``: a unit direction scaled by the typical residual norm at the
block it is added to (``resid_pre`` of block ``L``, where the vector was read), so one α grid means the same
relative push in every model and at every layer. All conditions at one ``(layer, α)`` therefore add vectors
of the same norm ``|α| · ‖resid‖_L``, whichever direction they use.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from emotion_assets.science.batch_cache import BatchCache, batch_key, require_fingerprint
from emotion_assets.science.interventions import PromptPositions, add_to_residual
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.prefill import eos_token_ids
from emotion_assets.science.prompts import NEUTRAL, fitting_mask, steering_starts

ConditionKind = Literal["baseline", "emotion", "random_isotropic", "random_covariance"]
RandomKind = Literal["isotropic", "covariance"]
Decoding = Literal["greedy", "sample"]
_RANDOM_KIND_CODE: dict[str, int] = {"isotropic": 0, "covariance": 1}


@dataclass(frozen=True, eq=False)
class SteeringCondition:
    """One steering condition: ``vector`` is the exact vector added at ``resid_pre`` of block ``layer``.

    The baseline adds nothing (zero vector) and has ``layer=None``. ``seed`` is the integer seed a random
    control's direction was drawn from (``random_directions(reference, 1, seed, ...)`` reproduces it).
    """

    name: str
    kind: ConditionKind
    emotion: str | None
    layer: int | None
    alpha: float
    seed: int | None
    vector: Float[Tensor, " d_model"]

    @property
    def vector_norm(self) -> float:
        return float(self.vector.double().norm())

    def describe(self) -> dict[str, Any]:
        """The condition's metadata (everything but the vector itself)."""
        return {
            "condition": self.name,
            "kind": self.kind,
            "emotion": self.emotion,
            "layer": self.layer,
            "alpha": self.alpha,
            "seed": self.seed,
            "vector_norm": self.vector_norm,
        }


def scaled_vector(
    direction: Float[Tensor, " d_model"], alpha: float, resid_norm: float
) -> Float[Tensor, " d_model"]:
    """``alpha · resid_norm · direction / ‖direction‖`` (``alpha`` is relative to the residual norm)."""
    norm = direction.double().norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"Cannot scale a direction of norm {float(norm)}.")
    out = (float(alpha) * float(resid_norm)) * (direction.double() / norm)  # [d_model]
    return out.to(direction.dtype)


def random_directions(
    reference: Float[Tensor, " d_model"],
    n: int,
    seed: int,
    kind: RandomKind = "isotropic",
    covariance_factor: Float[Tensor, "m d_model"] | None = None,
) -> Float[Tensor, "n d_model"]:
    """``n`` random vectors, each with exactly the norm of ``reference``.

    ``isotropic`` draws ``z ~ N(0, I)``. ``covariance`` draws ``z ~ N(0, Σ)`` with ``Σ`` the empirical
    covariance of the activation rows in ``covariance_factor`` (e.g. neutral prompts at that layer):
    ``z = g @ X / sqrt(m - 1)`` with ``g ~ N(0, I_m)`` and ``X`` the rows centered here (a no-op for
    centered input), so no ``d × d`` matrix is formed and every draw lies in the span of ``X``. The draws
    depend only on ``seed`` (a numpy PCG64 stream), so they are identical in any process.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    if reference.ndim != 1:
        raise ValueError(f"reference must be [d_model], got shape {tuple(reference.shape)}.")
    d = reference.shape[0]
    target = float(reference.double().norm())
    rng = np.random.default_rng(int(seed))
    if kind == "isotropic":
        z = rng.standard_normal((n, d))  # [n, d_model]
    elif kind == "covariance":
        if covariance_factor is None:
            raise ValueError("kind='covariance' needs covariance_factor (activation rows [m, d_model]).")
        x = covariance_factor.detach().cpu().double().numpy()  # [m, d_model]
        if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 2:
            raise ValueError(f"covariance_factor must be [m >= 2, {d}], got shape {x.shape}.")
        x = x - x.mean(axis=0, keepdims=True)
        g = rng.standard_normal((n, x.shape[0]))  # [n, m]
        z = g @ x / math.sqrt(x.shape[0] - 1)  # [n, d_model]
    else:
        raise ValueError(f"kind must be 'isotropic' or 'covariance', got {kind!r}.")
    norms = np.linalg.norm(z, axis=1, keepdims=True)  # [n, 1]
    if not (norms > 0).all():
        raise ValueError("A random draw has zero norm (are the activations constant?).")
    out = torch.from_numpy(z / norms * target)  # [n, d_model] float64
    return out.to(dtype=reference.dtype, device=reference.device)


def control_seed(seed: int, layer: int, kind: RandomKind, index: int) -> int:
    """The stable integer seed of random control ``index`` of ``kind`` at ``layer``."""
    state = np.random.SeedSequence([int(seed), int(layer), _RANDOM_KIND_CODE[kind], int(index)])
    return int(state.generate_state(1, dtype=np.uint32)[0])


def _alpha_label(alpha: float) -> str:
    return f"{alpha:+g}"


def steering_prompts(frame: pd.DataFrame, max_prompts: int | None) -> tuple[pd.DataFrame, str]:
    """Eval-split ``steering_prompt`` rows (else eval neutral fitting rows), in id order, optionally capped,
    and the role they have; neither was used to fit the vectors."""
    prompts, role = steering_starts(frame)
    return (prompts.head(max_prompts) if max_prompts else prompts), role


def layer_vectors(
    vectors: Mapping[str, Tensor], boundaries: Sequence[int], strategy: str, layers: Sequence[int], model: str
) -> dict[str, dict[int, Float[Tensor, " d_model"]]]:
    """Every emotion's ``strategy`` vector at each steering layer (``vectors``: ``"<strategy>/<emotion>"`` →
    [n_boundaries, d_model] at ``boundaries``); a layer without vectors is an error naming the fix."""
    missing = [layer for layer in layers if layer not in boundaries]
    if missing:
        raise ValueError(
            f"Steering layers {missing} have no emotion vectors for {model} (captured: {list(boundaries)}). "
            "Re-materialize activations and emotion_vectors for this profile."
        )
    emotions = sorted({key.split("/")[1] for key in vectors if key.startswith(f"{strategy}/")})
    return {e: {L: vectors[f"{strategy}/{e}"][list(boundaries).index(L)] for L in layers} for e in emotions}


def neutral_centered_activations(
    pooled: Float[Tensor, "n n_boundaries d_model"],
    index: pd.DataFrame,
    boundaries: Sequence[int],
    layers: Sequence[int],
) -> dict[int, Float[Tensor, "m d_model"]]:
    """Per steering layer, the pooled activations of the **train** neutral fitting prompts minus their mean
    (the covariance the covariance-matched random controls are drawn from). ``index`` lists the rows of
    ``pooled``; ``boundaries`` its second axis."""
    neutral_train = torch.as_tensor(
        ((index["split"] == "train") & (index["emotion"] == NEUTRAL)).to_numpy() & fitting_mask(index)
    )
    centered = {}
    for layer in layers:
        x = pooled[neutral_train, list(boundaries).index(layer)]  # [m, d_model]
        centered[layer] = x - x.mean(dim=0, keepdim=True)
    return centered


def build_conditions(
    vectors: Mapping[str, Mapping[int, Float[Tensor, " d_model"]]],
    resid_norms: Mapping[int, float],
    layers: Sequence[int],
    alpha_grid: Sequence[float],
    n_random: int,
    seed: int,
    neutral_centered: Mapping[int, Float[Tensor, "m d_model"]] | None = None,
) -> list[SteeringCondition]:
    """The full condition list of a sweep, in a fixed order.

    - ``baseline``: once, no vector;
    - ``emotion``: every emotion × layer × α (α = 0 is added to the grid when missing; it reproduces the
      baseline and checks the machinery). The grid must contain a negative α;
    - random controls: per layer × α ≠ 0 × kind × seed index ``0..n_random-1``; ``random_isotropic``
      always, ``random_covariance`` for layers with ``neutral_centered`` activations. One direction per
      (layer, kind, index) is reused across α, so each control is a direction swept like the emotions.

    Random controls are shared by all emotions at a layer: every added vector is rescaled to
    ``|α| · resid_norms[layer]``, so a control at ``(layer, α)`` has exactly the norm of each emotion's
    vector at ``(layer, α)`` and is run on the same prompts (paired). The raw directions are drawn
    norm-matched to the mean norm of the emotion vectors at that layer.
    """
    if not vectors:
        raise ValueError("build_conditions needs at least one emotion vector.")
    alphas = sorted({float(a) for a in alpha_grid} | {0.0})
    if not any(a < 0 for a in alphas):
        raise ValueError(f"alpha_grid {list(alpha_grid)} has no negative α; the sweep needs one.")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}.")
    emotions = list(vectors)
    first = next(iter(vectors[emotions[0]].values()))
    conditions = [SteeringCondition("baseline", "baseline", None, None, 0.0, None, torch.zeros_like(first))]
    for layer in layers:
        missing = [e for e in emotions if layer not in vectors[e]]
        if missing:
            raise KeyError(f"No vector at layer {layer} for {missing}.")
        if layer not in resid_norms:
            raise KeyError(f"No residual norm for layer {layer}.")
        norm = float(resid_norms[layer])
        for emotion in emotions:
            direction = vectors[emotion][layer]  # [d_model]
            for alpha in alphas:
                conditions.append(
                    SteeringCondition(
                        name=f"{emotion}|L{layer}|a{_alpha_label(alpha)}",
                        kind="emotion",
                        emotion=emotion,
                        layer=layer,
                        alpha=alpha,
                        seed=None,
                        vector=scaled_vector(direction, alpha, norm),
                    )
                )
        mean_norm = float(torch.stack([vectors[e][layer].double().norm() for e in emotions]).mean())
        reference = vectors[emotions[0]][layer]
        reference = reference / reference.norm() * mean_norm  # [d_model]
        kinds: list[RandomKind] = ["isotropic"]
        if neutral_centered is not None and layer in neutral_centered:
            kinds.append("covariance")
        for kind in kinds:
            factor = neutral_centered[layer] if kind == "covariance" and neutral_centered else None
            for index in range(n_random):
                control = control_seed(seed, layer, kind, index)
                direction = random_directions(reference, 1, control, kind, factor)[0]  # [d_model]
                for alpha in alphas:
                    if alpha == 0.0:
                        continue
                    conditions.append(
                        SteeringCondition(
                            name=f"random_{kind}{index}|L{layer}|a{_alpha_label(alpha)}",
                            kind=f"random_{kind}",  # type: ignore[arg-type]
                            emotion=None,
                            layer=layer,
                            alpha=alpha,
                            seed=control,
                            vector=scaled_vector(direction, alpha, norm),
                        )
                    )
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError("Condition names are not unique; are emotions or layers repeated?")
    return conditions


def _stable_int(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def distinct_conditions(conditions: Sequence[SteeringCondition]) -> list[int]:
    """For each condition, the index of the first condition whose greedy output it must equal.

    Adding a zero vector changes nothing, so every zero-vector condition maps to the first one; a
    condition with the same layer and an equal vector as an earlier one maps to that one.
    """
    source: list[int] = []
    seen: dict[tuple[int | None, bytes], int] = {}
    for ci, cond in enumerate(conditions):
        vector = cond.vector.detach().cpu().contiguous()
        key = (None, b"") if not bool(vector.any()) else (cond.layer, vector.numpy().tobytes())
        source.append(seen.setdefault(key, ci))
    return source


def _valid_batch(stored: Any, n_rows: int) -> bool:
    """A cached batch: ``n_rows`` pairs of (continuation text, new-token count)."""
    return (
        isinstance(stored, list)
        and len(stored) == n_rows
        and all(
            isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], int)
            for r in stored
        )
    )


@dataclass(frozen=True, eq=False)
class SweepBatch:
    """One ``generate`` call of a sweep: ``rows`` (condition, prompt) left-padded into ``input_ids`` and
    ``attention_mask`` [batch, pos], each with its own ``vectors`` row [batch, d_model] added at block
    ``layer``; ``seed`` seeds sampling (None when greedy)."""

    layer: int | None
    rows: list[tuple[int, int]]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    vectors: Float[Tensor, "batch d_model"]
    seed: int | None


def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    batch: SweepBatch,
    gen_kwargs: Mapping[str, Any],
    prompt_positions: PromptPositions,
    device: torch.device,
) -> list[tuple[str, int]]:
    """The continuation of every row of ``batch`` and its new-token count (EOS included): new tokens only,
    up to the first EOS, decoded without special tokens."""
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        if batch.seed is not None:
            torch.manual_seed(batch.seed)
        with torch.inference_mode():
            inputs = {
                "input_ids": batch.input_ids.to(device),
                "attention_mask": batch.attention_mask.to(device),
            }
            if batch.layer is None:
                out = model.generate(**inputs, **gen_kwargs)  # [batch, pos + new]
            else:
                vectors = batch.vectors.to(device)  # [batch, d_model]
                with add_to_residual(model, batch.layer, vectors, prompt_positions=prompt_positions):
                    out = model.generate(**inputs, **gen_kwargs)  # [batch, pos + new]
    new = out[:, batch.input_ids.shape[1] :].cpu()  # [batch, new]
    eos_ids = eos_token_ids(model, tokenizer)
    results = []
    for tokens in new.tolist():
        n_new = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
        results.append((tokenizer.decode(tokens[:n_new], skip_special_tokens=True), n_new))
    return results


def _generate_batch_of_handle(handle: Any, **kwargs: Any) -> list[tuple[str, int]]:
    """:func:`generate_batch` on a worker's model handle (``.model``, ``.tokenizer``)."""
    return generate_batch(handle.model, handle.tokenizer, **kwargs)


def generate_sweep(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    conditions: Sequence[SteeringCondition],
    *,
    max_new_tokens: int,
    batch_size: int,
    decoding: Decoding = "greedy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_positions: PromptPositions = "all",
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    cache: BatchCache | None = None,
    fingerprint: str = "",
    workers: ModelWorkers | None = None,
) -> pd.DataFrame:
    """Generate a continuation for every prompt × condition; one row each, in condition then prompt order.

    Rows are grouped by layer (the baseline rides along with the first layer), sorted by prompt length and
    run in ``generate`` calls of ``batch_size`` rows where each row carries its own vector
    (``add_to_residual`` with ``[batch, d_model]`` vectors), so conditions share batches. With greedy
    decoding, conditions that cannot differ (zero vectors, or an equal vector at the same layer) are
    generated once and their rows copied. Greedy by default;
    ``decoding="sample"`` seeds each batch from ``(seed, layer, batch number)`` without touching the global
    RNG. ``continuation`` holds the new tokens only, up to the first EOS, decoded without special tokens;
    ``n_new_tokens`` counts them (the EOS included). ``progress(rows_done, rows_total)`` is called after
    every ``generate`` call. With a ``cache`` (and the model's ``fingerprint``), each batch's continuations
    are stored under its content key and a batch found there is not generated again, so an interrupted
    sweep resumes where it stopped with identical results (``science.batch_cache``).

    ``workers`` (:class:`science.parallel.ModelWorkers` holding this model as ``.model`` and ``.tokenizer``)
    spreads the same batches over its processes; the batches, and so the continuations, are the same.
    """
    require_fingerprint(cache, fingerprint)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if decoding not in ("greedy", "sample"):
        raise ValueError(f"decoding must be 'greedy' or 'sample', got {decoding!r}.")
    if not prompts or not conditions:
        raise ValueError("generate_sweep needs at least one prompt and one condition.")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError("Condition names must be unique.")
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = next(model.parameters()).dtype
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(model.generation_config, "pad_token_id", None)
    if pad_id is None:
        raise ValueError("Neither the tokenizer nor the generation config has a pad token id.")
    d_model = conditions[0].vector.shape[-1]
    if any(c.vector.shape != (d_model,) for c in conditions):
        raise ValueError("Every condition vector must be [d_model] with the same d_model.")

    token_ids: list[list[int]] = tokenizer(list(prompts))["input_ids"]
    lengths = [len(ids) for ids in token_ids]
    if min(lengths) == 0:
        raise ValueError("A prompt tokenizes to no tokens.")
    vectors = torch.stack([c.vector for c in conditions]).to(dtype=dtype)  # [n_cond, d_model]

    # Greedy rows of conditions that change nothing (a zero vector, e.g. the baseline and every α = 0) or
    # repeat another condition (same layer, same vector) are generated once and copied.
    source = distinct_conditions(conditions) if decoding == "greedy" else list(range(len(conditions)))
    # Group (condition, prompt) rows by the block they steer; unlayered rows ride with the first layer.
    layers = sorted({c.layer for c in conditions if c.layer is not None})
    groups: dict[int | None, list[tuple[int, int]]] = {}
    for ci, cond in enumerate(conditions):
        if cond.layer is None and cond.vector.abs().max() > 0:
            raise ValueError(f"Condition {cond.name!r} adds a vector but has no layer.")
        if source[ci] != ci:
            continue
        key = cond.layer if cond.layer is not None else (layers[0] if layers else None)
        groups.setdefault(key, []).extend((ci, pi) for pi in range(len(prompts)))
    n_rows = sum(len(r) for r in groups.values())

    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if decoding == "greedy":
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)

    results: dict[tuple[int, int], tuple[str, int]] = {}
    pending: list[tuple[SweepBatch, str | None]] = []
    for layer, rows in groups.items():
        rows = sorted(rows, key=lambda r: (lengths[r[1]], r[1], r[0]))
        for batch_no, start in enumerate(range(0, len(rows), batch_size)):
            batch_rows = rows[start : start + batch_size]
            width = max(lengths[pi] for _, pi in batch_rows)
            input_ids = torch.full((len(batch_rows), width), pad_id, dtype=torch.long)  # [batch, pos]
            attention_mask = torch.zeros((len(batch_rows), width), dtype=torch.long)  # [batch, pos]
            for row, (_, pi) in enumerate(batch_rows):
                ids = token_ids[pi]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            batch_seed = _stable_int(seed, layer, batch_no) if decoding == "sample" else None
            batch = SweepBatch(
                layer,
                batch_rows,
                input_ids,
                attention_mask,
                vectors[[ci for ci, _ in batch_rows]],
                batch_seed,
            )
            key = None
            if cache is not None:
                settings = {"layer": layer, "generate": gen_kwargs, "prompt_positions": prompt_positions,
                            "device": device.type, "seed": batch_seed}  # fmt: skip
                key = batch_key(
                    "steering_sweep",
                    fingerprint,
                    settings,
                    input_ids,
                    attention_mask,
                    batch.vectors,
                )
                stored = cache.get(
                    key,
                    partial(_valid_batch, n_rows=len(batch_rows)),
                    f"{len(batch_rows)} [text, tokens] rows",
                )
                if stored is not None:
                    for key_row, (text, n_new) in zip(batch_rows, stored, strict=True):
                        results[key_row] = (text, int(n_new))
                    if progress is not None:
                        progress(len(results), n_rows)
                    continue
            pending.append((batch, key))

    def finished(index: int, generated: list[tuple[str, int]]) -> None:
        batch, key = pending[index]
        for row_key, (text, n_new) in zip(batch.rows, generated, strict=True):
            results[row_key] = (text, n_new)
        if key is not None:
            cache.put(key, [list(results[row_key]) for row_key in batch.rows])
        if progress is not None:
            progress(len(results), n_rows)

    fixed = {"gen_kwargs": gen_kwargs, "prompt_positions": prompt_positions, "device": device}
    tasks = [{"batch": batch, **fixed} for batch, _ in pending]
    if workers is None:
        workers = ModelWorkers(SimpleNamespace(model=model, tokenizer=tokenizer), load=None)
    workers.map(_generate_batch_of_handle, tasks, on_result=finished)

    records = []
    for ci, cond in enumerate(conditions):
        meta = cond.describe()
        for pi, prompt in enumerate(prompts):
            text, n_new = results[(source[ci], pi)]
            records.append(
                {"prompt_index": pi, "prompt": prompt, **meta, "continuation": text, "n_new_tokens": n_new}
            )
    return pd.DataFrame.from_records(records)
