"""Residual-stream steering hooks that work with Hugging Face ``generate`` and its KV cache."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from emotion_assets.science.residual import _hidden_from_call, decoder_blocks

PromptPositions = Literal["all", "last", "none"]


def _past_length(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, bool]:
    """Cached tokens before this forward and whether a KV cache object was passed in."""
    cache = kwargs.get("past_key_values")
    if cache is None and args:
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
        except TypeError:
            bound = None
        if bound is not None:
            cache = bound.arguments.get("past_key_values")
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0, False
    return int(cache.get_seq_length()), True


@contextmanager
def add_to_residual(
    model: nn.Module,
    block_index: int,
    vectors: Float[Tensor, "batch d_model"] | Float[Tensor, " d_model"],
    prompt_positions: PromptPositions = "all",
    prompt_length: int | None = None,
) -> Iterator[None]:
    """Add ``vectors`` to the residual stream at ``resid_pre`` of block ``block_index``.

    Each batch row gets its own vector (a single ``[d_model]`` vector is shared by all rows). Every
    generated token is steered; prompt tokens are steered at ``all`` positions, the ``last`` prompt
    position only, or ``none``.

    A position counts as generated when its index in the padded sequence is at least the prompt length.
    Positions are located from the KV cache length seen at the start of each forward, so the prefill
    (cache empty, the whole left-padded prompt, whose last position is the last prompt token) and the
    one-token decode steps are told apart. The prompt length is taken from the prefill unless
    ``prompt_length`` is given; give it when generating with ``use_cache=False``, where each step
    re-runs the whole sequence.

    The hooks are removed on exit, also when the body raises.
    """
    if prompt_positions not in ("all", "last", "none"):
        raise ValueError(f"prompt_positions must be 'all', 'last' or 'none', got {prompt_positions!r}.")
    blocks = decoder_blocks(model)
    if not 0 <= block_index < len(blocks):
        raise IndexError(f"block_index {block_index} out of range for {len(blocks)} blocks.")
    if vectors.ndim == 1:
        vectors = vectors[None, :]  # [1, d_model]
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [d_model] or [batch, d_model], got shape {tuple(vectors.shape)}.")

    root = getattr(model, "base_model", None) or model
    state: dict[str, Any] = {"past": 0, "prompt_length": prompt_length}

    def root_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        past, has_cache = _past_length(module, args, kwargs)
        state["past"] = past
        state["new_sequence"] = past == 0 and (has_cache or state.get("seen") is None)
        state["seen"] = True

    def block_pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = _hidden_from_call(args, kwargs)  # [batch, pos, d_model]
        batch, pos, d_model = hidden.shape
        if vectors.shape[1] != d_model:
            raise ValueError(f"Steering vectors have width {vectors.shape[1]}, the residual has {d_model}.")
        if vectors.shape[0] not in (1, batch):
            raise ValueError(f"{vectors.shape[0]} steering vectors for a batch of {batch} rows.")
        if prompt_length is None and state.pop("new_sequence", False):
            state["prompt_length"] = state["past"] + pos
        n_prompt = state["prompt_length"] if state["prompt_length"] is not None else state["past"] + pos

        index = state["past"] + torch.arange(pos, device=hidden.device)  # [pos]
        steer = index >= n_prompt  # [pos]
        if prompt_positions == "all":
            steer |= index < n_prompt
        elif prompt_positions == "last":
            steer |= index == n_prompt - 1
        vec = vectors.to(device=hidden.device, dtype=hidden.dtype)  # [batch or 1, d_model]
        delta = steer.to(hidden.dtype)[None, :, None] * vec[:, None, :]  # [batch or 1, pos, d_model]
        steered = hidden + delta  # [batch, pos, d_model]
        if args and isinstance(args[0], Tensor):
            return (steered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": steered}

    handles = []
    try:
        handles.append(root.register_forward_pre_hook(root_pre_hook, with_kwargs=True))
        handles.append(blocks[block_index].register_forward_pre_hook(block_pre_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_library_hook(hook: Any) -> bool:
    """Hooks transformers installs permanently (e.g. its lazy ``output_hidden_states`` recorders)."""
    return getattr(hook, "__module__", "").startswith("transformers.")


def hooks_removed(model: nn.Module) -> bool:
    """True when no forward hook or pre-hook remains on any submodule.

    Hooks owned by transformers itself are ignored: after the first ``output_hidden_states=True`` call it
    leaves inactive output-capturing forward hooks on every decoder layer.
    """
    for module in model.modules():
        for registry in (module._forward_hooks, module._forward_pre_hooks):
            if any(not _is_library_hook(h) for h in registry.values()):
                return False
    return True
