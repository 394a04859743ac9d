"""Resume folders: finished batches of an unfinished materialization, kept until it publishes.

``<results root>/.resume/<profile>/<asset>/<partition>/<key>.json``, one file per batch, named by the
batch's content key (``emotion_assets.science.batch_cache.batch_key``) and written atomically. A run that
is killed or fails leaves the folder; the next run of the same partition reuses every batch whose inputs
are unchanged and computes the rest. The asset deletes the folder once its version is published.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resources.storage import RESUME_DIR, ArtifactStore, write_json


@dataclass
class ResumeFolder:
    """A :class:`~emotion_assets.science.batch_cache.BatchCache` on disk, with counts of what it served."""

    path: Path
    reused: int = 0
    written: int = 0
    unreadable: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, store: ArtifactStore, profile: str, asset: str, partition: str | None = None) -> ResumeFolder:
        """The resume folder of one artifact (see :meth:`ArtifactStore.resume_path`)."""
        return cls(store.resume_path(profile, asset, partition))

    def _file(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"A resume key must be a hex digest, got {key!r}.")
        return self.path / f"{key}.json"

    def get(self, key: str, valid: Callable[[Any], bool], expected: str) -> Any | None:
        file = self._file(key)
        try:
            payload = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.unreadable.append(f"{file.name}: {exc}")
            return None
        if not isinstance(payload, dict) or payload.get("key") != key or "value" not in payload:
            self.unreadable.append(f"{file.name}: not a batch record for this key")
            return None
        value = payload["value"]
        if not valid(value):
            self.unreadable.append(f"{file.name}: holds {type(value).__name__} instead of {expected}")
            file.unlink(missing_ok=True)
            return None
        self.reused += 1
        return value

    def put(self, key: str, value: Any) -> None:
        write_json(self._file(key), {"key": key, "value": value})
        self.written += 1

    def clear(self) -> None:
        """Delete the folder (after the result it served was published) and its parents left empty, up to
        the ``.resume`` folder itself."""
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.path.parents:
            if parent.name == RESUME_DIR:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: another artifact's batches are waiting there
                break

    def describe(self) -> dict[str, Any]:
        """What this run took from the folder and added to it (for the materialization's metadata)."""
        return {
            "folder": str(self.path),
            "batches_reused": self.reused,
            "batches_computed": self.written,
            "unreadable": list(self.unreadable),
        }
