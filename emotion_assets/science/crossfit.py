"""Cross-fitted selection: what is chosen on one half of the prompts is measured on the other half.

Choosing the top-N heads by |effect| on some prompts and then measuring those heads on the same prompts
reports a maximum on the data that selected it: noise that happened to favour a head is counted as its
effect (the winner's curse). Cross-fitting removes that bias and still uses every prompt:

1. :func:`split_halves` puts each prompt pair of an emotion into half ``A`` or ``B`` by a seeded hash of
   its prompt id (independent of row order; the halves differ in size by at most one);
2. screening scores every head on each half separately (:func:`rank_within_halves`);
3. :func:`fold_plans`: the top-N heads of half ``A`` are measured on half ``B`` (fold ``A_to_B``) and those
   of half ``B`` on half ``A`` (fold ``B_to_A``);
4. the two folds' rows are concatenated, so each prompt appears once per condition, measured only with
   heads chosen on the other half. :func:`leaked_rows` verifies this from the prompt ids stored on each row.

The selection effect of a chosen head (on its own half) is reported beside its held-out effect (the other
half) by :func:`honest_top_heads`, labelled with the half that selected it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Float

from emotion_assets.science.heads import Head
from emotion_assets.science.statistics import bootstrap_mean_ci, stable_seed

HALVES: tuple[str, str] = ("A", "B")
ID_SEPARATOR = ","
SCORE = "ablation_effect"
RANK = "rank_by_abs_ablation"


def other_half(half: str) -> str:
    """``"A"`` ↔ ``"B"``."""
    if half not in HALVES:
        raise ValueError(f"Unknown half {half!r}; halves are {HALVES}.")
    return HALVES[1 - HALVES.index(half)]


def split_halves(prompt_ids: Sequence[str], seed: int) -> np.ndarray:
    """Half label (``"A"`` / ``"B"``) of each prompt id, by a seeded hash of the id.

    Ids are ordered by ``stable_seed(seed, "crossfit", id)``; the first ``ceil(n / 2)`` form half ``A``. The
    label of an id depends on the seed and on the set of ids, never on their order. Needs at least two
    unique ids (one per half).
    """
    ids = [str(i) for i in prompt_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("split_halves needs unique prompt ids; deduplicate the prompts first.")
    if len(ids) < 2:
        raise ValueError(
            f"Cross-fitting needs at least 2 prompt pairs (one per half), got {len(ids)}; raise "
            "profile.heads.max_prompts or add eval prompts."
        )
    keys = np.array([stable_seed(seed, "crossfit", i) for i in ids], dtype=np.uint64)
    order = np.lexsort((np.array(ids), keys))  # ties (never seen) broken by the id itself
    labels = np.empty(len(ids), dtype=object)
    n_a = (len(ids) + 1) // 2
    labels[order[:n_a]] = HALVES[0]
    labels[order[n_a:]] = HALVES[1]
    return labels


def split_table(
    emotion: str, prompt_ids: Sequence[str], neutral_ids: Sequence[str], seed: int
) -> pd.DataFrame:
    """One row per prompt pair: ``emotion``, ``pair_index``, ``prompt_id``, ``neutral_prompt_id``, ``half``,
    ``split_seed``. The pair's half is drawn from its emotion prompt id; its neutral prompt goes with it."""
    if len(prompt_ids) != len(neutral_ids):
        raise ValueError(f"{len(prompt_ids)} emotion prompts but {len(neutral_ids)} neutral prompts to pair.")
    return pd.DataFrame(
        {
            "emotion": emotion,
            "pair_index": np.arange(len(prompt_ids)),
            "prompt_id": [str(i) for i in prompt_ids],
            "neutral_prompt_id": [str(i) for i in neutral_ids],
            "half": split_halves(prompt_ids, seed),
            "split_seed": seed,
        }
    )


def join_ids(ids: Sequence[str]) -> str:
    """Prompt ids stored in one cell (sorted, comma-separated)."""
    return ID_SEPARATOR.join(sorted(str(i) for i in ids))


