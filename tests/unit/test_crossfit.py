"""Cross-fitted head selection: seeded halves, fold plans, leak detection and honest maxima."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from emotion_assets.common import all_emotion_words
from emotion_assets.science import circuit_effects as CE
from emotion_assets.science import crossfit as C
from emotion_assets.science import head_conditions as G
from emotion_assets.science import head_pairs as P
from emotion_assets.science import head_screen as S
from emotion_assets.science import heads as H
from emotion_assets.science.parallel import ModelWorkers
from emotion_assets.science.patching_statistics import crossfit_attributes
from tests.tiny_models import byte_tokenizer, tiny_llama

N_LAYERS, N_HEADS, N_KV, D_MODEL = 3, 4, 2, 64
EMOTION = [
    "I am so grateful for this!", "Thanks a lot, truly.", "We really appreciate it.", "Thank you kindly.",
    "So thankful for your help.", "Many thanks to the team.", "I appreciate the quick reply.",
    "Grateful for the warm welcome.",
]  # fmt: skip
NEUTRAL = [
    "I am so curious about this.", "Notes on a lot, truly.", "We really evaluate it.", "Read it slowly.",
    "So careful with the help.", "Many notes on the team.", "I read the quick reply.",
    "Careful with the warm room.",
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)


def worker_model() -> SimpleNamespace:
    """What a worker process loads: the module's tiny model (seeded, so the same weights)."""
    return SimpleNamespace(
        model=tiny_llama(seed=0, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv=N_KV)
    )


