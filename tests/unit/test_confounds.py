"""Known-answer tests of the confound audit: planted surface confounds are found, absent ones are not."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from emotion_assets.registry import PROJECT_ROOT
from emotion_assets.science.confounds import (
    ALL,
    PUNCTUATION_NUISANCES,
    LayerProbes,
    Nuisance,
    ValidationSet,
    audit_confounds,
    class_contrast_nuisances,
    fit_layer_probes,
    flag_vectors,
    keyword_rule,
    load_validation_set,
    norm_share_left,
    probe_by_register,
    punctuation_counterfactuals,
    surface_baselines,
    validation_scores,
    vector_geometry,
)
from emotion_assets.science.directions import emotion_vectors
from emotion_assets.science.prompts import DatasetError
from emotion_assets.science.residual import extract_pooled_activations
from tests.tiny_models import byte_tokenizer, tiny_llama

EMOTIONS = ("gratitude", "anger", "apology", "neutral")
WORDS = {"gratitude": ["thank"], "anger": ["angry"], "apology": ["sorry"], "neutral": []}
BOUNDARIES = [0, 1, 2, 3]

# Four one-word slots: every prompt has four words, no pronoun and one register, so only punctuation varies
# on the surface. The class is carried by the last word (cue words of similar length in every class).
_SUBJECTS = ["parcel", "sister", "meeting", "train", "report", "laptop", "garden", "order"]
_VERBS = ["arrived", "moved", "waited", "returned", "stopped", "changed"]
_TIMES = ["today", "tonight", "early", "later", "again", "twice"]
_CUES = {
    "gratitude": ["kindly", "gladly", "warmly"],
    "anger": ["rudely", "coldly", "harshly"],
    "apology": ["wrongly", "sadly", "badly"],
    "neutral": ["slowly", "calmly", "plainly"],
}


def _prompts(planted: bool, n_per: int = 24) -> pd.DataFrame:
    """Emotion prompts end in "!" and neutral ones in "." (planted), or every class has the same mix."""
    rng = np.random.default_rng(0)
    rows = []
    for emotion in EMOTIONS:
        for i in range(n_per):
            words = [_SUBJECTS[rng.integers(8)], _VERBS[rng.integers(6)], _TIMES[rng.integers(6)]]
            body = " ".join([*words, _CUES[emotion][i % 3]]).capitalize()
            end = ("!" if emotion != "neutral" else ".") if planted else ".!?"[(i // 3) % 3]
            split = "eval" if i % 4 == 0 else "train"
            rows.append({"text": body + end, "emotion": emotion, "split": split, "register": "unspecified"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_llama(seed=0, n_layers=3, d_model=64), byte_tokenizer()

    def extract(texts: list[str]) -> dict[str, torch.Tensor]:
        return extract_pooled_activations(
            model, tokenizer, texts, boundaries=BOUNDARIES, strategies=["last", "mean"], emotion_words=[],
            batch_size=64, device="cpu",
        ).pooled  # fmt: skip

    return extract


def _audit(extract, frame: pd.DataFrame):
    pooled = extract(frame["text"].tolist())
    train = (frame["split"] == "train").to_numpy()
    vectors = {s: emotion_vectors(x, frame["emotion"].tolist(), train) for s, x in pooled.items()}
    return audit_confounds(
        pooled, frame, BOUNDARIES, vectors, fitting=np.ones(len(frame), dtype=bool), extract=extract,
        emotion_words=WORDS, seed=0,
    )  # fmt: skip


def test_planted_exclamation_confound_is_flagged(tiny):
    audit = _audit(tiny, _prompts(planted=True))
    last = audit.vector_audit[audit.vector_audit["strategy"] == "last"]
    assert len(last) == 3 * len(BOUNDARIES)
    assert (last["cos_exclamation"] >= 0.5).all()
    assert last["flagged"].all()
    assert last["reason"].str.contains("exclamation").all()
    # The punctuation + length baseline separates neutral from emotion as well as the planted cue allows.
    punct = audit.surface_baselines.query("baseline == 'punctuation_length' and register == @ALL")
    assert float(punct["accuracy"].iloc[0]) > float(punct["chance"].iloc[0]) + 0.2
    # Nothing else varies: length, person and register are reported as not estimable, never dropped.
    missing = audit.nuisance_summary.set_index("nuisance")
    assert {"length", "person", "register"} <= set(missing.index[~missing["estimated"]])
    assert "no variation" in missing.loc["length", "reason"]
    assert last["cos_length"].isna().all()


def test_matched_punctuation_is_not_flagged(tiny):
    audit = _audit(tiny, _prompts(planted=False))
    punct = audit.vector_cosines[audit.vector_cosines["nuisance"].isin(PUNCTUATION_NUISANCES)]
    assert punct["cosine"].abs().max() < 0.5
    assert not audit.vector_audit["flagged"].any(), audit.vector_audit.loc[
        audit.vector_audit["flagged"], "reason"
    ]


def test_counterfactual_edits():
    edits = punctuation_counterfactuals(["It rained.", "Stop it!!", "No end"])
    assert edits == {
        "final_punctuation": ["It rained", "Stop it", "No end"],
        "exclamation": ["It rained!", "Stop it!", "No end!"],
        "question": ["It rained?", "Stop it?", "No end?"],
    }


def test_keyword_rule_known_answers():
    words = {"gratitude": ["thank", "grateful"], "anger": ["angry", "mad$"], "apology": ["sorry"]}
    texts = [
        "Thanks a lot for the ride.",  # one gratitude keyword
        "I made a cake.",  # "made" is not "mad": no keyword
        "Sorry, I am angry and angry again.",  # two anger matches beat one apology match
        "Sorry I was mad.",  # one each: the earliest match (Sorry) wins
        "I was mad, sorry.",  # one each: mad comes first
    ]
    predicted, tied = keyword_rule(texts, words)
    assert predicted.tolist() == ["gratitude", "neutral", "anger", "apology", "anger"]
    assert tied.tolist() == [False, False, False, True, True]


def test_bag_of_words_and_punctuation_baselines_known_answers():
    rng = np.random.default_rng(1)
    fillers = ["the box", "a letter", "our plan", "the car", "this note", "the bill"]
    texts, labels = [], []
    for i in range(80):
        label = ["gratitude", "neutral"][i % 2]
        word = "wonderful" if label == "gratitude" else "unchanged"  # same length
        texts.append(f"{fillers[rng.integers(6)]} was {word} {fillers[rng.integers(6)]}.")
        labels.append(label)
    train = np.arange(80) % 5 != 0  # both labels in the eval rows
    table = surface_baselines(texts, labels, ["r"] * 80, train, ~train, {"gratitude": ["thank"]}, seed=0)
    whole = table[table["register"] == ALL].set_index("baseline")
    assert whole.loc["bag_of_words", "accuracy"] == 1.0  # the class word decides
    assert whole.loc["keyword_rule", "accuracy"] == 0.5  # no keyword anywhere: always neutral
    assert whole.loc["keyword_rule", "n_train"] == 0
    assert whole.loc["punctuation_length", "accuracy"] <= 0.75  # equal punctuation, near-equal length

    punct_texts = [
        t[:-1] + ("!" if lab == "gratitude" else ".") for t, lab in zip(texts, labels, strict=True)
    ]
    punct_texts = [t.replace("wonderful", "plain").replace("unchanged", "plain") for t in punct_texts]
    table = surface_baselines(punct_texts, labels, ["r"] * 80, train, ~train, {}, seed=0)
    whole = table[table["register"] == ALL].set_index("baseline")
    assert whole.loc["punctuation_length", "accuracy"] == 1.0  # the final character decides
    assert set(table["register"]) == {ALL, "r"}


def test_norm_share_left_known_answers():
    e = torch.eye(6, dtype=torch.float64)
    span = torch.stack([e[0] + e[1], e[1] - e[2]])  # spans a 2-d plane inside (e0, e1, e2)
    assert norm_share_left(e[4], span) == (pytest.approx(1.0), 2)
    inside = 3 * (e[0] + e[1]) - 2 * (e[1] - e[2])
    share, rank = norm_share_left(inside, span)
    assert share == pytest.approx(0.0, abs=1e-12) and rank == 2
    share, _ = norm_share_left(e[0] + e[4], span[:1])  # cos 0.5 with the only nuisance
    assert share == pytest.approx(math.sqrt(1 - 0.5**2))
    nan_row = torch.full((1, 6), math.nan, dtype=torch.float64)
    assert norm_share_left(e[4], torch.cat([span, nan_row, 2 * span[:1]])) == (pytest.approx(1.0), 2)


def _nuisance(name: str, direction: torch.Tensor, reason: str = "") -> Nuisance:
    return Nuisance(name, "within_class", {"last": direction[None, :]}, n_prompts=4, reason=reason)


def test_vector_geometry_names_nuisances_and_keeps_unestimated_ones():
    e = torch.eye(4, dtype=torch.float64)
    nuisances = [
        _nuisance("exclamation", e[0]),
        _nuisance("length", e[1]),
        _nuisance("register", torch.full((4,), math.nan, dtype=torch.float64), reason="one register only"),
    ]
    vectors = {"last": {"anger": (e[0] + e[2]).float()[None, :], "apology": e[3].float()[None, :]}}
    cosines, shares = vector_geometry(vectors, nuisances, [7])
    cos = cosines.set_index(["emotion", "nuisance"])["cosine"]
    assert cos[("anger", "exclamation")] == pytest.approx(1 / math.sqrt(2))
    assert cos[("apology", "exclamation")] == pytest.approx(0.0)
    assert math.isnan(cos[("anger", "register")])
    share = shares.set_index("emotion")["share_left"]
    assert share["anger"] == pytest.approx(1 / math.sqrt(2)) and share["apology"] == pytest.approx(1.0)
    probe = pd.DataFrame({"strategy": ["last"], "boundary": [7], "register": [ALL], "accuracy": [0.9]})
    baselines = pd.DataFrame(
        {"baseline": ["keyword_rule"], "register": [ALL], "accuracy": [0.3], "chance": [0.25]}
    )
    flags = flag_vectors(cosines, probe, baselines, cosine_threshold=0.5).set_index("emotion")
    assert flags.loc["anger", "flagged"] and "exclamation (cos +0.71)" in flags.loc["anger", "reason"]
    assert not flags.loc["apology", "flagged"]


def test_flag_rule_baseline_arm():
    cosines = pd.DataFrame(
        {
            "strategy": "last",
            "boundary": [1, 2],
            "emotion": "anger",
            "nuisance": "length",
            "cosine": [0.1, 0.1],
        }
    )
    probe = pd.DataFrame({"strategy": "last", "boundary": [1, 2], "register": ALL, "accuracy": [0.97, 0.25]})
    baselines = pd.DataFrame(
        {
            "baseline": ["keyword_rule", "punctuation_length", "bag_of_words"],
            "register": ALL,
            "accuracy": [0.95, 0.25, 1.0],
            "chance": 0.25,
        }
    )
    flags = flag_vectors(cosines, probe, baselines, baseline_margin=0.05).set_index("boundary")
    assert flags.loc[1, "flagged"] and "keyword_rule acc 0.95" in flags.loc[1, "reason"]
    assert "bag_of_words" not in flags.loc[1, "reason"]  # the lexical ceiling is reported, not flagged
    # At boundary 2 the probe is at chance; the keyword rule beats it, punctuation (at chance) explains nothing.
    assert flags.loc[2, "flagged"] and "punctuation_length" not in flags.loc[2, "reason"]
    strict = flag_vectors(cosines, probe, baselines, flagging_baselines=()).set_index("boundary")
    assert not strict["flagged"].any()


def test_within_class_length_direction_excludes_emotion():
    """Emotion prompts are longer than neutral ones: a pooled length contrast would absorb the emotion
    direction; the within-class one recovers the planted length direction only."""
    g = torch.Generator().manual_seed(0)
    d = 32
    emotion_dir, length_dir = torch.eye(d)[0], torch.eye(d)[1]
    texts, labels, rows = [], [], []
    for label, base_len in (("anger", 12), ("neutral", 6)):
        for i in range(40):
            n = base_len + (i % 5)
            texts.append(" ".join(["word"] * n) + ".")
            labels.append(label)
            rows.append((4.0 if label == "anger" else 0.0) * emotion_dir + 0.5 * n * length_dir)
    acts = (torch.stack(rows) + 0.05 * torch.randn(len(rows), d, generator=g))[:, None, :]  # [n, 1, d]
    nuisances = class_contrast_nuisances({"mean": acts}, texts, labels, ["r"] * len(texts), np.ones(80, bool))
    length = next(n for n in nuisances if n.name == "length").directions["mean"][0]
    assert torch.cosine_similarity(length.float(), length_dir, dim=0) > 0.99
    assert abs(float(torch.cosine_similarity(length.float(), emotion_dir, dim=0))) < 0.05
    person = next(n for n in nuisances if n.name == "person")
    assert not person.estimated and torch.isnan(person.directions["mean"]).all()


def _register_data(seed: int = 0):
    """Two classes decodable from dimension 0 in register ``clear``, pure noise in register ``noisy``."""
    g = torch.Generator().manual_seed(seed)
    n, d = 240, 16
    labels = np.array(["anger", "neutral"] * (n // 2))
    registers = np.array(["clear"] * (n // 2) + ["noisy"] * (n // 2))
    acts = torch.randn(n, 1, d, generator=g)
    signal = torch.as_tensor((labels == "anger") & (registers == "clear"), dtype=torch.float32)
    acts[:, 0, 0] += 6 * signal - 3 * torch.as_tensor(registers == "clear", dtype=torch.float32)
    train = np.arange(n) % 3 != 0
    return acts, labels, registers, train


def test_probe_accuracy_per_register():
    acts, labels, registers, train = _register_data()
    probes = fit_layer_probes(acts, labels, train, seed=0)
    table = probe_by_register(probes, acts, labels, registers, ~train, boundaries=[5]).set_index("register")
    assert set(table.index) == {ALL, "clear", "noisy"}
    assert table.loc["clear", "accuracy"] >= 0.95
    assert table.loc["noisy", "accuracy"] <= 0.75
    assert table.loc[ALL, "n"] == table.loc["clear", "n"] + table.loc["noisy", "n"]
    assert (table["boundary"] == 5).all()


def test_validation_scores_probe_and_evaluator():
    acts, labels, registers, train = _register_data()
    probes: dict[str, LayerProbes] = {"last": fit_layer_probes(acts, labels, train, seed=0)}
    clear = registers == "clear"
    vset = ValidationSet(
        "external", ["t"] * int(clear.sum()), labels[clear].tolist(), ["x"] * int(clear.sum())
    )
    good = pd.DataFrame(
        {
            "emotion_anger": (labels[clear] == "anger").astype(float),
            "emotion_neutral": (labels[clear] != "anger"),
        }
    ).astype(float)
    table = validation_scores(
        probes, [vset], {"external": {"last": acts[clear]}}, [9], {"external": good},
        {"anger": "emotion_anger", "neutral": "emotion_neutral"},
    )  # fmt: skip
    probe_row = table[table["scorer"] == "probe"].iloc[0]
    assert probe_row["boundary"] == 9 and probe_row["accuracy"] >= 0.95
    evaluator_row = table[table["scorer"] == "evaluator"].iloc[0]
    assert evaluator_row["accuracy"] == 1.0
    missing = validation_scores(probes, [vset], {"external": {"last": acts[clear]}}, [9], None, None)
    assert math.isnan(missing[missing["scorer"] == "evaluator"]["accuracy"].iloc[0])
    assert missing[missing["scorer"] == "evaluator"]["note"].iloc[0] == "no evaluator scores"


def test_shipped_validation_set_is_new_and_balanced():
    dataset = PROJECT_ROOT / "data" / "prompts" / "emotion_prompts.jsonl"
    texts = [json.loads(line)["text"] for line in dataset.read_text(encoding="utf-8").splitlines() if line]
    vset = load_validation_set(PROJECT_ROOT / "data" / "validation" / "emotion_validation.jsonl", texts)
    counts = pd.Series(vset.labels).value_counts()
    assert set(counts.index) == set(EMOTIONS) and counts.min() >= 12
    frame = pd.DataFrame({"text": vset.texts, "emotion": vset.labels})
    ends = (
        frame.assign(end=frame["text"].str[-1]).groupby("emotion")["end"].value_counts().unstack(fill_value=0)
    )
    assert (ends.nunique() == 1).all()  # every class has the same final-punctuation counts


def test_validation_set_near_duplicate_of_dataset_is_refused(tmp_path):
    path = tmp_path / "external.jsonl"
    lines = [
        {"text": "Thank you so much for taking the time to review my application!", "emotion": "gratitude"},
        {"text": "The printer jammed twice and nobody came to fix it.", "emotion": "anger"},
        {"text": "Forgive me for the noise last night.", "emotion": "apology"},
        {"text": "The library opens at nine on weekdays.", "emotion": "neutral"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    dataset = ["Thank you so much for taking the time to review my application."]
    with pytest.raises(DatasetError, match=r"external\.jsonl line 1: near-duplicate of dataset prompt"):
        load_validation_set(path, dataset)
    assert load_validation_set(path, ["Something else entirely."]).name == "external"


def test_report_escapes_text_and_lists_missingalignment_control_table(tmp_path):
    from emotion_assets.alignment import subspace_alignment
    from emotion_assets.io import ProfileArtifacts
    from emotion_assets.report_tables import alignment_control_table, section_markdown
    from resources.storage import ArtifactStore, write_table

    store = ArtifactStore(root_dir=str(tmp_path))
    with store.publishing():
        write_table(
            store.directory("smoke", "subspace_alignment", "smollm2-135m__gemma3-270m")
            / "alignment_sweep.parquet",
            pd.DataFrame(
                {
                    "method": ["ridge"],
                    "emotion": ["<b>anger</b>"],
                    "layer_a": [3],
                    "layer_b": [2],
                    "k": [1],
                    "overlap": [0.4],
                    "null_p95": [0.1],
                    "chance": [0.01],
                    "beats_null": [True],
                    "specific": [True],
                    "headline_beats_null": [True],
                }
            ),
        )
    inputs = ProfileArtifacts.published(
        store, "smoke", {"subspace_alignment": subspace_alignment.partitions_def}
    )
    controls = alignment_control_table(inputs)
    status = controls.set_index("pair")["status"]
    assert status["smollm2-135m__gemma3-270m"] == "materialized"
    assert controls.set_index("pair").loc["smollm2-135m__gemma3-270m", "role"] == "headline"
    assert status["smollm2-135m-random__gemma3-270m"] == "not materialized"
    assert status["smollm2-135m__gemma3-270m-random"] == "not materialized"
    markdown = section_markdown("Alignment controls", controls)
    assert "&lt;b&gt;anger&lt;/b&gt;" in markdown and "<b>" not in markdown


def test_missing_validation_set_names_the_profile_field(tmp_path):
    from emotion_assets.science.confounds import load_validation_set

    with pytest.raises(FileNotFoundError, match="validation_sets"):
        load_validation_set(tmp_path / "absent.jsonl", [])
