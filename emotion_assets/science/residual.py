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


def pool_hidden(
    hidden: Float[Tensor, "batch n_boundaries pos d_model"],
    attention_mask: Int[Tensor, "batch pos"],
    strategy: PoolStrategy,
    special_mask: Bool[Tensor, "batch pos"],
    emotion_mask: Bool[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch n_boundaries d_model"], Bool[Tensor, " batch"]]:
    """Pool each prompt over its real, non-special tokens; pad positions are never read.

    - ``last``: the last real non-special token (skips a trailing EOS/[SEP]);
    - ``mean``: the mean over real non-special tokens;
    - ``emotion_tokens``: the mean over emotion-word positions; rows without any use ``last``.

    Returns the pooled vectors and a ``fallback`` flag per row (True where ``emotion_tokens`` fell back
    to ``last``; always False for the other strategies).
    """
    content = attention_mask.bool() & ~special_mask.bool()  # [batch, pos]
    empty = ~content.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"Rows {rows} have no real non-special token to pool over.")
    batch, _, pos, d_model = hidden.shape
    positions = torch.arange(pos, device=hidden.device)  # [pos]
    last_index = torch.where(content, positions, -1).amax(dim=1)  # [batch]
    index = last_index.view(batch, 1, 1, 1).expand(batch, hidden.shape[1], 1, d_model)
    last = hidden.gather(2, index).squeeze(2)  # [batch, n_boundaries, d_model]
    no_fallback = torch.zeros(batch, dtype=torch.bool, device=hidden.device)

    def masked_mean(mask: Tensor) -> Tensor:
        keep = mask[:, None, :, None]  # [batch, 1, pos, 1]
        total = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(2)
        count = mask.sum(dim=1).clamp(min=1).to(hidden.dtype)  # [batch]
        return total / count[:, None, None]  # [batch, n_boundaries, d_model]

    if strategy == "last":
        return last, no_fallback
    if strategy == "mean":
        return masked_mean(content), no_fallback
    if strategy == "emotion_tokens":
        if emotion_mask is None:
            raise ValueError("strategy 'emotion_tokens' needs an emotion_mask.")
        selected = emotion_mask.bool() & content  # [batch, pos]
        fallback = ~selected.any(dim=1)  # [batch]
        pooled = torch.where(fallback[:, None, None], last, masked_mean(selected))
        return pooled, fallback
    raise ValueError(f"Unknown pooling strategy {strategy!r}; expected one of {POOL_STRATEGIES}.")


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


def tokenize_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    emotion_words: Iterable[str],
    max_length: int,
) -> dict[str, Tensor]:
    """Tokenize with left padding and mark special and emotion-word positions.

    Returns ``input_ids``, ``attention_mask``, ``special_mask`` (True at pads and special tokens),
    ``emotion_mask`` (tokens whose character span overlaps an emotion-word match) — all ``[batch, pos]`` —
    and ``n_tokens`` ``[batch]`` (real non-special tokens).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed.")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token first.")
    enc = tokenizer(
        list(texts),
        padding=True,
        padding_side="left",
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    input_ids = enc["input_ids"]  # [batch, pos]
    attention_mask = enc["attention_mask"]  # [batch, pos]
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

    ``pooled[strategy]`` is ``[n_prompts, n_boundaries, d_model]`` float32 on CPU.
    """

    pooled: dict[str, Float[Tensor, "n n_boundaries d_model"]]
    boundaries: list[int]
    boundary_names: list[str]
    n_tokens: Int[Tensor, " n"]  # real non-special tokens per prompt
    emotion_fallback: Bool[Tensor, " n"]  # True where no emotion-word token was found (pooled as `last`)


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
) -> PooledActivations:
    """Capture and pool residual activations for every prompt, batch by batch.

    Prompts are batched by length (less padding) and results are returned in the input order. Only pooled
    ``[batch, n_boundaries, d_model]`` tensors are kept per batch.
    """
    if not texts:
        raise ValueError("extract_pooled_activations got no texts.")
    unknown = [s for s in strategies if s not in POOL_STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown pooling strategies {unknown}; expected a subset of {POOL_STRATEGIES}.")
    n_layers = len(decoder_blocks(model))
    boundaries = list(boundaries)
    enc = tokenize_prompts(tokenizer, texts, emotion_words, max_length)
    n = len(texts)
    lengths = enc["attention_mask"].sum(dim=1)  # [n]
    order = torch.argsort(lengths, stable=True)  # [n]

    results: dict[str, list[Tensor]] = {s: [] for s in strategies}
    fallbacks: list[Tensor] = []
    for batch_no, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]  # [batch]
        width = int(lengths[idx].max())
        rows = {
            k: enc[k][idx, -width:] for k in ("input_ids", "attention_mask", "special_mask", "emotion_mask")
        }
        rows = {k: v.to(device) for k, v in rows.items()}
        hidden = capture_residuals(model, rows["input_ids"], rows["attention_mask"], boundaries)
        hidden = hidden.float()  # [batch, n_boundaries, pos, d_model]
        fallback = None
        for strategy in strategies:
            pooled, fb = pool_hidden(
                hidden, rows["attention_mask"], strategy, rows["special_mask"], rows["emotion_mask"]
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
            if strategy == "emotion_tokens":
                fallback = fb
        if fallback is None:
            content = rows["emotion_mask"] & ~rows["special_mask"]
            fallback = ~content.any(dim=1)
        fallbacks.append(fallback.cpu())
        del hidden

    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return PooledActivations(
        pooled={s: torch.cat(chunks)[inverse] for s, chunks in results.items()},
        boundaries=boundaries,
        boundary_names=[boundary_names(n_layers)[b] for b in boundaries],
        n_tokens=enc["n_tokens"],
        emotion_fallback=torch.cat(fallbacks)[inverse],
    )
