"""Per-materialization timing records: metadata on the asset plus one timing file per run and asset.

Each materialization writes its own row to ``<root>/<profile>/run_timings/<...>.parquet`` (no shared file
to rewrite, lock or corrupt); :func:`read_timings` gathers them (and a ``run_timings.parquet`` written
before per-run files). Timing is a side record: a problem writing or reading it is reported as a warning
and in metadata, never fatal to the run.
"""

from __future__ import annotations

import resource
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
import torch

from resources.storage import (
    STALE_TMP_GRACE_S,
    ArtifactError,
    atomic_path,
    clean_stale_temporaries,
    read_table,
)

TIMINGS_FILE = "run_timings.parquet"  # the single table of earlier versions, still read
TIMINGS_DIR = "run_timings"


@dataclass
class TimingRecord:
    phase: str
    asset: str
    model: str
    profile: str
    device: str
    run_id: str = ""
    started_at: str = ""
    elapsed_s: float = 0.0
    samples: int = 0
    throughput_per_s: float = 0.0
    throughput_unit: str = "samples"
    peak_memory_mb: float = 0.0
    memory_kind: str = "process_peak_rss"
    problem: str = ""

    def metadata(self) -> dict[str, dg.MetadataValue]:
        extra = {"timing_record_problem": dg.MetadataValue.text(self.problem)} if self.problem else {}
        return {
            **extra,
            "timing_elapsed_s": dg.MetadataValue.float(round(self.elapsed_s, 3)),
            "timing_samples": dg.MetadataValue.int(self.samples),
            f"timing_{self.throughput_unit}_per_s": dg.MetadataValue.float(round(self.throughput_per_s, 2)),
            "timing_peak_memory_mb": dg.MetadataValue.float(round(self.peak_memory_mb, 1)),
            "timing_memory_kind": dg.MetadataValue.text(self.memory_kind),
            "device": dg.MetadataValue.text(self.device),
        }


def _peak_memory_mb(device: str) -> tuple[float, str]:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "process_peak_rss"


@contextmanager
def timed(
    results_root: str | Path,
    *,
    phase: str,
    asset: str,
    model: str,
    profile: str,
    device: str,
    run_id: str = "",
    throughput_unit: str = "samples",
) -> Iterator[TimingRecord]:
    """Time the body; the caller sets ``record.samples``. Writes ``<root>/<profile>/run_timings/*.parquet``."""
    record = TimingRecord(
        phase=phase,
        asset=asset,
        model=model,
        profile=profile,
        device=device,
        run_id=run_id,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        throughput_unit=throughput_unit,
    )
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield record
    record.elapsed_s = time.perf_counter() - start
    record.throughput_per_s = record.samples / record.elapsed_s if record.elapsed_s > 0 else 0.0
    record.peak_memory_mb, record.memory_kind = _peak_memory_mb(device)
    try:
        write_timing(Path(results_root) / profile / TIMINGS_DIR, record)
    except Exception as exc:  # a side record: report it, never fail the materialization over it
        record.problem = f"timing record not written: {type(exc).__name__}: {exc}"
        warnings.warn(record.problem, stacklevel=2)


def write_timing(folder: Path, record: TimingRecord) -> Path:
    """One small parquet file per materialization; stale temporaries of killed writers are removed."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    run = "".join(c for c in record.run_id if c.isalnum())[:8] or "norun"
    path = folder / f"{stamp}-{record.asset}-{record.model}-{run}-{uuid.uuid4().hex[:6]}.parquet"
    row = {k: v for k, v in asdict(record).items() if k != "problem"}
    with atomic_path(path) as tmp:
        pd.DataFrame([row]).to_parquet(tmp, index=False)
    clean_stale_temporaries(folder, time.time() - STALE_TMP_GRACE_S)
    return path


def read_timings(profile_dir: Path, pattern: str = "*.parquet") -> tuple[pd.DataFrame | None, list[str]]:
    """Every timing row of a profile (of the record files matching ``pattern``; the single table of earlier
    versions is always read), and one line per unreadable timing file (skipped, never fatal)."""
    profile_dir = Path(profile_dir)
    files = sorted((profile_dir / TIMINGS_DIR).glob(pattern))
    if (profile_dir / TIMINGS_FILE).exists():
        files.insert(0, profile_dir / TIMINGS_FILE)
    frames, problems = [], []
    for path in files:
        try:
            frames.append(read_table(path))
        except (ArtifactError, OSError) as exc:
            problems.append(f"{path}: {exc}. Delete the file; it only records how long a run took.")
    return (pd.concat(frames, ignore_index=True) if frames else None), problems


def past_medians(
    results_root: str | Path, profile: str, asset: str | None = None, model: str | None = None
) -> dict[tuple[str, str], float]:
    """Median ``elapsed_s`` of the earlier timing records per (asset, model) on ``profile``: the estimate
    ``python -m jobs.study --dry-run`` prints. Given ``asset`` and ``model``, only their record files are read
    (a record's file name starts ``<stamp>-<asset>-<model>-``). Unreadable records are skipped (a side record).
    """
    pattern = "*.parquet" if asset is None or model is None else f"*-{asset}-{model}-*.parquet"
    timings, _ = read_timings(Path(results_root) / profile, pattern)
    if timings is None or timings.empty:
        return {}
    if asset is not None and model is not None:
        timings = timings[(timings["asset"] == asset) & (timings["model"] == model)]
    medians = timings.groupby(["asset", "model"])["elapsed_s"].median()
    return {(str(a), str(m)): float(v) for (a, m), v in medians.items()}


def past_estimate_s(results_root: str | Path, profile: str, asset: str, model: str) -> float | None:
    """:func:`past_medians` of one asset × model, else None (no record yet)."""
    return past_medians(results_root, profile, asset, model).get((asset, model))
