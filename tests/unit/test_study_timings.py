"""Timings from Dagster's own records: bench_study's table, the dry-run estimate and the report's rows (no
model; planted materializations in an ephemeral instance)."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from emotion_assets.timing import (
    ELAPSED_KEY,
    RECORD_COLUMNS,
    TimingRecord,
    past_estimate_s,
    profile_timings,
    run_records,
)
from jobs.study_timings import STEP_COLUMNS, asset_table, format_timings, step_rows


def _plant(instance: dg.DagsterInstance, records: list[tuple[str, str, float]]) -> None:
    """Materializations of (asset, partition) carrying ``timing_elapsed_s`` seconds, as assets record them."""
    for asset, partition, seconds in records:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset, partition=partition, metadata={ELAPSED_KEY: seconds})
        )


def _steps(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"run_id": f"r{i}", "job": "j", "partition": p, "asset": a, "step_s": s}
            for i, (a, p, s) in enumerate(rows)
        ],
        columns=STEP_COLUMNS,
    )


def _recorded(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"run_id": "r", "asset": a, "partition": p, "recorded_s": s} for a, p, s in rows],
        columns=RECORD_COLUMNS,
    )


def test_asset_table_sums_partitions_and_orders_by_time():
    recorded = _recorded(
        [
            ("activations", "m|smoke", 30.0),
            ("activations", "m-random|smoke", 20.0),
            ("head_patching", "m|smoke", 90.0),
        ]
    )
    steps = _steps(
        [
            ("activations", "m|smoke", 35.0),
            ("activations", "m-random|smoke", 25.0),
            ("head_patching", "m|smoke", 100.0),
            ("model_card", "m|smoke", 40.0),
        ]
    )
    table = asset_table(steps, recorded)
    assert table["asset"].tolist() == ["head_patching", "activations", "model_card"]
    row = table.set_index("asset")
    assert row.loc["activations", "runs"] == 2 and row.loc["activations", "step_s"] == 60.0
    assert row.loc["activations", "recorded_s"] == 50.0
    assert pd.isna(
        row.loc["model_card", "recorded_s"]
    )  # an asset without a recorded timing keeps its step time
    assert row["share"].tolist() == pytest.approx([0.5, 0.3, 0.2])
    text = format_timings(table, wall_s=230.0, conversion="m: 20.0 s cold", title="Study")
    assert "| head_patching | 1 | 100.0 | 90.0 | 50.0 % |" in text
    assert "| **total** | 4 | **200.0** | 140.0 | 100 % |" in text
    assert "between steps (process start, run set-up, Dagster bookkeeping) 30.0 s" in text
    assert "Model conversion (one-off): m: 20.0 s cold" in text


def test_asset_table_uses_the_records_when_no_step_was_seen():
    recorded = _recorded([("activations", "m|baseline", 10.0), ("emotion_vectors", "m|baseline", 30.0)])
    table = asset_table(_steps([]), recorded)
    assert table.set_index("asset")["share"].to_dict() == pytest.approx(
        {"emotion_vectors": 0.75, "activations": 0.25}
    )
    assert table["runs"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="step_rows"):
        asset_table(pd.DataFrame({"asset": ["a"]}), recorded)
    with pytest.raises(ValueError, match="run_records"):
        asset_table(_steps([]), pd.DataFrame({"asset": ["a"]}))


def test_steps_and_recorded_seconds_come_from_the_runs_records():
    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["m|smoke"]))
    def timed_asset() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={ELAPSED_KEY: 1.5})

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["m|smoke"]), deps=[timed_asset])
    def untimed_asset() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"rows": 3})

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([timed_asset, untimed_asset], partition_key="m|smoke", instance=instance)
    steps = step_rows(instance)
    assert sorted(steps["asset"]) == ["timed_asset", "untimed_asset"]
    assert (steps["partition"] == "m|smoke").all() and (steps["step_s"] >= 0).all()
    recorded = run_records(instance)
    assert recorded.to_dict("records") == [
        {"run_id": result.run_id, "asset": "timed_asset", "partition": "m|smoke", "recorded_s": 1.5}
    ]
    table = asset_table(steps, recorded).set_index("asset")
    assert table.loc["timed_asset", "recorded_s"] == 1.5 and pd.isna(table.loc["untimed_asset", "recorded_s"])


def test_estimate_is_the_median_of_the_partitions_earlier_materializations():
    from types import SimpleNamespace

    from emotion_assets.common import Recorder

    instance = dg.DagsterInstance.ephemeral()
    assert past_estimate_s(instance, "activations", "m|smoke") is None
    _plant(instance, [("activations", "m|smoke", 10.0), ("activations", "m|smoke", 30.0), ("activations", "m|smoke", 11.0), ("activations", "other|smoke", 99.0), ("activations", "m|baseline", 99.0), ("vectors", "m|smoke", 99.0)])  # fmt: skip
    instance.report_runless_asset_event(
        dg.AssetMaterialization("activations", partition="m|smoke")
    )  # no timing
    estimate = past_estimate_s(instance, "activations", "m|smoke")
    assert estimate == 11.0  # the median of this asset × partition only
    timing = TimingRecord(phase="x", asset="activations", model="m", profile="smoke", device="cpu")
    tracked = SimpleNamespace(metadata=dict)
    with_record = Recorder(timing=timing, tracked=tracked, config=None, estimate_s=estimate).metadata()
    assert with_record["estimated_seconds"] == dg.MetadataValue.float(11.0)
    assert with_record[ELAPSED_KEY] == dg.MetadataValue.float(0.0)
    without = Recorder(timing=timing, tracked=tracked, config=None).metadata()
    assert without["estimated_seconds"] == dg.MetadataValue.text("no record yet")


def test_profile_timings_keep_the_profiles_partitions_only():
    instance = dg.DagsterInstance.ephemeral()
    _plant(instance, [("activations", "m|smoke", 4.0), ("activations", "m|baseline", 8.0), ("subspace_alignment", "a__b|smoke", 2.0), ("findings_report", "smoke", 1.0), ("findings_report", "baseline", 3.0)])  # fmt: skip
    rows = profile_timings(instance, "smoke").sort_values("asset").to_dict("records")
    assert rows == [
        {"model": "m", "asset": "activations", "partition": "m|smoke", "elapsed_s": 4.0},
        {"model": "all", "asset": "findings_report", "partition": "smoke", "elapsed_s": 1.0},
        {"model": "a__b", "asset": "subspace_alignment", "partition": "a__b|smoke", "elapsed_s": 2.0},
    ]
    assert profile_timings(instance, "nothing-here").empty


def test_baseline_head_work_uses_every_eval_pair():
    from emotion_assets.partitions import PROFILES, REGISTRY
    from emotion_assets.science.prompts import fitting_mask
    from jobs.plan import TARGET_EMOTIONS, prompt_frame, work_units

    profile = PROFILES["baseline"]
    assert profile.heads.max_prompts is None
    frame = prompt_frame(profile)
    evals = frame[fitting_mask(frame) & (frame["split"] == "eval")].groupby("emotion").size()
    pairs = sum(min(int(evals[e]), int(evals["neutral"])) for e in TARGET_EMOTIONS)
    assert pairs > 3 * 34  # above the 34 pairs per emotion that d = 0.5 needs at 80 % power
    units = work_units("head_patching", profile, REGISTRY.get("smollm2-135m"), frame)
    assert f"× {pairs} prompt pairs" in units
