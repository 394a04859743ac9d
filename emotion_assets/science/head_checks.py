"""The logic of the attention-head asset checks, as pure functions on the tables the assets write.

Each returns a :class:`CheckOutcome` (passed, description, metadata); the asset modules turn it into the
Dagster check result and run the blocking ones on the staged tables before publishing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from emotion_assets.science.crossfit import HALVES, half_ids, leaked_rows


@dataclass
class CheckOutcome:
    """What a check found: whether it passed, why (one line) and the numbers behind it."""

    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def screening_outcome(
    screening: pd.DataFrame, split: pd.DataFrame, n_layers: int, n_heads: int
) -> CheckOutcome:
    """The logic of ``head_screening_complete``: every ``(layer, head)`` scored once per emotion and half,
    finitely, on halves that share no prompt."""
    expected = {(ly, h) for ly in range(n_layers) for h in range(n_heads)}
    missing = {}
    for emotion in screening["emotion"].unique():
        for half in HALVES:
            rows = screening[(screening["emotion"] == emotion) & (screening["half"] == half)]
            got = set(zip(rows["layer"].astype(int), rows["head"].astype(int), strict=True))
            if got != expected or len(rows) != len(expected):
                missing[f"{emotion}/{half}"] = len(expected - got) + abs(len(rows) - len(expected))
    overlapping = [
        str(emotion)
        for emotion, rows in split.groupby("emotion")
        if set(half_ids(rows, HALVES[0])) & set(half_ids(rows, HALVES[1]))
    ]
    # Under atp_star only the confirmed shortlist has an exact ablation effect (NaN elsewhere, by design).
    confirmed = (
        screening["confirmed"].astype(bool) if "confirmed" in screening else np.ones(len(screening), bool)
    )
    finite = bool(
        np.isfinite(screening.loc[confirmed, "ablation_effect"].to_numpy()).all()
        and np.isfinite(screening["attribution"].to_numpy()).all()
    )
    problems = [f"incomplete or repeated heads per emotion {missing}"] if missing else []
    if not finite:
        problems.append("non-finite ablation or attribution scores")
    if overlapping:
        problems.append(f"halves share a prompt for {overlapping}")
    if screening["emotion"].nunique() == 0:
        problems.append("no emotion was screened")
    return CheckOutcome(
        passed=not problems,
        description="; ".join(problems) or "Every head is scored once per emotion and half, finitely.",
        metadata={
            "emotions": sorted(screening["emotion"].unique().tolist()),
            "heads_per_emotion_and_half": len(expected),
            "incomplete": missing,
            "halves_sharing_a_prompt": overlapping,
            "all_finite": finite,
        },
    )


def patching_outcome(scored: pd.DataFrame) -> CheckOutcome:
    """The logic of ``head_patching_complete``: every (emotion, condition) continues each of its emotion's
    baseline prompts exactly once, and every kind of condition is there."""
    incomplete = []
    for (emotion, condition), group in scored.groupby(["emotion", "condition"]):
        expected = set(
            scored.loc[(scored["emotion"] == emotion) & (scored["kind"] == "baseline"), "pair_index"]
        )
        if set(group["pair_index"]) != expected or group["pair_index"].duplicated().any():
            incomplete.append(f"{emotion}/{condition}")
    kinds = set(scored["kind"])
    needed = {"baseline", "ablation", "patch", "random_ablation", "random_patch"}
    problems = [f"conditions without one row per prompt: {incomplete[:20]}"] if incomplete else []
    if needed - kinds:
        problems.append(f"missing kinds of condition {sorted(needed - kinds)}")
    return CheckOutcome(
        passed=not problems,
        description="; ".join(problems) or "Every condition has one row per prompt.",
        metadata={
            "conditions": int(scored.groupby(["emotion", "condition"]).ngroups),
            "incomplete": incomplete[:20],
            "missing_kinds": sorted(needed - kinds),
        },
    )


def crossfit_outcome(scored: pd.DataFrame, split: pd.DataFrame) -> CheckOutcome:
    """The logic of ``head_patching_crossfit``: no row's prompt selected its heads, one fold per prompt."""
    leaks = leaked_rows(scored, split)
    folds_per_prompt = scored.groupby(["emotion", "condition", "pair_index"])["fold"].nunique()
    in_two = int((folds_per_prompt > 1).sum())
    problems = (
        [f"{len(leaks)} rows measured on a prompt that selected their heads"] if not leaks.empty else []
    )
    if in_two:
        problems.append(f"{in_two} prompt × condition cells measured in two folds")
    return CheckOutcome(
        passed=not problems,
        description="; ".join(problems) or "No head set is measured on a prompt that selected it.",
        metadata={
            "rows": len(scored),
            "leaking_rows": len(leaks),
            "leaks": leaks[["emotion", "condition", "fold", "prompt_id"]].head(20).to_dict("records"),
            "prompts_in_two_folds": in_two,
        },
    )
