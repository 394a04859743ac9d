"""Fault injection on the artifact store: kill -9 at every write step, damaged files, escaping names.

* Kill: a child process writes a three-file version (safetensors, parquet, JSON) and SIGKILLs itself at
  write step i, for every i. Afterwards a reader sees the old version or the new one, whole, and a rerun
  publishes and cleans up after the dead writer.
* Damage: every artifact kind gets flipped bytes, truncation, emptying, another format, extra bytes and
  deletion; each read fails with an error naming the asset, partition, file and the fix.
* Names: names that would escape the results root are refused by the store itself (the YAML loaders
  refuse them earlier; see test_trusted_inputs.py).
"""

import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from resources.storage import (
    MANIFEST_FILE,
    TMP_PREFIX,
    VERSIONS_DIR,
    ArtifactError,
    ArtifactMissingError,
    ArtifactStore,
    UnsafePathError,
    read_json,
    read_table,
    read_tensors,
    write_json,
    write_table,
    write_tensors,
)

PROFILE, ASSET, PARTITION, KEY = "p", "toy", "m", "m|p"
FILES = {"tensors": "a.safetensors", "table": "b.parquet", "json": "c.json"}
READERS: dict[str, Callable[[Path], object]] = {
    "tensors": read_tensors,
    "table": read_table,
    "json": read_json,
}
# The os calls through which the store changes the disk; the child counts them and dies at step i.
WRITE_CALLS = ("open", "mkdir", "fsync", "replace", "rename", "symlink", "unlink")


def write_version(root: Path, value: int) -> None:
    """A multi-file asset write, as an asset does it inside ``recorded``."""
    store = ArtifactStore(root_dir=str(root))
    with store.publishing(partition_key=KEY):
        out = store.directory(PROFILE, ASSET, PARTITION)
        write_tensors(out / FILES["tensors"], {"x": torch.full((64,), float(value))})
        write_table(out / FILES["table"], pd.DataFrame({"v": [value] * 8}))
        write_json(out / FILES["json"], {"v": value})


def read_version(root: Path) -> int:
    """Read all three files through one resolved pointer; fail on a mix of versions."""
    folder = ArtifactStore(root_dir=str(root)).existing(PROFILE, ASSET, PARTITION)
    values = {
        int(read_tensors(folder / FILES["tensors"])["x"][0]),
        int(read_table(folder / FILES["table"])["v"].iloc[0]),
        int(read_json(folder / FILES["json"])["v"]),
    }
    assert len(values) == 1, f"reader saw a mix of versions: {values}"
    return values.pop()


def _killed_writer(root: str, kill_at: int, steps_file: str) -> None:
    """Child process: write version 2, SIGKILL itself at write step ``kill_at`` (never if out of range)."""
    count = 0

    def counted(original):
        def call(*args, **kwargs):
            nonlocal count
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            count += 1
            return original(*args, **kwargs)

        return call

    originals = {name: getattr(os, name) for name in WRITE_CALLS}
    for name, original in originals.items():
        setattr(os, name, counted(original))
    write_version(Path(root), 2)
    for name, original in originals.items():
        setattr(os, name, original)
    Path(steps_file).write_text(str(count))


def _run_child(root: Path, kill_at: int, steps_file: Path) -> int | None:
    ctx = multiprocessing.get_context("forkserver")  # a fresh, single-threaded child per step
    process = ctx.Process(target=_killed_writer, args=(str(root), kill_at, str(steps_file)))
    process.start()
    process.join(timeout=120)
    return process.exitcode


