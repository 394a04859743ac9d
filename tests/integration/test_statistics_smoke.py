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
    assert (stats["n"] == generations["prompt_id"].nunique()).all()
    assert {"vs_baseline", "vs_random"} == set(stats["comparison"])
    assert stats["family_size_t"].nunique() == 1 and stats["family_size_t"].iloc[0] == len(stats)
    assert stats["family_t"].str.contains(f"model={MODEL}").all()
    assert (stats["p_bh"] >= stats["p_t"] - 1e-12).all() and (
        stats["p_bonferroni"] >= stats["p_bh"] - 1e-12
    ).all()
    assert np.isfinite(stats["d_z"]).all()
    assert (stats["diff_ci_low"] <= stats["diff_ci_high"]).all()


def test_k_selection_and_report(smoke_study):
    chosen = pd.read_parquet(
        smoke_study.results / SMOKE / "k_selection" / "smollm2-135m__minilm-l6" / "chosen_k.parquet"
    )
    assert {"method", "emotion", "k", "decision"} <= set(chosen.columns)
    report = (smoke_study.results / SMOKE / "findings_report" / "findings.md").read_text()
    assert "Evaluator quality" in report and "Steering" in report and "Cross-model alignment" in report
    html = (smoke_study.results / SMOKE / "findings_report" / "findings.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
