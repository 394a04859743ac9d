"""Where a study run spent its time: seconds per asset from the Dagster instance's records.

``bench/bench_study.py`` runs a study in a throw-away instance and prints :func:`format_timings` of
:func:`asset_table`. Two sources per asset, both Dagster's: the step (``step_s``: the whole op, model loading
and storage included, from the run's step stats) and the materialization's metadata (``recorded_s``: its
``timing_elapsed_s``, the body inside ``timed(...)``). Shares are of the summed step time; the study's wall time is given
separately, so what lies between steps (run start-up, Dagster bookkeeping) is shown, not hidden.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from emotion_assets.timing import RECORD_COLUMNS

STEP_COLUMNS = ["run_id", "job", "partition", "asset", "step_s"]


def step_rows(instance: Any) -> pd.DataFrame:
    """One row per executed step of every run in ``instance`` (a ``DagsterInstance``), in ``STEP_COLUMNS``."""
    rows = []
    for run in instance.get_runs():
        partition = run.tags.get("dagster/partition", "")
        for stat in instance.get_run_step_stats(run.run_id):
            if stat.start_time is None or stat.end_time is None:
                continue
            rows.append(
                {
                    "run_id": run.run_id,
                    "job": run.job_name,
                    "partition": partition,
                    "asset": stat.step_key,
                    "step_s": float(stat.end_time - stat.start_time),
                }
            )
    return pd.DataFrame(rows, columns=STEP_COLUMNS)


def asset_table(steps: pd.DataFrame, recorded: pd.DataFrame) -> pd.DataFrame:
    """Seconds per asset, summed over its partitions, largest first.

    Columns: ``asset``, ``runs`` (materializations), ``step_s`` (Dagster step time; NaN when no step was
    seen), ``recorded_s`` (sum of the ``recorded`` rows' seconds, :func:`emotion_assets.timing.run_records`;
    NaN when the asset has none) and ``share`` (``step_s`` over the summed step time, else ``recorded_s``
    over the summed records).
    """
    missing = set(STEP_COLUMNS) - set(steps.columns)
    if missing:
        raise ValueError(
            f"step rows lack the columns {sorted(missing)}; build them with step_rows(instance)."
        )
    lacking = set(RECORD_COLUMNS) - set(recorded.columns)
    if lacking:
        raise ValueError(
            f"recorded rows lack the columns {sorted(lacking)}; build them with "
            "emotion_assets.timing.run_records(instance)."
        )
    by_step = steps.groupby("asset").agg(runs=("step_s", "size"), step_s=("step_s", "sum"))
    if recorded.empty:
        by_record = pd.DataFrame(columns=["recorded_runs", "recorded_s"], dtype=float)
    else:
        by_record = recorded.groupby("asset").agg(
            recorded_runs=("recorded_s", "size"), recorded_s=("recorded_s", "sum")
        )
    table = by_step.join(by_record, how="outer")
    table["runs"] = table["runs"].fillna(table["recorded_runs"]).astype(int)
    basis = table["step_s"] if table["step_s"].notna().any() else table["recorded_s"]
    table["share"] = basis / basis.sum()
    table = table.drop(columns="recorded_runs").reset_index(names="asset")
    return table.sort_values(["step_s", "recorded_s"], ascending=False, na_position="last").reset_index(
        drop=True
    )


def format_timings(
    table: pd.DataFrame,
    *,
    wall_s: float | None,
    conversion: str,
    title: str,
) -> str:
    """The table as Markdown, then the totals and the model conversion line."""

    def sec(value: float) -> str:
        return "–" if pd.isna(value) else f"{value:.1f}"

    lines = [title, "", "| asset | runs | step s | recorded s | share |", "|---|---:|---:|---:|---:|"]
    for row in table.itertuples():
        share = "–" if pd.isna(row.share) else f"{100 * row.share:.1f} %"
        lines.append(f"| {row.asset} | {row.runs} | {sec(row.step_s)} | {sec(row.recorded_s)} | {share} |")
    step_total = float(table["step_s"].sum(skipna=True))
    lines.append(f"| **total** | {int(table['runs'].sum())} | **{step_total:.1f}** | "
                 f"{float(table['recorded_s'].sum(skipna=True)):.1f} | 100 % |")  # fmt: skip
    lines.append("")
    if wall_s is not None:
        lines.append(
            f"Study wall time: {wall_s:.1f} s ({wall_s / 60:.1f} min); steps {step_total:.1f} s, between steps "
            f"(process start, run set-up, Dagster bookkeeping) {wall_s - step_total:.1f} s."
        )
    lines.append(f"Model conversion (one-off): {conversion}")
    return "\n".join(lines)
