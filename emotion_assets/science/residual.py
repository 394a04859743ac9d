"""Residual-stream capture and per-prompt pooling.

Boundary naming. A model with ``n_layers`` blocks has ``n_layers + 1`` residual boundaries:

- boundary ``L`` for ``0 <= L < n_layers`` is ``blocks.{L}.hook_resid_pre``: the **input** of block ``L``
  (boundary 0 is the embedding output, including any embedding scaling the model applies);
- boundary ``n_layers`` is ``blocks.{n_layers - 1}.hook_resid_post``: the **output** of the last block,
  taken **before** any final norm.

Boundaries ``0..n_layers-1`` equal entries ``0..n_layers-1`` of a Hugging Face ``output_hidden_states``;
the last HF entry is taken after the final norm for Llama/GPT-2-style models and is *not* boundary
``n_layers``.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

PoolStrategy = Literal["last", "mean", "emotion_tokens"]
POOL_STRATEGIES: tuple[PoolStrategy, ...] = ("last", "mean", "emotion_tokens")

# Attribute paths (relative to the model or to its base model) of the block list, per architecture family.
_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Qwen, Gemma, Mistral (…ForCausalLM)
    "layers",  # their base models; GPT-NeoX base model
    "transformer.h",  # GPT-2, GPT-Neo
    "h",  # GPT-2 / GPT-Neo base models
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "encoder.layer",  # BertModel
    "bert.encoder.layer",  # wrapped BERT heads
    "model.language_model.layers",  # multimodal wrappers around a decoder
    "language_model.layers",
)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered transformer blocks of ``model`` (decoder layers, or encoder layers for BERT)."""
    for root in (model, getattr(model, "base_model", None)):
        if root is None:
            continue
        for path in _BLOCK_PATHS:
            blocks = _get_path(root, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return blocks
    raise TypeError(
        f"Cannot locate the transformer blocks of {type(model).__name__}: expected one of "
        f"{', '.join(_BLOCK_PATHS)}. Add its block path to emotion_assets.science.residual._BLOCK_PATHS."
    )


def boundary_names(n_layers: int) -> list[str]:
    """Hook-style names of the ``n_layers + 1`` boundaries (``resid_pre`` of each block, then the final one)."""
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return names


def position_ids_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Position ids for a (left-)padded batch, as Hugging Face ``generate`` builds them.

    Real tokens count from 0; pad positions get 0.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1  # [batch, pos]
    return position_ids.masked_fill(attention_mask == 0, 0)


def _hidden_from_call(args: tuple, kwargs: dict) -> Tensor:
    """The residual stream a block is called with (first positional argument or ``hidden_states=``)."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if not isinstance(hidden, Tensor):
        raise TypeError("A block was called without a hidden_states tensor; cannot read its residual stream.")
    return hidden


def _block_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class _StopForward(Exception):
    """Raised from a hook once every requested boundary has been captured."""


def _forward_kwargs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor | bool]:
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Tensor | bool] = {"input_ids": input_ids, "attention_mask": attention_mask}
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    # RoBERTa-style embeddings derive positions from the pad id themselves.
    if "position_ids" in params and "roberta" not in model_type:
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        kwargs["token_type_ids"] = torch.zeros_like(input_ids)
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def capture_residuals(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    boundaries: Sequence[int],
) -> Float[Tensor, "batch n_boundaries pos d_model"]:
    """Residual stream at ``boundaries`` (see the module docstring) for one batch.

    Position ids are built from the attention mask, so a left-padded prompt sees the same positions as
    when run alone. The forward stops right after the last needed boundary (the final norm, the LM head
    and any later block never run). Hooks are removed even when the forward fails.
    """
    blocks = decoder_blocks(model)
    n_layers = len(blocks)
    if not boundaries:
        raise ValueError("capture_residuals needs at least one boundary.")
    bad = [b for b in boundaries if not 0 <= b <= n_layers]
    if bad:
        raise ValueError(f"Boundaries {bad} out of range 0..{n_layers} for {type(model).__name__}.")

    wanted = sorted(set(boundaries))
    stop_at = wanted[-1]
    captured: dict[int, Tensor] = {}

    def pre_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[index] = _hidden_from_call(args, kwargs)  # [batch, pos, d_model]
            if index == stop_at:
                raise _StopForward

        return hook

    def final_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        captured[n_layers] = _block_output(output)  # [batch, pos, d_model]
        raise _StopForward

    handles = []
    try:
        for b in wanted:
            if b < n_layers:
                handles.append(blocks[b].register_forward_pre_hook(pre_hook(b), with_kwargs=True))
            else:
                handles.append(blocks[n_layers - 1].register_forward_hook(final_hook))
        with torch.inference_mode(), contextlib.suppress(_StopForward):
            model(**_forward_kwargs(model, input_ids, attention_mask))
    finally:
        for handle in handles:
            handle.remove()

    missing = [b for b in wanted if b not in captured]
    if missing:
        raise RuntimeError(f"Boundaries {missing} were not reached in the forward of {type(model).__name__}.")
    return torch.stack([captured[b] for b in boundaries], dim=1)  # [batch, n_boundaries, pos, d_model]


# Defaults of ``Profile.sinks`` (``emotion_assets.profiles.SinkConfig``; a unit test keeps them equal).
DEFAULT_EXCLUDE_FIRST = True
DEFAULT_NORM_RATIO: float | None = 10.0


@dataclass(frozen=True)
class SinkPositions:
    """Attention-sink positions of one batch: what ``mean`` / ``emotion_tokens`` pooling never reads.

    Two rules, both applied to content tokens (real and non-special; pads and special tokens are never
    pooled anyway):

    - ``first``: the first real position of each row when ``exclude_first``. With a BOS the first real
      position is the BOS (already special, so no content token is removed); without one (SmolLM2) it is
      the first word, which such models turn into an attention sink.
    - ``by_norm``: any other content token whose residual norm at a boundary exceeds ``norm_ratio`` × the
      row's median norm at that boundary, the median taken over the content tokens left after ``first``
      (``numpy.median`` convention: the mean of the two middle values for an even count). Per boundary.
    """

    content: Bool[Tensor, "batch pos"]
    first: Bool[Tensor, "batch pos"]  # the content position excluded as the row's first real position
    by_norm: Bool[Tensor, "batch n_boundaries pos"]  # content positions excluded by the norm rule
    norms: Float[Tensor, "batch n_boundaries pos"]  # ‖residual‖ per position
    ratio: Float[Tensor, "batch n_boundaries pos"]  # norm / row median; NaN at pads or without a median
    first_index: Int[Tensor, " batch"]  # first real position
    last_index: Int[Tensor, " batch"]  # last content position (what `last` pooling reads)

    @property
    def keep(self) -> Bool[Tensor, "batch n_boundaries pos"]:
        """Content positions that ``mean`` / ``emotion_tokens`` may read at each boundary."""
        return (self.content & ~self.first)[:, None, :] & ~self.by_norm

    @property
    def n_excluded(self) -> Int[Tensor, "batch n_boundaries"]:
        """Content positions excluded per row and boundary (first position + norm rule; disjoint)."""
        return self.first.sum(dim=1)[:, None] + self.by_norm.sum(dim=2)

    @property
    def no_token_left(self) -> Bool[Tensor, "batch n_boundaries"]:
        """Rows with no content token left at a boundary: ``mean`` falls back to the last token there."""
        return ~self.keep.any(dim=2)

    def _at(self, values: Tensor, index: Int[Tensor, " batch"]) -> Tensor:
        """``values[b, :, index[b]]`` for a ``[batch, n_boundaries, pos]`` tensor → ``[batch, n_boundaries]``."""
        return values.gather(2, index.view(-1, 1, 1).expand(-1, values.shape[1], 1)).squeeze(2)

    def token_norm(self) -> Float[Tensor, "batch n_boundaries"]:
        """Mean residual norm over the kept tokens; the last token's norm where none is kept (as ``mean``)."""
        keep = self.keep
        zero = torch.zeros((), dtype=self.norms.dtype, device=self.norms.device)
        total = torch.where(keep, self.norms, zero).sum(dim=2)
        mean = total / keep.sum(dim=2).clamp(min=1).to(self.norms.dtype)
        return torch.where(self.no_token_left, self._at(self.norms, self.last_index), mean)

    def last_is_sink(self) -> Bool[Tensor, "batch n_boundaries"]:
        """True where the token ``last`` pooling reads is itself excluded by a sink rule."""
        excluded = self.first[:, None, :] | self.by_norm  # [batch, n_boundaries, pos]
        return self._at(excluded, self.last_index)

    def first_ratio(self) -> Float[Tensor, "batch n_boundaries"]:
        """Norm of the first real position (BOS, or the first token without one) over the row median."""
        return self._at(self.ratio, self.first_index)

    def max_ratio(self) -> Float[Tensor, "batch n_boundaries"]:
        """Largest norm / median among the content tokens the norm rule examined (NaN where none)."""
        candidates = (self.content & ~self.first)[:, None, :]
        peak = torch.where(candidates, self.ratio.nan_to_num(nan=-torch.inf), -torch.inf).amax(dim=2)
        return peak.masked_fill(torch.isneginf(peak), torch.nan)


def find_sinks(
    hidden: Float[Tensor, "batch n_boundaries pos d_model"],
    attention_mask: Int[Tensor, "batch pos"],
    special_mask: Bool[Tensor, "batch pos"],
    *,
    exclude_first: bool = DEFAULT_EXCLUDE_FIRST,
    norm_ratio: float | None = DEFAULT_NORM_RATIO,
) -> SinkPositions:
    """Mark attention-sink positions per row and boundary (see ``SinkPositions``); vectorised over positions."""
    if norm_ratio is not None and not norm_ratio > 1.0:
        raise ValueError(f"norm_ratio must be > 1 or None (off), got {norm_ratio}; see Profile.sinks.")
    real = attention_mask.bool()  # [batch, pos]
    content = real & ~special_mask.bool()
    batch, n_boundaries, pos, _ = hidden.shape
    positions = torch.arange(pos, device=hidden.device)  # [pos]
    first_index = torch.where(real, positions, pos).amin(dim=1).clamp(max=pos - 1)  # [batch]
    last_index = torch.where(content, positions, -1).amax(dim=1).clamp(min=0)  # [batch]
    first = (
        content & (positions[None, :] == first_index[:, None]) if exclude_first else torch.zeros_like(content)
    )
    candidates = (content & ~first)[:, None, :]  # [batch, 1, pos]
    norms = hidden.float().norm(dim=-1)  # [batch, n_boundaries, pos]
    nan = torch.full((), torch.nan, device=hidden.device)
    # torch.nanquantile: a masked per-row median in one call (numpy/scipy would need a loop or a copy).
    median = torch.nanquantile(torch.where(candidates, norms, nan), 0.5, dim=2, keepdim=True)  # [b, nb, 1]
    ratio = torch.where(real[:, None, :], norms / median, nan)  # [batch, n_boundaries, pos]
    if norm_ratio is None:
        by_norm = torch.zeros(batch, n_boundaries, pos, dtype=torch.bool, device=hidden.device)
    else:
        by_norm = candidates & (ratio > norm_ratio)
    return SinkPositions(content, first, by_norm, norms, ratio, first_index, last_index)


def pool_hidden(
    hidden: Float[Tensor, "batch n_boundaries pos d_model"],
    attention_mask: Int[Tensor, "batch pos"],
    strategy: PoolStrategy,
    special_mask: Bool[Tensor, "batch pos"],
    emotion_mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    exclude_first: bool = DEFAULT_EXCLUDE_FIRST,
    norm_ratio: float | None = DEFAULT_NORM_RATIO,
    sinks: SinkPositions | None = None,
) -> tuple[Float[Tensor, "batch n_boundaries d_model"], Bool[Tensor, "batch n_boundaries"]]:
    """Pool each prompt over its real, non-special tokens; pad positions are never read.

    - ``last``: the last real non-special token (skips a trailing EOS/[SEP]); sink rules do not apply, it
      is the position that predicts the next token (``SinkPositions.last_is_sink`` records when it is one);
    - ``mean``: the mean over real non-special tokens that are not attention sinks (``find_sinks``, with
      ``exclude_first`` / ``norm_ratio``, or precomputed ``sinks``); where none is left the last token;
    - ``emotion_tokens``: the mean over non-sink emotion-word positions; where none, ``last``.

    Returns the pooled vectors and a ``fallback`` flag per row and boundary: True where ``mean`` or
    ``emotion_tokens`` read the last token instead (always False for ``last``).
    """
    content = attention_mask.bool() & ~special_mask.bool()  # [batch, pos]
    empty = ~content.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"Rows {rows} have no real non-special token to pool over.")
    if sinks is None:
        sinks = find_sinks(
            hidden, attention_mask, special_mask, exclude_first=exclude_first, norm_ratio=norm_ratio
        )
    batch, n_boundaries, _, d_model = hidden.shape
    index = sinks.last_index.view(batch, 1, 1, 1).expand(batch, n_boundaries, 1, d_model)
    last = hidden.gather(2, index).squeeze(2)  # [batch, n_boundaries, d_model]

    if strategy == "last":
        return last, torch.zeros(batch, n_boundaries, dtype=torch.bool, device=hidden.device)
    if strategy == "mean":
        selected = sinks.keep  # [batch, n_boundaries, pos]
    elif strategy == "emotion_tokens":
        if emotion_mask is None:
            raise ValueError("strategy 'emotion_tokens' needs an emotion_mask.")
        selected = sinks.keep & emotion_mask.bool()[:, None, :]
    else:
        raise ValueError(f"Unknown pooling strategy {strategy!r}; expected one of {POOL_STRATEGIES}.")
    # torch.where, not a multiply: a NaN/inf at an unread position must not leak into the sum.
    zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
    total = torch.where(selected[..., None], hidden, zero).sum(dim=2)  # [batch, n_boundaries, d_model]
    count = selected.sum(dim=2).clamp(min=1).to(hidden.dtype)  # [batch, n_boundaries]
    fallback = ~selected.any(dim=2)  # [batch, n_boundaries]
    return torch.where(fallback[..., None], last, total / count[..., None]), fallback


