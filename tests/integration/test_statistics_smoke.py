"""Phase 7 on smoke: corrected statistics, k-selection and the findings report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.integration.conftest import MODEL, SMOKE

pytestmark = pytest.mark.integration


def test_patching_statistics_family_and_unique_prompts(smoke_study):
    stats = pd.read_parquet(
        smoke_study.results / SMOKE / "patching_statistics" / MODEL / "comparisons.parquet"
    )
    generations = pd.read_parquet(
        smoke_study.results / SMOKE / "residual_patching" / MODEL / "generations.parquet"
    )
    heads = pd.read_parquet(smoke_study.results / SMOKE / "head_patching" / MODEL / "generations.parquet")
    residual = stats[stats["source"] == "residual"]
    assert (residual["n"] == generations["prompt_id"].nunique()).all()
    paired_heads = stats[(stats["source"] == "heads") & (stats["effect_measure"] == "d_z")]
    prompts_per_set = heads.groupby(["emotion", "destination"])["prompt_id"].nunique()
    expected_n = [
        prompts_per_set[(e, d)]
        for e, d in zip(paired_heads["emotion"], paired_heads["destination"], strict=True)
    ]
    assert paired_heads["n"].tolist() == expected_n
    assert set(stats["comparison"]) == {
        "vs_baseline", "vs_random_isotropic", "vs_random_covariance", "vs_other_emotion", "vs_random_heads",
        "emotion_vs_neutral_prompts",
    }  # fmt: skip
    contrasts = stats[stats["comparison"] == "vs_other_emotion"]
    assert contrasts["other_emotion"].notna().all()
    assert (contrasts["other_emotion"] != contrasts["emotion"]).all()
    assert stats["family_size_t"].nunique() == 1 and stats["family_size_t"].iloc[0] == len(stats)
    assert stats["family_t"].str.contains(f"model={MODEL}").all()
    assert (stats["p_bh"] >= stats["p_t"] - 1e-12).all() and (
        stats["p_bonferroni"] >= stats["p_bh"] - 1e-12
    ).all()
    assert np.isfinite(stats["effect_size"]).all()
    assert np.isfinite(stats.loc[stats["effect_measure"] == "d_z", "d_z"]).all()
    assert (stats["diff_ci_low"] <= stats["diff_ci_high"]).all()


def test_k_selection_and_report(smoke_study):
    chosen = pd.read_parquet(
        smoke_study.results / SMOKE / "k_selection" / "smollm2-135m__minilm-l6" / "chosen_k.parquet"
    )
    assert {"method", "emotion", "k", "decision"} <= set(chosen.columns)
    report = (smoke_study.results / SMOKE / "findings_report" / "findings.md").read_text()
    assert "Evaluator quality" in report and "Steering" in report and "Cross-model alignment" in report
    for section in ("Corrected effects at a glance", "Attention heads", "Head patching", "Circuits"):
        body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
        assert "Not materialized" not in body and "|" in body, section
    html = (smoke_study.results / SMOKE / "findings_report" / "findings.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
