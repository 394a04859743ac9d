"""Tiny random-weight checkpoints of several families, saved as local folders for ``source: {type: local}``.

Each folder is what ``save_pretrained`` writes (config.json, model.safetensors, tokenizer files), so a
registry entry can point ``path:`` at it exactly as a user points it at a local Pythia or Qwen3 copy. The
byte-level tokenizer of ``tests.tiny_models`` is shared: any text works, no download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM as _Auto
from transformers import (
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen3Config,
)

from tests.tiny_models import SPECIAL, byte_tokenizer

VOCAB = len(SPECIAL) + 256
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _llama() -> PretrainedConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **_IDS,
    )  # fmt: skip


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True, **_IDS,
    )  # fmt: skip


def _gpt_neox() -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=256, tie_word_embeddings=False,
        **_IDS,
    )  # fmt: skip


def _gemma3() -> PretrainedConfig:
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], **_IDS,
    )  # fmt: skip


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama,
    "qwen3": _qwen3,
    "gpt_neox": _gpt_neox,
    "gemma3": _gemma3,
}


def save_tiny_checkpoint(family: str, path: Path, seed: int = 0) -> dict[str, int]:
    """Save a seeded random ``family`` model with the byte tokenizer to ``path``; return its registry
    geometry (``width``, ``layers``, ``heads``, ``kv_heads``, ``head_dim``)."""
    config = FAMILIES[family]()
    torch.manual_seed(seed)
    model = _Auto.from_config(config).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    heads = config.num_attention_heads
    return {
        "width": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }
