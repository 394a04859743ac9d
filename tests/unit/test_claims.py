"""Claims and verdicts: known-answer verdicts on small hand-built statistics tables, and the findings report
rendered from fake upstream artifacts (claims first, every evidence link resolving, plots beside tables)."""

from __future__ import annotations

import re

import dagster as dg
import pandas as pd
import pytest

from emotion_assets.science.claims import (
    CONFOUNDED,
    NOT_SUPPORTED,
    NOT_TESTED,
    SUPPORTED,
    AuditScope,
    Check,
    alignment_claims,
    head_claims,
    pair_role,
    representation_claims,
    steering_claims,
    verdict,
    verdict_counts,
)
from tests.artifacts import materialize

EMOTIONS = ["gratitude", "anger", "apology"]
MODEL = "m"
TWINS = {"a-random": ("random_twin", "a"), "a-rotated": ("rotated_twin", "a")}


# ------------------------------------------------------------------------------------ the verdict rule


def test_verdict_rule_failed_before_missing_before_confound():
    ok, bad, gone = Check("x", True, "x ok"), Check("y", False, "y bad"), Check("z", None, "no z table")
    assert verdict([ok]) == (SUPPORTED, "")
    assert verdict([ok], "person (cos +0.7)") == (CONFOUNDED, "person (cos +0.7)")
    assert verdict([ok, gone], "flag") == (NOT_TESTED, "missing: z (no z table)")
    outcome, reasons = verdict([ok, bad, gone], "flag")
    assert outcome == NOT_SUPPORTED and reasons == "not shown: y; missing: z (no z table)"


# ------------------------------------------------------------------------------------------- steering


def _best(emotion: str = "gratitude", **changes: object) -> dict[str, object]:
    row = {
        "model": MODEL, "emotion": emotion, "metric": f"emotion_{emotion}", "status": "confirmed",
        "layer": 12, "alpha": 0.2, "condition": f"{emotion}|L12|a+0.2", "n_cells": 4, "n_cells_fluent": 3,
        "n_cells_excluded": 1, "target_shift": 0.21, "shift_ci_low": 0.12, "shift_ci_high": 0.30,
        "p_bh": 0.002, "p_method": "sign_flip_exact", "n_confirmation": 10,
        "vs_random_isotropic_diff": 0.18, "vs_random_isotropic_ci_low": 0.1, "vs_random_isotropic_ci_high": 0.3,
        "vs_random_isotropic_p": 0.004, "vs_random_covariance_diff": 0.15, "vs_random_covariance_ci_low": 0.05,
        "vs_random_covariance_ci_high": 0.25, "vs_random_covariance_p": 0.01, "share_degenerate": 0.0,
        "perplexity_ratio": 1.3, "fluent_on_confirmation": True, "share_intended": 0.8, "share_anti": 0.1,
    }  # fmt: skip
    return row | changes


def _contrasts(emotion: str = "gratitude", **diff_by_other: tuple[float, float]) -> pd.DataFrame:
    """vs_other_emotion rows of the selected cell: other → (mean_diff, p_bh); 0.1 / 0.01 by default."""
    rows = []
    for other in EMOTIONS:
        if other == emotion:
            continue
        diff, p = diff_by_other.get(other, (0.1, 0.01))
        rows.append({"model": MODEL, "comparison": "vs_other_emotion", "emotion": emotion, "other_emotion": other,
                     "condition": f"{emotion}|L12|a+0.2", "n": 20, "mean_diff": diff, "diff_ci_low": diff - 0.05,
                     "diff_ci_high": diff + 0.05, "p_bh": p})  # fmt: skip
    return pd.DataFrame(rows)


