"""Inputs through the IO manager: every asset of the graph loads as a checked artifact handle."""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch

from emotion_assets.definitions import ASSET_MODULES, defs
from emotion_assets.io import ArtifactHandle, ArtifactHandles, ArtifactIOManager
from resources.storage import (
    ArtifactError,
    ArtifactMissingError,
    ArtifactStore,
    write_json,
    write_table,
    write_tensors,
)


def _assets() -> list[tuple[dg.AssetKey, dg.PartitionsDefinition]]:
    graph = defs.resolve_asset_graph()
    keys = sorted(graph.materializable_asset_keys, key=lambda k: k.to_user_string())
    return [(key, graph.get(key).partitions_def) for key in keys]


def _folder(partitions_def: dg.PartitionsDefinition, key: str) -> tuple[str, str | None]:
    if isinstance(partitions_def, dg.MultiPartitionsDefinition):
        dims = dict(partitions_def.get_partition_key_from_str(key).keys_by_dimension)
        profile = dims.pop("profile")
        return profile, next(iter(dims.values()))
    return key, None


def _publish(store: ArtifactStore, asset: str, profile: str, partition: str | None, marker: float) -> None:
    with store.publishing():
        out = store.directory(profile, asset, partition)
        write_table(out / "t.parquet", pd.DataFrame({"x": [marker, 2.0]}))
        write_tensors(out / "w.safetensors", {"w": torch.full((2, 3), marker)})
        write_json(out / "s.json", {"marker": marker})


@pytest.fixture
def store(tmp_path, monkeypatch) -> ArtifactStore:
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(tmp_path / "results"))
    return ArtifactStore()


def test_every_asset_loads_through_defs(store):
    assets = _assets()
    assert len(assets) >= 15  # the whole graph, not a handful
    for i, (key, partitions_def) in enumerate(assets):
        assert partitions_def is not None, f"{key} is unpartitioned; artifacts are stored per profile"
        partition_key = partitions_def.get_partition_keys()[-1]
        profile, partition = _folder(partitions_def, partition_key)
        _publish(store, key.to_user_string(), profile, partition, float(i))

        handle = defs.load_asset_value(key, partition_key=partition_key)

        assert isinstance(handle, ArtifactHandle), key
        assert (handle.asset, handle.partition_key, handle.profile, handle.partition) == (
            key.to_user_string(),
            partition_key,
            profile,
            partition,
        )
        assert handle.files == ["s.json", "t.parquet", "w.safetensors"]
        assert handle.table("t.parquet")["x"].tolist() == [float(i), 2.0]
        assert torch.equal(handle.tensors("w.safetensors")["w"], torch.full((2, 3), float(i)))
        assert handle.json("s.json") == {"marker": float(i)}


def test_vectors_notebook_example(store):
    _publish(store, "emotion_vectors", "smoke", "smollm2-135m", 7.0)
    handle = defs.load_asset_value("emotion_vectors", partition_key="smollm2-135m|smoke")
    assert handle.directory.parent.parent.name == ".versions"  # a published version, resolved once
    assert handle.json("s.json") == {"marker": 7.0}


def test_missing_partition_names_asset_partition_and_fix(store):
    with pytest.raises(ArtifactMissingError) as caught:
        defs.load_asset_value("emotion_vectors", partition_key="smollm2-135m|smoke")
    message = str(caught.value)
    assert "Asset 'emotion_vectors' has no published version for 'smollm2-135m|smoke'" in message
    assert "dagster asset materialize" in message and "--select emotion_vectors" in message


def test_missing_file_and_tampered_file(store):
    _publish(store, "activations", "smoke", "smollm2-135m", 1.0)
    handle = defs.load_asset_value("activations", partition_key="smollm2-135m|smoke")
    with pytest.raises(ArtifactMissingError, match="older version of activations"):
        handle.table("not_written.parquet")
    handle.path("t.parquet").chmod(0o644)
    (handle.directory / "t.parquet").write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="Re-materialize activations"):
        handle.table("t.parquet")


def test_handle_output_refuses_objects():
    manager = ArtifactIOManager()
    context = dg.build_output_context(asset_key=dg.AssetKey("emotion_vectors"))
    manager.handle_output(context, None)  # MaterializeResult assets hand None: nothing stored
    with pytest.raises(TypeError, match="no pickling"):
        manager.handle_output(context, {"a": 1})


# ---------------------------------------------------------------- declared inputs inside a run

profile_def = dg.StaticPartitionsDefinition(["p"])
model_def = dg.StaticPartitionsDefinition(["a", "b", "c"])
model_profile = dg.MultiPartitionsDefinition({"model": model_def, "profile": profile_def})
SEEN: dict[str, object] = {}


