"""Head geometry: the one definition of how many heads a decoder has and how they share key/value heads.

``HeadGeometry`` is the shape every consumer uses: the model handle's geometry (read from the model config
before the weights load, ``resources.models.ModelGeometry``) and the attention layout read from the loaded
modules (``HeadLayout``, :func:`head_layout`) both extend it.

Grouped-query attention. With ``n_heads`` query heads and ``n_kv_heads`` key/value heads, query head ``h``
reads key/value head ``h // (n_heads // n_kv_heads)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from emotion_assets.science.attention_families import AttentionFamily, attention_module, block_family
from emotion_assets.science.residual import decoder_blocks

Head = tuple[int, int]  # (layer, query head)


@dataclass(frozen=True)
class HeadGeometry:
    """``n_layers`` blocks of ``n_heads`` query heads (width ``head_dim``) sharing ``n_kv_heads`` key/value heads."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        sizes = {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads}
        bad = {k: v for k, v in {**sizes, "head_dim": self.head_dim}.items() if v < 1}
        if bad:
            raise ValueError(f"Head geometry needs positive sizes; got {bad}. Check the model config.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}); check the "
                "model config."
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head query head ``head`` reads."""
        return head // self.group_size

    def every_head(self) -> list[Head]:
        """Every ``(layer, head)``, layer-major."""
        return [(layer, head) for layer in range(self.n_layers) for head in range(self.n_heads)]


@dataclass(frozen=True)
class HeadLayout(HeadGeometry):
    """Head geometry of a loaded decoder and where its attention keeps the heads (``family``)."""

    family: AttentionFamily


def head_layout(model: nn.Module) -> HeadLayout:
    """Head geometry read from the first block's attention module."""
    blocks = decoder_blocks(model)
    family = block_family(blocks[0])
    attn = attention_module(blocks[0])
    if family == "llama":
        head_dim = int(attn.head_dim)
        n_heads, n_kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    elif family == "gpt_neox":
        head_dim = int(attn.head_size)
        n_heads = n_kv = attn.dense.in_features // head_dim
    else:  # gpt2, gpt_neo
        head_dim, n_heads = int(attn.head_dim), int(attn.num_heads)
        n_kv = n_heads
    return HeadLayout(
        n_layers=len(blocks), n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, family=family
    )


def check_heads(layout: HeadGeometry, heads: Sequence[Head]) -> list[Head]:
    """``heads`` as ``(int, int)`` pairs; an error names those outside the geometry."""
    heads = [(int(layer), int(head)) for layer, head in heads]
    bad = [(ly, h) for ly, h in heads if not (0 <= ly < layout.n_layers and 0 <= h < layout.n_heads)]
    if bad:
        raise ValueError(f"Heads {bad} out of range ({layout.n_layers} layers × {layout.n_heads} heads).")
    return heads


def heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """{layer: its heads, in the given order}."""
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(layer, []).append(head)
    return grouped


def check_readout(layout: HeadGeometry, readout_boundary: int) -> None:
    """A readout boundary is a block input ``0..n_layers`` (``n_layers``: the final pre-norm residual)."""
    if not 0 <= readout_boundary <= layout.n_layers:
        raise ValueError(f"readout_boundary {readout_boundary} out of range 0..{layout.n_layers}.")