def _audit(
    flagged: dict[tuple[int, str], str] | None = None, boundaries: tuple[int, ...] = (12,)
) -> pd.DataFrame:
    """Vector audit rows of MODEL's ``last`` vectors; ``flagged`` maps (boundary, emotion) → reason."""
    flagged = flagged or {}
    return pd.DataFrame([
        {"model": MODEL, "strategy": "last", "boundary": b, "emotion": e, "flagged": (b, e) in flagged,
         "reason": flagged.get((b, e), "")}
        for b in boundaries for e in EMOTIONS
    ])  # fmt: skip


def _steer(best: list[dict], contrasts: pd.DataFrame | None, audit: pd.DataFrame | None) -> pd.DataFrame:
    """Steering claims of MODEL for every emotion (the others are the specificity contrasts)."""
    return steering_claims(pd.DataFrame(best), contrasts, audit, models=[MODEL], emotions=EMOTIONS,
                           strategy="last").set_index("emotion")  # fmt: skip


def test_a_cell_that_beats_everything_is_supported_and_says_so():
    claim = _steer([_best()], _contrasts(), _audit()).loc["gratitude"]
    assert claim["verdict"] == SUPPORTED and claim["reasons"] == "" and claim["confound"] == ""
    sentence = claim["sentence"]
    assert sentence.startswith("m: the gratitude direction at block 12 (α +0.2")
    assert "+0.21 [+0.12, +0.3] vs baseline (confirmation half B, n=10, p_BH 0.002" in sentence
    assert "vs isotropic random +0.18" in sentence and "vs covariance-matched random +0.15" in sentence
    assert "vs the anger vector +0.1" in sentence and "vs the apology vector +0.1" in sentence
    assert "fluency within bounds (perplexity ratio 1.3" in sentence
    assert "prompts moved as intended 8/10, the opposite way 1/10" in sentence
    assert claim["evidence"].split() == ["steering", "steering-specificity", "confound-flags"]


def test_losing_to_another_emotions_vector_is_not_supported_and_names_it():
    claim = _steer([_best()], _contrasts(anger=(-0.04, 0.3)), _audit()).loc["gratitude"]
    assert claim["verdict"] == NOT_SUPPORTED
    assert claim["reasons"] == "not shown: beats the anger vector"
    # a larger contrast that does not survive correction fails too
    claim = _steer([_best()], _contrasts(apology=(0.2, 0.2)), _audit()).loc["gratitude"]
    assert claim["verdict"] == NOT_SUPPORTED and claim["reasons"] == "not shown: beats the apology vector"


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"p_bh": 0.2}, "beats baseline"),
        ({"target_shift": -0.21, "shift_ci_low": -0.3, "shift_ci_high": -0.12}, "beats baseline"),
        ({"vs_random_covariance_p": 0.3}, "beats covariance-matched random"),
        ({"vs_random_isotropic_diff": -0.1}, "beats isotropic random"),
        ({"fluent_on_confirmation": False, "perplexity_ratio": 3.1}, "fluency within bounds"),
    ],
)
def test_each_failed_control_is_named(change, failed):
    claim = _steer([_best(**change)], _contrasts(), _audit()).loc["gratitude"]
    assert claim["verdict"] == NOT_SUPPORTED and claim["reasons"] == f"not shown: {failed}"


def test_an_audit_flag_makes_a_passing_cell_confounded_and_names_the_confound():
    audit = _audit({(12, "gratitude"): "person (cos +0.65)"})
    claim = _steer([_best()], _contrasts(), audit).loc["gratitude"]
    assert claim["verdict"] == CONFOUNDED
    assert "person (cos +0.65)" in claim["confound"] and "block 12" in claim["confound"]
    assert claim["reasons"] == claim["confound"]
    # a flag on another emotion's or another layer's vector does not touch this claim
    other = _audit({(12, "anger"): "person (cos +0.9)", (6, "gratitude"): "x"}, boundaries=(6, 12))
    assert _steer([_best()], _contrasts(), other).loc["gratitude", "verdict"] == SUPPORTED


