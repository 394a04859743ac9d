"""Head geometry has one definition: the config-read geometry and the module-read layout agree on it."""

from __future__ import annotations

import dataclasses

import pytest

from emotion_assets.registry import LocalSource, ModelSpec
from emotion_assets.science.heads.layout import HeadGeometry, HeadLayout, check_heads, head_layout
from resources.models import ModelGeometry, geometry_from_config
from tests.tiny_models import FAMILIES, tiny_llama

HEAD_FIELDS = [f.name for f in dataclasses.fields(HeadGeometry)]


def _heads_of(geometry: HeadGeometry) -> dict[str, int]:
    return {name: getattr(geometry, name) for name in HEAD_FIELDS}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_layout_read_from_the_modules_equals_the_geometry_read_from_the_config(family: str) -> None:
    model = FAMILIES[family](seed=0)
    layout = head_layout(model)
    cfg = getattr(model.config, "text_config", None) or model.config
    spec = ModelSpec(
        name=f"tiny-{family}",
        kind="causal_lm",
        source=LocalSource(type="local", path="."),
        width=layout.n_heads * layout.head_dim
        if family in ("gpt2", "gpt_neox", "gpt_neo")
        else cfg.hidden_size,
        layers=layout.n_layers,
        heads=layout.n_heads,
        kv_heads=layout.n_kv_heads,
        head_dim=layout.head_dim,
    )
    geometry = geometry_from_config(model.config, spec)
    assert isinstance(geometry, HeadGeometry) and isinstance(layout, HeadGeometry)
    assert _heads_of(geometry) == _heads_of(layout)
    assert geometry.group_size == layout.group_size


def test_grouped_query_heads_map_to_their_key_value_head() -> None:
    layout = head_layout(tiny_llama(seed=0, n_layers=2, n_heads=4, n_kv=2))
    assert (layout.family, layout.n_layers, layout.n_heads, layout.n_kv_heads) == ("llama", 2, 4, 2)
    assert [layout.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert layout.every_head() == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_a_geometry_whose_heads_do_not_share_evenly_is_refused() -> None:
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        HeadGeometry(n_layers=2, n_heads=6, n_kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="positive sizes"):
        ModelGeometry(
            n_layers=0, n_heads=4, n_kv_heads=2, head_dim=8, kind="causal_lm", d_model=32, vocab_size=9
        )
    with pytest.raises(ValueError, match="positive sizes"):
        HeadLayout(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=0, family="llama")


def test_heads_outside_the_geometry_are_named() -> None:
    geometry = HeadGeometry(n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8)
    assert check_heads(geometry, [(1, 3), (0.0, 1)]) == [(1, 3), (0, 1)]
    with pytest.raises(ValueError, match=r"Heads \[\(2, 0\), \(0, 4\)\] out of range \(2 layers × 4 heads\)"):
        check_heads(geometry, [(2, 0), (0, 4), (1, 1)])
