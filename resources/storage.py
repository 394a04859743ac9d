"""Artifact storage: versioned, verified and atomic; no pickle anywhere.

Layout. Readers use ``<root>/<profile>/<asset>/<partition>/<file>`` (``<root>/<profile>/<asset>/<file>``
for a per-profile asset), as always. That folder is a *pointer*: a relative symlink to one immutable
version, ``<parent>/.versions/<leaf>/<version_id>/``, where ``<parent>/<leaf>`` is the pointer.

Writing. A materialization runs inside :meth:`ArtifactStore.publishing` (``emotion_assets.common.recorded``
opens one for every asset). :meth:`ArtifactStore.directory` then returns a fresh, empty version folder;
files are written there (each one atomically). When the block succeeds the version is published in one
step: ``manifest.json`` (sha256 and size of every file) is written last inside it, then the pointer is
swapped to it with ``os.replace`` of a fresh symlink. When the block fails or the process dies, the pointer
still names the previous version and the unfinished folder is removed later. A reader that resolves the
pointer once (:meth:`ArtifactStore.existing`) sees the old version or the new one, never a mix.

Reading. ``read_table`` / ``read_tensors`` / ``read_json`` check a file of a published version against its
manifest (size, then sha256) and turn a missing, changed, truncated or wrong-format file into an
:class:`ArtifactError` that names the asset, partition, file and the fix.

Pruning policy (:data:`KEEP_VERSIONS`): after each publish the newest two published versions of that
pointer are kept (the current one and the one before, so a reader that resolved the pointer just before
the swap can finish) and older ones are deleted. An unpublished version folder is deleted once its writer
is gone (same host, process no longer running) or, for a writer on another host, after
:data:`STALE_STAGING_S` without change. ``.tmp-*`` files last changed before the publishing run began
(minus :data:`STALE_TMP_GRACE_S`) are deleted beside it.

Resuming. ``<root>/.resume/<profile>/<asset>/<partition>/`` (:meth:`ArtifactStore.resume_path`) holds the
finished batches of a long materialization that has not published yet (``resources.resume``); it is not
an artifact, readers never see it, and the asset deletes it after publishing.

Files and folders follow the umask (group-readable on a shared disk when the umask says so).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emotion_assets.registry import PROJECT_ROOT

VERSIONS_DIR = ".versions"
RESUME_DIR = ".resume"
MANIFEST_FILE = "manifest.json"
WRITER_FILE = ".writer.json"
TMP_PREFIX = ".tmp-"
MANIFEST_FORMAT = 1
KEEP_VERSIONS = 2
STALE_TMP_GRACE_S = 600.0
STALE_STAGING_S = 24 * 3600.0
MATERIALIZE_HINT = "dagster asset materialize -m emotion_assets.definitions --select {asset}{partition}"


class ArtifactError(RuntimeError):
    """An artifact file cannot be trusted: missing, changed since publishing, truncated or wrong format."""


class ArtifactMissingError(ArtifactError, FileNotFoundError):
    """An artifact file or folder does not exist."""


class UnsafePathError(ValueError):
    """A name would put an artifact outside its folder (or outside the results root)."""


def default_results_root() -> str:
    return os.environ.get("EMOTION_RESULTS_DIR", str(PROJECT_ROOT / "results"))


# ---------------------------------------------------------------- permissions


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no read-only way elsewhere; restored at once
    os.umask(mask)
    return mask


def follow_umask(path: Path, *, directory: bool = False) -> None:
    """``mkstemp`` / ``mkdtemp`` create 0600 / 0700; give the mode a plain ``open`` / ``mkdir`` would."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


# ---------------------------------------------------------------- atomic single files


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    The temporary name starts with ``.tmp-`` so a crash leaves nothing that looks like a finished
    artifact, and ``os.replace`` makes the switch atomic on POSIX and Windows.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        follow_umask(tmp)  # after the write: some writers replace the file and its mode
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, payload: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default), encoding="utf-8")
    return path


def write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata or {}))
    return path


