"""The artifact store: whole-version publishing, pruning, permissions, and the places that rely on it."""

import json
import os
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pandas as pd
import pytest
import torch

from emotion_assets.common import recorded
from emotion_assets.profiles import get_profile
from resources.storage import (
    KEEP_VERSIONS,
    MANIFEST_FILE,
    VERSIONS_DIR,
    WRITER_FILE,
    ArtifactError,
    ArtifactStore,
    read_json,
    read_table,
    read_tensors,
    write_json,
    write_table,
    write_tensors,
)
from resources.tracking import TrackingResource
from tests.artifacts import materialize


def _publish(store: ArtifactStore, value: int, partition: str | None = "m") -> Path:
    with store.publishing(partition_key=f"{partition}|p" if partition else "p"):
        out = store.directory("p", "toy", partition)
        write_tensors(out / "a.safetensors", {"x": torch.full((3,), float(value))})
        write_table(out / "b.parquet", pd.DataFrame({"v": [value]}))
        write_json(out / "c.json", {"v": value})
    return out


def _versions(root: Path, partition: str = "m") -> list[str]:
    return sorted(p.name for p in (root / "p" / "toy" / VERSIONS_DIR / partition).iterdir())


def test_publish_swaps_one_pointer_and_keeps_reader_paths(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    first = _publish(store, 1)
    pointer = tmp_path / "p" / "toy" / "m"
    assert pointer.is_symlink() and not os.path.isabs(os.readlink(pointer))
    assert read_table(pointer / "b.parquet")["v"].tolist() == [1]  # the old reader path still works
    manifest = json.loads((first / MANIFEST_FILE).read_text())
    assert sorted(manifest["files"]) == ["a.safetensors", "b.parquet", "c.json"]
    assert manifest["asset"] == "toy" and manifest["partition_key"] == "m|p"
    assert not (first / WRITER_FILE).exists()

    held = store.existing("p", "toy", "m")  # a reader resolves the pointer once...
    _publish(store, 2)
    assert read_json(held / "c.json") == {"v": 1}  # ...and keeps reading that version
    now = store.existing("p", "toy", "m")
    assert read_json(now / "c.json") == {"v": 2} and read_tensors(now / "a.safetensors")["x"][0] == 2


def test_old_versions_are_pruned_to_the_newest_two(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    outs = [_publish(store, i) for i in range(5)]
    assert _versions(tmp_path) == sorted(o.name for o in outs[-KEEP_VERSIONS:])
    assert os.readlink(tmp_path / "p" / "toy" / "m").endswith(outs[-1].name)


def test_failed_block_publishes_nothing_and_keeps_the_last_version(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    good = _publish(store, 1)
    with pytest.raises(RuntimeError, match="mid-asset"), store.publishing():
        out = store.directory("p", "toy", "m")
        write_json(out / "c.json", {"v": 99})
        raise RuntimeError("mid-asset")
    assert not out.exists() and _versions(tmp_path) == [good.name]
    assert read_json(store.existing("p", "toy", "m") / "c.json") == {"v": 1}


def test_directory_outside_a_publishing_block_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"outside a publishing block.*recorded"):
        ArtifactStore(root_dir=str(tmp_path)).directory("p", "toy", "m")


def test_unpartitioned_asset_and_legacy_folder(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    legacy = tmp_path / "p" / "toy"
    legacy.mkdir(parents=True)
    write_json(legacy / "c.json", {"v": "legacy"})
    assert read_json(store.existing("p", "toy") / "c.json") == {"v": "legacy"}  # read as before
    _publish(store, 1, partition=None)
    assert legacy.is_symlink() and read_json(legacy / "c.json") == {"v": 1}
    kept = sorted((tmp_path / "p" / VERSIONS_DIR / "toy").iterdir())
    assert len(kept) == 2 and kept[0].name.endswith("-legacy") and (kept[0] / MANIFEST_FILE).exists()


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        out = _publish(ArtifactStore(root_dir=str(tmp_path)), 1)
    finally:
        os.umask(old)
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path.name
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode


def test_stale_temporaries_and_dead_writers_are_cleaned(tmp_path):
    store = ArtifactStore(root_dir=str(tmp_path))
    _publish(store, 1)
    parent = tmp_path / "p" / "toy"
    old_tmp, fresh_tmp = parent / ".tmp-b.parquet.old", parent / ".tmp-b.parquet.fresh"
    old_tmp.write_text("half")
    fresh_tmp.write_text("being written")
    hour_ago = time.time() - 3600
    os.utime(old_tmp, (hour_ago, hour_ago))
    dead = subprocess.Popen(["true"])
    dead.wait()
    versions = parent / VERSIONS_DIR / "m"
    for name, pid in (
        ("20000101T000000000000Z-dead", dead.pid),
        ("20000101T000000000000Z-live", os.getpid()),
    ):
        (versions / name).mkdir()
        (versions / name / "a.safetensors").write_bytes(b"partial")
        (versions / name / WRITER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
    _publish(store, 2)
    assert not old_tmp.exists() and fresh_tmp.exists()
    names = _versions(tmp_path)
    assert "20000101T000000000000Z-dead" not in names and "20000101T000000000000Z-live" in names


# ---------------------------------------------------------------- recorded(): the asset-level contract


def _toy_asset(fail: bool):
    @dg.asset(name="toy", partitions_def=dg.StaticPartitionsDefinition(["smoke"]))
    def toy(context: dg.AssetExecutionContext, store: ArtifactStore, tracking: TrackingResource):
        profile = get_profile("smoke")
        with recorded(
            context,
            tracking=tracking,
            store=store,
            phase="0",
            model="-",
            profile=profile,
            device="cpu",
            config=None,
        ) as rec:
            out = store.directory(profile.name, "toy")
            write_table(out / "b.parquet", pd.DataFrame({"v": [1, 2]}))
            if fail:
                raise RuntimeError("asset body failed after its first file")
            write_json(out / "c.json", {"v": 1})
        return dg.MaterializeResult(metadata=rec.metadata())

    return toy


def _materialize(asset, root: Path) -> dg.ExecuteInProcessResult:
    store = ArtifactStore(root_dir=str(root))
    return materialize(
        [asset],
        store=store,
        partition_key="smoke",
        resources={"store": store, "tracking": TrackingResource(enabled=False)},
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )


def test_recorded_publishes_on_success_with_the_manifest_digest_as_data_version(tmp_path):
    result = _materialize(_toy_asset(fail=False), tmp_path)
    assert result.success
    materialization = result.asset_materializations_for_node("toy")[0]
    manifest = json.loads((tmp_path / "smoke" / "toy" / MANIFEST_FILE).read_text())
    assert materialization.tags["dagster/data_version"] == manifest["digest"]
    assert materialization.metadata["artifact_digest"].value == manifest["digest"]
    assert manifest["partition_key"] == "smoke"
    assert materialization.metadata["timing_elapsed_s"].value >= 0  # the timing lives in Dagster's record
    assert not (tmp_path / "smoke" / "run_timings").exists()

    failed = _materialize(_toy_asset(fail=True), tmp_path)
    assert not failed.success
    assert (
        json.loads((tmp_path / "smoke" / "toy" / MANIFEST_FILE).read_text())["digest"] == manifest["digest"]
    )
    assert len(list((tmp_path / "smoke" / VERSIONS_DIR / "toy").iterdir())) == 1


def test_failing_dataset_never_replaces_the_last_good_one(tmp_path, monkeypatch):
    import emotion_assets.dataset as dataset

    good = _materialize(dataset.emotion_dataset, tmp_path)
    assert good.success
    prompts = tmp_path / "smoke" / "emotion_dataset" / "prompts.parquet"
    before = read_table(prompts)
    assert set(before["split"]) == {"train", "eval"}

    def everything_in_train(frame, eval_fraction, seed):  # a split bug the balance check exists to catch
        return frame.assign(split="train")

    monkeypatch.setattr(dataset, "assign_splits", everything_in_train)
    bad = _materialize(dataset.emotion_dataset, tmp_path)
    assert not bad.success
    failure = bad.failure_data_for_node("emotion_dataset").error
    assert "fails its blocking check(s) emotion_dataset_balance" in failure.message
    pd.testing.assert_frame_equal(read_table(prompts), before)


# ---------------------------------------------------------------- model cache


def test_model_cache_is_verified_and_rebuilds_itself(tmp_path, monkeypatch):
    import resources.models as models
    from emotion_assets.registry import EmbeddedGgufSource

    package = tmp_path / "package"
    package.mkdir()
    (package / "m.gguf").write_bytes(b"gguf" * 100)
    conversions = []

    class Fake:
        config = SimpleNamespace()
        hf_quantizer = None

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def save_pretrained(self, path):
            conversions.append(path)
            (Path(path) / "model.safetensors").write_bytes(b"w" * 4096)
            (Path(path) / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_package_dir", lambda *a: package)
    monkeypatch.setattr(models, "AutoTokenizer", Fake)
    monkeypatch.setattr(models, "AutoModelForCausalLM", Fake)
    src = EmbeddedGgufSource(type="embedded_gguf", package="p", file="m.gguf")
    cache = tmp_path / "cache"
    (cache / ".tmp-m-killed").mkdir(parents=True)  # left by a conversion killed earlier

    target, record = models._converted_gguf("m", src, cache)
    assert record["cached"] is False and "files" not in record and len(conversions) == 2
    assert not (cache / ".tmp-m-killed").exists()
    assert models._converted_gguf("m", src, cache)[1]["cached"] is True

    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated cache
    assert models._converted_gguf("m", src, cache)[1]["cached"] is False
    assert weights.stat().st_size == 4096

    weights.write_bytes(b"x" * 4096)  # same size, other bytes
    assert models._converted_gguf("m", src, cache)[1]["cached"] is False

    source = json.loads((target / "source.json").read_text())
    (target / "source.json").write_text(json.dumps({k: v for k, v in source.items() if k != "files"}))
    assert models._converted_gguf("m", src, cache)[1]["cached"] is False  # a record without file hashes
    assert models._converted_gguf("m", src, cache)[1]["cached"] is True


# ---------------------------------------------------------------- report


def test_report_html_escapes_user_text_and_drops_links():
    from emotion_assets.report import safe_markdown_html

    page = safe_markdown_html(
        "# Findings\n\n<script>alert(1)</script> [x](javascript:alert(2)) a < b\n\n"
        "| a |\n|---|\n| <img src=x onerror=alert(3)> |\n"
    )
    assert "<script>" not in page and "<img" not in page and "href" not in page
    assert "&lt;script&gt;" in page and "<table>" in page and "<h1>Findings</h1>" in page


def test_unreadable_artifact_is_a_named_error_not_a_bare_library_error(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ArtifactError, match=r"x\.parquet is not a readable parquet file.*re-materialize"):
        read_table(path)


def test_reader_path_names_the_published_pointer_not_the_version_folder(tmp_path):
    from resources.storage import reader_path

    store = ArtifactStore(root_dir=str(tmp_path))
    with store.publishing():
        folder = store.directory("smoke", "activations", "smollm2-135m")
        (folder / "index.parquet").write_bytes(b"x")
        shown = reader_path(folder / "index.parquet")
    assert shown == str(tmp_path / "smoke" / "activations" / "smollm2-135m" / "index.parquet")
    assert Path(shown).read_bytes() == b"x"  # the pointer path reads the published file
    assert reader_path(tmp_path / "plain.txt") == str(tmp_path / "plain.txt")


def test_tree_sha256_hashes_files_and_folders_by_path_and_content(tmp_path):
    from resources.storage import file_sha256, tree_sha256

    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "data" / "sub" / "b.csv").write_text("text\ny\n")
    assert tree_sha256(tmp_path / "data" / "a.jsonl") == file_sha256(tmp_path / "data" / "a.jsonl")
    before = tree_sha256(tmp_path / "data")
    (tmp_path / "data" / "sub" / "b.csv").rename(tmp_path / "data" / "b.csv")  # same bytes, other place
    moved = tree_sha256(tmp_path / "data")
    (tmp_path / "data" / "b.csv").write_text("text\nz\n")
    assert len({before, moved, tree_sha256(tmp_path / "data")}) == 3
