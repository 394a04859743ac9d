"""``python -m jobs.study --dry-run``: the plan, work units and estimates on smoke, without loading a model."""

from __future__ import annotations

from emotion_assets.timing import TimingRecord, write_timing
from jobs import study
from jobs.plan import format_plan


def test_dry_run_on_smoke_lists_jobs_work_and_estimates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMOTION_RESULTS_DIR", str(tmp_path))
    record = TimingRecord("6-heads", "head_patching", "smollm2-135m", "smoke", "cpu", elapsed_s=42.0)
    write_timing(tmp_path / "smoke" / "run_timings", record)
    write_timing(tmp_path / "smoke" / "run_timings", TimingRecord(**{**record.__dict__, "elapsed_s": 50.0}))

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