def _leftovers(root: Path) -> list[str]:
    """Anything in the tree that is neither a published version nor a pointer."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.name.startswith(TMP_PREFIX) or (
            path.parent.parent.name == VERSIONS_DIR and path.is_dir() and not (path / MANIFEST_FILE).exists()
        ):
            found.append(rel)
    return sorted(found)


def test_kill_at_every_write_step_never_exposes_a_mixed_version(tmp_path):
    multiprocessing.get_context("forkserver").set_forkserver_preload(["resources.storage"])
    base = tmp_path / "base"
    write_version(base, 1)
    steps_file = tmp_path / "steps"
    dry = tmp_path / "dry"
    shutil.copytree(base, dry, symlinks=True)
    assert _run_child(dry, kill_at=10**9, steps_file=steps_file) == 0
    n_steps = int(steps_file.read_text())
    assert read_version(dry) == 2 and n_steps >= 20

    seen, left_behind = [], 0
    for step in range(n_steps):
        tree = tmp_path / f"kill-{step}"
        shutil.copytree(base, tree, symlinks=True)
        assert _run_child(tree, kill_at=step, steps_file=steps_file) == -signal.SIGKILL, step
        seen.append(read_version(tree))  # old or new, whole, verified against its manifest
        # An hour later, a rerun publishes and removes everything the dead writer left behind.
        hour_ago = time.time() - 3600
        left_behind += bool(_leftovers(tree))
        for rel in _leftovers(tree):
            os.utime(tree / rel, (hour_ago, hour_ago), follow_symlinks=False)
        write_version(tree, 3)
        assert read_version(tree) == 3
        assert _leftovers(tree) == [], step
    # Before the pointer swap readers see version 1, from the swap on version 2: one switch, no mix.
    switch = seen.index(2)
    assert set(seen[:switch]) == {1} and set(seen[switch:]) == {2}, seen
    assert 0 < switch < n_steps and left_behind > 0
    print(
        f"\nkill -9 points: {n_steps}; new version from step {switch}; {left_behind} left debris, all cleaned"
    )


# ---------------------------------------------------------------- damaged files


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_format(path: Path) -> None:
    """Same size, but the bytes of another format (parquet magic for JSON, a JSON document otherwise)."""
    size = path.stat().st_size
    other = b"PAR1\x15\x00\x15" if path.suffix == ".json" else b'{"not": "this format"}'
    path.write_bytes(other.ljust(size, b" ")[:size])


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flip_one_byte": _flip_middle,
    "truncate_half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncate_empty": lambda p: p.write_bytes(b""),
    "other_format_same_size": _other_format,
    "append_garbage": lambda p: p.write_bytes(p.read_bytes() + b"\x00garbage"),
    "delete": lambda p: p.unlink(),
}


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_artifact_names_asset_partition_file_and_fix(tmp_path, kind, damage):
    write_version(tmp_path, 1)
    folder = ArtifactStore(root_dir=str(tmp_path)).existing(PROFILE, ASSET, PARTITION)
    path = folder / FILES[kind]
    DAMAGE[damage](path)
    with pytest.raises(ArtifactError) as err:
        READERS[kind](path)
    message = str(err.value)
    assert f"File {FILES[kind]!r} of asset {ASSET!r}, partition {KEY!r}" in message
    assert f"Re-materialize {ASSET} for partition {KEY}" in message
    assert f"--select {ASSET} --partition '{KEY}'" in message
    if damage == "delete":
        assert isinstance(err.value, FileNotFoundError)
    # The other files of the version are untouched and still read.
    for other, name in FILES.items():
        if other != kind:
            READERS[other](folder / name)


UNVERSIONED_DAMAGE = ("truncate_half", "truncate_empty", "other_format_same_size")


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("damage", UNVERSIONED_DAMAGE)
def test_damaged_file_without_manifest_is_a_named_error_not_a_library_error(tmp_path, kind, damage):
    """Files outside a published version (older results trees) cannot be checked against a manifest, but
    a file that does not parse still fails with its path and the fix, not a bare library error."""
    legacy = tmp_path / PROFILE / ASSET / PARTITION
    legacy.mkdir(parents=True)
    write_tensors(legacy / FILES["tensors"], {"x": torch.ones(64)})
    write_table(legacy / FILES["table"], pd.DataFrame({"v": [1] * 8}))
    write_json(legacy / FILES["json"], {"v": 1})
    path = legacy / FILES[kind]
    DAMAGE[damage](path)
    with pytest.raises(ArtifactError, match=rf"(?s){FILES[kind]} is not a readable .* file.*re-materialize"):
        READERS[kind](path)


def test_damaged_manifest_and_pointer_are_named(tmp_path):
    write_version(tmp_path, 1)
    store = ArtifactStore(root_dir=str(tmp_path))
    folder = store.existing(PROFILE, ASSET, PARTITION)
    (folder / MANIFEST_FILE).write_text("{ not json")
    with pytest.raises(ArtifactError, match=r"manifest .* is unreadable.*Re-materialize"):
        read_json(folder / FILES["json"])
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"has no manifest.*Re-materialize toy"):
        store.existing(PROFILE, ASSET, PARTITION)
    shutil.rmtree(folder)  # the pointer now dangles
    with pytest.raises(ArtifactMissingError, match=r"'toy' partition 'm' for profile 'p' is missing"):
        store.existing(PROFILE, ASSET, PARTITION)


def test_file_added_to_a_published_version_is_refused(tmp_path):
    write_version(tmp_path, 1)
    folder = ArtifactStore(root_dir=str(tmp_path)).existing(PROFILE, ASSET, PARTITION)
    write_json(folder / "extra.json", {"smuggled": True})
    with pytest.raises(ArtifactError, match=r"'extra.json' .* is not listed in the version's manifest"):
        read_json(folder / "extra.json")


# ---------------------------------------------------------------- names that escape


UNSAFE_STORE_NAMES = [
    "..",
    ".",
    "",
    "../escape",
    "mine/../smoke",
    "../../relia_escape",
    "../../../../x",
    "/abs/path",
    "a/b",
    "a\\b",
    "nul\0byte",
    ".versions",
    ".tmp-x",
]


@pytest.mark.parametrize("position", ["profile", "asset", "partition"])
@pytest.mark.parametrize("name", UNSAFE_STORE_NAMES)
def test_store_refuses_names_that_bypassed_validation(tmp_path, name, position):
    root = tmp_path / "results"
    root.mkdir()
    store = ArtifactStore(root_dir=str(root))
    parts = {"profile": "p", "asset": "toy", "partition": "m", position: name}
    with pytest.raises(UnsafePathError, match="cannot be a folder name under the results root"):
        store.existing(**parts)
    with pytest.raises(UnsafePathError), store.publishing():
        store.directory(**parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"] and not any(root.iterdir())


def test_store_refuses_a_link_that_leads_out_of_the_root(tmp_path):
    root, outside = tmp_path / "results", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "p").symlink_to(outside)
    store = ArtifactStore(root_dir=str(root))
    with pytest.raises(UnsafePathError, match="outside the results root"), store.publishing():
        store.directory("p", "toy", "m")
    (outside / "toy" / "m").mkdir(parents=True)
    with pytest.raises(UnsafePathError, match="outside the results root"):
        store.existing("p", "toy", "m")
    assert not any((outside / "toy" / "m").iterdir())