def test_a_failing_flagged_cell_is_not_supported_and_still_shows_the_flag():
    audit = _audit({(12, "gratitude"): "person (cos +0.65)"})
    claim = _steer([_best(p_bh=0.4)], _contrasts(), audit).loc["gratitude"]
    assert claim["verdict"] == NOT_SUPPORTED and "audit flag" in claim["sentence"]
    assert "person (cos +0.65)" in claim["sentence"]


def test_missing_control_rows_are_not_tested_never_dropped():
    no_random = _best(vs_random_isotropic_diff=float("nan"), vs_random_isotropic_p=float("nan"))
    claim = _steer([no_random], _contrasts(), _audit()).loc["gratitude"]
    assert claim["verdict"] == NOT_TESTED and "isotropic random" in claim["reasons"]
    claim = _steer([_best()], _contrasts().iloc[:1], _audit()).loc["gratitude"]  # the apology row is gone
    assert claim["verdict"] == NOT_TESTED and "against apology" in claim["reasons"]
    claim = _steer([_best()], None, _audit()).loc["gratitude"]
    assert claim["verdict"] == NOT_TESTED and "beats the anger vector" in claim["reasons"]
    claim = _steer([_best()], _contrasts(), None).loc["gratitude"]
    assert claim["verdict"] == NOT_TESTED and "no confound_audit result for m" in claim["reasons"]
    every = steering_claims(pd.DataFrame([_best()]), _contrasts(), _audit(), models=[MODEL, "other"],
                            emotions=EMOTIONS, strategy="last")  # fmt: skip
    assert len(every) == 6  # every model × emotion has a claim
    assert (every.loc[every["emotion"] != "gratitude", "verdict"] == NOT_TESTED).all()


def test_no_fluent_cell_is_not_supported_and_unscored_target_is_not_tested():
    rows = [_best("gratitude", status="no fluent cell on half A", n_cells=4, n_cells_excluded=4),
            _best("anger", status="target score not scored")]  # fmt: skip
    claims = steering_claims(pd.DataFrame(rows), None, _audit(), models=[MODEL], emotions=["gratitude", "anger"],
                             strategy="last").set_index("emotion")  # fmt: skip
    assert claims.loc["gratitude", "verdict"] == NOT_SUPPORTED
    assert "4 of 4 cells outside the fluency bounds" in claims.loc["gratitude", "sentence"]
    assert claims.loc["anger", "verdict"] == NOT_TESTED


# ---------------------------------------------------------------------------------------------- heads


def _heads(emotion_diff: float, neutral_diff: float, p: float = 0.01) -> pd.DataFrame:
    return pd.DataFrame([
        {"model": MODEL, "comparison": "vs_random_heads", "emotion": "anger", "condition": condition,
         "destination": destination, "n": 12, "mean_diff": diff, "diff_ci_low": diff - 0.05,
         "diff_ci_high": diff + 0.05, "p_bh": p}
        for condition, destination, diff in [("ablate_zero_top3", "emotion", emotion_diff),
                                             ("patch_z_neutral_to_emotion_top3", "neutral", neutral_diff)]
    ])  # fmt: skip


def _head_claim(table: pd.DataFrame | None, audit: pd.DataFrame) -> pd.Series:
    claims = head_claims(table, audit, models=[MODEL], emotions=["anger"], strategy="last",
                         readout_boundary={MODEL: 30})  # fmt: skip
    return claims.iloc[0]


def test_head_claims_need_the_intended_direction_on_every_intervention():
    audit = _audit(boundaries=(30,))
    assert _head_claim(_heads(-0.2, 0.2), audit)["verdict"] == SUPPORTED
    wrong_way = _head_claim(_heads(0.2, 0.2), audit)  # ablating the top heads raises the anger score
    assert wrong_way["verdict"] == NOT_SUPPORTED
    assert wrong_way["reasons"] == "not shown: ablate_zero_top3 beats random heads"
    assert _head_claim(_heads(-0.2, 0.2, p=0.2), audit)["verdict"] == NOT_SUPPORTED
    assert _head_claim(None, audit)["verdict"] == NOT_TESTED
    flagged = _head_claim(_heads(-0.2, 0.2), _audit({(30, "anger"): "question (cos +0.6)"}, boundaries=(30,)))
    assert flagged["verdict"] == CONFOUNDED and "question (cos +0.6)" in flagged["confound"]


