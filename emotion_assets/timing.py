"""Per-materialization timing: measured around the asset's body, kept in its Dagster metadata.

:func:`timed` measures the body (wall seconds, samples and throughput, peak memory) and the asset puts
:meth:`TimingRecord.metadata` on its materialization; Dagster's event log is then the one store of timings.
:func:`recorded_seconds` reads ``timing_elapsed_s`` back from an instance's materialization records, and
:func:`past_estimate_s` is the median the dry run and the next materialization's metadata show.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg
import pandas as pd
import torch

ELAPSED_KEY = "timing_elapsed_s"  # the materialization metadata key of the body's seconds
PAGE = 1000  # materialization records fetched per query
RECORD_COLUMNS = ["run_id", "asset", "partition", "recorded_s"]


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
            ELAPSED_KEY: dg.MetadataValue.float(round(self.elapsed_s, 3)),
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
    *,
    phase: str,
    asset: str,
    model: str,
    profile: str,
    device: str,
    run_id: str = "",
    throughput_unit: str = "samples",
) -> Iterator[TimingRecord]:
    """Time the body; the caller sets ``record.samples``. The record goes into the asset's metadata."""
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


def _materializations(
    instance: dg.DagsterInstance, asset: str, partitions: list[str] | None = None
) -> Iterator[dg.EventLogRecord]:
    """Every materialization record of ``asset`` (of ``partitions`` only, when given), newest first."""
    records_filter = dg.AssetRecordsFilter(
        asset_key=dg.AssetKey.from_user_string(asset), asset_partitions=partitions
    )
    cursor = None
    while True:
        page = instance.fetch_materializations(records_filter, limit=PAGE, cursor=cursor)
        yield from page.records
        if not page.has_more:
            return
        cursor = page.cursor


def _seconds(record: dg.EventLogRecord) -> float | None:
    """The ``timing_elapsed_s`` of a materialization record, or None when it carries none."""
    materialization = record.asset_materialization
    value = materialization.metadata.get(ELAPSED_KEY) if materialization is not None else None
    return float(value.value) if value is not None else None


def recorded_seconds(instance: dg.DagsterInstance, asset: str, partition: str | None) -> list[float]:
    """``timing_elapsed_s`` of every earlier materialization of ``asset`` in ``partition`` (every one of an
    unpartitioned asset: ``partition`` None), newest first."""
    partitions = [partition] if partition is not None else None
    found = (_seconds(record) for record in _materializations(instance, asset, partitions))
    return [seconds for seconds in found if seconds is not None]


def past_estimate_s(instance: dg.DagsterInstance, asset: str, partition: str | None) -> float | None:
    """The median of :func:`recorded_seconds`, else None (no record yet): the estimate ``python -m jobs.study
    --dry-run`` prints and each materialization's ``estimated_seconds``."""
    seconds = recorded_seconds(instance, asset, partition)
    return float(statistics.median(seconds)) if seconds else None


def partition_profile(partition: str) -> str:
    """The profile of a partition key (``model|profile``, ``a__b|profile`` or ``profile``)."""
    return partition.rsplit("|", 1)[-1]


def partition_subject(partition: str) -> str:
    """The model (or model pair) of a partition key; ``all`` for a profile-only partition."""
    return partition.split("|", 1)[0] if "|" in partition else "all"


def run_records(instance: dg.DagsterInstance, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per materialization carrying a timing, of the given runs (default: every run), in
    ``RECORD_COLUMNS``; read from each run's event records."""
    ids = list(run_ids) if run_ids is not None else [run.run_id for run in instance.get_runs()]
    rows = []
    for run_id in ids:
        events = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        for record in events.records:
            seconds = _seconds(record)
            if seconds is None:
                continue
            materialization = record.asset_materialization
            rows.append(
                {
                    "run_id": run_id,
                    "asset": materialization.asset_key.to_user_string(),
                    "partition": materialization.partition or "",
                    "recorded_s": seconds,
                }
            )
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def profile_timings(instance: dg.DagsterInstance, profile: str) -> pd.DataFrame:
    """Every timed materialization of ``profile``'s partitions: columns ``model`` (the partition's model,
    pair or ``all``), ``asset``, ``partition`` and ``elapsed_s``."""
    rows = []
    for key in instance.get_asset_keys():
        asset = key.to_user_string()
        for record in _materializations(instance, asset):
            partition = record.partition_key or ""
            seconds = _seconds(record)
            if seconds is None or partition_profile(partition) != profile:
                continue
            rows.append(
                {
                    "model": partition_subject(partition),
                    "asset": asset,
                    "partition": partition,
                    "elapsed_s": seconds,
                }
            )
    return pd.DataFrame(rows, columns=["model", "asset", "partition", "elapsed_s"])
