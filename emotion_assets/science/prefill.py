"""Greedy decoding with the KV cache and separate intervention contexts for the prompt and the new tokens.

``model.generate`` runs every forward (prompt and new tokens) under the same hooks. Head patching needs
two regimes: a patch copies source tensors shaped like the prompt (``[batch, pos]``), so it can only act
on the prefill forward; an ablation must act on every forward, generated tokens included. This loop runs
the prefill inside ``prefill_context()`` and every decoding step inside ``decode_context()``.

Positions follow ``generate`` for left-padded batches: prompt position ids are ``cumsum(mask) - 1``
(clamped at 0 on pads), each new token takes the row's last position + 1, and the attention mask grows by
one real column per step. Without contexts the continuations equal ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

ContextFactory = Callable[[], AbstractContextManager[Any]]


def eos_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list | tuple) else [eos]) if eos is not None else set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return {int(i) for i in ids if i is not None}


def _pad_id(model: nn.Module, tokenizer: Any, eos: set[int]) -> int:
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
    ):
        if candidate is not None:
            return int(candidate)
    if eos:
        return min(eos)
    raise ValueError("Neither the tokenizer nor the generation config has a pad or EOS token id.")


def _context(factory: ContextFactory | None) -> AbstractContextManager[Any]:
    return factory() if factory is not None else contextlib.nullcontext()


def greedy_generate_with_prefill(
    model: nn.Module,
    tokenizer: Any,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    max_new_tokens: int,
    prefill_context: ContextFactory | None = None,
    decode_context: ContextFactory | None = None,
) -> list[str]:
    """Greedy continuations of a left-padded batch; the new tokens only, decoded without special tokens.

    ``prefill_context`` (a zero-argument callable returning a context manager) is entered around the
    prompt forward, ``decode_context`` around the decoding steps; pass the same factory as both to
    intervene on every token. Decoding stops after ``max_new_tokens`` or once every row has produced an
    EOS; a row's text ends at its first EOS, and finished rows are fed the pad token meanwhile.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must be "
            "the same [batch, pos] shape."
        )
    eos = eos_token_ids(model, tokenizer)
    pad_id = _pad_id(model, tokenizer, eos)
    device = input_ids.device
    mask = attention_mask.long()  # [batch, pos]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, pos]
    batch = input_ids.shape[0]
    eos_tensor = torch.tensor(sorted(eos), dtype=torch.long, device=device)
    # Only the last position's logits are needed from the prefill (as ``generate`` does).
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    last_only: dict[str, Any] = {"logits_to_keep": 1} if takes_keep else {}
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[Tensor] = []
    with torch.inference_mode():
        with _context(prefill_context):
            out = model(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only
            )
        past = out.past_key_values
        logits = out.logits[:, -1]  # [batch, vocab]
        last = positions[:, -1]  # [batch]
        del out
        with _context(decode_context):
            for step in range(max_new_tokens):
                token = logits.argmax(dim=-1)  # [batch]
                token = torch.where(finished, torch.full_like(token, pad_id), token)
                generated.append(token)
                finished |= torch.isin(token, eos_tensor)
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)  # [batch, pos + step + 1]
                last = last + 1
                out = model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=last[:, None],
                    past_key_values=past,
                    use_cache=True,
                )
                past = out.past_key_values
                logits = out.logits[:, -1]
    tokens = torch.stack(generated, dim=1).cpu()  # [batch, n_new]
    texts = []
    for row in tokens.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