def emotion_word_pattern(emotion_words: Iterable[str]) -> re.Pattern[str] | None:
    """Case-insensitive pattern matching a word that starts with any emotion word (stem prefix).

    ``thank`` matches ``Thanks`` and ``thankful`` but not ``unthankful``. An entry ending in ``$`` is a
    whole word: ``mad$`` matches "mad" but not "made".
    """
    words = {w.strip().lower() for w in emotion_words if w.strip()}
    stems = sorted((w for w in words if not w.endswith("$")), key=len, reverse=True)
    whole = sorted((w[:-1] for w in words if w.endswith("$") and len(w) > 1), key=len, reverse=True)
    parts = []
    if whole:
        parts.append(r"\b(?:" + "|".join(re.escape(w) for w in whole) + r")\b")
    if stems:
        parts.append(r"\b(?:" + "|".join(re.escape(s) for s in stems) + r")\w*")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the limit; prompts are never cut silently."""


def check_prompt_lengths(
    lengths: Sequence[int],
    max_length: int,
    ids: Sequence[str] | None = None,
    setting: str = "max_length",
) -> None:
    """Raise :class:`PromptTooLongError` naming every prompt longer than ``max_length`` tokens.

    ``lengths`` counts each prompt's tokens as the model sees them (special tokens included); ``ids`` name
    the prompts (else their position); ``setting`` names the knob that sets the limit.
    """
    over = [(i, int(n)) for i, n in enumerate(lengths) if int(n) > max_length]
    if not over:
        return
    shown = "; ".join(
        f"prompt {ids[i]!r} has {n} tokens" if ids is not None else f"prompt #{i} has {n} tokens"
        for i, n in over[:10]
    )
    more = f" (and {len(over) - 10} more)" if len(over) > 10 else ""
    raise PromptTooLongError(
        f"{len(over)} prompt(s) are longer than {setting} = {max_length} tokens (special tokens included): "
        f"{shown}{more}. Prompts are never truncated, since a cut prompt loses the words that carry its "
        f"emotion. Shorten or remove these prompts, or raise {setting}."
    )


def tokenize_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    emotion_words: Iterable[str],
    max_length: int,
    *,
    ids: Sequence[str] | None = None,
    setting: str = "max_length",
) -> dict[str, Tensor]:
    """Tokenize with left padding and mark special and emotion-word positions.

    Returns ``input_ids``, ``attention_mask``, ``special_mask`` (True at pads and special tokens),
    ``emotion_mask`` (tokens whose character span overlaps an emotion-word match) — all ``[batch, pos]`` —
    and ``n_tokens`` ``[batch]`` (real non-special tokens). A prompt longer than ``max_length`` tokens is
    an error naming it (by ``ids`` when given) and ``setting``, never truncated.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed.")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token first.")
    enc = tokenizer(
        list(texts),
        padding=True,
        padding_side="left",
        truncation=False,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"]  # [batch, pos]
    attention_mask = enc["attention_mask"]  # [batch, pos]
    check_prompt_lengths(attention_mask.sum(dim=1).tolist(), max_length, ids, setting)
    special_ids = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    special = enc["special_tokens_mask"].bool() | (attention_mask == 0)
    if special_ids:
        special |= torch.isin(input_ids, torch.tensor(sorted(special_ids)))

    offsets = enc["offset_mapping"]  # [batch, pos, 2]
    emotion = torch.zeros_like(special)
    pattern = emotion_word_pattern(emotion_words)
    if pattern is not None:
        for row, text in enumerate(texts):
            for match in pattern.finditer(text):
                start, end = match.span()
                overlap = (offsets[row, :, 0] < end) & (offsets[row, :, 1] > start)  # [pos]
                emotion[row] |= overlap
    emotion &= ~special
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "special_mask": special,
        "emotion_mask": emotion,
        "n_tokens": (~special).sum(dim=1),
    }