def write_table(path: Path, frame: pd.DataFrame, *, csv: bool = False) -> Path:
    """Parquet always; a CSV twin beside it when people will open it in a spreadsheet."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    if csv:
        with atomic_path(path.with_suffix(".csv")) as tmp:
            frame.to_csv(tmp, index=False)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def reader_path(path: Path) -> str:
    """The stable reader path of a file inside a version folder (``<asset>/<partition>/<file>``, through the
    published pointer), for metadata a person opens; other paths are returned unchanged."""
    parts = Path(path).parts  # [..., VERSIONS_DIR, <leaf>, <version id>, <file>...]
    if VERSIONS_DIR in parts:
        i = len(parts) - 1 - parts[::-1].index(VERSIONS_DIR)
        if len(parts) > i + 2:
            return str(Path(*parts[:i], parts[i + 1], *parts[i + 3 :]))
    return str(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- verified reads


def read_json(path: Path) -> Any:
    """JSON of an artifact file, checked against its version's manifest."""
    real = verify_artifact_file(path)
    try:
        return json.loads(real.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise _format_error(path, real, "JSON", exc) from exc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors artifact file, checked against its version's manifest."""
    real = verify_artifact_file(path)
    try:
        return load_file(str(real))
    except (SafetensorError, ValueError, OSError) as exc:
        raise _format_error(path, real, "safetensors", exc) from exc


def read_table(path: Path) -> pd.DataFrame:
    """A parquet artifact table, checked against its version's manifest."""
    import pyarrow as pa

    real = verify_artifact_file(path)
    try:
        return pd.read_parquet(real)
    except (pa.ArrowException, ValueError, OSError) as exc:  # ArrowInvalid is both
        raise _format_error(path, real, "parquet", exc) from exc


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (artifacts, model weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(payload: Any) -> str:
    """Hex sha256 of ``payload`` as canonical JSON (sorted keys, other values by ``str``): config hashes, keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def tree_sha256(path: Path) -> str:
    """Hex sha256 of a file (:func:`file_sha256`) or of a folder: every file below it, in sorted order, by
    relative path and content hash (input datasets given as folders)."""
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path).as_posix()}\0{file_sha256(child)}\n".encode())
    return digest.hexdigest()


# (path, inode, size, mtime, ctime) -> sha256 of files already verified in this process; a version folder
# is immutable, and any write changes ctime, so a changed file is never taken from here.
_VERIFIED: dict[tuple[str, int, int, int, int], str] = {}


def verify_artifact_file(path: Path) -> Path:
    """The real path of ``path`` after checking it against its version's manifest.

    Files outside a published version (a folder being written, a file elsewhere, a results tree from before
    versioned storage) have no manifest to check against and are returned as they are.
    """
    real = Path(os.path.realpath(path))
    version = _version_dir_of(real)
    manifest = _read_manifest(version) if version is not None else None
    if manifest is None:
        if not real.exists():
            raise ArtifactMissingError(f"{path} does not exist.")
        return real
    rel = real.relative_to(version).as_posix()
    where = _describe(manifest, rel, real)
    entry = manifest["files"].get(rel)
    if entry is None:
        raise ArtifactError(f"{where} is not listed in the version's manifest. {_fix(manifest)}")
    try:
        stat = real.stat()
    except FileNotFoundError as exc:
        raise ArtifactMissingError(
            f"{where} is missing from its published version. {_fix(manifest)}"
        ) from exc
    if stat.st_size != entry["size"]:
        raise ArtifactError(
            f"{where} has {stat.st_size} bytes but was published with {entry['size']} (truncated or "
            f"overwritten). {_fix(manifest)}"
        )
    actual = _sha256_once(real, stat)
    if actual != entry["sha256"]:
        raise ArtifactError(
            f"{where} changed after it was published (sha256 {actual[:12]}… differs from the manifest's "
            f"{entry['sha256'][:12]}…). {_fix(manifest)}"
        )
    return real


def _sha256_once(path: Path, stat: os.stat_result) -> str:
    """sha256 of ``path``, hashed once per process while its inode, size, mtime and ctime stay the same."""
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = file_sha256(path)
    return _VERIFIED[key]


def _version_dir_of(real: Path) -> Path | None:
    """The ``.versions/<leaf>/<version_id>`` folder holding ``real``, if any."""
    for parent in list(real.parents)[:8]:
        if parent.parent.parent.name == VERSIONS_DIR:
            return parent
    return None


def _read_manifest(version: Path) -> dict[str, Any] | None:
    path = version / MANIFEST_FILE
    if not path.exists():
        return None  # a version still being written: nothing published to check against
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no `files` mapping")
        return manifest
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"The manifest {path} of version {version.name} is unreadable ({exc}); the files of this version "
            f"cannot be checked. Re-materialize the asset that wrote {version.parent.parent.parent}."
        ) from exc


def _describe(manifest: Mapping[str, Any], rel: str, real: Path) -> str:
    partition = manifest.get("partition_key") or manifest.get("partition")
    part = f", partition {partition!r}" if partition else ""
    return (
        f"File {rel!r} of asset {manifest.get('asset')!r}{part} (profile {manifest.get('profile')!r}, {real})"
    )


def _fix(manifest: Mapping[str, Any]) -> str:
    asset = manifest.get("asset", "the asset")
    partition = manifest.get("partition_key") or manifest.get("partition")
    part = f" for partition {partition}" if partition else ""
    command = MATERIALIZE_HINT.format(
        asset=asset, partition=f" --partition '{partition}'" if partition else ""
    )
    return f"Re-materialize {asset}{part} (`{command}`)."


def _format_error(path: Path, real: Path, kind: str, exc: BaseException) -> ArtifactError:
    version = _version_dir_of(real)
    manifest = _read_manifest(version) if version is not None else None
    reason = f"{type(exc).__name__}: {exc}"
    if manifest is not None:
        where = _describe(manifest, real.relative_to(version).as_posix(), real)
        return ArtifactError(f"{where} is not a readable {kind} file ({reason}). {_fix(manifest)}")
    return ArtifactError(
        f"{path} is not a readable {kind} file ({reason}); it is truncated, overwritten or of another "
        "format. Re-create it (re-materialize the asset that wrote it)."
    )


# ---------------------------------------------------------------- manifests


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, size}}`` of every file under ``folder`` except store bookkeeping."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(folder).rglob("*")):
        if (
            not path.is_file()
            or path.name in (MANIFEST_FILE, WRITER_FILE)
            or path.name.startswith(TMP_PREFIX)
        ):
            continue
        stat = path.stat()
        files[path.relative_to(folder).as_posix()] = {
            "sha256": _sha256_once(path, stat),
            "size": stat.st_size,
        }
    return files


def manifest_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One hash of a version's content (paths, sizes, hashes): its Dagster data version."""
    lines = "".join(f"{rel}\t{entry['size']}\t{entry['sha256']}\n" for rel, entry in sorted(files.items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def verify_files(folder: Path, files: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Problems of ``folder`` against a ``build_manifest`` record (empty when every file matches)."""
    problems = []
    for rel, entry in sorted(files.items()):
        path = Path(folder) / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif (stat := path.stat()).st_size != entry["size"]:
            problems.append(f"{rel}: {stat.st_size} bytes, recorded {entry['size']}")
        elif _sha256_once(path, stat) != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from the record")
    return problems


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- versions and publishing


@dataclass
class StagedVersion:
    """One version folder written by the current publication."""

    pointer: Path
    directory: Path
    profile: str
    asset: str
    partition: str | None
    partition_key: str | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    digest: str = ""


@dataclass
class Publication:
    """The versions one materialization writes; all published when it succeeds, all discarded otherwise."""

    partition_key: str | None = None
    started_at: float = field(default_factory=time.time)
    staged: dict[Path, StagedVersion] = field(default_factory=dict)
    published: bool = False

    @property
    def digest(self) -> str:
        """Data version of what was published: the manifest digest (combined over several folders)."""
        digests = [v.digest for v in self.staged.values() if v.digest]
        if len(digests) <= 1:
            return digests[0] if digests else ""
        return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()

    def metadata(self) -> dict[str, dg.MetadataValue]:
        if not self.published or not self.staged:
            return {}
        versions = [v.directory.name for v in self.staged.values()]
        return {
            "artifact_version": dg.MetadataValue.text(", ".join(versions)),
            "artifact_digest": dg.MetadataValue.text(self.digest),
            "artifact_files": dg.MetadataValue.int(sum(len(v.files) for v in self.staged.values())),
        }

    def publish(self) -> None:
        done: set[Path] = set()
        try:
            for pointer, version in self.staged.items():
                _publish(version)
                done.add(pointer)
        except BaseException:
            for pointer, version in self.staged.items():
                if pointer not in done:  # never swapped in: nobody can be reading it
                    shutil.rmtree(version.directory, ignore_errors=True)
            raise
        self.published = True
        for pointer in self.staged:
            _prune(pointer, self.started_at)

    def discard(self) -> None:
        for version in self.staged.values():
            shutil.rmtree(version.directory, ignore_errors=True)


_ACTIVE: contextvars.ContextVar[Publication | None] = contextvars.ContextVar("publication", default=None)


def _new_version_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def _publish(version: StagedVersion) -> None:
    """Manifest last inside the version, then one atomic pointer swap."""
    version.files = build_manifest(version.directory)
    version.digest = manifest_digest(version.files)
    manifest = {
        "format": MANIFEST_FORMAT,
        "profile": version.profile,
        "asset": version.asset,
        "partition": version.partition,
        "partition_key": version.partition_key,
        "version": version.directory.name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "digest": version.digest,
        "files": version.files,
    }
    write_json(version.directory / MANIFEST_FILE, manifest)
    (version.directory / WRITER_FILE).unlink(missing_ok=True)  # the manifest now marks it finished
    _fsync_dir(version.directory)
    _swap_pointer(version.pointer, version.directory)


def _swap_pointer(pointer: Path, target: Path) -> None:
    parent = pointer.parent
    link = parent / f"{TMP_PREFIX}link-{target.name}"
    os.symlink(os.path.relpath(target, parent), link)
    try:
        if pointer.is_dir() and not pointer.is_symlink():
            _adopt_legacy_folder(pointer)
        os.replace(link, pointer)
    finally:
        if link.is_symlink():
            link.unlink()
    _fsync_dir(parent)


def _adopt_legacy_folder(pointer: Path) -> None:
    """A folder written before versioned storage becomes the previous version (with a manifest)."""
    stamp = datetime.fromtimestamp(pointer.stat().st_mtime, UTC)
    legacy = pointer.parent / VERSIONS_DIR / pointer.name / f"{stamp:%Y%m%dT%H%M%S%fZ}-legacy"
    legacy.parent.mkdir(parents=True, exist_ok=True)
    os.rename(pointer, legacy)
    files = build_manifest(legacy)
    write_json(
        legacy / MANIFEST_FILE,
        {"format": MANIFEST_FORMAT, "asset": pointer.name, "version": legacy.name, "legacy": True,
         "digest": manifest_digest(files), "files": files},
    )  # fmt: skip


def _pointer_target(pointer: Path) -> str | None:
    with contextlib.suppress(OSError):
        return Path(os.readlink(pointer)).name
    return None


def _prune(pointer: Path, started_at: float) -> None:
    """Keep the newest :data:`KEEP_VERSIONS` published versions; drop dead unpublished ones and old temps."""
    folder = pointer.parent / VERSIONS_DIR / pointer.name
    current = _pointer_target(pointer)
    published, unpublished = [], []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not child.is_dir():
            continue
        (published if (child / MANIFEST_FILE).exists() else unpublished).append(child)
    keep = {p.name for p in published[-KEEP_VERSIONS:]} | {current}
    for child in published:
        if child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
    for child in unpublished:
        if child.name != current and _staging_is_stale(child):
            shutil.rmtree(child, ignore_errors=True)
    clean_stale_temporaries(pointer.parent, started_at - STALE_TMP_GRACE_S)


def _staging_is_stale(folder: Path) -> bool:
    """An unpublished version whose writer is gone: dead on this host, or silent for a day elsewhere.

    A live writer records itself in ``.writer.json`` right after creating the folder; a folder without
    that record was left between the two steps and is stale once older than the temporary-file grace.
    """
    try:
        writer = json.loads((folder / WRITER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _newest_mtime(folder) < time.time() - STALE_TMP_GRACE_S
    except (OSError, ValueError):
        writer = {}
    if writer.get("host") == socket.gethostname() and isinstance(writer.get("pid"), int):
        try:
            os.kill(writer["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's process
        else:
            return writer["pid"] != os.getpid() and _newest_mtime(folder) < time.time() - STALE_STAGING_S
    return _newest_mtime(folder) < time.time() - STALE_STAGING_S


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [p.lstat().st_mtime for p in folder.rglob("*")]
    return max(times)


def clean_stale_temporaries(folder: Path, older_than: float) -> list[Path]:
    """Delete ``.tmp-*`` files, links and folders directly in ``folder`` last changed before ``older_than``."""
    removed = []
    for child in Path(folder).glob(f"{TMP_PREFIX}*") if Path(folder).is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if child.lstat().st_mtime >= older_than:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
            removed.append(child)
    return removed


# ---------------------------------------------------------------- the resource


def _component(value: str, what: str) -> str:
    """One folder name: no separators, no ``.``/``..``, nothing the store reserves (leading dot)."""
    if (
        not isinstance(value, str)
        or not value
        or value.startswith(".")
        or any(c in value for c in "/\\\0")
        or len(value) > 255
    ):
        raise UnsafePathError(
            f"{what} {value!r} cannot be a folder name under the results root: it must be non-empty, may not "
            "contain '/', '\\' or NUL and may not start with '.'. Profile and model names are checked when "
            "data/profiles.yaml and data/models.yaml are loaded; use a name that passes that check."
        )
    return value


class ArtifactStore(dg.ConfigurableResource):
    """Where assets write their artifacts: ``<root>/<profile>/<asset>/<partition>/`` (see the module doc)."""

    root_dir: str = Field(
        default="", description="Results folder; empty = $EMOTION_RESULTS_DIR or <project>/results."
    )

    @property
    def root(self) -> str:
        return self.root_dir or default_results_root()

    def pointer(self, profile: str, asset: str, partition: str | None = None) -> Path:
        """The reader path of an artifact folder, refused when any part would leave the results root."""
        path = Path(self.root) / _component(profile, "Profile") / _component(asset, "Asset")
        if partition is not None:
            path = path / _component(partition, "Partition")
        self._inside_root(path.parent)
        return path

    def resume_path(self, profile: str, asset: str, partition: str | None = None) -> Path:
        """``<root>/.resume/<profile>/<asset>[/<partition>]``: finished batches of an unfinished
        materialization (``resources.resume``), outside every artifact folder."""
        path = Path(self.root) / RESUME_DIR / _component(profile, "Profile") / _component(asset, "Asset")
        if partition is not None:
            path = path / _component(partition, "Partition")
        self._inside_root(path.parent)
        return path

    def _inside_root(self, path: Path) -> Path:
        root = Path(os.path.realpath(self.root))
        real = Path(os.path.realpath(path))
        if real != root and root not in real.parents:
            raise UnsafePathError(
                f"{path} resolves to {real}, outside the results root {root}; refusing to read or write "
                "there. Remove the link or name that leads out of the results folder."
            )
        return real

    @contextlib.contextmanager
    def publishing(self, partition_key: str | None = None) -> Iterator[Publication]:
        """Collect the versions written by :meth:`directory` in the block; publish them if it succeeds."""
        publication = Publication(partition_key=partition_key)
        token = _ACTIVE.set(publication)
        try:
            yield publication
        except BaseException:
            publication.discard()
            raise
        finally:
            _ACTIVE.reset(token)
        publication.publish()

    def directory(self, profile: str, asset: str, partition: str | None = None) -> Path:
        """A new, empty version folder for this artifact; it is published when the publishing block ends."""
        publication = _ACTIVE.get()
        if publication is None:
            raise RuntimeError(
                f"ArtifactStore.directory({profile!r}, {asset!r}, {partition!r}) was called outside a "
                "publishing block. Write artifacts inside `with recorded(...)` (assets) or "
                "`with store.publishing():`, so the files are published together or not at all."
            )
        pointer = self.pointer(profile, asset, partition)
        if pointer in publication.staged:
            return publication.staged[pointer].directory
        directory = pointer.parent / VERSIONS_DIR / pointer.name / _new_version_id()
        directory.mkdir(parents=True)
        self._inside_root(directory)
        writer = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        (directory / WRITER_FILE).write_text(json.dumps(writer), encoding="utf-8")
        publication.staged[pointer] = StagedVersion(
            pointer=pointer,
            directory=directory,
            profile=profile,
            asset=asset,
            partition=partition,
            partition_key=publication.partition_key,
        )
        return directory

    def existing(self, profile: str, asset: str, partition: str | None = None) -> Path:
        """The published version folder of an upstream artifact (the pointer resolved once).

        Read every file of one artifact from the folder returned here, so they come from the same version.
        """
        path = self.pointer(profile, asset, partition)
        if not path.is_dir():
            part = f" partition {partition!r}" if partition else ""
            raise ArtifactMissingError(
                f"Upstream artifact {asset!r}{part} for profile {profile!r} is missing at {path}. "
                f"Materialize {asset} for this partition first (or the whole job)."
            )
        real = self._inside_root(path)
        if path.is_symlink() and not (real / MANIFEST_FILE).is_file():
            raise ArtifactError(
                f"Artifact {asset!r} for profile {profile!r} at {path} points at version {real.name}, which "
                f"has no manifest, so its files cannot be checked. Re-materialize {asset} for this partition."
            )
        return real
