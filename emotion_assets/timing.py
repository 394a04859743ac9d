"""Per-materialization timing records: metadata on the asset plus a per-profile timing table."""

from __future__ import annotations

import fcntl
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
import torch

from resources.storage import atomic_path

TIMINGS_FILE = "run_timings.parquet"


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

    def metadata(self) -> dict[str, dg.MetadataValue]:
        return {
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
    """Time the body; the caller sets ``record.samples``. Appends to ``<root>/<profile>/run_timings``."""
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
    append_timing(Path(results_root) / profile / TIMINGS_FILE, record)


def append_timing(path: Path, record: TimingRecord) -> None:
    """Append one row under a file lock (several processes may finish steps at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        frame = pd.read_parquet(path) if path.exists() else pd.DataFrame()
        frame = pd.concat([frame, pd.DataFrame([asdict(record)])], ignore_index=True)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