@dataclass(frozen=True)
class PooledActivations:
    """Pooled residual activations of a prompt set, in the input order.

    ``pooled[strategy]`` is ``[n_prompts, n_boundaries, d_model]`` float32 on CPU. The sink fields
    (``find_sinks``) are per prompt and boundary; "excluded" counts content tokens only (a BOS is special
    and never pooled, so it is not counted).
    """

    pooled: dict[str, Float[Tensor, "n n_boundaries d_model"]]
    boundaries: list[int]
    boundary_names: list[str]
    n_tokens: Int[Tensor, " n"]  # real non-special tokens per prompt
    emotion_fallback: Bool[Tensor, " n"]  # True where `emotion_tokens` read `last` at any boundary
    sink_excluded: Int[Tensor, "n n_boundaries"]  # content positions excluded as sinks (first + norm rule)
    token_norm: Float[Tensor, "n n_boundaries"]  # mean ‖resid‖ over real non-sink tokens
    first_excluded: Bool[Tensor, " n"]  # the first real position was a content token and was excluded
    mean_fallback: Bool[Tensor, "n n_boundaries"]  # no non-sink token left: `mean` read the last token
    emotion_fallback_by_boundary: Bool[Tensor, "n n_boundaries"]  # `emotion_tokens` read `last` here
    last_is_sink: Bool[Tensor, "n n_boundaries"]  # the token `last` reads is excluded by a sink rule
    max_norm_ratio: Float[Tensor, "n n_boundaries"]  # largest norm / median the norm rule saw (NaN: none)
    first_norm_ratio: Float[Tensor, "n n_boundaries"]  # first real position (BOS or first token) / median

    @property
    def norm_excluded(self) -> Int[Tensor, "n n_boundaries"]:
        """Content positions excluded by the norm rule alone."""
        return self.sink_excluded - self.first_excluded.long()[:, None]