# ------------------------------------------------------------------------------------------ alignment


def _summary(pair: str, emotion: str, passes: bool) -> list[dict[str, object]]:
    return [
        {"pair": pair, "method": method, "emotion": emotion, "layer_a": 12, "layer_b": 3, "k": 2,
         "overlap": 0.5 if passes else 0.05, "null_p95": 0.1, "chance": 0.01, "beats_null": passes,
         "specificity": 0.1 if passes else 0.0, "specificity_lo": 0.05 if passes else -0.02,
         "specific": passes}
        for method in ("procrustes", "ridge")
    ]  # fmt: skip


PAIRS = [("a", "b"), ("a-random", "b"), ("a", "a-rotated")]


def _alignment(headline: bool, negative: bool | None, positive: bool | None) -> pd.DataFrame:
    rows = _summary("a__b", "gratitude", headline)
    if negative is not None:
        rows += _summary("a-random__b", "gratitude", negative)
    if positive is not None:
        rows += _summary("a__a-rotated", "gratitude", positive)
    audit = pd.concat([_audit(boundaries=(12,)).assign(model=m) for m in ("a", "b")] +
                      [_audit(boundaries=(3,)).assign(model="b")], ignore_index=True)  # fmt: skip
    claims = alignment_claims(pd.DataFrame(rows), audit, pairs=PAIRS, emotions=["gratitude"], twins=TWINS,
                              strategy="last")  # fmt: skip
    return claims.set_index("subject")


def test_pair_roles_follow_the_registry_twins():
    assert pair_role("a", "b", TWINS) == "headline"
    assert pair_role("a-random", "b", TWINS) == "negative control"
    assert pair_role("a", "a-random", TWINS) == "negative control"
    assert pair_role("a", "a-rotated", TWINS) == "positive control"


def test_alignment_supported_with_both_twin_controls_behaving():
    claims = _alignment(headline=True, negative=False, positive=True)
    headline = claims.loc["a → b"]
    assert headline["verdict"] == SUPPORTED and headline["kind"] == "alignment"
    assert "random-weight twin pair a-random → b stays at the null" in headline["sentence"]
    assert "positive control a → a-rotated recovered" in headline["sentence"]
    assert claims.loc["a-random → b", "verdict"] == SUPPORTED  # the negative control stays at the null
    assert claims.loc["a → a-rotated", "verdict"] == SUPPORTED


def test_a_negative_twin_that_passes_contradicts_the_headline():
    claims = _alignment(headline=True, negative=True, positive=True)
    headline = claims.loc["a → b"]
    assert headline["verdict"] == NOT_SUPPORTED
    assert "the control contradicts" in headline["sentence"]
    assert headline["reasons"] == "not shown: negative control stays at the null"
    assert claims.loc["a-random → b", "verdict"] == NOT_SUPPORTED


def test_a_failed_positive_control_is_stated_beside_a_negative_result():
    claims = _alignment(headline=False, negative=False, positive=False)
    headline = claims.loc["a → b"]
    assert headline["verdict"] == NOT_SUPPORTED
    assert "positive control a → a-rotated NOT recovered: the control contradicts" in headline["sentence"]
    assert claims.loc["a → a-rotated", "verdict"] == NOT_SUPPORTED


def test_missing_control_pair_leaves_the_headline_not_tested():
    claims = _alignment(headline=True, negative=None, positive=None)
    assert claims.loc["a → b", "verdict"] == NOT_TESTED
    assert "a-random → b not materialized" in claims.loc["a → b", "reasons"]
    assert (claims.loc[["a-random → b", "a → a-rotated"], "verdict"] == NOT_TESTED).all()