@pytest.fixture(scope="module")
def handle(model):
    return SimpleNamespace(model=model, tokenizer=byte_tokenizer(), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """Eval fitting prompts of gratitude and neutral, as the dataset asset writes them."""
    rows = [
        {"id": f"{prefix}-{i:02d}", "text": text, "emotion": emotion, "split": "eval", "role": "fit",
         "register": "casual"}
        for emotion, prefix, texts in (("gratitude", "g", EMOTION), ("neutral", "n", NEUTRAL))
        for i, text in enumerate(texts)
    ]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def direction():
    return torch.randn(D_MODEL, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def screened(handle, frame, direction):
    """The screening asset's per-half scores of every head on the tiny Llama, with the split."""
    pair = P.prompt_pair(handle.tokenizer, handle.device, frame, "gratitude", None, 128, all_emotion_words())
    split = P.crossfit_split(pair, "gratitude", profile_seed=13)
    every_head = [(ly, h) for ly in range(N_LAYERS) for h in range(N_HEADS)]
    tables = []
    for half in C.HALVES:
        sub = P.sub_pair(pair, split.loc[split["half"] == half, "pair_index"].tolist())
        table = S.screen_pairs(handle.model, sub, direction, N_LAYERS, every_head)
        tables.append(table.assign(emotion="gratitude", half=half))
    return pair, split, C.rank_within_halves(pd.concat(tables, ignore_index=True))


# --- the split ---------------------------------------------------------------------------------------


def test_split_is_seeded_balanced_and_independent_of_order():
    ids = [f"p{i}" for i in range(11)]
    labels = dict(zip(ids, C.split_halves(ids, seed=3), strict=True))
    shuffled = list(reversed(ids))
    assert dict(zip(shuffled, C.split_halves(shuffled, seed=3), strict=True)) == labels
    assert sorted(labels.values()).count("A") == 6 and sorted(labels.values()).count("B") == 5
    others = [dict(zip(ids, C.split_halves(ids, seed=s), strict=True)) for s in range(4, 9)]
    assert any(o != labels for o in others)


def test_split_refuses_too_few_or_duplicate_ids():
    with pytest.raises(ValueError, match="at least 2 prompt pairs"):
        C.split_halves(["only"], seed=0)
    with pytest.raises(ValueError, match="unique"):
        C.split_halves(["a", "a", "b"], seed=0)


def test_screening_scores_each_half_on_its_own_prompts(screened):
    _, split, screening = screened
    assert set(screening["half"]) == {"A", "B"}
    assert screening.groupby("half").size().tolist() == [N_LAYERS * N_HEADS] * 2
    for half in C.HALVES:
        rows = screening[screening["half"] == half]
        ids = set(split.loc[split["half"] == half, "prompt_id"])
        assert C.split_ids(rows["prompt_ids"].iloc[0]) == ids
        assert sorted(rows["rank_by_abs_ablation"]) == list(range(1, N_LAYERS * N_HEADS + 1))
    # The halves see different prompts, so their scores differ.
    a, b = (screening[screening["half"] == h]["ablation_effect"].to_numpy() for h in C.HALVES)
    assert not np.allclose(a, b)


def test_screen_emotion_is_the_per_half_screen_with_held_out_maxima(handle, screened, direction):
    # The asset's per-emotion screen equals screening each half on its own; its honest maxima are each
    # half's top heads measured on the other half, and the correlations are per half.
    from emotion_assets.profiles import ScreeningConfig

    pair, split, screening = screened
    every_head = [(ly, h) for ly in range(N_LAYERS) for h in range(N_HEADS)]
    result = S.screen_emotion(
        handle.model, pair, split, direction, every_head, ScreeningConfig(), top_n=2, n_boot=50, seed=3
    )
    pd.testing.assert_frame_equal(C.rank_within_halves(result.scores), screening)
    with ModelWorkers(handle, worker_model, 2) as workers:  # the halves screened in two processes
        spread = S.screen_emotion(
            handle.model, pair, split, direction, every_head, ScreeningConfig(), top_n=2, n_boot=50, seed=3,
            workers=workers,
        )  # fmt: skip
        assert workers.count == 2
    pd.testing.assert_frame_equal(spread.scores, result.scores)
    pd.testing.assert_frame_equal(spread.top, result.top)
    table = S.screening_table([result.scores], N_LAYERS, "last")
    assert list(table.columns[:4]) == ["emotion", "half", "layer", "head"]
    assert (table["readout_boundary"] == N_LAYERS).all() and (table["strategy"] == "last").all()
    for half in C.HALVES:
        chosen = result.top[result.top["selected_on"] == half]
        assert list(zip(chosen["layer"], chosen["head"], strict=True)) == C.top_of_half(
            screening, "gratitude", half, 2
        )
        assert (chosen["n_held_out"] == (split["half"] != half).sum()).all()
    assert [row["half"] for row in result.correlations] == list(C.HALVES)
    assert all(row["n_heads"] == N_LAYERS * N_HEADS for row in result.correlations)


# --- no head is tested on a prompt that selected it -------------------------------------------------


def _measure(handle, pair, plan, direction) -> pd.DataFrame:
    """Per-prompt held-out ablation effect of each chosen head, one row per prompt × head."""
    sub = P.sub_pair(pair, plan.measurement_pairs)
    effects = H.ablation_effects_per_prompt(
        handle.model, sub.emotion_batch["input_ids"], sub.emotion_batch["attention_mask"], direction,
        N_LAYERS, plan.heads,
    )  # fmt: skip
    return pd.DataFrame([
        {"emotion": plan.emotion, "prompt_id": sub.emotion["id"].iloc[i], "heads": P.head_label([head]),
         "effect": float(effects[i, j]), **plan.labels()}
        for i in range(sub.n) for j, head in enumerate(plan.heads)
    ])  # fmt: skip


def test_no_head_is_measured_on_a_prompt_that_selected_it(handle, screened, direction):
    pair, split, screening = screened
    plans = C.fold_plans(split, screening, top_n=3)
    assert [p.name for p in plans] == ["A_to_B", "B_to_A"]
    rows = pd.concat([_measure(handle, pair, p, direction) for p in plans], ignore_index=True)
    assert C.leaked_rows(rows, split).empty
    # From the stored ids alone: the prompt of a row is never among the prompts that chose its heads,
    # and its heads are the top 3 of the half that chose them.
    for row in rows.itertuples():
        assert row.prompt_id not in C.split_ids(row.selected_on_prompt_ids)
        top = C.top_of_half(screening, "gratitude", row.selection_half, 3)
        assert row.heads in {P.head_label([h]) for h in top}
    # Both folds together measure every prompt exactly once per head rank.
    assert rows.groupby("prompt_id")["fold"].nunique().eq(1).all()
    assert set(rows["prompt_id"]) == set(pair.emotion["id"])
    # Held-out means are the other half's screening scores of the same heads.
    for plan in plans:
        measured = screening[screening["half"] == plan.measurement_half].set_index(["layer", "head"])
        got = rows[rows["fold"] == plan.name].groupby("heads", sort=False)["effect"].mean()
        for head in plan.heads:
            want = measured.loc[head, "ablation_effect"]
            assert got[P.head_label([head])] == pytest.approx(want, abs=1e-4)


def test_measuring_on_the_selecting_half_is_caught(handle, screened, direction):
    pair, split, screening = screened
    plan = C.fold_plans(split, screening, top_n=2)[0]
    cheat = C.FoldPlan(
        plan.emotion, plan.selection_half, plan.measurement_half, plan.heads, plan.selection_ids,
        sorted(split.loc[split["half"] == plan.selection_half, "pair_index"].tolist()), plan.selection_ids,
    )  # fmt: skip
    rows = _measure(handle, pair, cheat, direction)
    assert len(C.leaked_rows(rows, split)) == len(rows)
    mislabelled = _measure(handle, pair, plan, direction).assign(measurement_half=plan.selection_half)
    assert len(C.leaked_rows(mislabelled, split)) == len(mislabelled)


def test_generation_table_keeps_folds_apart(handle, frame, screened, model):
    # The head_patching rows of both folds on the tiny Llama: the table-level guarantee.
    pair, split, screening = screened
    with torch.inference_mode():
        ids, mask = pair.neutral_batch["input_ids"], pair.neutral_batch["attention_mask"]
        mean_z = H.mean_head_outputs(H.capture_head_outputs(model, ids, mask, range(N_LAYERS)), mask)
    layout = H.head_layout(model)
    rows = []
    for plan in C.fold_plans(split, screening, top_n=2):
        sub = P.sub_pair(pair, plan.measurement_pairs)
        rows += G.fold_generations(
            handle.model, handle.tokenizer, plan, sub, layout, mean_z, max_new=2, profile_seed=13
        )
    table = pd.DataFrame(rows)
    assert C.leaked_rows(table, split).empty
    for (_, _), group in table.groupby(["condition", "destination"]):
        assert sorted(group["pair_index"]) == list(range(pair.n))  # every pair once per condition
    randoms = table[table["kind"].str.startswith("random")]
    for fold, group in randoms.groupby("fold"):
        top = set(table.loc[(table["fold"] == fold) & (table["kind"] == "patch"), "heads"].iloc[0].split(","))
        assert not any(set(h.split(",")) & top for h in group["heads"])
    # Statistics accept it and name both folds' heads; a leaking row is refused.
    scored = table.assign(emotion_gratitude=0.5)
    attributes = crossfit_attributes(scored)
    joint = attributes.loc[("gratitude", "ablate_zero_top2")]
    assert joint["heads"].startswith("A_to_B: ") and " | B_to_A: " in joint["heads"]
    assert joint["selection"].startswith("top heads selected on the other half")
    leaking = scored.copy()
    leaking.loc[0, "selected_on_prompt_ids"] = leaking.loc[0, "prompt_id"]
    with pytest.raises(ValueError, match="prompt that selected them"):
        crossfit_attributes(leaking)


def test_a_changed_prompt_set_is_refused(handle, frame, screened):
    _, split, _ = screened
    smaller = P.prompt_pair(handle.tokenizer, handle.device, frame, "gratitude", 6, 128, all_emotion_words())
    with pytest.raises(ValueError, match="re-materialize head_screening"):
        P.check_split_matches(split, smaller)


# --- honest maxima -----------------------------------------------------------------------------------


def _synthetic(per_prompt: np.ndarray, split: pd.DataFrame) -> pd.DataFrame:
    """A screening table from per-prompt effects [n_prompts, n_heads] (one layer, heads 0..n-1)."""
    tables = []
    for half in C.HALVES:
        rows = (split["half"] == half).to_numpy()
        tables.append(pd.DataFrame({
            "emotion": "anger", "half": half, "layer": 0, "head": np.arange(per_prompt.shape[1]),
            "ablation_effect": per_prompt[rows].mean(axis=0),
        }))  # fmt: skip
    return C.rank_within_halves(pd.concat(tables, ignore_index=True))


def _honest(per_prompt: np.ndarray, top_n: int) -> pd.DataFrame:
    ids = [f"a{i:03d}" for i in range(per_prompt.shape[0])]
    split = C.split_table("anger", ids, [f"n{i:03d}" for i in range(len(ids))], seed=5)
    screening = _synthetic(per_prompt, split)
    held_out = {}
    for half in C.HALVES:
        other = (split["half"] == C.other_half(half)).to_numpy()
        columns = [h for _, h in C.top_of_half(screening, "anger", half, top_n)]
        held_out[half] = per_prompt[other][:, columns]
    return C.honest_top_heads(screening, "anger", top_n, held_out, n_boot=2000, seed=1)


def test_nothing_planted_gives_a_selected_maximum_but_a_null_held_out_effect():
    # 300 heads with no effect, 40 prompts: the top 5 of a half look large there (winner's curse),
    # and their held-out effect sits at 0.
    per_prompt = np.random.default_rng(0).normal(0.0, 1.0, size=(40, 300))
    top = _honest(per_prompt, top_n=5)
    se = 1.0 / np.sqrt(20)
    assert (top["selection_effect"].abs() > 2 * se).all()  # the max of 300 |N(0, se)| is ~2.9 se
    assert abs(top["held_out_effect"].mean()) < se
    assert (top["shrinkage"] > 0).mean() >= 0.8
    covers = (top["held_out_ci_low"] <= 0) & (top["held_out_ci_high"] >= 0)
    assert covers.mean() >= 0.8
    assert set(top["label"]) == {
        "selected on half A, measured on half B",
        "selected on half B, measured on half A",
    }


def test_a_planted_head_is_selected_on_both_halves_and_confirmed_held_out():
    per_prompt = np.random.default_rng(1).normal(0.0, 1.0, size=(40, 300))
    per_prompt[:, 17] += 3.0
    top = _honest(per_prompt, top_n=3)
    first = top[top["rank"] == 1]
    assert first["head"].tolist() == [17, 17]
    assert first["held_out_effect"].to_numpy() == pytest.approx([3.0, 3.0], abs=0.8)
    assert (first["held_out_ci_low"] > 1.0).all()
    assert (first["n_held_out"] == 20).all()


def test_circuits_and_shift_tables_keep_folds_and_pool_them(handle, screened, direction):
    pair, split, screening = screened
    boundaries = list(range(N_LAYERS + 1))
    vectors = {
        "last/gratitude": torch.randn(len(boundaries), D_MODEL, generator=torch.Generator().manual_seed(1))
    }
    vectors["last/gratitude"][-1] = direction
    inputs = CE.CircuitInputs(vectors, boundaries, "last", ["gratitude"], direction, N_LAYERS)
    heads, tables = [], []
    for plan in C.fold_plans(split, screening, top_n=2):
        rows, table = CE.fold_circuit(
            handle.model, handle.tokenizer, plan, P.sub_pair(pair, plan.measurement_pairs), screening, inputs
        )
        heads += rows
        tables.append(table)
        # Single effects summed in the joint-vs-sum table are the measurement half's screening scores.
        measured = screening[screening["half"] == plan.measurement_half].set_index(["layer", "head"])
        joint = table[table["intervention"] == "ablate_heads"].iloc[0]
        assert joint["sum_single_effects"] == pytest.approx(measured.loc[plan.heads, "ablation_effect"].sum())
    heads = pd.DataFrame(heads)
    for row in heads.itertuples():
        assert not C.split_ids(row.measured_on_prompt_ids) & C.split_ids(row.selected_on_prompt_ids)
    folds = pd.concat(tables, ignore_index=True)
    pooled = CE.pooled_circuit_effects(folds)
    assert set(pooled["fold"]) == {"both"} and (pooled["n_prompts"] == pair.n).all()
    one = folds[folds["intervention"] == "patch_heads_z"]
    expected = float(np.average(one["joint_effect"], weights=one["n_prompts"]))
    assert pooled.set_index("intervention").loc["patch_heads_z", "joint_effect"] == pytest.approx(expected)
    # The written table: both folds and the pooled rows, keyed first; the summary names each fold's heads.
    effects = CE.effects_table(folds, pooled)
    assert list(effects.columns[:3]) == ["emotion", "fold", "intervention"] and len(effects) == 3 * 3
    summary = CE.circuit_summary(heads, pooled).set_index("emotion")
    assert (
        summary.loc["gratitude", "heads"].startswith("A_to_B: L")
        and " | B_to_A: L" in summary.loc["gratitude", "heads"]
    )
    ratios = pooled.set_index("intervention")["ratio"]
    assert summary.loc["gratitude", "ratio_ablate_heads"] == pytest.approx(
        ratios["ablate_heads"], nan_ok=True
    )

    generations = pd.DataFrame(
        [{**row, "emotion_gratitude": float(row["pair_index"]) + (row["kind"] != "baseline"),
          "sentiment_compound": 0.0}
         for row in _generation_rows(handle, pair, split, screening)]
    )  # fmt: skip
    shifts = G.shift_table(generations, {"gratitude": ["emotion_gratitude", "sentiment_compound"]})
    assert set(shifts["fold"]) == {"A_to_B", "B_to_A", "both"}
    both = shifts[shifts["fold"] == "both"]
    assert (both["n_prompts"] == pair.n).all()
    assert np.allclose(both.loc[both["kind"] == "baseline", "target_shift"], 0.0)
    assert np.allclose(both.loc[both["kind"] != "baseline", "target_shift"], 1.0)  # the planted +1
    versus = G.top_vs_random(shifts)
    assert versus["heads"].str.contains("A_to_B: ").all() and versus["heads"].str.contains("B_to_A: ").all()


def _generation_rows(handle, pair, split, screening) -> list[dict]:
    model = handle.model
    ids, mask = pair.neutral_batch["input_ids"], pair.neutral_batch["attention_mask"]
    mean_z = H.mean_head_outputs(H.capture_head_outputs(model, ids, mask, range(N_LAYERS)), mask)
    rows = []
    for plan in C.fold_plans(split, screening, top_n=2):
        sub = P.sub_pair(pair, plan.measurement_pairs)
        rows += G.fold_generations(
            handle.model, handle.tokenizer, plan, sub, H.head_layout(model), mean_z, 1, 13
        )
    return rows


@pytest.mark.parametrize("method", ["atp", "atp_star"])
def test_a_shortlist_screen_confirms_its_largest_estimates_exactly(handle, screened, direction, method):
    # atp / atp_star: every head gets the method's estimate, the `shortlist` largest |estimates| the exact
    # ablation effect of the exhaustive screen; the selection tests then read the estimate column.
    from emotion_assets.profiles import ScreeningConfig
    from emotion_assets.science.control_ledger import screening_effect_column

    pair, split, exhaustive = screened
    every_head = [(ly, h) for ly in range(N_LAYERS) for h in range(N_HEADS)]
    config = ScreeningConfig(method=method, shortlist=3)
    result = S.screen_emotion(
        handle.model, pair, split, direction, every_head, config, top_n=2, n_boot=50, seed=3
    )
    scores = C.rank_within_halves(result.scores)
    for half in C.HALVES:
        rows = scores[scores["half"] == half].reset_index(drop=True)
        reference = exhaustive[exhaustive["half"] == half].reset_index(drop=True)
        chosen = rows[method].abs().sort_values(ascending=False, kind="stable").index[:3]
        assert sorted(rows.index[rows["confirmed"]]) == sorted(chosen)
        np.testing.assert_allclose(
            rows.loc[chosen, "ablation_effect"], reference.loc[chosen, "ablation_effect"], rtol=0, atol=1e-5
        )
        assert rows.loc[~rows["confirmed"], "ablation_effect"].isna().all()
        assert (rows["screening_method"] == method).all()
    assert screening_effect_column(scores) == method
    other = {"atp": "atp_star", "atp_star": "atp"}[method]
    assert other not in scores