def extract_pooled_activations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    boundaries: Sequence[int],
    strategies: Sequence[PoolStrategy],
    emotion_words: Iterable[str],
    batch_size: int,
    device: str | torch.device,
    max_length: int = 128,
    exclude_first: bool = DEFAULT_EXCLUDE_FIRST,
    norm_ratio: float | None = DEFAULT_NORM_RATIO,
    prompt_ids: Sequence[str] | None = None,
    length_setting: str = "max_length",
) -> PooledActivations:
    """Capture and pool residual activations for every prompt, batch by batch.

    Prompts are batched by length (less padding) and results are returned in the input order. Only pooled
    ``[batch, n_boundaries, d_model]`` tensors and per-position sink statistics are kept per batch.
    ``exclude_first`` / ``norm_ratio`` are the sink rules of ``find_sinks`` (``Profile.sinks``). A prompt
    longer than ``max_length`` tokens raises :class:`PromptTooLongError` naming it (``prompt_ids``) and
    the knob (``length_setting``).
    """
    if not texts:
        raise ValueError("extract_pooled_activations got no texts.")
    unknown = [s for s in strategies if s not in POOL_STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown pooling strategies {unknown}; expected a subset of {POOL_STRATEGIES}.")
    n_layers = len(decoder_blocks(model))
    boundaries = list(boundaries)
    enc = tokenize_prompts(
        tokenizer, texts, emotion_words, max_length, ids=prompt_ids, setting=length_setting
    )
    n = len(texts)
    lengths = enc["attention_mask"].sum(dim=1)  # [n]
    order = torch.argsort(lengths, stable=True)  # [n]

    results: dict[str, list[Tensor]] = {s: [] for s in strategies}
    stats: dict[str, list[Tensor]] = {}
    for batch_no, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]  # [batch]
        width = int(lengths[idx].max())
        rows = {
            k: enc[k][idx, -width:] for k in ("input_ids", "attention_mask", "special_mask", "emotion_mask")
        }
        rows = {k: v.to(device) for k, v in rows.items()}
        hidden = capture_residuals(model, rows["input_ids"], rows["attention_mask"], boundaries)
        hidden = hidden.float()  # [batch, n_boundaries, pos, d_model]
        sinks = find_sinks(
            hidden,
            rows["attention_mask"],
            rows["special_mask"],
            exclude_first=exclude_first,
            norm_ratio=norm_ratio,
        )
        for strategy in strategies:
            pooled, _ = pool_hidden(
                hidden,
                rows["attention_mask"],
                strategy,
                rows["special_mask"],
                rows["emotion_mask"],
                sinks=sinks,
            )
            bad = ~torch.isfinite(pooled).all(dim=2)  # [batch, n_boundaries]
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                raise FloatingPointError(
                    f"Non-finite activations in batch {batch_no} (prompt index {int(idx[row])}, "
                    f"boundary {boundaries[col]}, strategy {strategy!r}): {texts[int(idx[row])]!r}. "
                    "Check the model dtype (try float32) and the weights."
                )
            results[strategy].append(pooled.cpu())
        batch_stats = {
            "sink_excluded": sinks.n_excluded,
            "token_norm": sinks.token_norm(),
            "first_excluded": sinks.first.any(dim=1),
            "mean_fallback": sinks.no_token_left,
            "emotion_fallback_by_boundary": ~(sinks.keep & rows["emotion_mask"].bool()[:, None, :]).any(
                dim=2
            ),
            "last_is_sink": sinks.last_is_sink(),
            "max_norm_ratio": sinks.max_ratio(),
            "first_norm_ratio": sinks.first_ratio(),
        }
        for key, value in batch_stats.items():
            stats.setdefault(key, []).append(value.cpu())
        del hidden, sinks

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    per_row = {key: torch.cat(chunks)[inverse] for key, chunks in stats.items()}
    return PooledActivations(
        pooled={s: torch.cat(chunks)[inverse] for s, chunks in results.items()},
        boundaries=boundaries,
        boundary_names=[boundary_names(n_layers)[b] for b in boundaries],
        n_tokens=enc["n_tokens"],
        emotion_fallback=per_row["emotion_fallback_by_boundary"].any(dim=1),
        **per_row,
    )