@dg.asset(name="upstream", partitions_def=model_profile)
def _upstream() -> None:
    return None


@dg.asset(
    name="rollup",
    partitions_def=profile_def,
    ins={"upstream": dg.AssetIn(partition_mapping=dg.MultiToSingleDimensionPartitionMapping("profile"))},
)
def _rollup(upstream: ArtifactHandles) -> None:
    SEEN["rollup"] = upstream


@dg.asset(name="single", partitions_def=model_profile)
def _single(upstream: ArtifactHandle) -> None:
    SEEN["single"] = upstream


def _run(asset: dg.AssetsDefinition, key: str, store: ArtifactStore) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [_upstream, asset], selection=[asset], partition_key=key, raise_on_error=False,
        resources={"io_manager": ArtifactIOManager(store=store)},
    )  # fmt: skip


def test_fan_in_hands_the_published_partitions_and_names_the_missing(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    _publish(store, "upstream", "p", "a", 1.0)
    _publish(store, "upstream", "p", "c", 3.0)
    assert _run(_rollup, "p", store).success
    handles = SEEN["rollup"]
    assert isinstance(handles, ArtifactHandles)
    assert list(handles) == ["a", "c"]  # b was never published: a roll-up reads what exists
    assert handles["c"].json("s.json") == {"marker": 3.0}
    with pytest.raises(
        ArtifactMissingError, match=re.escape("'upstream' has no published version for 'b|p'")
    ):
        handles["b"]


def test_single_input_missing_fails_the_step_with_the_fix(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    result = _run(_single, "b|p", store)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialize it first" in str(failure.event_specific_data.error.to_string())
    _publish(store, "upstream", "p", "b", 2.0)
    assert _run(_single, "b|p", store).success
    assert SEEN["single"].table("t.parquet")["x"].tolist() == [2.0, 2.0]


# ---------------------------------------------------------------- no asset module reads another's files


IMPORT_FROM = re.compile(r"^from ([\w.]+) import (\([^)]*\)|[^\n]*)", re.MULTILINE)


def _imports_from(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every top-level ``from module import names`` in a file (read as text: the
    asset modules import at the top, and CPython 3.11's ``ast.parse`` fails inside this test session with
    "AST constructor recursion depth mismatch")."""
    found = []
    for module, names in IMPORT_FROM.findall(path.read_text(encoding="utf-8")):
        cleaned = names.strip("()").replace("\n", " ")
        found.append((module, [n.split(" as ")[0].strip() for n in cleaned.split(",") if n.strip()]))
    return found


def test_import_scan_reads_multi_line_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from a.b import (\n    x,\n    load_y as z,\n)\nfrom c import w\n", encoding="utf-8")
    assert _imports_from(source) == [("a.b", ["x", "load_y"]), ("c", ["w"])]


def test_no_asset_module_imports_a_loader_from_another_asset_module():
    asset_modules = {m.__name__ for m in ASSET_MODULES}
    offenders = []
    for module in ASSET_MODULES:
        for source, names in _imports_from(Path(module.__file__)):
            if source in asset_modules - {module.__name__}:
                loaders = [name for name in names if name.startswith(("load_", "read_"))]
                offenders += [f"{module.__name__}: {source}.{name}" for name in loaders]
    assert offenders == []


# findings_report still builds its pages from the profile's results folder (glob over every asset's
# partitions); its inputs are to become declared ArtifactHandles like the roll-up's.
READS_BY_PATH = {"emotion_assets.report"}


def test_no_asset_module_opens_an_artifact_by_path():
    """Assets read upstream artifacts only through declared inputs (no path into the results tree, no glob
    over it, no hand-written loader of another asset's files)."""
    offenders = set()
    for module in ASSET_MODULES:
        source = Path(module.__file__).read_text(encoding="utf-8")
        if any(
            needle in source for needle in ("Path(store.root)", ".glob(", "store.existing(", "load_dataset(")
        ):
            offenders.add(module.__name__)
    assert offenders == READS_BY_PATH


@dg.asset_check(asset=_upstream)
def _upstream_check(upstream: ArtifactHandle) -> dg.AssetCheckResult:
    SEEN["check"] = upstream
    return dg.AssetCheckResult(passed=True)


def test_an_asset_check_reads_its_asset_at_the_run_partition(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    for model, marker in (("a", 1.0), ("b", 2.0)):
        _publish(store, "upstream", "p", model, marker)
    result = dg.materialize(
        [_upstream, _upstream_check], partition_key="b|p",  # the asset writes nothing here
        resources={"io_manager": ArtifactIOManager(store=store)},
    )  # fmt: skip
    assert result.success
    assert SEEN["check"].partition_key == "b|p" and SEEN["check"].json("s.json") == {"marker": 2.0}
