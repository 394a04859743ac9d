"""Materialize a few assets of the graph in a test, their upstream artifacts read from a results folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from emotion_assets.io import ArtifactIOManager
from resources.storage import ArtifactStore


def materialize(
    assets: Sequence[dg.AssetsDefinition],
    *,
    store: ArtifactStore,
    resources: Mapping[str, Any],
    **kwargs: Any,
) -> dg.ExecuteInProcessResult:
    """``dg.materialize(assets)`` where every input the assets (and checks) declare but do not produce is an
    upstream of the graph whose published artifact the IO manager reads from ``store``."""
    from emotion_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    produced = {key for asset in assets for key in asset.keys}
    inputs = {key for asset in assets for key in asset.keys_by_input_name.values()}
    upstream = [
        dg.AssetSpec(key, partitions_def=graph.get(key).partitions_def)
        for key in sorted(inputs - produced, key=lambda k: k.to_user_string())
    ]
    return dg.materialize(
        [*assets, *upstream], resources={"io_manager": ArtifactIOManager(store=store), **resources}, **kwargs
    )