def sink_exclusion_table(result: PooledActivations) -> pd.DataFrame:
    """One row per boundary: what the sink rules excluded and how large the largest norm ratios were.

    ``excluded_first`` / ``excluded_norm`` count positions, ``prompts_affected`` prompts with any excluded
    position; ``max_norm_ratio`` is the largest norm / median among tokens the norm rule examined and
    ``first_norm_ratio_median`` the median over prompts of the first real position's ratio.
    """
    return pd.DataFrame(
        {
            "boundary": result.boundaries,
            "name": result.boundary_names,
            "excluded_first": int(result.first_excluded.sum()),
            "excluded_norm": result.norm_excluded.sum(dim=0).numpy(),
            "prompts_affected": (result.sink_excluded > 0).sum(dim=0).numpy(),
            "max_norm_ratio": result.max_norm_ratio.nan_to_num(nan=-torch.inf).amax(dim=0).numpy(),
            "first_norm_ratio_median": result.first_norm_ratio.nanmedian(dim=0).values.numpy(),
            "mean_fallbacks": result.mean_fallback.sum(dim=0).numpy(),
            "emotion_token_fallbacks": result.emotion_fallback_by_boundary.sum(dim=0).numpy(),
            "last_token_is_sink": result.last_is_sink.sum(dim=0).numpy(),
        }
    ).replace(-np.inf, np.nan)


