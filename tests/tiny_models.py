"""Tiny random-weight models and a byte-level tokenizer for fast, offline unit tests."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
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
