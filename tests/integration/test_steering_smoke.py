"""Phase 5 on smoke: steered generations for the embedded model, scored on the continuation only."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tests.integration.conftest import MODEL, SMOKE

pytestmark = pytest.mark.integration


def test_residual_patching_table_and_controls(smoke_study):
    folder = smoke_study.results / SMOKE / "residual_patching" / MODEL
    scored = pd.read_parquet(folder / "generations.parquet")
    kinds = set(scored["kind"])
    assert {"baseline", "emotion", "random_isotropic", "random_covariance"} <= kinds
    assert (scored["alpha"] < 0).any() and (scored["alpha"] == 0).any()
    assert {"prompt", "continuation", "emotion_gratitude", "sentiment_compound", "politeness"} <= set(
        scored.columns
    )
    # Every prompt × condition is present exactly once.
    assert not scored.duplicated(["prompt_index", "condition"]).any()
    n_prompts = scored["prompt_index"].nunique()
    assert len(scored) == n_prompts * scored["condition"].nunique()
    # α = 0 reproduces the baseline text for every prompt (greedy).
    base = scored[scored["kind"] == "baseline"].set_index("prompt_index")["continuation"]
    zero = scored[(scored["kind"] == "emotion") & (scored["alpha"] == 0)]
    assert (zero["continuation"].to_numpy() == base.loc[zero["prompt_index"]].to_numpy()).all()
    # Random controls have exactly the norm of the emotion vectors at the same (layer, α).
    emo = scored[(scored["kind"] == "emotion") & (scored["alpha"] != 0)].groupby(["layer", "alpha"])[
        "vector_norm"
    ]
    ctrl = scored[scored["kind"].str.startswith("random")].groupby(["layer", "alpha"])["vector_norm"]
    pd.testing.assert_series_equal(emo.mean(), ctrl.mean(), check_names=False, rtol=1e-5)
    # Fluency beside every continuation and every shift; the best cells are selected on A, confirmed on B.
    assert {"generated_tokens", "distinct_2", "repetition_rate", "degenerate", "mean_logprob", "half"} <= set(
        scored.columns
    )
    shifts = pd.read_parquet(folder / "condition_shifts.parquet")
    assert {"share_degenerate", "perplexity_ratio", "fluent", "share_intended", "share_anti"} <= set(shifts)
    best = pd.read_parquet(folder / "best_per_emotion.parquet")
    split = pd.read_parquet(folder / "prompt_split.parquet")
    confirmed = best[best["status"] == "confirmed"]
    half_b = set(split.loc[split["half"] == "B", "prompt_id"])
    for row in confirmed.itertuples():
        assert set(json.loads(row.confirmation_prompt_ids)) == half_b
    run = smoke_study.runs[f"intervention_job:{MODEL}|{SMOKE}"]
    assert all(c.passed for c in run.get_asset_check_evaluations())
