"""Phase 4 on smoke: the embedded model against the encoder (576 → 384), with the random-twin control in the
same pair position and the rotated twin as the positive control."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.integration.conftest import SMOKE

pytestmark = pytest.mark.integration


PAIRS = [
    "smollm2-135m__minilm-l6",
    "smollm2-135m-random__minilm-l6",
    "smollm2-135m__smollm2-135m-random",
    "smollm2-135m__smollm2-135m-rotated",
]


@pytest.mark.parametrize("pair", PAIRS)
def test_alignment_partition_materialized_with_controls(smoke_study, pair):
    folder = smoke_study.results / SMOKE / "subspace_alignment" / pair
    sweep = pd.read_parquet(folder / "alignment_sweep.parquet")
    assert {"ridge", "procrustes"} == set(sweep["method"])
    assert sweep["overlap"].between(0, 1).all() and sweep["null_p95"].between(0, 1).all()
    assert {"chance", "r2_heldout", "beats_null", "boot_lo"} <= set(sweep.columns)
    if pair.endswith("minilm-l6"):
        assert sweep["overlap_before"].isna().all()  # widths differ: no before-alignment overlap
        assert (sweep["d_b"] == 384).all()
    else:
        assert sweep["overlap_before"].notna().all()
    specificity = pd.read_parquet(folder / "specificity.parquet")
    assert {"specificity", "lo", "hi", "diagonal_mean", "off_diagonal_mean"} <= set(specificity.columns)
    matrix = pd.read_parquet(folder / "specificity_matrix.parquet")
    n_emotions = sweep["emotion"].nunique()
    assert len(matrix) == len(specificity) * n_emotions**2
    cka = pd.read_parquet(folder / "cka_matrix.parquet")
    assert len(cka) == sweep["layer_a"].nunique() or len(cka) >= sweep["layer_a"].nunique()
    result = smoke_study.runs[f"alignment_job:{pair}|{SMOKE}"]
    assert all(c.passed for c in result.get_asset_check_evaluations())