# -------------------------------------------------------------------------------------- representation


def _representation(probe: float, flagged: dict | None = None) -> pd.Series:
    probes = pd.DataFrame([{"model": MODEL, "strategy": "last", "boundary": 12, "register": r, "accuracy": a}
                           for r, a in (("all", probe), ("implicit", 0.3))])  # fmt: skip
    surface = pd.DataFrame([{"model": MODEL, "baseline": b, "register": "all", "accuracy": a}
                            for b, a in (("keyword_rule", 0.7), ("punctuation_length", 0.4))])  # fmt: skip
    claims = representation_claims(probes, surface, _audit(flagged), scopes={MODEL: AuditScope("last", (12,), 0.05)},
                                   emotions=EMOTIONS, twins={})  # fmt: skip
    return claims.iloc[0]


def test_representation_claim_needs_the_probe_above_every_surface_baseline():
    assert _representation(0.9)["verdict"] == SUPPORTED
    close = _representation(0.74)  # within the margin of the keyword rule
    assert (
        close["verdict"] == NOT_SUPPORTED
        and close["reasons"] == "not shown: probe beats keyword_rule at block 12"
    )
    flagged = _representation(0.9, {(12, "apology"): "register:implicit (cos -0.9)"})
    assert flagged["verdict"] == CONFOUNDED and "apology @ block 12: register:implicit" in flagged["confound"]
    absent = representation_claims(None, None, None, scopes={MODEL: None}, emotions=EMOTIONS, twins={})
    assert absent.iloc[0]["verdict"] == NOT_TESTED


def test_verdict_counts_keep_every_verdict():
    claims = pd.concat([_steer([_best()], _contrasts(), _audit()).reset_index(),
                        _steer([_best(p_bh=0.5)], _contrasts(), _audit()).reset_index()])  # fmt: skip
    counts = verdict_counts(claims).set_index("kind")
    assert list(counts.columns) == [SUPPORTED, NOT_SUPPORTED, CONFOUNDED, NOT_TESTED]
    assert counts.loc["steering"].tolist() == [1, 1, 0, 4]  # anger and apology have no best cell: not tested


# ------------------------------------------------------------------------------------ the report page

PNG = b"\x89PNG\r\n\x1a\nfake"
REAL = "smollm2-135m"


def _write_upstream(root) -> None:
    """Fake upstream artifacts of the smoke profile for one real model, written through the store."""
    from resources.storage import ArtifactStore, write_bytes, write_json, write_table

    store = ArtifactStore(root_dir=str(root))
    best = pd.DataFrame([_best(e) for e in EMOTIONS]).drop(columns="model")
    contrasts = pd.concat([_contrasts(e) for e in EMOTIONS], ignore_index=True)
    rollup = contrasts.assign(model=REAL, source="residual", metric="emotion_x", layer=12.0, alpha=0.2,
                              mode=None, direction=None, heads=None, destination=None, effect_size=1.0,
                              effect_measure="d_z", p_t=0.001, p_bonferroni=0.01, family_t="model family")  # fmt: skip
    audit = _audit().drop(columns="model").assign(worst_nuisance="person", max_abs_cosine=0.2)
    with store.publishing():
        out = store.directory("smoke", "residual_patching", REAL)
        write_table(out / "best_per_emotion.parquet", best)
        write_bytes(out / "shift_heatmap_gratitude.png", PNG)
        out = store.directory("smoke", "patching_statistics_rollup")
        write_table(out / "rollup.parquet", rollup)
        write_table(out / "by_model.parquet", pd.DataFrame({"model": [REAL], "comparisons": [len(rollup)]}))
        out = store.directory("smoke", "confound_audit", REAL)
        write_json(
            out / "summary.json",
            {"first_strategy": "last", "focus_boundaries": [12], "baseline_margin": 0.05},
        )
        write_table(out / "vector_audit.parquet", audit)
        write_table(out / "probe_by_register.parquet", pd.DataFrame(
            [{"strategy": "last", "boundary": 12, "register": "all", "accuracy": 0.9}]))  # fmt: skip
        write_table(out / "surface_baselines.parquet", pd.DataFrame(
            [{"baseline": "keyword_rule", "register": "all", "accuracy": 0.7}]))  # fmt: skip
        write_table(out / "validation_scores.parquet", pd.DataFrame(
            [{"validation_set": "v", "scorer": "evaluator", "strategy": "last", "boundary": 12, "accuracy": 0.8,
              "macro_f1": 0.8, "n": 10, "note": ""}]))  # fmt: skip
        write_bytes(out / "nuisance_cosine_heatmap.png", PNG)