def split_ids(cell: str | None) -> set[str]:
    """Inverse of :func:`join_ids`; an empty or missing cell is the empty set."""
    if cell is None or (isinstance(cell, float) and np.isnan(cell)) or cell == "":
        return set()
    return set(str(cell).split(ID_SEPARATOR))


def half_ids(split: pd.DataFrame, half: str) -> list[str]:
    """Every prompt id (emotion and neutral side) of one emotion's pairs in ``half``."""
    rows = split[split["half"] == half]
    return [*rows["prompt_id"].astype(str), *rows["neutral_prompt_id"].astype(str)]


def rank_within_halves(table: pd.DataFrame, score: str = SCORE) -> pd.DataFrame:
    """Add ``abs_<score>`` and the rank by it (1 = largest |score|) within each ``emotion`` × ``half``.

    Ties keep row order (``method="first"``), so the ranking is deterministic. Heads without a score (not
    in an AtP* shortlist, NaN) rank after every scored head, in row order.
    """
    out = table.copy()
    out["abs_ablation"] = out[score].abs()
    out[RANK] = (
        out.groupby(["emotion", "half"], sort=False)["abs_ablation"]
        .rank(ascending=False, method="first", na_option="bottom")
        .astype(int)
    )
    return out


def top_of_half(screening: pd.DataFrame, emotion: str, half: str, n: int) -> list[Head]:
    """The ``n`` heads with the largest |ablation effect| on ``half`` of ``emotion`` (rank 1 first)."""
    rows = screening[(screening["emotion"] == emotion) & (screening["half"] == half)]
    if rows.empty:
        raise ValueError(
            f"head_screening has no scores for {emotion!r} on half {half!r}; re-materialize head_screening."
        )
    rows = rows.sort_values(RANK).head(n)
    return [(int(r.layer), int(r.head)) for r in rows.itertuples()]


@dataclass(frozen=True)
class FoldPlan:
    """Heads chosen on ``selection_half`` and the pairs of ``measurement_half`` they are measured on."""

    emotion: str
    selection_half: str
    measurement_half: str
    heads: list[Head]
    selection_ids: list[str]  # every prompt id (emotion and neutral) of the selecting pairs
    measurement_pairs: list[int]  # pair indices of the measuring pairs, ascending
    measurement_ids: list[str]

    @property
    def name(self) -> str:
        return f"{self.selection_half}_to_{self.measurement_half}"

    def labels(self) -> dict[str, str]:
        """Columns that tag every row measured under this plan."""
        return {
            "fold": self.name,
            "selection_half": self.selection_half,
            "measurement_half": self.measurement_half,
            "selected_on_prompt_ids": join_ids(self.selection_ids),
        }


def fold_plans(split: pd.DataFrame, screening: pd.DataFrame, top_n: int) -> list[FoldPlan]:
    """The two folds of one emotion: top-N of half A measured on half B, and of half B on half A."""
    emotions = split["emotion"].unique()
    if len(emotions) != 1:
        raise ValueError(f"fold_plans takes one emotion's split, got {sorted(map(str, emotions))}.")
    emotion = str(emotions[0])
    plans = []
    for selection in HALVES:
        measurement = other_half(selection)
        pairs = sorted(int(i) for i in split.loc[split["half"] == measurement, "pair_index"])
        if not pairs:
            raise ValueError(f"Half {measurement!r} of {emotion!r} has no prompt pairs; see split_halves.")
        plans.append(
            FoldPlan(
                emotion=emotion, selection_half=selection, measurement_half=measurement,
                heads=top_of_half(screening, emotion, selection, top_n),
                selection_ids=half_ids(split, selection), measurement_pairs=pairs,
                measurement_ids=half_ids(split, measurement),
            )
        )  # fmt: skip
    return plans


