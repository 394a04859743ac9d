"""``python -m jobs.study --dry-run``: the plan, work units and estimates on smoke, without loading a model."""

from __future__ import annotations

import dagster as dg

from emotion_assets.timing import ELAPSED_KEY
from jobs import study
from jobs.plan import format_plan


def test_dry_run_on_smoke_lists_jobs_work_and_estimates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    with dg.DagsterInstance.get() as instance:  # two earlier materializations of one asset × partition
        for seconds in (42.0, 50.0):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    "head_patching", partition="smollm2-135m|smoke", metadata={ELAPSED_KEY: seconds}
                )
            )

    assert study.main(["--profile", "smoke", "--model", "smollm2-135m", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    jobs = [line.split()[0] for line in lines if line and not line.startswith((" ", "Study", "Estimated"))]
    assert jobs[:3] == ["dataset_job", "representation_job", "intervention_job"]
    assert jobs[-1] == "report_job"
    patching = next(line for line in lines if line.strip().startswith("head_patching"))
    assert "46 s" in patching  # the median of the two records
    assert "22 conditions × 12 prompt pairs = 264 generations of 8 tokens" in patching
    activations = next(line for line in lines if line.strip().startswith("activations"))
    assert "no record yet" in activations and "forward passes of ≤ 32" in activations
    assert "Estimated total: 46 s for 1 of" in out
    assert not (tmp_path / "smoke" / "head_patching").exists()  # nothing ran


def test_plan_without_any_record_says_so():
    text = format_plan([], "m", "smoke")
    assert "Estimated total: no record yet" in text


def test_baseline_estimate_is_scaled_from_the_smoke_record_by_the_work_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    (tmp_path / "dagster_home").mkdir()
    records = {("head_patching", "smollm2-135m|smoke"): 40.0, ("head_screening", "smollm2-135m|smoke"): 30.0,
               ("head_screening", "smollm2-135m|baseline"): 1000.0, ("emotion_dataset", "smoke"): 2.0}  # fmt: skip
    with dg.DagsterInstance.get() as instance:
        for (asset, partition), seconds in records.items():
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset, partition=partition, metadata={ELAPSED_KEY: seconds})
            )

    assert study.main(["--profile", "baseline", "--model", "smollm2-135m", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    patching = next(line for line in lines if line.strip().startswith("head_patching"))
    baseline_generations = int(patching.split(" generations of ")[0].split("= ")[-1])
    # smoke: 264 generations of 8 new tokens; baseline: 20 new tokens each
    assert "[scaled from smoke: 40 s × " in patching and "/ 2112 generations × new tokens" in patching
    assert f"{40.0 * baseline_generations * 20 / (264 * 8) / 60:.1f} min" in patching
    screening = next(line for line in lines if line.strip().startswith("head_screening"))
    assert "16.7 min" in screening and "scaled" not in screening  # this partition's own record wins
    residual = next(line for line in lines if line.strip().startswith("residual_patching"))
    assert "no record yet" in residual  # no profile has a record to scale
    total = next(line for line in lines if line.startswith("Estimated total"))
    dataset = next(line for line in lines if line.strip().startswith("emotion_dataset"))
    assert "[scaled from smoke: 2 s × 1128 / " in dataset  # a per-profile asset scales by its prompts
    assert "for 3 of" in total and "2 scaled from another profile" in total


def test_a_record_scaled_across_worker_counts_is_marked():
    from emotion_assets.partitions import PROFILES
    from jobs.plan import _worker_caveat

    one, two = (PROFILES["smoke"].model_copy(update={"cpu_workers": n}) for n in (1, 2))
    assert _worker_caveat("head_patching", one, two) == (
        "; recorded with 1 worker process(es), runs with 2: not in the estimate"
    )
    assert _worker_caveat("head_patching", two, two) == ""
    assert _worker_caveat("activations", one, two) == ""  # one process whatever cpu_workers says
