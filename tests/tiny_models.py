"""Tiny random-weight models and a byte-level tokenizer for fast, offline unit tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def byte_tokenizer(add_bos: bool = True, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, no merges): any text works, vocab 260."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = len(SPECIAL) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    fast.padding_side = padding_side
    return fast


def tiny_llama(seed: int = 0, n_layers: int = 3, d_model: int = 64, n_heads: int = 4, n_kv: int = 2):
    """A random Llama with grouped-query attention (n_heads query heads share n_kv value heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(SPECIAL) + 256,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_gpt2(seed: int = 0, n_layers: int = 2, d_model: int = 48, n_heads: int = 4):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(SPECIAL) + 256,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_bert(seed: int = 0, n_layers: int = 2, d_model: int = 32, n_heads: int = 4):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(SPECIAL) + 256,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * d_model,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return BertModel(cfg).eval()


# Shared by the family builders below: the byte tokenizer's vocabulary and special ids, a short context.
_TOKENS = {"vocab_size": len(SPECIAL) + 256, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
SLIDING_WINDOW = 4  # short enough that the tests' prompts (10-30 byte tokens) reach past it


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model = model.eval()
    model.generation_config.pad_token_id = 0
    return model


def tiny_gpt_neox(seed: int = 0, n_layers: int = 3, d_model: int = 64, n_heads: int = 4):
    """A random GPT-NeoX (Pythia): parallel attention + MLP, rotary on a quarter of each head, fused qkv."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * d_model,
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        **_TOKENS,
    )
    return _finish(GPTNeoXForCausalLM(cfg))


def tiny_gpt_neo(seed: int = 0, d_model: int = 64, n_heads: int = 4):
    """A random GPT-Neo with a global then two local (sliding-window) attention layers, unscaled scores."""
    torch.manual_seed(seed)
    cfg = GPTNeoConfig(
        hidden_size=d_model,
        num_layers=3,
        attention_types=[[["global", "local"], 1], [["local"], 1]],
        num_heads=n_heads,
        window_size=SLIDING_WINDOW,
        intermediate_size=2 * d_model,
        max_position_embeddings=256,
        initializer_range=0.05,
        **_TOKENS,
    )
    return _finish(GPTNeoForCausalLM(cfg))


def tiny_qwen3(seed: int = 0, n_layers: int = 3, d_model: int = 64, n_heads: int = 4, n_kv: int = 2):
    """A random Qwen3: per-head q/k RMSNorms before the rotary embedding, grouped-query attention."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=d_model // n_heads,
        intermediate_size=2 * d_model,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **_TOKENS,
    )
    return _finish(Qwen3ForCausalLM(cfg))


def tiny_gemma3(
    seed: int = 0, d_model: int = 64, n_heads: int = 4, n_kv: int = 1, softcapping: float | None = None
):
    """A random Gemma-3 text model: q/k norms, two sliding-window layers then a global one, one KV head
    (as Gemma-3-270M), ``query_pre_attn_scalar`` unequal to ``head_dim`` and post-attention norms.

    ``softcapping`` sets the config's ``attn_logit_softcapping``, which Gemma-3's attention does not apply
    (the released Gemma-3 configs leave it null)."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        hidden_size=d_model,
        num_hidden_layers=3,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=d_model // n_heads,
        intermediate_size=2 * d_model,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        attn_logit_softcapping=softcapping,
        max_position_embeddings=256,
        **_TOKENS,
    )
    return _finish(Gemma3ForCausalLM(cfg))


def tiny_gemma2(seed: int = 0, d_model: int = 64, n_heads: int = 4, n_kv: int = 2):
    """A random Gemma-2: the one family here whose attention applies logit soft-capping."""
    torch.manual_seed(seed)
    cfg = Gemma2Config(
        hidden_size=d_model,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=d_model // n_heads,
        intermediate_size=2 * d_model,
        sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=d_model // n_heads,
        attn_logit_softcapping=1.0,
        max_position_embeddings=256,
        initializer_range=0.2,
        **_TOKENS,
    )
    return _finish(Gemma2ForCausalLM(cfg))


# One tiny random model per attention family of the registry (data/models.yaml).
FAMILIES = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_gpt_neox,
    "gpt_neo": tiny_gpt_neo,
    "qwen3": tiny_qwen3,
    "gemma3": tiny_gemma3,
}