def residual_norm_table(
    result: PooledActivations, reference_rows: Bool[Tensor, " n"] | Sequence[bool], pooled_strategy: str
) -> pd.DataFrame:
    """Per boundary: ``mean_residual_norm`` (the steering α reference) = mean ``token_norm`` over
    ``reference_rows`` (train fitting prompts), beside ``pooled_vector_norm``, the mean ‖pooled vector‖ of
    ``pooled_strategy`` over all prompts (the former reference, kept for comparison)."""
    rows = torch.as_tensor(np.asarray(reference_rows, dtype=bool))
    if rows.shape != (result.token_norm.shape[0],):
        raise ValueError(
            f"reference_rows has shape {tuple(rows.shape)}, expected ({result.token_norm.shape[0]},)."
        )
    if not rows.any():
        raise ValueError(
            "No reference prompts (train split, role 'fit') for the residual norm; check the dataset's "
            "split and role columns."
        )
    return pd.DataFrame(
        {
            "boundary": result.boundaries,
            "mean_residual_norm": result.token_norm[rows].double().mean(dim=0).numpy(),
            "n_reference_prompts": int(rows.sum()),
            "pooled_strategy": pooled_strategy,
            "pooled_vector_norm": result.pooled[pooled_strategy].double().norm(dim=-1).mean(dim=0).numpy(),
        }
    )