def test_report_opens_with_claims_whose_links_resolve_and_plots_sit_in_their_sections(tmp_path):
    from emotion_assets.report import findings_report
    from resources.storage import ArtifactStore, read_table
    from resources.tracking import TrackingResource

    root = tmp_path / "results"
    _write_upstream(root)
    instance = dg.DagsterInstance.ephemeral()
    for partition, seconds in (("tiny|smoke", 12.5), ("tiny|baseline", 99.5)):  # the slowest phases' source
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "activations", partition=partition, metadata={"timing_elapsed_s": seconds}
            )
        )
    store = ArtifactStore(root_dir=str(root))
    result = materialize(
        [findings_report], store=store, partition_key="smoke",
        resources={"store": store, "tracking": TrackingResource(enabled=False)},
        instance=instance,
    )  # fmt: skip
    assert result.success
    folder = root / "smoke" / "findings_report"
    page = (folder / "findings.html").read_text(encoding="utf-8")
    sections = re.findall(r'<section id="([a-z0-9-]+)"', page)
    assert sections[0] == "claims" and "confounds" in sections and "steering" in sections
    assert page.index('<section id="claims"') < page.index("<h2>Confounds</h2>")
    links = set(re.findall(r'href="#([^"]+)"', page))
    assert {"steering", "steering-specificity", "confound-flags"} <= links
    assert links <= set(re.findall(r'id="([^"]+)"', page))  # every evidence link lands on a section
    steering = page.split('<section id="steering">', 1)[1].split("</section>", 1)[0]
    assert "<table>" in steering and steering.index("<table>") < steering.index("residual_patching/")
    assert "data:image/png;base64," in steering and "<h2>Plots</h2>" not in page
    confounds = page.split('<section id="confound-vectors">', 1)[1].split("</section>", 1)[0]
    assert "nuisance_cosine_heatmap.png" in confounds

    markdown = (folder / "findings.md").read_text(encoding="utf-8")
    assert markdown.index("## Claims and verdicts") < markdown.index("## Confounds")
    md_links = set(re.findall(r"\]\(#([a-z0-9-]+)\)", markdown))
    assert md_links and md_links <= set(re.findall(r'<a id="([a-z0-9-]+)"></a>', markdown))

    claims = read_table(folder / "claims.parquet").set_index("claim_id")
    steering_rows = claims[claims["kind"] == "steering"]
    assert len(steering_rows) == 3 and (steering_rows["verdict"] == SUPPORTED).all()
    # no head statistics and no alignment summaries in this study: those claims are listed as not tested
    assert (claims.loc[claims["kind"].isin(["heads", "alignment"]), "verdict"] == NOT_TESTED).all()
    assert claims.loc[f"representation-{REAL}", "verdict"] == SUPPORTED
    metadata = result.asset_materializations_for_node("findings_report")[0].metadata
    assert "verdicts" in metadata
    slowest = markdown.split('<a id="slowest-phases"></a>', 1)[1]
    assert "activations" in slowest and "12.5" in slowest and "99.5" not in slowest