def leaked_rows(
    rows: pd.DataFrame, splits: pd.DataFrame, id_columns: Sequence[str] = ("prompt_id", "source_prompt_id")
) -> pd.DataFrame:
    """Rows that break cross-fitting, from the prompt ids stored on them and the split of their emotion.

    A row (``emotion``, ``selection_half``, ``measurement_half``, ``selected_on_prompt_ids`` and the
    prompt-id columns in ``id_columns`` that it has) leaks when: its halves are equal or unknown; one of its
    prompts is among ``selected_on_prompt_ids``; its selected ids are not exactly its selection half's
    prompts; or one of its prompts is not in its measurement half. Empty when every head set was measured
    only on prompts that did not select it.
    """
    needed = {"emotion", "selection_half", "measurement_half", "selected_on_prompt_ids"}
    missing = sorted(needed - set(rows.columns))
    if missing:
        raise ValueError(f"Rows lack the cross-fitting columns {missing}; re-materialize the head assets.")
    by_half = {
        (str(e), h): set(half_ids(group, h))
        for e, group in splits.groupby("emotion", sort=False)
        for h in HALVES
    }
    present = [c for c in id_columns if c in rows.columns]
    bad = []
    for row in rows.itertuples(index=False):
        emotion, selection, measurement = str(row.emotion), row.selection_half, row.measurement_half
        selected = split_ids(row.selected_on_prompt_ids)
        ids = {str(v) for c in present if (v := getattr(row, c)) is not None and not pd.isna(v)}
        known = (emotion, selection) in by_half and (emotion, measurement) in by_half
        bad.append(
            not known
            or selection == measurement
            or bool(ids & selected)
            or selected != by_half[(emotion, selection)]
            or not ids <= by_half[(emotion, measurement)]
        )
    return rows[np.array(bad, dtype=bool)] if len(rows) else rows


def honest_top_heads(
    screening: pd.DataFrame,
    emotion: str,
    top_n: int,
    held_out: Mapping[str, Float[np.ndarray, "n_prompts n_top"]],
    *,
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    """Each half's top-N heads with their selection effect and their held-out effect and CI.

    ``held_out[h]``: per-prompt ablation effects on the **other** half of the top heads of half ``h``, in
    rank order (:func:`ablation_effects_per_prompt`). ``selection_effect`` is the score that chose the head
    (a maximum, biased away from 0); ``held_out_effect`` with its percentile bootstrap CI is the estimate to
    report. ``shrinkage = |selection| - |held-out|``.
    """
    rows = []
    for selection in HALVES:
        measurement = other_half(selection)
        heads = top_of_half(screening, emotion, selection, top_n)
        effects = np.asarray(held_out[selection], dtype=float)
        if effects.shape[1] != len(heads):
            raise ValueError(
                f"held_out[{selection!r}] has {effects.shape[1]} columns for {len(heads)} top heads of {emotion!r}."
            )
        scored = screening[screening["emotion"] == emotion].set_index(["half", "layer", "head"])
        for rank, (layer, head) in enumerate(heads, start=1):
            mean, low, high = bootstrap_mean_ci(
                effects[:, rank - 1], n_boot, stable_seed(seed, emotion, selection, layer, head)
            )
            chosen = float(scored.loc[(selection, layer, head), SCORE])
            rows.append({
                "emotion": emotion, "selected_on": selection, "measured_on": measurement, "rank": rank,
                "layer": layer, "head": head, "label": f"selected on half {selection}, measured on half {measurement}",
                "selection_effect": chosen, "held_out_effect": mean, "held_out_ci_low": low,
                "held_out_ci_high": high, "n_held_out": int(effects.shape[0]),
                "shrinkage": abs(chosen) - abs(mean),
            })  # fmt: skip
    return pd.DataFrame(rows)


def top_set_overlap(screening: pd.DataFrame, emotion: str, top_n: int) -> float:
    """Jaccard overlap of the two halves' top-N head sets (1 = both halves select the same heads)."""
    a, b = (set(top_of_half(screening, emotion, h, top_n)) for h in HALVES)
    return len(a & b) / len(a | b)


def heads_by_fold(rows: pd.DataFrame) -> str:
    """``"A_to_B: L1H2,L3H4 | B_to_A: ..."`` for one condition's rows (folds in order, empty head sets
    skipped): which heads a combined statistic pools."""
    parts = [
        f"{fold}: {heads}"
        for fold, heads in rows.drop_duplicates("fold")
        .sort_values("fold")[["fold", "heads"]]
        .itertuples(index=False)
        if isinstance(heads, str) and heads
    ]
    return " | ".join(parts)
