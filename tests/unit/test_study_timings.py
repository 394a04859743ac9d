"""Tables of bench_study: seconds per asset from planted step rows and timing records (no model)."""

from __future__ import annotations

import dagster as dg
import pandas as pd
import pytest

from emotion_assets.timing import TIMINGS_DIR, TimingRecord, write_timing
from jobs.study_timings import STEP_COLUMNS, asset_table, format_timings, step_rows


def _plant_timings(root, profile: str, records: list[tuple[str, str, float]]) -> None:
    for asset, model, seconds in records:
        record = TimingRecord(phase="x", asset=asset, model=model, profile=profile, device="cpu")
        record.elapsed_s = seconds
        write_timing(root / profile / TIMINGS_DIR, record)


def _steps(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"run_id": f"r{i}", "job": "j", "partition": p, "asset": a, "step_s": s}
            for i, (a, p, s) in enumerate(rows)
        ],
        columns=STEP_COLUMNS,
    )


def test_asset_table_sums_partitions_and_orders_by_time(tmp_path):
    _plant_timings(
        tmp_path,
        "smoke",
        [("activations", "m", 30.0), ("activations", "m-random", 20.0), ("head_patching", "m", 90.0)],
    )
    steps = _steps(
        [
            ("activations", "m|smoke", 35.0),
            ("activations", "m-random|smoke", 25.0),
            ("head_patching", "m|smoke", 100.0),
            ("model_card", "m|smoke", 40.0),
        ]
    )
    table = asset_table(steps, tmp_path, "smoke")
    assert table["asset"].tolist() == ["head_patching", "activations", "model_card"]
    row = table.set_index("asset")
    assert row.loc["activations", "runs"] == 2 and row.loc["activations", "step_s"] == 60.0
    assert row.loc["activations", "recorded_s"] == 50.0
    assert pd.isna(row.loc["model_card", "recorded_s"])  # an asset without timing records keeps its step time
    assert row["share"].tolist() == pytest.approx([0.5, 0.3, 0.2])
    text = format_timings(table, wall_s=230.0, conversion="m: 20.0 s cold", title="Study")
    assert "| head_patching | 1 | 100.0 | 90.0 | 50.0 % |" in text
    assert "| **total** | 4 | **200.0** | 140.0 | 100 % |" in text
    assert "between steps (process start, run set-up, Dagster bookkeeping) 30.0 s" in text
    assert "Model conversion (one-off): m: 20.0 s cold" in text


def test_asset_table_uses_the_records_when_no_step_was_seen(tmp_path):
    _plant_timings(tmp_path, "baseline", [("activations", "m", 10.0), ("emotion_vectors", "m", 30.0)])
    table = asset_table(_steps([]), tmp_path, "baseline")
    assert table.set_index("asset")["share"].to_dict() == pytest.approx(
        {"emotion_vectors": 0.75, "activations": 0.25}
    )
    assert table["runs"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="step_rows"):
        asset_table(pd.DataFrame({"asset": ["a"]}), tmp_path, "baseline")


def test_step_rows_reads_every_step_of_every_run():
    @dg.op
    def first() -> int:
        return 1

    @dg.op
    def second(value: int) -> int:
        return value + 1

    @dg.job
    def two_steps():
        second(first())

    instance = dg.DagsterInstance.ephemeral()
    two_steps.execute_in_process(instance=instance, tags={"dagster/partition": "m|smoke"})
    rows = step_rows(instance)
    assert sorted(rows["asset"]) == ["first", "second"]
    assert (rows["partition"] == "m|smoke").all() and (rows["job"] == "two_steps").all()
    assert (rows["step_s"] >= 0).all() and rows["run_id"].nunique() == 1


def test_materialization_metadata_carries_the_dry_run_estimate(tmp_path):
    from types import SimpleNamespace

    from emotion_assets.common import Recorder
    from emotion_assets.timing import past_estimate_s

    assert past_estimate_s(tmp_path, "smoke", "activations", "m") is None
    _plant_timings(tmp_path, "smoke", [("activations", "m", 10.0), ("activations", "m", 30.0), ("activations", "m", 11.0), ("activations", "other", 99.0)])  # fmt: skip
    estimate = past_estimate_s(tmp_path, "smoke", "activations", "m")
    assert estimate == 11.0  # the median of this model's records only
    timing = TimingRecord(phase="x", asset="activations", model="m", profile="smoke", device="cpu")
    tracked = SimpleNamespace(metadata=dict)
    with_record = Recorder(timing=timing, tracked=tracked, config=None, estimate_s=estimate).metadata()
    assert with_record["estimated_seconds"] == dg.MetadataValue.float(11.0)
    without = Recorder(timing=timing, tracked=tracked, config=None).metadata()
    assert without["estimated_seconds"] == dg.MetadataValue.text("no record yet")


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
